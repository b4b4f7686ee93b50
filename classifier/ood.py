"""Out-of-distribution flag: "this may be none of the model's classes".

The score is the energy of the calibrated logits, logsumexp(logits / T): high when some class
answers strongly, low when none does. docs/ood_study.md measured it against the top probability
(MSP) on the shipped CIFAR-10 model: at the same false-alarm rate it flags more of the junk (text
98% vs 74%, gradients 98% vs 70%, pooled out-of-domain images 68% vs 57%) and fewer of the model's
own mistakes, so the MSP keeps the "Not sure" message and energy gets the "none of my classes" one.

The threshold is a property of one bundle: fitted at evaluation time on its validation split (never
trained on), as the energy below which KEEP_IN_DOMAIN's complement of those images fall, and stored
in config.json (bundle.OOD_FIELD). Its rates are then measured on the shown split (false positives:
in-domain images flagged) and on out-of-domain images built here, offline (true positives):
synthetic noise, gradients, flat colours, patterns and rendered text, plus any labelled data set
of other classes (Fashion-MNIST for a CIFAR-10 model, say) that the evaluation is given
(classifier.evaluate.measure_ood runs the model over them).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

SCORE = "energy"
# 95% of in-domain validation images pass: the study's operating point (5% false alarms on
# CIFAR-10 test), the usual "FPR at 95% TPR" convention turned around.
KEEP_IN_DOMAIN = 0.95
SYNTHETIC_PER_KIND = 100
SYNTHETIC_SIZE = 96  # like a small upload: larger than CIFAR, so a bundle's shrink-to-source applies
SYNTHETIC_KINDS = ("noise", "smooth noise", "gradient", "flat colour", "pattern", "text")
_WORDS = ("the quick brown fox jumps over lazy dog settings file edit view help error warning "
          "install python import model config data train test loss accuracy total price name date").split()


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The OOD score of each row of `logits`: logsumexp(logits / T); lower is less like the classes."""
    return torch.logsumexp(logits.float() / temperature, dim=-1)


def is_out_of_domain(score: float, threshold: float | None) -> bool:
    """Whether an energy falls below a bundle's threshold; never, for a bundle without one."""
    return threshold is not None and score < threshold


def fit_threshold(val_logits: torch.Tensor, temperature: float, keep: float = KEEP_IN_DOMAIN) -> dict:
    """The record of the threshold that keeps `keep` of the validation images (their energy's
    1 - keep quantile), as metrics.json keeps it under "ood"."""
    scores = energy(val_logits, temperature).numpy()
    return {"score": SCORE, "threshold": float(np.quantile(scores, 1 - keep)), "keep": keep,
            "fitted_on": "validation", "num_fitted": int(len(scores)),
            "rule": f"flag an image when logsumexp(logits / T) is below the threshold, which {keep:.0%} of the "
                    "validation images (never trained on) are above"}


def flagged(scores: torch.Tensor, threshold: float) -> dict:
    """{"n": images, "flagged": share below the threshold}."""
    return {"n": int(len(scores)), "flagged": float((scores < threshold).double().mean()) if len(scores) else None}


# ----------------------------------------------------------------------------------------------
# Out-of-domain images built offline


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    a, b = rng.integers(0, 256, (2, 3))
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    if rng.random() < 0.5:  # linear, at a random angle
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)
    else:  # radial, from a random centre
        cy, cx = rng.uniform(0, 1, 2)
        t = np.hypot(yy - cy, xx - cx)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-9)
    return a + t[..., None] * (b - a)


def _pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    a, b = rng.integers(0, 256, (2, 3))
    period = int(rng.integers(2, 24))
    yy, xx = np.mgrid[0:size, 0:size]
    kind = rng.integers(0, 3)
    mask = ((xx // period + yy // period) % 2 if kind == 0 else (xx // period) % 2 if kind == 1
            else ((xx + yy) // period) % 2).astype(bool)
    return np.where(mask[..., None], a, b)


def _text(rng: np.random.Generator, size: int) -> np.ndarray:
    dark = rng.random() < 0.4
    background, ink = ((30, 30, 35), (220, 220, 220)) if dark else ((250, 250, 250), (20, 20, 20))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=int(rng.integers(9, 16)))
    y = int(rng.integers(0, 8))
    if rng.random() < 0.3:  # a title bar, as on a screenshot
        draw.rectangle([0, 0, size, 12], fill=tuple(int(v) for v in rng.integers(60, 200, 3)))
        y = 16
    while y < size:
        words = " ".join(rng.choice(_WORDS, int(rng.integers(2, 6))))
        draw.text((int(rng.integers(0, 10)), y), words, fill=ink, font=font)
        y += int(rng.integers(12, 20))
    return np.asarray(image)


def synthetic_images(kind: str, count: int = SYNTHETIC_PER_KIND, size: int = SYNTHETIC_SIZE,
                     seed: int = 0) -> np.ndarray:
    """`count` RGB images [N, size, size, 3] uint8 of one of SYNTHETIC_KINDS, the same for a seed."""
    rng = np.random.default_rng([seed, SYNTHETIC_KINDS.index(kind)])
    images = []
    for _ in range(count):
        if kind == "noise":
            pixels = rng.integers(0, 256, (size, size, 3))
        elif kind == "smooth noise":
            cells = int(rng.integers(3, 12))
            small = Image.fromarray(rng.integers(0, 256, (cells, cells, 3)).astype(np.uint8))
            pixels = np.asarray(small.resize((size, size), Image.BICUBIC))
        elif kind == "gradient":
            pixels = _gradient(rng, size)
        elif kind == "flat colour":
            pixels = np.broadcast_to(rng.integers(0, 256, 3), (size, size, 3))
        elif kind == "pattern":
            pixels = _pattern(rng, size)
        elif kind == "text":
            pixels = _text(rng, size)
        else:
            raise ValueError(f"unknown kind {kind!r}: one of {', '.join(SYNTHETIC_KINDS)}")
        images.append(np.clip(pixels, 0, 255).astype(np.uint8))
    return np.stack(images)
