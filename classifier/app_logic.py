"""What the Gradio app shows, without Gradio: which bundles there are, one Predictor per bundle,
a timed prediction, the misclassified examples filtered by class, and the tables and text of the
Mistakes and Model tabs.

app.py only lays these out and wires events to them, so everything here is plain Python that the
tests call directly, and the app never re-derives anything from training data: it reads the bundle.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Sequence

from PIL import Image

from classifier.batching import BatchingPredictor
from classifier.bundle import CONFIG_FILE, EVAL_DIR, MISTAKES_FILE, Bundle, lineage
from classifier.errors import BundleError, HubError, ImageError
from classifier.images import IMAGE_EXTENSIONS, ImageSource
from classifier.model_card import describe_ingredient
from classifier.serving import DEFAULT_RUNTIME, load_predictor
from classifier.tta import describe_tta

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "assets" / "models"
EXAMPLES_DIR = REPO_ROOT / "assets" / "examples"
# The shipped bundles, best first: the fine-tuned EfficientNet-Lite0 beats the from-scratch CNN.
# Any other folder in assets/models comes after these, in name order.
PREFERRED_MODELS = ("cifar10-efficientnet-lite0", "cifar10-cnn")
ALL = "all"
# Format names for the extensions the library reads, for telling a person what to upload instead.
_FORMAT_NAMES = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WebP"}
_FORMATS = sorted({_FORMAT_NAMES.get(ext, ext.lstrip(".").upper()) for ext in IMAGE_EXTENSIONS})
READABLE_FORMATS = ", ".join(_FORMATS[:-1]) + " or " + _FORMATS[-1]  # "BMP, GIF, ... or WebP"
# Below this top (calibrated) probability the headline says the model is not sure and names the
# runner-up. 0.74 keeps 95% of the shipped default's held-out validation images and flags 57% of
# out-of-domain images, 42% of its own test mistakes and none of the example photos
# (docs/ood_study.md, benchmarks/results/ood_scores_cpu.md).
UNSURE_BELOW = 0.74
# Example images are shown in the browser, which cannot show TIFF: the library's formats less those.
IMAGE_SUFFIXES = tuple(sorted(IMAGE_EXTENSIONS - {".tif", ".tiff"}))


# ----------------------------------------------------------------------------------------------
# Which models there are, and the default


def find_bundles(models_dir: str | os.PathLike = MODELS_DIR) -> dict[str, str]:
    """{folder name: folder path} for every bundle (a folder with a config.json) in models_dir."""
    root = Path(models_dir)
    if not root.is_dir():
        return {}
    return {p.name: str(p) for p in sorted(root.iterdir()) if (p / CONFIG_FILE).is_file()}


def model_choices(models_dir: str | os.PathLike = MODELS_DIR, extra: str | None = None) -> dict[str, str]:
    """{name shown in the dropdown: location for load_predictor}; `extra` (MODEL_ID or --model, a
    folder or a Hub id) comes first, unless it is one of the shipped folders already."""
    shipped = find_bundles(models_dir)
    if not extra:
        return shipped
    for name, location in shipped.items():
        if Path(extra).expanduser().resolve() == Path(location).resolve():
            return shipped
    return {extra: extra, **shipped}


def default_model(choices: dict[str, str], requested: str | None = None,
                  preferred: Sequence[str] = PREFERRED_MODELS) -> str:
    """The dropdown name to start with: the requested one, else the first preferred, else the first."""
    if requested:
        for name, location in choices.items():
            if requested in (name, location) or (
                    Path(requested).expanduser().exists()
                    and Path(requested).expanduser().resolve() == Path(location).resolve()):
                return name
        raise BundleError(f"{requested}: not among the models {list(choices)}")
    for name in preferred:
        if name in choices:
            return name
    if not choices:
        raise BundleError("no model bundles to choose from")
    return next(iter(choices))


class ModelStore:
    """Loads each bundle once, on first use, and keeps its predictor for every later request.

    The predictor comes from classifier.serving.load_predictor, on `runtime` ("auto", "torch" or
    "onnx"): torch's Predictor or onnxruntime on the bundle's model.onnx, which answer alike.
    Gradio runs callbacks in worker threads, so two requests may ask for a model at the same time;
    a lock per model makes the second wait for the first load instead of loading it twice.
    `max_batch` over 1: the predictions asked for at the same time share forward passes, up to that
    many images each (classifier.batching).
    """

    def __init__(self, choices: dict[str, str], runtime: str = DEFAULT_RUNTIME, threads: int | None = None,
                 max_batch: int = 1):
        self.choices = dict(choices)
        self.runtime, self.threads, self.max_batch = runtime, threads, max_batch
        self._predictors: dict = {}
        self._locks = {name: threading.Lock() for name in self.choices}

    @property
    def names(self) -> list[str]:
        return list(self.choices)

    def location(self, name: str) -> str:
        if name not in self.choices:
            raise BundleError(f"unknown model {name!r}; choose one of {self.names}")
        return self.choices[name]

    def get(self, name: str):
        """The model's Predictor (or BundleOnnxPredictor: the same interface), loaded on first use."""
        location = self.location(name)
        with self._locks[name]:
            if name not in self._predictors:
                # With the test-time augmentation the bundle was evaluated with (the default of
                # both runtimes): its accuracy and temperature hold for those logits only.
                predictor = self._load(location, self.runtime, self.threads)
                # One throwaway prediction, so the first person to ask does not wait for the
                # runtime's lazy set-up (allocators, kernel choice), which made the first request
                # several times slower.
                predictor.predict(Image.new("RGB", (64, 64)))
                if self.max_batch > 1:
                    predictor = BatchingPredictor(predictor, self.max_batch)
                self._predictors[name] = predictor
            return self._predictors[name]

    def add(self, name: str, location: str) -> None:
        """A model made while the app runs (the Train tab's): listed from now on, loaded on first use."""
        self._locks.setdefault(name, threading.Lock())
        self.choices[name] = location

    def remove(self, name: str) -> None:
        self.choices.pop(name, None)
        predictor = self._predictors.pop(name, None)
        if isinstance(predictor, BatchingPredictor):
            predictor.close()  # its worker thread would otherwise wait for work for good

    @staticmethod
    def _load(location: str, runtime: str, threads: int | None):
        try:
            return load_predictor(location, runtime, threads=threads)
        except (BundleError, HubError):
            raise
        except Exception as exc:  # an unknown architecture, corrupt safetensors: still the bundle's fault
            raise BundleError(f"{location}: cannot load this bundle ({type(exc).__name__}: {exc})") from exc

    def bundle(self, name: str) -> Bundle:
        return self.get(name).bundle


# ----------------------------------------------------------------------------------------------
# Classify


def format_probability(p: float) -> str:
    """A probability as a percentage that never claims more certainty than there is: whole
    percents, one decimal where rounding would say 0% or 100%, and "<0.1%" or ">99.9%" beyond."""
    for digits in (0, 1):
        text = f"{p:.{digits}%}"
        if float(text[:-1]) not in (0.0, 100.0):
            return text
    return ">99.9%" if p > 0.5 else "<0.1%"


def probability_bars(probabilities: dict[str, float], top_k: int | None = None) -> str:
    """The Classify tab's bars as HTML: the `top_k` most likely classes, each with its probability as
    format_probability writes it and a bar as long as the probability. By hand rather than Gradio's
    Label, which rounds to whole percents: it showed 100% for 0.9995 and 0% for 0.004. Class names
    are escaped: a taught model's come from whoever taught it."""
    ranked = sorted(probabilities.items(), key=lambda item: item[1], reverse=True)[:top_k]
    rows = "".join(
        f'<div class="bar-row" role="meter" aria-label="{escape(name)}" aria-valuemin="0" aria-valuemax="100" '
        f'aria-valuenow="{100 * p:.1f}"><span class="bar-name">{escape(name)}</span>'
        f'<span class="bar-value">{escape(format_probability(p))}</span>'
        f'<span class="bar-track"><span class="bar-fill" style="width: {100 * p:.1f}%"></span></span></div>'
        for name, p in ranked)
    return f'<div class="probability-bars">{rows}</div>' if rows else ""


def headline(probabilities: dict[str, float], unsure_below: float = UNSURE_BELOW, out_of_domain: bool = False) -> str:
    """The top class and its probability; when that is below `unsure_below`, says so and names
    the runner-up too, so a coin toss is not read as an answer. `out_of_domain` (the bundle's
    out-of-distribution flag, classifier.ood) comes first: then the top class is only the closest."""
    ranked = sorted(probabilities.items(), key=lambda item: item[1], reverse=True)
    if not ranked:
        return ""
    (top, p), rest = ranked[0], ranked[1:]
    if out_of_domain:
        return f"This may be none of the model's classes (closest: {top} {format_probability(p)})"
    if p >= unsure_below or not rest:
        return f"{top} {format_probability(p)}"
    second, q = rest[0]
    return f"Not sure: {top} {format_probability(p)} or {second} {format_probability(q)}"


@dataclass
class Prediction:
    probabilities: dict[str, float]
    seconds: float
    out_of_domain: bool = False  # the bundle's out-of-distribution flag (classifier.ood)

    def headline(self) -> str:
        return headline(self.probabilities, out_of_domain=self.out_of_domain)

    def timing(self) -> str:
        return f"Predicted in **{self.seconds * 1000:.1f} ms** (decode, resize and model, on the CPU)"


@contextlib.contextmanager
def _named_by_upload(image: ImageSource):
    """An ImageError from reading `image` names the file by its own name (upload_error), not the
    server's temporary path, which means nothing to the person uploading."""
    try:
        yield
    except ImageError as exc:
        if isinstance(image, (str, os.PathLike)):
            raise ImageError(upload_error(Path(image).name, exc)) from exc
        raise


def classify(predictor, image: ImageSource, top_k: int | None = None) -> Prediction:
    """A timed, calibrated prediction; an unusable image raises ImageError naming the file by its
    own name (not the server's temporary path, which means nothing to the person uploading)."""
    start = time.perf_counter()
    with _named_by_upload(image):
        probabilities, score = predictor.predict_scored(image, top_k=top_k)
    return Prediction(probabilities, time.perf_counter() - start, predictor.out_of_domain(score))


@dataclass
class Explanation:
    """A Grad-CAM picture (Predictor.explain) and what it shows, in words for the panel's label."""

    picture: Image.Image
    label: str
    seconds: float

    def title(self) -> str:
        return f"Where the model looked for {self.label} (Grad-CAM; red: most evidence)"


def explain(predictor: Predictor, image: ImageSource, label: str | None = None) -> Explanation:
    """Where the model found the evidence for `label` (by default its top class) in `image`, timed;
    bad images raise ImageError with the upload's own name, as classify does."""
    start = time.perf_counter()
    with _named_by_upload(image):
        picture, label = predictor.explain(image, label)
    return Explanation(picture, label, time.perf_counter() - start)


def upload_error(name: str, error: ImageError) -> str:
    """One sentence for the person who uploaded `name`: what is wrong in plain words (not Pillow's
    jargon, which classifier.images keeps apart as detail) and which formats do work."""
    problem = getattr(error, "problem", None) or "cannot be read as an image"
    return f"{name} {problem}. Upload a {READABLE_FORMATS} image instead."


def example_images(folder: str | os.PathLike = EXAMPLES_DIR) -> list[str]:
    root = Path(folder)
    if not root.is_dir():
        return []
    return [str(p) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]


def example_caption(path: str | os.PathLike) -> str:
    """The caption the app shows for an example photo: its file's stem, which is the class it shows
    ("deer.jpg" -> "deer"), so a person knows the true class before clicking. One word keeps ten of
    them on a phone's screen."""
    return Path(path).stem


# ----------------------------------------------------------------------------------------------
# Mistakes


@dataclass
class EvalReport:
    """A bundle's eval/ folder: the metrics of the split it shows (test, or validation for a bundle
    measured on held-out or cross-validated images, as taught ones are) and its saved mistakes."""

    labels: list[str]
    eval_dir: Path
    metrics: dict = field(default_factory=dict)
    mistakes: list[dict] = field(default_factory=list)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> "EvalReport":
        eval_dir = bundle.eval_path()
        metrics = bundle.eval_metrics() or {}
        index = eval_dir / MISTAKES_FILE
        mistakes = json.loads(index.read_text()) if index.is_file() else []
        # Keep only entries whose thumbnail is there: a gallery of broken images helps no one.
        mistakes = [m for m in mistakes if (eval_dir / m["file"]).is_file()]
        return cls(bundle.label_names, eval_dir, metrics, mistakes)

    @property
    def split(self) -> str:
        """The split the metrics and mistakes come from, as the texts name it: "test" or "validation"."""
        return self.metrics.get("split", "test")

    @property
    def confusion_matrix(self) -> list[list[int]]:
        return self.metrics.get("confusion_matrix") or []

    def image(self, name: str) -> str | None:
        path = self.eval_dir / name
        return str(path) if path.is_file() else None

    def filter(self, true: str = ALL, predicted: str = ALL) -> list[dict]:
        for name in (true, predicted):
            if name not in (ALL, None) and name not in self.labels:
                raise ValueError(f"{name!r} is not a class of this model ({', '.join(self.labels)})")
        return [m for m in self.mistakes
                if true in (ALL, None, m["true"]) and predicted in (ALL, None, m["predicted"])]

    def mistake_at(self, index: int, true: str = ALL, predicted: str = ALL) -> dict:
        """The mistake shown at `index` of gallery(true, predicted), with its thumbnail's full path
        under "path"; IndexError when the gallery has no such place."""
        shown = self.filter(true, predicted)
        if not 0 <= index < len(shown):
            raise IndexError(f"no mistake at place {index} of {len(shown)} shown")
        return shown[index] | {"path": str(self.eval_dir / shown[index]["file"])}

    def gallery(self, true: str = ALL, predicted: str = ALL) -> list[tuple[str, str]]:
        """(thumbnail path, caption) for each matching mistake, worst first."""
        return [(str(self.eval_dir / m["file"]), caption(m)) for m in self.filter(true, predicted)]

    def summary(self, true: str = ALL, predicted: str = ALL) -> str:
        shown = len(self.filter(true, predicted))
        if not self.metrics and not self.mistakes:
            return "This bundle has no evaluation (no eval/ folder)."
        if shown == 0 and not (true not in (ALL, None) and true == predicted):
            return self.empty_note(true, predicted)
        text = f"**{shown}** misclassified {self.split} image{'s' if shown != 1 else ''} shown"
        errors = self.errors_in_split(true, predicted)
        if errors is not None and errors != shown:
            # The bundle keeps the highest-loss mistakes only (training's --mistakes).
            text += f" of {errors} in the {self.split} set (the bundle keeps the most confident mistakes)"
        if true not in (ALL, None) and true == predicted:
            text += f". *{true} → {true}* are the correct predictions: pick two different classes"
        return text + "."

    def empty_note(self, true: str = ALL, predicted: str = ALL) -> str:
        """Why the gallery is empty, in plain words: an empty gallery alone reads as a broken page.
        It tells apart "the model never made this mistake" from "it did, but the bundle kept
        other mistakes" (only the most confident ones are saved)."""
        true_part = f"{self.split} images" + ("" if true in (ALL, None) else f" of {true}")
        predicted_part = "" if predicted in (ALL, None) else f" for {predicted}"
        errors = self.errors_in_split(true, predicted)
        if errors is None:  # no confusion matrix: only the saved mistakes are known
            return "No saved mistakes match these classes."
        if errors:
            return (f"None of the {errors} {true_part} taken{predicted_part or ' for another class'} "
                    f"were kept in this bundle (it keeps the most confident mistakes only).")
        if predicted_part:
            return f"No {true_part} were taken{predicted_part}."
        return f"No {true_part} were misclassified."

    def most_confused(self, limit: int = 10) -> list[tuple[str, str, int]]:
        """(true class, predicted class, count) for the off-diagonal cells of the confusion matrix
        that are not zero, most frequent first, like fastai's most_confused(min_val=1): the pairs
        worth looking at first, without reading the whole matrix. Ties keep the matrix order."""
        pairs = [(self.labels[r], self.labels[c], int(count))
                 for r, row in enumerate(self.confusion_matrix) for c, count in enumerate(row)
                 if r != c and count > 0]
        return sorted(pairs, key=lambda pair: -pair[2])[:limit]

    def most_confused_table(self, limit: int = 10) -> tuple[list[str], list[list]]:
        return ["true", "predicted", "images"], [list(pair) for pair in self.most_confused(limit)]

    def errors_in_split(self, true: str = ALL, predicted: str = ALL) -> int | None:
        """How many images of the split the confusion matrix counts as `true` predicted as `predicted`."""
        matrix = self.confusion_matrix
        if not matrix:
            return None
        rows = range(len(self.labels)) if true in (ALL, None) else [self.labels.index(true)]
        cols = range(len(self.labels)) if predicted in (ALL, None) else [self.labels.index(predicted)]
        return sum(matrix[r][c] for r in rows for c in cols if r != c)

    def per_class_table(self) -> tuple[list[str], list[list]]:
        headers = ["class", "precision", "recall", "F1", "support"]
        rows = [[c["class"], round(c["precision"], 3), round(c["recall"], 3), round(c["f1"], 3),
                 int(c["support"])] for c in self.metrics.get("per_class", [])]
        return headers, rows

    def confusion_table(self) -> tuple[list[str], list[list]]:
        """Rows are true classes, columns predicted ones; the first column names the row."""
        headers = ["true \\ predicted", *self.labels]
        rows = [[label, *map(int, counts)] for label, counts in zip(self.labels, self.confusion_matrix)]
        return headers, rows

    def filters_for_cell(self, true_label: str, column: int) -> tuple[str, str]:
        """The (true, predicted) filters for a clicked cell of confusion_table: its row's class and
        its column's class, or every prediction when the clicked cell is the row's name."""
        if true_label not in self.labels:
            return ALL, ALL
        if column <= 0 or column > len(self.labels):
            return true_label, ALL
        return true_label, self.labels[column - 1]


def _probability(mistake: dict, key: str, label: str) -> float | None:
    """mistake[key], else the class's entry in its top-k "top" dict, else None: older or
    hand-written mistakes.json files may lack p_true, and "top" rarely holds the true class."""
    value = mistake.get(key)
    if value is None:
        value = (mistake.get("top") or {}).get(label)
    return float(value) if isinstance(value, (int, float)) else None


def caption(mistake: dict) -> str:
    """"cat (true, 12%) → dog 81%": both probabilities, since how little the model believed the
    true class says as much as how sure it was of the wrong one. A missing one is left out."""
    true, predicted = mistake["true"], mistake["predicted"]
    p_true = _probability(mistake, "p_true", true)
    p_predicted = _probability(mistake, "p_predicted", predicted)
    left = f"{true} (true, {format_probability(p_true)})" if p_true is not None else f"{true} (true)"
    right = f"{predicted} {format_probability(p_predicted)}" if p_predicted is not None else predicted
    return f"{left} → {right}"


def servable_dirs(bundle_dir: str | os.PathLike) -> list[Path]:
    """The folders the app must be allowed to serve for a bundle's eval/ images. A Hub download
    is a folder of symlinks into the cache's blobs/, and Gradio checks the resolved path, so the
    targets' folders are listed too. Never the bundle root, whose weights nobody needs to fetch."""
    eval_dir = Path(bundle_dir) / EVAL_DIR
    if not eval_dir.is_dir():
        return []
    dirs = {eval_dir.resolve()}
    dirs.update(p.resolve().parent for p in eval_dir.rglob("*") if p.is_file())
    return sorted(dirs)


# ----------------------------------------------------------------------------------------------
# Model


def _percent(value) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "unknown"


def describe_source(location: str) -> str:
    path = Path(location).expanduser()
    if path.exists():
        try:
            return f"local folder `{path.resolve().relative_to(REPO_ROOT)}`"
        except ValueError:
            return f"local folder `{path.resolve()}`"
    repo_id = location.removeprefix("hf-hub:")
    return f"Hugging Face Hub [{repo_id}](https://huggingface.co/{repo_id})"


def model_summary(bundle: Bundle, location: str) -> str:
    """The Model tab as a Markdown table: what it is, what it was trained on, how good it is."""
    project = bundle.project
    metrics = bundle.metrics()
    calibration = metrics.get("calibration", {})
    parameters = project.get("parameters") or (sum(p.numel() for p in bundle.model.parameters())
                                               if bundle.model is not None else None)  # None: ONNX served
    dataset = project.get("dataset", "unknown")
    counts = [f"{project[k]:,} {k.removeprefix('num_')}" for k in ("num_train", "num_val", "num_test")
              if isinstance(project.get(k), int)]
    if counts:
        dataset += f" ({', '.join(counts)} images)"
    input_size = "x".join(str(v) for v in bundle.pretrained_cfg["input_size"][1:])
    base = project.get("base_model") or ("ImageNet weights" if project.get("pretrained") else "none (from scratch)")
    ece_before = calibration.get("ece_before", metrics.get("ece_before_calibration"))
    ece_after = calibration.get("ece_after", metrics.get("ece"))
    rows = [
        ("Architecture", f"`{bundle.architecture}`, {input_size} px input"),
        ("Parameters", f"{parameters:,}" if parameters else "not recorded"),
        ("Classes", ", ".join(bundle.label_names)),
        ("Dataset", dataset),
        ("Pretrained from", base),
        (f"{metrics.get('split', 'test').capitalize()} accuracy", _percent(metrics.get("accuracy"))
         + (f" (macro F1 {metrics['macro_f1']:.3f})" if "macro_f1" in metrics else "")),
        ("Test-time augmentation", describe_tta(bundle.tta) + (", in testing and here" if bundle.tta != "none" else "")),
        ("Calibration", f"temperature {bundle.temperature:.3f}; expected calibration error "
                        f"{_percent(ece_before)} before, {_percent(ece_after)} after"),
        ("Source", describe_source(location)),
        *((f"Training stage {number}", f"`{stage.get('command') or 'not recorded'}` "
           f"({_percent(stage.get('accuracy'))} test accuracy)")
          for number, stage in enumerate(lineage(project), start=1)),
        *((f"Averaged model {number}", f"{describe_ingredient(ingredient)}: "
           f"`{ingredient.get('command') or 'not recorded'}`"
           + (f", after {len(lineage(ingredient))} earlier stage(s), listed on the model card" if ingredient.get("started_from") else ""))
          for number, ingredient in enumerate(project.get("soup", {}).get("ingredients", []), start=1)),
        ("Averaging command" if project.get("soup") else "Training command",
         f"`{project['command']}`" if project.get("command") else "not recorded"),
        *((("Evaluation command", f"`{project['evaluation_command']}`"),) if project.get("evaluation_command") else ()),
        ("Library versions", ", ".join(f"{k} {v}" for k, v in project.get("versions", {}).items()) or "not recorded"),
    ]
    # A "|" inside a cell (a shell pipe in the command, say) would end the cell early.
    lines = [f"| {key} | {str(value).replace('|', chr(92) + '|')} |" for key, value in rows]
    return "\n".join([lines[0], "|---|---|", *lines[1:]]) + "\n"
