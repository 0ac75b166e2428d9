"""Statistics over seeds: owns the 95% confidence intervals of the report and the "tied for best" rule.

- :func:`mean_ci`: the mean of a setting's seeds, the half-width of its 95% confidence interval (Student t with
  n - 1 degrees of freedom: ``t_{0.975, n-1} · s / √n``, ``s`` the sample std) and n. One seed has no interval
  (NaN half-width).
- :func:`paired_difference`: the difference of two settings over their *common* seeds (``a[s] - b[s]``), with
  the 95% CI of its mean from the t distribution of the per-seed differences: pairing by seed removes what the
  two share (the starting weights, the data order), so the interval is that of the effect, not of the noise.
- :func:`tied_for_best`: every entry whose interval overlaps the best one's. An entry without an interval (one
  seed) cannot be told apart from the best, so it counts as tied: the report never names a winner it cannot
  separate.

Pure numpy/scipy; used by :mod:`analysis.tables`, :mod:`analysis.controls`, :mod:`analysis.curves` and
:mod:`analysis.families`.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95  # two-sided confidence level of every interval in the report


def t_quantile(dof: int) -> float:
    """``t_{(1 + LEVEL) / 2, dof}``, e.g. 4.302653 for 2 degrees of freedom; NaN below 1."""
    return float(scipy_stats.t.ppf((1.0 + LEVEL) / 2.0, dof)) if dof >= 1 else math.nan


def _finite(values: Iterable[Any]) -> np.ndarray:
    array = np.asarray([float(v) for v in values if v is not None], dtype=float)
    return array[~np.isnan(array)]


def mean_ci(values: Iterable[Any]) -> tuple[float, float, int]:
    """``(mean, 95% CI half-width, n)`` of the non-NaN ``values``; the half-width is NaN for n < 2, both NaN
    for n = 0."""
    array = _finite(values)
    n = int(array.size)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(array[0]), math.nan, 1
    return float(array.mean()), t_quantile(n - 1) * float(array.std(ddof=1)) / math.sqrt(n), n


def paired_difference(a: Mapping[Any, float], b: Mapping[Any, float]) -> tuple[float, float, int]:
    """Mean of ``a[s] - b[s]`` over the seeds ``s`` both have (non-NaN), its 95% CI half-width (t over the
    per-seed differences, n - 1 degrees of freedom) and the number of pairs."""
    common = [s for s in a if s in b]
    return mean_ci(float(a[s]) - float(b[s]) for s in common)


def tied_for_best(means: Iterable[float], halves: Iterable[float]) -> list[bool]:
    """For each entry: is it tied for best (the highest mean)? An entry is tied when its interval
    ``[mean - h, mean + h]`` overlaps the best one's (``mean + h >= best - h_best``); a NaN half-width counts as
    an unknown interval, which overlaps everything. NaN means are never tied; the best entry always is."""
    means = np.asarray(list(means), dtype=float)
    halves = np.asarray(list(halves), dtype=float)
    if means.shape != halves.shape:
        raise ValueError(f"means and halves differ in length: {means.shape} vs {halves.shape}")
    valid = ~np.isnan(means)
    if not valid.any():
        return [False] * len(means)
    best = int(np.nanargmax(means))
    if np.isnan(halves[best]):
        return valid.tolist()
    low = means[best] - halves[best]
    return [bool(ok and (np.isnan(h) or m + h >= low)) for ok, m, h in zip(valid, means, halves)]

