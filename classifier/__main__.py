"""`python -m classifier <command>`: the project's command lines (classifier/cli)."""

import sys

from classifier.cli import main

sys.exit(main())
