"""The report's section "What adaptivity buys": owns its tables and figure (numbers: :mod:`analysis.adaptivity`).

:func:`write_adaptivity_section` ``(records, out_dir)`` writes, per backbone (``<backbone>`` the slug of
:func:`analysis.formatting.backbone_slug`) whose ``run`` records carry ``compute_per_image``:

- ``adaptivity_compute_<backbone>.{png,pdf}``: the per-image GFLOPs distribution of every method setting (the
  stored histograms re-binned onto one axis in fractions of dense, seeds pooled), one panel per setting;
- ``adaptivity_spread_<backbone>.{md,tex,csv}``: mean, std, min and max of per-image GFLOPs as fractions of
  dense, and top-1;
- ``adaptivity_accuracy_<backbone>.{md,tex,csv}`` (adaptive settings only): top-1 in the quarters of the images
  by compute, and the rank correlation of compute with being right: do images that get more compute turn out
  harder?
- ``adaptivity_objects_<backbone>.{md,tex,csv}`` (data with ground truth, ``data=digit_scenes``): correlations
  of per-image compute with the object's size and the clutter, and the share of compute spent on object tokens;

and ``adaptivity_oracle_<backbone>.{md,tex,csv}`` wherever an adaptive method's trade-off curve and its declared
counterpart's share a backbone: at a fixed mean FLOPs, does per-image allocation beat a fixed count?
Anything the records cannot support gets a ``note:`` line instead.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import adaptivity, style
from .formatting import DASH, fmt, plus_minus
from .table_files import Table

FIGURE_BINS = 40
SPREAD_FOOTNOTE = (
    "Per-image GFLOPs from each image's own token counts under the suite's FLOPs model (1 multiply-add = 1 FLOP, "
    "experiments/cost/flops.py), as fractions of dense (× dense); std in % of dense GFLOPs; each seed's "
    "statistic, then the mean over seeds. A fixed-count method spends the same on every image (std 0, min = "
    "max); adaptive = some spread. Top-1 in %, seed mean."
)
ACCURACY_FOOTNOTE = (
    "Top-1 (%) of the images in each quarter by per-image compute, least to most (seed mean ± 95% CI over seeds, "
    "Student t): quarters are merged from the record's histogram bins, a bin never split, so a quarter holds "
    "about a quarter of the images. Lower accuracy where compute is higher: the images that get more compute are "
    "the harder ones. ρ = Spearman rank correlation of per-image compute with being right (1/0): negative = more "
    "compute goes to images the model gets wrong; 95% CI: over seeds (Student t) with several seeds, else the "
    "record's Fisher-z interval (standard error √(1.06/(n−3))). Settings with one compute level have no quarters."
)
OBJECTS_FOOTNOTE = (
    "Spearman ρ of per-image GFLOPs with the object's size (its object-token count: tokens at least half in the "
    "ground-truth mask) and with the scene's clutter (the fragments' visible ink: the mean over the canvas of what "
    "they add above background and digit), [95% CI: over seeds with several, else the record's Fisher-z "
    "interval]; — = compute constant over the images (fixed count). Object compute share = share of the blocks "
    "run on patch tokens that went to object tokens (attention's quadratic part aside), next to the object "
    "tokens' share of all patch tokens (equal for dense); seed mean ± 95% CI."
)
ORACLE_FOOTNOTE = (
    "Each adaptive method's trade-off curve (one checkpoint per seed, knob swept, experiments/tradeoff.py) against "
    "its fixed-count counterpart's, as its registration declares (methods/registry.py, counterpart=…): top-1 (%) "
    "linearly interpolated at the same mean FLOPs ratio, never extrapolated. Δ = adaptive − fixed, the mean of "
    "the per-seed differences (each seed's own curves interpolated) ± its 95% CI (Student t over the n seeds both "
    "curves have and span the budget). Verdict: per-image / fixed when the interval excludes 0, else tied; one "
    "seed = no interval; — = a curve does not reach the budget."
)


def _correlation_cell(row: pd.Series, name: str) -> str:
    rho = row.get(f"rho[{name}]", math.nan)
    if rho is None or (isinstance(rho, float) and math.isnan(rho)):
        return DASH
    low, high = row.get(f"low[{name}]", math.nan), row.get(f"high[{name}]", math.nan)
    interval = "" if math.isnan(low) else f" [{low:.2f}, {high:.2f}]"
    return f"{rho:+.2f}{interval}"


def spread_table(frame: pd.DataFrame, model: str, data: str) -> Optional[Table]:
    part = frame[(frame["model"] == model) & (frame["data"] == data)]
    if part.empty:
        return None
    display = pd.DataFrame([{
        "Method": row["label"], "Family": row["family"], "Seeds": str(row["n_seeds"]),
        "Mean (× dense)": fmt(row["mean"], ".3f"), "Std (% of dense)": fmt(100.0 * row["std"], ".2f"),
        "Min (× dense)": fmt(row["min"], ".3f"), "Max (× dense)": fmt(row["max"], ".3f"),
        "Adaptive": "yes" if row["adaptive"] else "no", "Top-1 (%)": fmt(row["top1"], ".2f"),
    } for _, row in part.iterrows()])
    numeric = part[["method", "label", "family", "n_seeds", "mean", "std", "min", "max", "adaptive", "top1"]]
    return Table(f"Per-image compute: {model} on {data}", display, numeric.reset_index(drop=True), "llrrrrrlr")


def accuracy_table(frame: pd.DataFrame, model: str, data: str) -> Optional[Table]:
    part = frame[(frame["model"] == model) & (frame["data"] == data) & frame["adaptive"]]
    if part.empty:
        return None
    groups = [c for c in part.columns if c.startswith("group") and c[5:].isdigit()]
    names = ["least compute", *[f"quarter {g + 1}" for g in range(1, len(groups) - 1)], "most compute"]
    display = pd.DataFrame([{
        "Method": row["label"],
        **{f"Top-1, {name}": plus_minus(row[g], row[f"{g}_ci"], ".1f") for name, g in zip(names, groups)},
        "ρ(compute, correct)": _correlation_cell(row, "correct"),
    } for _, row in part.iterrows()])
    keep = ["method", "label", *[c for g in groups for c in (g, f"{g}_ci", f"{g}_share")],
            *[c for c in part.columns if c.endswith("[correct]")]]
    return Table(f"Accuracy by per-image compute: {model} on {data}", display, part[keep].reset_index(drop=True),
                 "l" + "r" * (len(groups) + 1))


def objects_table(frame: pd.DataFrame, model: str, data: str) -> Optional[Table]:
    part = frame[(frame["model"] == model) & (frame["data"] == data)]
    if part.empty or "n[object_tokens]" not in part:
        return None
    part = part[part["n[object_tokens]"].notna()]
    if part.empty:
        return None
    display = pd.DataFrame([{
        "Method": row["label"], "ρ(compute, object size)": _correlation_cell(row, "object_tokens"),
        "ρ(compute, clutter)": _correlation_cell(row, "clutter"),
        "Object compute share (%)": plus_minus(100 * row["object_compute_share"],
                                               100 * row["object_compute_share_ci"], ".1f"),
        "Object token share (%)": fmt(100 * row["object_token_share"], ".1f"),
    } for _, row in part.iterrows()])
    keep = ["method", "label", "object_compute_share", "object_compute_share_ci", "object_token_share",
            *[c for c in part.columns if c.endswith(("[object_tokens]", "[clutter]"))]]
    return Table(f"Where per-image compute goes: {model} on {data}", display, part[keep].reset_index(drop=True),
                 "lrrrr")


def _delta_cell(delta: float, half: float, n: int) -> str:
    if math.isnan(delta):
        return DASH
    return f"{delta:+.2f}" + ("" if math.isnan(half) else f" ± {half:.2f}") + f" (n={n})"


def oracle_table(oracle: pd.DataFrame, model: str, data: str) -> Optional[Table]:
    part = oracle[(oracle["model"] == model) & (oracle["data"] == data)] if not oracle.empty else oracle
    if part.empty:
        return None
    display = pd.DataFrame([{
        "Adaptive": row["adaptive"], "Fixed count": row["counterpart"],
        "Mean FLOPs": f"{row['target'] * 100:.0f}% of dense",
        "Top-1 adaptive": fmt(row["top1_adaptive"], ".2f"), "Top-1 fixed": fmt(row["top1_fixed"], ".2f"),
        "Δ (paired)": _delta_cell(row["delta"], row["ci"], row["n"]),
        "Verdict": row["verdict"],
    } for _, row in part.iterrows()])
    numeric = part.drop(columns=["slug"]).reset_index(drop=True)
    return Table(f"Per-image allocation vs a fixed count at matched mean FLOPs: {model} on {data}", display,
                 numeric, "lllrrrl")


def pooled_histograms(part: pd.DataFrame, bins: int = FIGURE_BINS) -> tuple[np.ndarray, list[np.ndarray]]:
    """Common edges (fractions of dense) over a backbone's settings and each setting's seeds pooled onto them
    (:func:`analysis.adaptivity.rebin`), as shares of its images."""
    low = min(float(e[0]) for edges in part["edges_by_seed"] for e in edges)
    high = max(float(e[-1]) for edges in part["edges_by_seed"] for e in edges)
    pad = max(0.02 * (high - low), 0.005)
    common = np.linspace(low - pad, high + pad, bins + 1)
    shares = []
    for edges_list, images_list in zip(part["edges_by_seed"], part["images_by_seed"]):
        pooled = sum(adaptivity.rebin(e, i, common) for e, i in zip(edges_list, images_list))
        shares.append(pooled / max(float(np.sum(pooled)), 1e-12))
    return common, shares


def plot_compute(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per backbone: one panel per setting, the share of images against per-image GFLOPs ÷ dense."""
    paths: list[Path] = []
    styles = style.method_styles(dict(zip(frame["method"], frame["family"])))
    for (model, data, slug), part in frame.groupby(["model", "data", "slug"], sort=False):
        edges, shares = pooled_histograms(part)
        with style.figure_style():
            fig = Figure(figsize=(6.4, 0.9 * len(part) + 1.2))
            axes = np.atleast_1d(fig.subplots(len(part), 1, sharex=True))
            for ax, (_, row), share in zip(axes, part.iterrows(), shares):
                color, _ = styles[row["method"]]
                ax.stairs(share, edges, fill=True, color=color, alpha=0.7)
                ax.set_ylabel(style.wrap(row["label"], 16), rotation=0, ha="right", va="center", fontsize=8)
                ax.set_yticks([])
                ax.axvline(row["mean"], color="black", lw=0.8, ls="--")
            axes[-1].set_xlabel("Per-image GFLOPs ÷ dense GFLOPs (dashed: the mean)")
            fig.suptitle(f"{model} on {data}: per-image compute (share of images, seeds pooled)", y=1.0)
            paths += style.save_figure(fig, out_dir, f"adaptivity_compute_{slug}")
    return paths


def write_adaptivity_section(records: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Every table and figure of the section (module docstring); returns their paths."""
    out = Path(out_dir)
    frame = adaptivity.settings_frame(records)
    oracle = adaptivity.oracle_frame(records)
    if frame.empty and oracle.empty:
        print("note: no run record carries compute_per_image and no adaptive curve meets its counterpart's; no "
              "'what adaptivity buys' section")
        return []
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    backbones: list[tuple[Any, Any, Any]] = []
    for source in (frame, oracle):
        if not source.empty:
            backbones += [key for key in source.groupby(["model", "data", "slug"], sort=False).groups
                          if key not in backbones]
    for model, data, slug in backbones:
        made = [(oracle_table(oracle, model, data), "oracle", ORACLE_FOOTNOTE)]
        part = frame[(frame["model"] == model) & (frame["data"] == data)] if not frame.empty else frame
        if not part.empty:
            made = [(spread_table(frame, model, data), "spread", SPREAD_FOOTNOTE),
                    (accuracy_table(frame, model, data), "accuracy", ACCURACY_FOOTNOTE),
                    (objects_table(frame, model, data), "objects", OBJECTS_FOOTNOTE), *made]
            if not part["adaptive"].any():
                print(f"note: no setting on {model}/{data} spends compute per image (each is a fixed count); no "
                      f"accuracy-by-compute table")
        for table, name, footnote in made:
            if table is not None:
                paths += table.write(out / f"adaptivity_{name}_{slug}", f"tab:adaptivity-{name}-{slug}",
                                     footnote=footnote)
    if not frame.empty:
        paths += plot_compute(frame, out)
    if oracle.empty:
        print("note: no adaptive method's trade-off curve shares a backbone with its declared counterpart's "
              "(methods/registry.py counterpart=); no per-image vs fixed-count comparison")
    return paths
