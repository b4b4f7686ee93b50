"""`python -m classifier pull OWNER/NAME`: download a bundle from the Hub, check that it loads, print its folder.

    python -m classifier pull alice/cifar10-lite0 [--revision R]

With HF_HUB_OFFLINE=1 it finds the bundle in the local Hugging Face cache or says why it cannot.
"""

from __future__ import annotations

import argparse
import sys

from classifier.bundle import load_bundle
from classifier.cli.common import report
from classifier.errors import USER_ERRORS
from classifier.hub import redact, validate_repo_id
from classifier.publish import accuracy_note


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m classifier pull", description=__doc__.split("\n")[0])
    p.add_argument("repo_id", metavar="OWNER/NAME")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        bundle = load_bundle(f"hf-hub:{validate_repo_id(args.repo_id)}", revision=args.revision)
    except USER_ERRORS as exc:
        return report(redact(str(exc)))
    score = accuracy_note(bundle)
    print(f"{bundle.architecture}: {len(bundle.label_names)} classes" + (f", {score}" if score else ""))
    print(bundle.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
