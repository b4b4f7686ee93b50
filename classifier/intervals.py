"""How sure a measured accuracy is: the Wilson score interval of a proportion.

An accuracy of 100% on 24 images is not an accuracy of 100%: with 95% confidence the true rate lies
anywhere from 86% to 100%. Every accuracy this project prints or records comes with its split's
size and this interval. Wilson's interval (Wilson, 1927; Brown, Cai & DasGupta, 2001) rather than
the textbook normal one, which collapses to a point at 0% and 100% and spills outside [0, 1] on the
small splits it matters most for. It is a few lines of arithmetic: no statistics package needed.

Plain Python, no torch: the Predictor's command line (serving) uses it too.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The 95% (by default) Wilson score interval of `correct` successes out of `total`; (0, 1)
    when there is nothing to go on."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_with_interval(correct: int, total: int) -> dict:
    """{"accuracy", "accuracy_ci95", "num_samples"}: the fields metrics.json keeps for a split."""
    low, high = wilson_interval(correct, total)
    return {"accuracy": correct / total if total else 0.0, "accuracy_ci95": [low, high], "num_samples": int(total)}


def describe_accuracy(accuracy: float, interval, n: int, split: str | None = None) -> str:
    """'96.0% (95% CI 90.2-98.4%, n=100, validation)': an accuracy as every line of output shows it."""
    where = f", {split}" if split else ""
    if interval is None:
        return f"{accuracy:.1%} (n={n:,}{where})"
    low, high = interval
    return f"{accuracy:.1%} (95% CI {low:.1%}-{high:.1%}, n={n:,}{where})"
