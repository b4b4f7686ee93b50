"""`python -m classifier deploy --space OWNER/NAME`: put the demo app with chosen bundles on a Hugging Face Space.

    python -m classifier deploy --space alice/cifar10-demo [--model BUNDLE ...] [--dry-run] [--staging DIR]
    python -m classifier deploy --space alice/cifar10-demo --runtime onnx   # onnxruntime, no torch

The Space's files (app.py, classifier/, the bundles under assets/models/, README.md, .gitattributes,
requirements.txt) are staged in a folder, then uploaded; --dry-run lists them with their sizes and
uploads nothing. The token comes from HF_TOKEN or `hf auth login` and is never printed. See
classifier/space.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from classifier.cli.common import report
from classifier.errors import USER_ERRORS
from classifier.hub import redact, validate_repo_id
from classifier.space import RUNTIMES, deploy_space

PROG = "python -m classifier deploy"


def space_id(text: str) -> str:
    try:
        return validate_repo_id(text)
    except USER_ERRORS as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--space", required=True, type=space_id, metavar="OWNER/NAME", help="the Space to create or update")
    p.add_argument("--model", action="append", default=None, metavar="BUNDLE",
                   help="a bundle folder to serve; repeat for more (default: the bundles in assets/models)")
    p.add_argument("--dry-run", action="store_true", help="stage and list the files with their sizes; upload nothing")
    p.add_argument("--staging", default=None, metavar="DIR",
                   help="stage into this (absent or empty) folder and keep it (default: a temporary folder)")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch",
                   help="what the Space serves with: torch (its CPU build) or onnx (each bundle's model.onnx on "
                        "onnxruntime, exported now where missing; a far smaller install)")
    p.add_argument("--private", action="store_true", help="create the Space private")
    p.add_argument("--message", default=None, help="commit message")
    return p


def print_files(files: list[tuple[str, int]]) -> None:
    width = max(len(path) for path, _ in files)
    for path, size in files:
        print(f"  {path:<{width}}  {size:>12,} B")
    print(f"{len(files)} files, {sum(size for _, size in files) / 1e6:.1f} MB")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="space-") as scratch:
        try:
            result = deploy_space(args.space, args.model, args.staging or scratch, dry_run=args.dry_run,
                                  private=args.private, commit_message=args.message, runtime=args.runtime)
        except USER_ERRORS as exc:
            return report(redact(str(exc)))
    if args.dry_run:
        print(f"dry run: would upload to {result.url}" + (f" (staged in {args.staging})" if args.staging else ""))
        print_files(result.files)
        print(f"requirements.txt: {result.requirements}")
        return 0
    print(f"deployed {len(result.files)} files to {result.url}")
    print(f"commit: {result.commit_url}")
    print(f"requirements.txt: {result.requirements}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
