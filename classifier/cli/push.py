"""`python -m classifier push BUNDLE OWNER/NAME`: upload a bundle with its model card to the Hub.

    python -m classifier push runs/x/bundle alice/cifar10-lite0 [--private] [--revision BRANCH] [--message MSG]

Only the bundle's own files go up (weights as safetensors, config.json, README.md, eval/); the token
comes from HF_TOKEN or `hf auth login` and is never printed. See classifier/publish.py.
"""

from __future__ import annotations

import argparse
import sys

from classifier.cli.common import report
from classifier.errors import USER_ERRORS
from classifier.hub import redact
from classifier.publish import push_bundle


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m classifier push", description=__doc__.split("\n")[0])
    p.add_argument("bundle", help="the bundle folder, e.g. runs/x/bundle")
    p.add_argument("repo_id", metavar="OWNER/NAME")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    p.add_argument("--message", default=None, help="commit message (default: architecture, data, accuracy)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = push_bundle(args.bundle, args.repo_id, private=args.private, revision=args.revision,
                             commit_message=args.message)
    except USER_ERRORS as exc:
        return report(redact(str(exc)))
    print(f"pushed {len(result.files)} files to {result.url}")
    print(f"commit: {result.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
