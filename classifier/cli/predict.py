"""`python -m classifier predict BUNDLE IMAGE [IMAGE or FOLDER ...]`: classify images with a bundle.

    python -m classifier predict runs/latest/bundle photo.jpg                 top-5 classes per image
    python -m classifier predict owner/name photo.jpg --plot photo-pred.png    image beside a bar chart
    python -m classifier predict runs/latest/bundle a.jpg b.png --json         for scripts
    python -m classifier predict runs/latest/bundle test/ --submission out.csv
    python -m classifier predict runs/latest/bundle --csv test.csv --image-dir test/ --submission out.csv

A folder stands for every image under it (the id is the file name without its extension); a CSV
with an `id` column names the images by id, found in --image-dir as `<id>` or `<id>.<ext>`, and
the submission keeps the CSV's order. An image that cannot be read gets one error line on stderr,
the others are still predicted, and the exit status is 1 (2 when nothing could run at all).

A labelled folder -- images in folders named after the model's classes, root/<class>/* or
root/test/<class>/* -- is scored too: the accuracy with its 95% interval, per class, and every
mistake written to --mistakes (a CSV: image, true class, predicted class, probabilities).

    python -m classifier predict runs/latest/bundle my-labelled-photos/ --mistakes mistakes.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from classifier.allocator import keep_freed_memory
from classifier.cli.common import report
from classifier.errors import USER_ERRORS, ImageError, InputError
from classifier.images import IMAGE_EXTENSIONS, list_images, open_image
from classifier.intervals import describe_accuracy, wilson_interval
from classifier.serving import DEFAULT_RUNTIME, RUNTIMES, load_predictor, pick_runtime
from classifier.tta import TTA_MODES

PLOT_MAX_IMAGES = 12  # a figure with more rows than this is unreadable

@dataclass
class Item:
    id: str  # what the submission calls the image: the CSV id, or the file name without extension
    path: Path | None  # None: the CSV names an id with no image file
    predictions: dict[str, float] | None = None
    error: str | None = None
    folder: str | None = None  # the name of the folder the image is in, when it came from a folder given
    label: str | None = None  # its true class: the folder's name, when that is one of the model's classes


def _images_under(folder: Path) -> list[Path]:
    return sorted(map(Path, list_images(folder)))  # Path order, as before (it differs from str order)


def items_from_paths(paths: Iterable[str | os.PathLike]) -> list[Item]:
    """Files as given (whatever their extension: the decoder decides), folders expanded."""
    items = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = _images_under(path)
            if not found:
                raise InputError(f"{path}: the folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            items += [Item(p.stem, p, folder=p.parent.name if p.parent != path else None) for p in found]
        else:
            items.append(Item(path.stem, path))  # a missing file becomes that image's error line
    return items


def items_from_csv(csv_path: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> list[Item]:
    """One item per row of a CSV with an `id` column (any other columns are ignored)."""
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: no such CSV file")
    image_dir = Path(image_dir).expanduser() if image_dir else csv_path.parent
    if not image_dir.is_dir():
        raise InputError(f"{image_dir}: no such image folder")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        columns = {c.strip().lower(): c for c in reader.fieldnames or []}
        if "id" not in columns:
            raise InputError(f"{csv_path}: needs an 'id' column, found {reader.fieldnames}")
        ids = [row[columns["id"]].strip() for row in reader]
    by_name: dict[str, Path] = {}
    for path in _images_under(image_dir):
        by_name.setdefault(path.stem, path)
        by_name.setdefault(path.name, path)
    return [Item(i, by_name[i]) if i in by_name else Item(i, None, error=f"{i}: no image with this id in {image_dir}")
            for i in ids]


def _load(predictor, item: Item):
    """The item's preprocessed image (a torch tensor or a numpy array, as the runtime takes it)."""
    if item.error:
        return None
    try:
        return predictor.preprocess(item.path)
    except ImageError as exc:
        item.error = str(exc)
        return None


def predict_items(predictor, items: list[Item], top_k: int = 5, batch_size: int = 64) -> Iterator[Item]:
    """Fill each item's predictions (or error) in batches, yielding items in order as they finish."""
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        tensors = [(item, _load(predictor, item)) for item in chunk]
        good = [(item, x) for item, x in tensors if x is not None]
        if good:
            probs = predictor.probabilities(predictor.stack([x for _, x in good]))
            for (item, _), p in zip(good, probs):
                item.predictions = predictor.top_classes(p, top_k)
        yield from chunk


def write_submission(items: list[Item], path: str | os.PathLike) -> int:
    """id,label for each predicted item (the top class); returns the number of rows."""
    rows = [(item.id, next(iter(item.predictions))) for item in items if item.predictions]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label"])
        writer.writerows(rows)
    return len(rows)


def plot_predictions(items: list[Item], path: str | os.PathLike, channels: int = 3) -> Path:
    """One row per image: the image on the left, its top classes as horizontal bars on the right."""
    # Imported here, not at the top: only --plot draws, and a plain prediction should not pay for
    # loading matplotlib (serving imports none of it; tests/test_house.py holds that).
    from classifier.plots import plot_predictions as draw

    shown = [item for item in items if item.predictions][:PLOT_MAX_IMAGES]
    if not shown:
        raise InputError("no image could be predicted, so there is nothing to plot")
    return draw([(item.path.name, open_image(item.path, channels), item.predictions) for item in shown], path)


def label_items(items: list[Item], labels: list[str]) -> int:
    """Give each image in a folder named after one of the model's classes that class as its true
    label (root/<class>/*); returns how many are labelled."""
    known = set(labels)
    for item in items:
        item.label = item.folder if item.folder in known else None
    return sum(item.label is not None for item in items)


def score(items: list[Item]) -> str:
    """The accuracy on the labelled images that were predicted, with its interval, and per class."""
    scored = [item for item in items if item.label and item.predictions]
    right = [item for item in scored if next(iter(item.predictions)) == item.label]
    lines = [f"labelled images: {len(right)} of {len(scored)} right, accuracy "
             f"{describe_accuracy(len(right) / len(scored), wilson_interval(len(right), len(scored)), len(scored))}"]
    for label in sorted({item.label for item in scored}):
        mine = [item for item in scored if item.label == label]
        hits = sum(next(iter(item.predictions)) == label for item in mine)
        lines.append(f"  {label}: {describe_accuracy(hits / len(mine), wilson_interval(hits, len(mine)), len(mine))}")
    return "\n".join(lines)


def write_mistakes(items: list[Item], path: str | os.PathLike) -> int:
    """image,true,predicted,p_predicted,p_true for each labelled image predicted wrong, the most
    confident mistakes first; returns how many."""
    wrong = [item for item in items if item.label and item.predictions and next(iter(item.predictions)) != item.label]
    wrong.sort(key=lambda item: item.predictions.get(item.label, 0.0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "true", "predicted", "p_predicted", "p_true"])
        for item in wrong:
            predicted, p = next(iter(item.predictions.items()))
            writer.writerow([str(item.path), item.label, predicted, f"{p:.4f}",
                             f"{item.predictions.get(item.label, 0.0):.4f}"])
    return len(wrong)


def format_item(item: Item, top_k: int | None = None) -> str:
    shown = list(item.predictions.items())[:top_k]
    lines = [str(item.path) + (f"  (true: {item.label})" if item.label else "")]
    width = max(len(name) for name, _ in shown)
    for name, p in shown:
        lines.append(f"  {name:<{width}}  {p:7.2%}  {'#' * int(round(p * 20))}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m classifier predict",
                                description="Predict the classes of images with a trained bundle.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("bundle", help="a bundle folder (runs/NAME/bundle) or a Hub id (owner/name)")
    p.add_argument("images", nargs="*", help="image files and folders of images")
    p.add_argument("--csv", help="a CSV with an 'id' column naming the images (test.csv of a contest)")
    p.add_argument("--image-dir", help="with --csv: the folder of images (default: the CSV's folder)")
    p.add_argument("--top-k", type=int, default=5, help="classes to show per image")
    p.add_argument("--mistakes", metavar="CSV", default="mistakes.csv",
                   help="with a labelled folder (root/<class>/*): where to write the images predicted wrong")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--plot", metavar="PNG", help=f"save the images beside bar charts (the first {PLOT_MAX_IMAGES})")
    p.add_argument("--submission", metavar="CSV", help="write id,label (the top class) for every image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tta", choices=list(TTA_MODES), default=None,
                   help="test-time augmentation (default: the one the bundle was evaluated with, which its "
                        "probabilities are calibrated for)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (the torch runtime)")
    p.add_argument("--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME,
                   help="torch, onnx (the bundle's model.onnx on onnxruntime, no torch needed) or auto: "
                        "torch where installed, else onnx")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.images and not args.csv:
        print("error: give image files or folders, or --csv ids.csv", file=sys.stderr)
        return 2
    if args.top_k < 1:
        print("error: --top-k must be at least 1", file=sys.stderr)
        return 2
    try:
        items = items_from_paths(args.images) + (items_from_csv(args.csv, args.image_dir) if args.csv else [])
        runtime = pick_runtime(args.runtime, args.bundle)
        if runtime == "torch":
            from classifier.runtime import pick_device  # torch's devices; imported only for that runtime

            device = pick_device(args.device)
            keep_freed_memory(device)  # faster CPU predictions: see classifier/allocator.py
        else:
            device = args.device
            keep_freed_memory()
        predictor = load_predictor(args.bundle, runtime, device=str(device), tta=args.tta)
    except USER_ERRORS as exc:
        return report(exc)

    quiet = args.json or args.submission  # a contest's thousands of images: a summary, not pages of text
    labelled = label_items(items, predictor.labels)
    # Scoring needs the true class's probability, whatever --top-k shows.
    top_k = len(predictor.labels) if labelled else args.top_k
    for item in predict_items(predictor, items, top_k, args.batch_size):
        if item.error:
            print(f"error: {item.error}", file=sys.stderr)
        elif not quiet:
            print(format_item(item, args.top_k))
    failed = [item for item in items if item.error]
    summary_stream = sys.stderr if args.json else sys.stdout
    if labelled and any(item.label and item.predictions for item in items):
        print(score(items), file=summary_stream)
        wrong = write_mistakes(items, args.mistakes)
        print(f"wrote {wrong} mistake(s) to {args.mistakes}", file=summary_stream)

    if args.json:
        print(json.dumps([{"id": item.id, "image": str(item.path) if item.path else None,
                           **({"label": item.label} if item.label else {}),
                           **({"predictions": dict(list(item.predictions.items())[:args.top_k])} if item.predictions
                              else {"error": item.error})}
                          for item in items], indent=1))
    if args.submission:
        rows = write_submission(items, args.submission)
        print(f"wrote {rows} prediction(s) to {args.submission}", file=sys.stderr if args.json else sys.stdout)
        if failed:
            print(f"warning: {len(failed)} id(s) have no prediction and are missing from {args.submission}",
                  file=sys.stderr)
    if args.plot:
        try:
            plot = plot_predictions(items, args.plot, predictor.bundle.in_chans)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
        else:
            extra = sum(1 for item in items if item.predictions) - PLOT_MAX_IMAGES
            note = f" (the first {PLOT_MAX_IMAGES}; {extra} more not shown)" if extra > 0 else ""
            print(f"plot: {plot}{note}", file=sys.stderr if args.json else sys.stdout)
    if failed and len(failed) == len(items):
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
