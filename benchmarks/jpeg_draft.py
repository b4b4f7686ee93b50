#!/usr/bin/env python
"""A 48-megapixel JPEG upload through Predictor.predict on the shipped default, decoded whole vs
with Pillow's draft() (classifier.images._draft), one torch thread, median of 5:

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/jpeg_draft.py

The photo is made here: smooth colours with a little grain, 8000x6000, ~8.9 MB at quality 90
(under the app's 10 MB upload limit). Compare the two as a ratio: the machine is shared.
"""

import tempfile
import time

import numpy as np
import torch
from PIL import Image

from classifier import images
from classifier.predict import Predictor

torch.set_num_threads(1)
PHOTO = f"{tempfile.gettempdir()}/big48.jpg"


def median_ms(f, n=5):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2] * 1000


def main():
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).resize((8000, 6000), Image.BICUBIC)
    grain = rng.normal(0, 3, (6000, 8000, 1)).astype(np.float32)
    Image.fromarray(np.clip(np.asarray(smooth, np.float32) + grain, 0, 255).astype(np.uint8)).save(PHOTO, quality=90)
    predictor = Predictor("assets/models/cifar10-efficientnet-lite0")
    drafted = median_ms(lambda: predictor.predict(PHOTO))
    threshold, images.DRAFT_ABOVE_PIXELS = images.DRAFT_ABOVE_PIXELS, 10**12  # never draft
    try:
        whole = median_ms(lambda: predictor.predict(PHOTO))
    finally:
        images.DRAFT_ABOVE_PIXELS = threshold
    print(f"48 MP JPEG (8000x6000), Predictor.predict, cifar10-efficientnet-lite0, 1 thread, median of 5: "
          f"whole decode {whole:.0f} ms, draft {drafted:.0f} ms ({whole / drafted:.1f}x)")


if __name__ == "__main__":
    main()
