"""`python -m classifier export BUNDLE`: write the bundle's model.onnx and check it against torch.

    python -m classifier export runs/x/bundle [--out FILE] [--opset 18] [--images FILE_OR_FOLDER ...]

The check runs the ONNX model and the bundle's Predictor on the same images (by default the test
images the bundle's evaluation kept, eval/mistakes/) and prints the largest difference in
probability and how often both agree on the top class. See classifier/export.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from classifier.bundle import load_bundle
from classifier.cli.common import positive_int, report
from classifier.data import list_images
from classifier.errors import USER_ERRORS
from classifier.export import DEFAULT_OPSET, bundle_sample_images, export_onnx, verify_onnx

PROG = "python -m classifier export"
DEFAULT_LIMIT = 200  # images checked: every thumbnail a shipped bundle keeps, in seconds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("bundle", help="the bundle folder, e.g. runs/x/bundle")
    p.add_argument("--out", default=None, help="where to write the model (default: BUNDLE/model.onnx)")
    p.add_argument("--opset", type=positive_int("--opset"), default=DEFAULT_OPSET, help="ONNX opset version")
    p.add_argument("--images", nargs="+", default=None, metavar="PATH",
                   help="images or folders of images to verify on (default: the bundle's eval/mistakes thumbnails)")
    p.add_argument("--limit", type=positive_int("--limit"), default=DEFAULT_LIMIT, help="images verified at most")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="export only, compare nothing")
    return p


def verification_images(bundle, given: list[str] | None, limit: int) -> list[str]:
    """The images named (folders expanded), else the bundle's own test thumbnails; at most `limit`."""
    if given is None:
        return [str(p) for p in bundle_sample_images(bundle, limit)]
    found = []
    for item in map(Path, given):
        if not item.exists():
            raise FileNotFoundError(f"{item}: no such image or folder")
        found += list_images(item) if item.is_dir() else [str(item)]
    return found[:limit]


def print_verification(result: dict) -> None:
    print(f"verified on {result['images']} images against torch:")
    print(f"  max probability difference  {result['max_abs_diff']:.2e}   "
          f"(end to end, ONNX preprocessing: {result['runtime_max_abs_diff']:.2e})")
    print(f"  top-1 agreement             {result['top1_agreement']:.2%}   "
          f"(end to end: {result['runtime_top1_agreement']:.2%})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        bundle = load_bundle(args.bundle)
        images = verification_images(bundle, args.images, args.limit) if args.verify else []
        path = export_onnx(bundle, args.out, opset=args.opset)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, opset {args.opset})")
        if not args.verify:
            return 0
        if not images:  # a model that made no mistakes kept no thumbnails: say so, do not fail the export
            print("not verified: the bundle keeps no test images (eval/mistakes/); pass --images")
            return 0
        print_verification(verify_onnx(bundle, path, images))
    except (*USER_ERRORS, FileNotFoundError) as exc:
        return report(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
