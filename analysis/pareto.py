"""Pareto fronts of the report's trade-off plots and summary: which settings no other beats on both axes."""
from __future__ import annotations

from typing import Iterable

import numpy as np


def pareto_front(x: Iterable[float], y: Iterable[float], *, maximize_x: bool = False,
                 maximize_y: bool = True) -> np.ndarray:
    """Boolean mask of the points no other point dominates.

    A point is dominated when another is at least as good on both axes and strictly better on one
    (by default: lower ``x``, e.g. GFLOPs, and higher ``y``, e.g. top-1). NaN points are never on the front;
    exact duplicates of a front point are both on it.
    """
    xs = np.asarray(list(x), dtype=float)
    ys = np.asarray(list(y), dtype=float)
    if xs.shape != ys.shape:
        raise ValueError(f"x and y differ in length: {xs.shape} vs {ys.shape}")
    gx = xs if maximize_x else -xs  # larger is better on both after the sign flips
    gy = ys if maximize_y else -ys
    valid = ~(np.isnan(gx) | np.isnan(gy))
    mask = valid.copy()
    for i in np.flatnonzero(valid):
        others = valid.copy()
        others[i] = False
        dominated = others & (gx >= gx[i]) & (gy >= gy[i]) & ((gx > gx[i]) | (gy > gy[i]))
        mask[i] = not dominated.any()
    return mask
