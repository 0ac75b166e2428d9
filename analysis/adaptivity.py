"""What adaptivity buys: owns the numbers of the report's section on per-image compute.

An adaptive method spends a different compute on each image; a fixed-count one the same on all. From the
records' ``compute_per_image`` (``experiments/cost/per_image.py``) and the trade-off curves, per backbone:

- :func:`settings_frame`: one row per method setting (``run`` records, seeds aggregated): the per-image GFLOPs'
  mean, std, min and max as fractions of dense (each seed's, then the mean over seeds), the accuracy in compute
  groups (:func:`accuracy_groups`), the rank correlations (:func:`combine_correlations`) and, on data with ground
  truth, the object compute and token shares. Whether a method is adaptive is read from its numbers (a spread),
  never from its name;
- :func:`rebin`: a stored histogram moved onto other edges (the figure's common axis);
- :func:`oracle_frame`: at a fixed mean FLOPs, does per-image allocation beat a fixed count? Each adaptive
  method's trade-off curve against its fixed-count counterpart's, the counterpart being the one its
  records declare (``method_info.counterpart``, per curve: A-ViT -> top-k, ATS -> EViT, LTMP and threshold ToMe
  -> ToMe), both interpolated at matched mean FLOPs ratios (:func:`analysis.curves.top1_at_flops`, never
  extrapolated) and their difference paired by seed (:func:`analysis.stats.mean_ci` over the per-seed
  differences).

Pure pandas/numpy; the tables and the figure are :mod:`analysis.adaptivity_report`'s.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

from . import curves
from .formatting import DASH, backbone_slug, method_families, method_rank, setting_labels
from .stats import mean_ci

GROUPS = 4  # compute groups of the accuracy table: quarters of the images by per-image compute
TARGETS = curves.TARGETS  # the matched mean FLOPs ratios of the oracle comparison
LEVEL_Z = 1.959963984540054  # normal 97.5% quantile (the records' Fisher-z intervals)


# --- reading the entries ----------------------------------------------------------------------------------------

def accuracy_groups(entry: dict[str, Any], groups: int = GROUPS) -> Optional[list[dict[str, float]]]:
    """Top-1 (%) of the images in ``groups`` compute groups of one record's histogram, from least to most
    compute: adjacent bins merged, a bin going to the group its middle image falls in (a bin is never split, so
    a group holds about, not exactly, ``1 / groups`` of the images; ``share`` says how many). ``None`` for a
    single bin (every image got the same compute: nothing to group). Each group: ``share``, ``top1``
    (NaN when empty)."""
    hist = entry.get("histogram") or {}
    images = np.asarray(hist.get("images") or [], dtype=float)
    correct = np.asarray(hist.get("correct") or [], dtype=float)
    if images.size < 2 or images.sum() <= 0:
        return None
    total = images.sum()
    middle = np.cumsum(images) - images / 2.0
    index = np.minimum((middle / total * groups).astype(int), groups - 1)
    out = []
    for group in range(groups):
        count, right = images[index == group].sum(), correct[index == group].sum()
        out.append({"share": float(count / total), "top1": float(100.0 * right / count) if count else math.nan})
    return out


def combine_correlations(values: Iterable[Optional[dict]]) -> dict[str, Any]:
    """One setting's rank correlation over its seeds: ``rho`` the mean of the seeds' rho; with two or more seeds
    ``low``/``high`` the 95% t interval over them (``source`` ``seeds``), with one its own Fisher-z interval
    from the record (``source`` ``fisher-z``); NaN where no seed has one (constant compute)."""
    entries = [v for v in values if isinstance(v, dict) and v.get("rho") is not None]
    if not entries:
        return {"rho": math.nan, "low": math.nan, "high": math.nan, "n": 0, "source": None}
    if len(entries) == 1:
        low, high = entries[0].get("ci") or (math.nan, math.nan)
        return {"rho": float(entries[0]["rho"]), "low": float(low), "high": float(high), "n": 1,
                "source": "fisher-z"}
    mean, half, n = mean_ci(e["rho"] for e in entries)
    return {"rho": mean, "low": mean - half, "high": mean + half, "n": n, "source": "seeds"}


def rebin(edges: Iterable[float], counts: Iterable[float], new_edges: Iterable[float]) -> np.ndarray:
    """``counts`` of bins ``edges`` moved onto ``new_edges``: each bin's images spread evenly over its width,
    a bin of zero width (a fixed count) a point mass at its edge (the last new bin holds its right edge)."""
    edges, counts, new = (np.asarray(list(a), dtype=float) for a in (edges, counts, new_edges))
    out = np.zeros(new.size - 1)
    for low, high, count in zip(edges[:-1], edges[1:], counts):
        if count == 0:
            continue
        if high <= low:
            where = min(max(int(np.searchsorted(new, low, side="right")) - 1, 0), out.size - 1)
            out[where] += count
            continue
        overlap = np.clip(np.minimum(new[1:], high) - np.maximum(new[:-1], low), 0.0, None)
        out += count * overlap / (high - low)
    return out


# --- per setting ------------------------------------------------------------------------------------------------

def compute_records(records: pd.DataFrame) -> pd.DataFrame:
    """The ``run`` records that carry ``compute_per_image``."""
    if records.empty or "compute_per_image" not in records:
        return pd.DataFrame()
    mask = (records["kind"] == "run") & records["compute_per_image"].map(lambda e: isinstance(e, dict))
    return records[mask]


def _ratios(entry: dict[str, Any]) -> dict[str, float]:
    dense = float(entry.get("dense_gflops") or math.nan)
    return {name: float(entry.get(f"gflops_{name}", math.nan)) / dense for name in ("mean", "std", "min", "max")}


def _objects(tokens: Any) -> dict[str, Any]:
    objects = tokens.get("objects") if isinstance(tokens, dict) else None
    return objects if isinstance(objects, dict) else {}


def settings_frame(records: pd.DataFrame, groups: int = GROUPS) -> pd.DataFrame:
    """One row per backbone and method setting with per-image compute (module docstring). Columns: ``model``,
    ``data``, ``slug``, ``method``, ``family``, ``label``, ``n_seeds``, ``mean``/``std``/``min``/``max``
    (per-image GFLOPs ÷ dense, seed means), ``adaptive`` (a spread in some seed), ``edges_by_seed`` and
    ``images_by_seed`` (the stored histograms, in dense fractions), ``top1``, ``group{g}`` and
    ``group{g}_ci``/``_share`` (accuracy per compute group, seed mean and 95% CI), ``rho[<name>]`` with
    ``low``/``high``/``n``/``source`` per correlation, ``object_compute_share`` and ``object_token_share``."""
    runs = compute_records(records)
    if runs.empty:
        return pd.DataFrame()
    families = method_families(records)
    several = records.groupby("model")["data"].nunique().to_dict()
    rows = []
    keys = ["model", "data", "method", "params_key", "setting_key"]
    for (model, data, method, _, _), group in runs.groupby(keys, sort=False):
        entries = list(group["compute_per_image"])
        ratios = [_ratios(e) for e in entries]
        row: dict[str, Any] = {
            "model": model, "data": data, "slug": backbone_slug(model, data, several.get(model, 1) > 1),
            "method": method, "family": families.get(method, DASH), "method_params": group["method_params"].iloc[0],
            "n_seeds": len(group), "top1": float(group["top1"].mean()),
            **{name: float(np.mean([r[name] for r in ratios])) for name in ("mean", "std", "min", "max")},
            "adaptive": any(r["max"] > r["min"] for r in ratios),
            "edges_by_seed": [np.asarray(e["histogram"]["edges"], dtype=float) / float(e["dense_gflops"])
                              for e in entries],
            "images_by_seed": [np.asarray(e["histogram"]["images"], dtype=float) for e in entries],
        }
        grouped = [accuracy_groups(e, groups) for e in entries]
        for g in range(groups):
            values = [parts[g]["top1"] for parts in grouped if parts is not None]
            row[f"group{g}"], row[f"group{g}_ci"], _ = mean_ci(values)
            row[f"group{g}_share"] = (float(np.mean([p[g]["share"] for p in grouped if p is not None]))
                                      if values else math.nan)
        names = sorted({name for e in entries for name in (e.get("correlations") or {})})
        for name in names:
            combined = combine_correlations((e.get("correlations") or {}).get(name) for e in entries)
            for key, value in combined.items():
                row[f"{key}[{name}]"] = value
        shares = [e.get("object_compute_share") for e in entries if e.get("object_compute_share") is not None]
        row["object_compute_share"], row["object_compute_share_ci"], _ = mean_ci(shares)
        token_shares = [_objects(t).get("object_share") for t in group["tokens"]]
        row["object_token_share"] = mean_ci(v for v in token_shares if v is not None)[0]
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame["label"] = frame["method"]
    for _, idx in frame.groupby(["model", "data", "method"], sort=False).groups.items():
        if len(idx) > 1:
            labels = setting_labels(list(frame.loc[idx, "method_params"]))
            frame.loc[idx, "label"] = [f"{m} ({lab})" for m, lab in zip(frame.loc[idx, "method"], labels)]
    frame["_order"] = [(m, d, method_rank(me, f), lab) for m, d, me, f, lab in
                       zip(frame["model"], frame["data"], frame["method"], frame["family"], frame["label"])]
    return frame.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


# --- the oracle question ----------------------------------------------------------------------------------------

def paired_at_flops(adaptive: pd.DataFrame, fixed: pd.DataFrame, target: float) -> tuple[float, float, int]:
    """Mean over the seeds both curves have of ``top1_adaptive(target) - top1_fixed(target)``, each seed's own
    curve interpolated at the FLOPs ratio ``target`` (seeds whose curves do not both span it drop out), its 95%
    CI half-width and n (:func:`analysis.stats.mean_ci`)."""
    def by_seed(curve: pd.DataFrame) -> dict[Any, float]:
        seeds = list(dict.fromkeys(s for d in curve["top1_by_seed"] for s in d))
        return {s: curves.top1_at_flops([f.get(s, math.nan) for f in curve["flops_ratio_by_seed"]],
                                        [t.get(s, math.nan) for t in curve["top1_by_seed"]], target)
                for s in seeds}

    a, b = by_seed(adaptive), by_seed(fixed)
    return mean_ci(a[s] - b[s] for s in a if s in b)


def verdict(delta: float, half: float) -> str:
    """``per-image`` (the interval lies above 0), ``fixed`` (below), ``tied``, or ``one seed`` (no interval)."""
    if math.isnan(delta):
        return DASH
    if math.isnan(half):
        return "one seed"
    return "per-image" if delta - half > 0 else "fixed" if delta + half < 0 else "tied"


def oracle_frame(records: pd.DataFrame, targets: Iterable[float] = TARGETS,
                 points: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """One row per backbone, adaptive curve, counterpart curve and target FLOPs ratio: ``adaptive``,
    ``counterpart`` (curve labels), ``top1_adaptive``/``top1_fixed`` (seed-mean curves interpolated),
    ``delta``/``ci``/``n`` (paired by seed, :func:`paired_at_flops`) and ``verdict``. Curves of a method
    declaring a counterpart (its records' ``method_info.counterpart``, :func:`analysis.curves.declared_counterpart`)
    meet every curve of that method on the same backbone that declares none (a threshold ToMe curve declares ToMe,
    its own method: it meets ToMe's fixed-count curves, never itself)."""
    points = curves.curve_points(records) if points is None else points
    if points.empty or not points["counterpart"].astype(bool).any():
        return pd.DataFrame()
    rows = []
    for (model, data, slug), part in points.groupby(["model", "data", "slug"], sort=False):
        for label, curve in part.groupby("label", sort=False):
            method, other = curve["method"].iloc[0], curve["counterpart"].iloc[0]
            if not other:
                continue
            fixed_curves = part[(part["method"] == other) & ~part["counterpart"].astype(bool)]
            for fixed_label, fixed in fixed_curves.groupby("label", sort=False):
                for target in targets:
                    top_a = curves.top1_at_flops(curve["flops_ratio_mean"], curve["top1_mean"], target)
                    top_f = curves.top1_at_flops(fixed["flops_ratio_mean"], fixed["top1_mean"], target)
                    delta, half, n = paired_at_flops(curve, fixed, target)
                    rows.append({"model": model, "data": data, "slug": slug, "method": method,
                                 "adaptive": label, "counterpart": fixed_label, "target": float(target),
                                 "top1_adaptive": top_a, "top1_fixed": top_f, "delta": delta, "ci": half, "n": n,
                                 "verdict": verdict(delta, half)})
    return pd.DataFrame(rows)
