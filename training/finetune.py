#!/usr/bin/env python
"""Train or fine-tune an image classifier and save it as a bundle: `python -m classifier train`.

    python training/finetune.py --data path/to/photos --model tf_efficientnet_lite0 --epochs 5
    torchrun --nproc_per_node=4 training/finetune.py ...

The command line itself lives in classifier/cli/train.py; this file keeps the path that users of
the project (and its tutorials) know, and runs from a checkout without installing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from classifier.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
