"""Confidence intervals over images and a paired test, for the accuracies of `coup_fast.evaluate`.

Every accuracy of an evaluation is an average over n test images, so its uncertainty is the
sampling of those images (n = 32 images carry about +-15 points).  Two kinds of numbers occur:

- a fraction of images (Worst-of-R: an image counts when all R purifications of its worst
  adversarial example classify it correctly): `wilson_interval`, the Wilson score interval
  (Wilson 1927), which keeps its coverage near 0 % and 100 %, where the normal interval collapses;
- a mean over images of per-image accuracies a_i = k_i / R in [0, 1] (Avg, R purifications each):
  `mean_interval`, the Wilson interval at the effective sample size n_eff = p(1 - p) / Var(mean)
  (Korn & Graubard 1998, "Confidence intervals for proportions with small expected number of
  positive counts estimated from survey data", for clustered binary data: here the R draws of an
  image are a cluster).  It plays the role of a bootstrap over images but keeps Wilson's behaviour
  at the boundaries, where a percentile bootstrap of 32 images that are nearly all correct
  collapses to a point (tests/test_stats.py compares the coverage of both in simulation).
  n_eff is capped at n R (the number of draws: independent draws cannot carry more information),
  which is also its value when every image has the same accuracy (no spread to estimate).

`sign_test` is the exact one-sided paired sign test (two gradients on the same images).
"""
from __future__ import annotations

import math
from statistics import NormalDist

LEVEL = 0.95


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a confidence level in (0, 1), got {level!r}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def _wilson(p: float, n: float, z: float) -> tuple[float, float]:
    """Wilson's interval for a proportion p observed over n (possibly effective, non-integer) trials."""
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1.0 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval (fractions in [0, 1]) for `successes` out of n independent trials."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an integer >= 1, got {n!r}")
    if isinstance(successes, bool) or not isinstance(successes, int) or not 0 <= successes <= n:
        raise ValueError(f"successes: expected an integer in [0, n = {n}], got {successes!r}")
    return _wilson(successes / n, n, _z(level))


def mean_interval(values, runs: int, level: float = LEVEL) -> tuple[float, float]:
    """Interval (in [0, 1]) for the mean of per-image accuracies `values`, each the mean of `runs` 0/1 draws.

    Wilson's interval at the effective size n_eff = m (1 - m) / (s^2 / n), m the mean, s^2 the sample
    variance over images, n_eff capped at n runs (module docstring).  One image: the interval of its
    `runs` draws; runs = 1: Wilson's interval of the fraction (the values are 0 or 1).
    """
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("values: expected at least one image")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs: expected an integer >= 1, got {runs!r}")
    if any(not (0.0 <= v <= 1.0) for v in values):
        raise ValueError("values: expected per-image accuracies in [0, 1]")
    mean = sum(values) / n
    if runs == 1:  # each image is one draw: the mean is a fraction of images, Wilson's own case
        return _wilson(mean, n, _z(level))
    cap = float(n * runs)
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    n_eff = cap if var <= 0.0 else min(cap, max(1.0, mean * (1.0 - mean) * n / var))
    return _wilson(mean, n_eff, _z(level))


def sign_test(wins: int, losses: int) -> float:
    """One-sided exact sign test: P(X >= wins) for X ~ Binomial(wins + losses, 1/2) (ties left out).

    Small when `wins` clearly exceed `losses`, e.g. images where one gradient's attack did better than
    another's against images where it did worse."""
    for name, v in (("wins", wins), ("losses", losses)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: expected an integer >= 0, got {v!r}")
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2.0**n
