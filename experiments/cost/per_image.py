"""Per-image compute for a record: owns the ``compute_per_image`` entry (what adaptivity spends, image by image).

An adaptive method (A-ViT's halting, ATS's sampling, threshold merging) spends a different amount of compute on
each image; a fixed-count one (top-k, EViT, ToMe) spends the same on all. The record's ``flops`` keeps the mean
and the spread; this entry keeps the distribution and what it goes with, compactly (no per-image arrays):

- ``gflops_mean/std/min/max``, ``dense_gflops`` and ``images``: per-image GFLOPs from the method's per-image
  token counts under the suite's FLOPs model (``experiments/cost/flops.py``, :func:`~experiments.cost.flops.
  per_image_macs`, the very numbers ``flops.gflops`` averages), std with ``ddof=0`` as ``flops.gflops_std``;
- ``histogram``: ``edges`` (GFLOPs, ``bins + 1`` values, evenly spaced from the minimum to the maximum),
  ``images`` and ``correct`` (top-1 correct images) per bin: the distribution and the accuracy per compute bin.
  ``bins`` is the number of distinct per-image values, at most :data:`MAX_BINS`; a fixed-count method gets one
  bin whose two edges are equal. Bins are half-open ``[a, b)`` but for the last, which holds its right edge
  (numpy's ``histogram``);
- ``correlations``: Spearman's rank correlation of per-image GFLOPs with ``correct`` (top-1 right = 1: do images
  that get more compute turn out harder? A negative rho says yes) and, on data with ground truth
  (``data=digit_scenes``), with ``object_tokens`` (the object's size: its token count, the ground truth the
  ``tokens.objects`` scores use) and with ``clutter`` (the fragments' visible ink, ``DigitScenesDataset.
  scene_clutter``). Each is ``{"rho", "ci": [low, high], "n"}``: the 95% interval from Fisher's z with the
  standard error ``sqrt(1.06 / (n - 3))`` that Fieller, Hartley & Pearson (1957) give for Spearman's rho (the
  ``1 / sqrt(n - 3)`` of Pearson's r understates it). Spearman, not Pearson: per-image compute is discrete and
  skewed (a fixed count for most images, a tail that halts late), ``correct`` is binary and the clutter is
  zero-inflated; what is asked is whether more of one goes with more of the other, a monotone association, and
  ranks do not let a few extreme images decide it. ``rho`` and ``ci`` are null where either side is constant (a
  fixed-count method: its compute goes with nothing) or ``n < 4``;
- ``object_compute_share`` (ground truth only): the share of the blocks run on patch tokens that went to object
  tokens, ``1 - tokens.objects.background_compute`` (attention's quadratic part aside).

The numbers are pure numpy (:func:`summarise`); :func:`compute_per_image` feeds it a method's evaluation.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
from scipy import stats

from experiments.records.schema import MAX_COMPUTE_BINS

MAX_BINS = MAX_COMPUTE_BINS
LEVEL = 0.95
SPEARMAN_VARIANCE = 1.06  # Fieller, Hartley & Pearson (1957): var(atanh(rho_s)) ~ 1.06 / (n - 3)
CORRELATION = (f"Spearman rank correlation; 95% CI from Fisher's z, standard error sqrt({SPEARMAN_VARIANCE} / "
               f"(n - 3)) (Fieller, Hartley & Pearson 1957)")


def histogram(gflops: np.ndarray, correct: np.ndarray, max_bins: int = MAX_BINS) -> dict[str, list]:
    """``{"edges", "images", "correct"}`` of per-image ``gflops`` (module docstring): ``min(distinct values,
    max_bins)`` even bins from the minimum to the maximum; one bin (equal edges) when all are equal."""
    gflops = np.asarray(gflops, dtype=float)
    correct = np.asarray(correct, dtype=float)
    if gflops.size == 0 or gflops.shape != correct.shape:
        raise ValueError(f"need one correct flag per image and at least one image; got {gflops.shape} GFLOPs "
                         f"and {correct.shape} flags")
    low, high = float(gflops.min()), float(gflops.max())
    if low == high:
        return {"edges": [low, high], "images": [int(gflops.size)], "correct": [int(correct.sum())]}
    bins = min(int(np.unique(gflops).size), int(max_bins))
    counts, edges = np.histogram(gflops, bins=bins, range=(low, high))
    right, _ = np.histogram(gflops, bins=edges, weights=correct)
    return {"edges": edges.tolist(), "images": counts.astype(int).tolist(),
            "correct": np.rint(right).astype(int).tolist()}


def spearman(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """``{"rho", "ci", "n"}``: Spearman's rho of ``x`` and ``y`` with its Fisher-z 95% interval (module
    docstring); rho and ci null when either is constant or ``n < 4``."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.shape} vs {y.shape}")
    n = int(x.size)
    if n < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": None, "ci": None, "n": n}
    rho = float(np.corrcoef(stats.rankdata(x), stats.rankdata(y))[0, 1])  # Pearson's r of the average ranks
    return {"rho": rho, "ci": list(fisher_interval(rho, n)), "n": n}


def fisher_interval(rho: float, n: int, variance: float = SPEARMAN_VARIANCE) -> tuple[float, float]:
    """The 95% interval of a rank correlation ``rho`` over ``n`` pairs: ``tanh(atanh(rho) ± z · sqrt(variance /
    (n - 3)))``, z the normal quantile; ``rho`` of ±1 gives the degenerate ``(rho, rho)``."""
    if abs(rho) >= 1.0:
        return float(rho), float(rho)
    half = float(stats.norm.ppf((1 + LEVEL) / 2)) * math.sqrt(variance / (n - 3))
    centre = math.atanh(rho)
    return math.tanh(centre - half), math.tanh(centre + half)


def summarise(gflops: np.ndarray, correct: np.ndarray, dense_gflops: float,
              object_tokens: Optional[np.ndarray] = None, clutter: Optional[np.ndarray] = None,
              object_compute_share: Optional[float] = None, max_bins: int = MAX_BINS) -> dict[str, Any]:
    """The record's ``compute_per_image`` entry (module docstring) from per-image ``gflops`` and top-1
    ``correct`` flags; ``object_tokens``, ``clutter`` (per image) and ``object_compute_share`` where the data has
    ground truth."""
    gflops = np.asarray(gflops, dtype=float)
    correct = np.asarray(correct, dtype=float)
    entry: dict[str, Any] = {
        "images": int(gflops.size), "gflops_mean": float(gflops.mean()), "gflops_std": float(gflops.std()),
        "gflops_min": float(gflops.min()), "gflops_max": float(gflops.max()), "dense_gflops": float(dense_gflops),
        "histogram": histogram(gflops, correct, max_bins),
        "correlations": {"correct": spearman(gflops, correct)},
        "correlation": CORRELATION,
    }
    if object_tokens is not None:
        entry["correlations"]["object_tokens"] = spearman(gflops, object_tokens)
    if clutter is not None:
        entry["correlations"]["clutter"] = spearman(gflops, clutter)
    if object_compute_share is not None:
        entry["object_compute_share"] = float(object_compute_share)
    return entry


def compute_per_image(method, result, objects=None, clutter=None,
                      tokens: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """``compute_per_image`` of ``method`` evaluated as ``result`` (``engine.EvalResult``, with its per-image
    ``correct1``); ``objects`` (``[N, P]`` bool) and ``clutter`` (``[N]``) are the data's ground truth, and
    ``tokens`` the record's token summary, whose ``objects.background_compute`` gives the object share."""
    from experiments.cost import flops  # noqa: PLC0415 - torch and the methods, only for a live method

    macs = flops.per_image_macs(method, result.token_counts).numpy()
    if result.correct1 is None or len(result.correct1) != len(macs):
        raise ValueError("compute_per_image needs the evaluation's per-image correct flags (EvalResult.correct1)")
    background = ((tokens or {}).get("objects") or {}).get("background_compute")
    return summarise(macs / 1e9, result.correct1.numpy(), flops.dense_macs(method) / 1e9,
                     objects.sum(dim=1).numpy() if objects is not None else None,
                     clutter.numpy() if clutter is not None else None,
                     1.0 - background if background is not None else None)
