"""Accuracy-vs-compute curves from ``tradeoff`` records: owns curve aggregation, matched-FLOPs interpolation,
the best-method-at-matched-FLOPs table and the curves figure.

A *curve* is one method setting (``method_params`` without the swept knob, see ``analysis.load``) on one
backbone, swept over its inference knob by ``experiments/tradeoff.py``; seeds are averaged per knob value.

- :func:`curve_points`: one row per backbone, curve and knob value: mean and sample std over seeds of top-1,
  GFLOPs, FLOPs ratio and, per throughput condition, img/s; top-1's 95% CI; each seed's top-1 and FLOPs ratio.
- :func:`top1_at_flops`: top-1 of one curve at a target FLOPs ratio, linearly interpolated between the two
  neighbouring points (points at the same ratio are averaged first). A target outside the measured range is
  NaN: never extrapolated.
- :func:`matched_flops_table`: per backbone, each curve's top-1 at 50/65/80% of dense FLOPs with its 95% CI
  over seeds (:func:`seed_interval`) and every curve tied for best at each (intervals overlapping the best one's,
  :func:`analysis.stats.tied_for_best`); :func:`plot_curves`: top-1 against GFLOPs and against img/s, every
  curve on the same axes, the seed mean with a 95% CI band.
- :func:`write_curves` writes both for every backbone with trade-off records.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import load, style, tables
from .formatting import (DASH, backbone_slug, condition_title, format_value, mean_std, method_families, method_rank,
                         plus_minus, setting_labels)
from .stats import mean_ci, tied_for_best

TARGETS = (0.5, 0.65, 0.8)
KIND = "tradeoff"
FOOTNOTE = (
    "Each curve is one checkpoint per seed swept over its inference knob without retraining "
    "(experiments/tradeoff.py). Top-1 (%) at a FLOPs budget is linearly interpolated between the two measured "
    "points around it on the seed-averaged curve (FLOPs ratio = GFLOPs ÷ dense GFLOPs, 1 multiply-add = 1 FLOP), "
    "± the 95% CI half-width of the seeds' own interpolated values (Student t over the n seeds whose curve spans "
    "the budget, shown as n=…); — = the budget lies outside the curve's measured range (never extrapolated). "
    "Tied for best: every curve whose interval overlaps that of the highest top-1 at the budget (a curve with "
    "one seed has no interval and cannot be told apart, so it counts as tied)."
)


def tradeoff_records(records: pd.DataFrame) -> pd.DataFrame:
    return records[records["kind"] == KIND] if not records.empty else records


def curve_points(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (backbone, method, curve, knob value); see the module docstring. Columns: ``model``,
    ``data``, ``slug``, ``method``, ``family`` (its records' ``method_info.family``), ``curve_key``,
    ``counterpart`` (:func:`declared_counterpart`), ``label``, ``knob``, ``knob_value``, ``n_seeds``,
    ``top1_mean``/``_std``/``_ci``/``_n``, ``gflops_mean``/``_std``, ``flops_ratio_mean``/``_std``,
    ``top1_by_seed`` and ``flops_ratio_by_seed`` (seed -> value) and ``img_per_s[c]`` per throughput condition
    ``c`` (listed in ``frame.attrs["conditions"]``)."""
    points = tradeoff_records(records)
    if points.empty:
        return pd.DataFrame()
    points = points.copy()
    families = method_families(points)
    through = load.throughput_frame(points)
    conds = load.conditions(through)
    several = records.groupby("model")["data"].nunique().to_dict()
    rows = []
    keys = ["model", "data", "method", "curve_key", "knob"]
    for (model, data, method, curve_key, knob), curve in points.groupby(keys, sort=False):
        for _, group in curve.groupby(curve["knob_value"].map(format_value), sort=False):
            row: dict[str, Any] = {
                "model": model, "data": data, "slug": backbone_slug(model, data, several.get(model, 1) > 1),
                "method": method, "family": families[method], "curve_key": curve_key,
                "counterpart": declared_counterpart(group),
                "params": _without(group["method_params"].iloc[0], knob),
                "knob": knob, "knob_value": group["knob_value"].iloc[0], "n_seeds": len(group),
            }
            for metric in ("top1", "gflops", "flops_ratio"):
                row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(group[metric])
            _, row["top1_ci"], row["top1_n"] = mean_ci(group["top1"])
            row["top1_by_seed"] = dict(zip(group["seed"], group["top1"]))  # one checkpoint per seed
            row["flops_ratio_by_seed"] = dict(zip(group["seed"], group["flops_ratio"]))
            sub = through[through["record_id"].isin(group["record_id"])] if not through.empty else through
            for cond in conds:
                part = sub[sub["condition"] == cond]["img_per_s"] if not sub.empty else pd.Series(dtype=float)
                row[f"img_per_s[{cond}]"] = mean_std(part)[0]
            rows.append(row)
    frame = pd.DataFrame(rows)
    frame["label"] = ""
    for _, idx in frame.groupby(["model", "data", "method"], sort=False).groups.items():
        part = frame.loc[idx]
        firsts = part.drop_duplicates("curve_key")  # one setting per curve; label it by what differs
        labels = setting_labels(list(firsts["params"]), max_keys=0) if len(firsts) > 1 else [""]
        by_key = dict(zip(firsts["curve_key"], labels))
        frame.loc[idx, "label"] = [f"{m} ({by_key[k]})" if by_key[k] else m
                                   for m, k in zip(part["method"], part["curve_key"])]
    frame["_order"] = [(m, d, method_rank(me, f), lab, r) for m, d, me, f, lab, r in
                       zip(frame["model"], frame["data"], frame["method"], frame["family"], frame["label"],
                           frame["flops_ratio_mean"])]
    frame = frame.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    frame.attrs["conditions"] = conds
    return frame


def declared_counterpart(points: pd.DataFrame) -> str:
    """The fixed-count counterpart the points' records declare (``method_info.counterpart``: the method's
    registration, or the built method's own, as threshold ToMe's -> ToMe), or ``""``."""
    infos = points["method_info"] if "method_info" in points else []
    return next((info["counterpart"] for info in infos if isinstance(info, dict)
                 and isinstance(info.get("counterpart"), str) and info["counterpart"]), "")


def _without(params: dict, knob: str) -> dict:
    return {k: v for k, v in (params or {}).items() if k != knob}


def top1_at_flops(flops_ratio: Iterable[float], top1: Iterable[float], target: float) -> float:
    """Top-1 at ``target`` FLOPs ratio by linear interpolation along the curve; NaN outside its range.

    Points are sorted by FLOPs; points at the same FLOPs are averaged; NaN points are ignored.
    """
    x = np.asarray(list(flops_ratio), dtype=float)
    y = np.asarray(list(top1), dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"flops_ratio and top1 differ in length: {x.shape} vs {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if x.size == 0 or not (x.min() <= target <= x.max()):
        return math.nan
    unique, inverse = np.unique(x, return_inverse=True)
    mean_y = np.bincount(inverse, weights=y) / np.bincount(inverse)
    return float(np.interp(target, unique, mean_y))


def seed_interval(flops_by_seed: Iterable[Any], top1_by_seed: Iterable[Any], target: float) -> tuple[float, int]:
    """95% CI half-width and n of a curve's top-1 at ``target``: each seed's own curve (its points: one dict
    seed -> value per knob value) interpolated there (:func:`top1_at_flops`), the seeds whose curve spans it
    counted. ``(NaN, 0)`` when the points carry no per-seed values."""
    flops = [d for d in flops_by_seed if isinstance(d, dict)]
    top1 = [d for d in top1_by_seed if isinstance(d, dict)]
    seeds = list(dict.fromkeys(s for d in top1 for s in d))
    values = [top1_at_flops([f.get(s, math.nan) for f in flops], [t.get(s, math.nan) for t in top1], target)
              for s in seeds]
    _, half, n = mean_ci(values)
    return half, n


def matched_flops_frame(points: pd.DataFrame, targets: Iterable[float] = TARGETS) -> pd.DataFrame:
    """One row per backbone and target: each curve's interpolated top-1 (columns ``top1[label]``) with its 95% CI
    half-width and seeds (``ci[label]``, ``n[label]``, :func:`seed_interval`), the best curve (``best``,
    ``best_top1``; equal means go to the earlier curve in method order) and every curve tied for best
    (``tied``: labels joined by ``, ``)."""
    if points.empty:
        return pd.DataFrame()
    rows = []
    for (model, data, slug), part in points.groupby(["model", "data", "slug"], sort=False):
        labels = list(dict.fromkeys(part["label"]))
        for target in targets:
            row: dict[str, Any] = {"model": model, "data": data, "slug": slug, "target": float(target)}
            for label in labels:
                curve = part[part["label"] == label]
                row[f"top1[{label}]"] = top1_at_flops(curve["flops_ratio_mean"], curve["top1_mean"], target)
                row[f"ci[{label}]"], row[f"n[{label}]"] = seed_interval(
                    curve.get("flops_ratio_by_seed", ()), curve.get("top1_by_seed", ()), target)
            means = [row[f"top1[{label}]"] for label in labels]
            tied = tied_for_best(means, [row[f"ci[{label}]"] for label in labels])
            best = int(np.nanargmax(means)) if not np.isnan(means).all() else None
            row["best"] = labels[best] if best is not None else None
            row["best_top1"] = means[best] if best is not None else math.nan
            row["tied"] = ", ".join(label for label, t in zip(labels, tied) if t)
            rows.append(row)
    return pd.DataFrame(rows)


def _cell(value: float, half: float, n: int) -> str:
    text = plus_minus(value, half, ".2f")
    return text if text == DASH or not n else f"{text} (n={n})"


def matched_flops_table(points: pd.DataFrame, model: str, data: str,
                        targets: Iterable[float] = TARGETS) -> Optional[tables.Table]:
    part = points[(points["model"] == model) & (points["data"] == data)]
    frame = matched_flops_frame(part, targets)
    if frame.empty:
        return None
    labels = [c[len("top1["):-1] for c in frame.columns if c.startswith("top1[")]
    display = pd.DataFrame([{
        "FLOPs budget": f"{row['target'] * 100:.0f}% of dense",
        **{label: _cell(row[f"top1[{label}]"], row[f"ci[{label}]"], row[f"n[{label}]"]) for label in labels},
        "Tied for best": row["tied"] or DASH,  # no curve reaches the budget: none is tied
    } for _, row in frame.iterrows()])
    numeric = frame.drop(columns=["slug"]).reset_index(drop=True)
    return tables.Table(f"Top-1 at matched FLOPs: {model} on {data}", display, numeric,
                        "l" + "r" * len(labels) + "l")


def plot_curves(points: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Per backbone: top-1 against GFLOPs (left) and against img/s at the largest measured batch (right),
    every curve on the same axes: the seed mean per knob value, band = mean ± 95% CI half-width over seeds."""
    paths: list[Path] = []
    conds = points.attrs.get("conditions", [])
    styles = style.method_styles(dict(zip(points["method"], points["family"])))
    for (model, data, slug), part in points.groupby(["model", "data", "slug"], sort=False):
        cond = _widest_condition(part, conds)
        with style.figure_style():
            panels = 2 if cond else 1
            fig = Figure(figsize=(4.2 * panels + 2.0, 4.4))
            axes = np.atleast_1d(fig.subplots(1, panels, sharey=True))
            linestyles = ("-", "--", ":", "-.")
            for label, curve in part.groupby("label", sort=False):
                method = curve["method"].iloc[0]
                color, marker = styles[method]
                siblings = list(dict.fromkeys(part.loc[part["method"] == method, "label"]))  # settings of a method
                ls = linestyles[siblings.index(label) % len(linestyles)]
                for ax, xcol in zip(axes, ["gflops_mean"] + ([f"img_per_s[{cond}]"] if cond else [])):
                    ordered = curve.dropna(subset=[xcol, "top1_mean"]).sort_values(xcol, kind="stable")
                    ax.plot(ordered[xcol], ordered["top1_mean"], color=color, marker=marker, ms=5, lw=1.2, ls=ls,
                            label=f"{label} [{curve['knob'].iloc[0]}]")
                    half = ordered["top1_ci"].fillna(0.0)  # one seed: no band
                    ax.fill_between(ordered[xcol], ordered["top1_mean"] - half, ordered["top1_mean"] + half,
                                    color=color, alpha=0.15, lw=0)
            axes[0].set_xlabel(style.GFLOPS_LABEL)
            axes[0].set_ylabel(style.TOP1_LABEL)
            axes[0].set_title("accuracy vs GFLOPs")
            if cond:
                axes[1].set_xlabel("Throughput (images/s)")
                axes[1].set_title(f"vs throughput ({condition_title(cond)})")
            fig.suptitle(f"{model} on {data}: one checkpoint per seed, inference knob swept "
                         f"(mean over seeds, band: 95% CI)", y=1.0)
            style.legend_outside(axes[-1], title="method [knob]")
            paths += style.save_figure(fig, Path(out_dir), f"tradeoff_curves_{slug}")
    return paths


def _widest_condition(part: pd.DataFrame, conds: list[str]) -> Optional[str]:
    """The measured condition with the largest batch (fp32 first): the regime token reduction targets."""
    present = [c for c in conds if f"img_per_s[{c}]" in part and part[f"img_per_s[{c}]"].notna().any()]
    if not present:
        return None
    return max(present, key=lambda c: (c.split(" ")[2] == "fp32", int(c.split(" ")[1][1:])))


def write_curves(records: pd.DataFrame, out_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """The matched-FLOPs tables (``matched_flops_<backbone>.{md,tex,csv}``), ``tradeoff_points.csv`` and the
    curves figures (``tradeoff_curves_<backbone>.{png,pdf}``); returns ``(table paths, figure paths)``."""
    points = curve_points(records)
    if points.empty:
        print("note: no tradeoff records (experiments/tradeoff.py); no trade-off curves or matched-FLOPs table")
        return [], []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table_paths: list[Path] = []
    for (model, data, slug), _ in points.groupby(["model", "data", "slug"], sort=False):
        table = matched_flops_table(points, model, data)
        if table is not None:
            table_paths += table.write(out / f"matched_flops_{slug}", f"tab:matched-{slug}", footnote=FOOTNOTE)
    csv = out / "tradeoff_points.csv"
    numeric = points.drop(columns=["params", "slug", "top1_by_seed", "flops_ratio_by_seed"])
    csv.write_text(numeric.to_csv(index=False, float_format="%.10g", lineterminator="\n"), encoding="utf-8")
    table_paths.append(csv)
    return table_paths, plot_curves(points, out)
