"""Figures of the report (seaborn on matplotlib ``Figure`` objects, no pyplot state): owns the accuracy,
token-count and depth-prior plots and the list of every figure (:data:`FIGURES`). Each figure is written as PNG and PDF; every function returns the paths
it wrote and prints a ``note:`` instead of failing when the records lack what it needs.

Every figure takes ``(agg, records, out_dir)``: ``records`` are the run and measure records
(``aggregation.without_tradeoff``) and ``agg`` is ``aggregation.aggregate(records)``, computed once by the caller
(:func:`write_figures` passes it on). The look (style, colours, saving) is :mod:`analysis.style`'s.

Per backbone (``model`` on ``data``):

- ``top1_vs_gflops``: top-1 vs GFLOPs, one marker per method, settings of a method joined, Pareto front dashed;
  vertical bars are the 95% CI of top-1 over seeds (horizontal: GFLOPs std);
- ``top1_vs_throughput``: the same against img/s, one panel per device / batch size / dtype;
- ``tokens_per_block``: tokens each block's attention (solid) and MLP (dotted) ran on, one panel per method;
- ``<method>_depth``: for every method whose records carry a prior target (``method_info.prior_target``: the
  target probability of halting depth 1..L, as the method computed it, e.g. A-ViT for its ``prior`` mode), its
  halting-depth histogram against that target; a setting whose records lack it gets no target line and a
  ``note:``;
- the token-map figures (``depth_maps``, ``mean_depth``, ``kept_iou``): :mod:`analysis.depth_figures`;
  ``object_depth`` (each method's token depth over the object outline, data with ground truth):
  :mod:`analysis.object_figures`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from . import aggregation, load, pareto
from .depth_figures import plot_depth_maps, plot_kept_iou, plot_mean_depth
from .object_figures import plot_object_depth
from .figure_data import backbones, records_of
from .formatting import REFERENCE, condition_title, method_rank
from .style import GFLOPS_LABEL, TOP1_LABEL, figure_style, legend_outside, method_styles, save_figure, wrap


def _draw_front(ax, x: pd.Series, y: pd.Series, maximize_x: bool) -> None:
    mask = pareto.pareto_front(x, y, maximize_x=maximize_x)
    if mask.sum() < 1:
        return
    order = np.argsort(np.asarray(x, dtype=float)[mask], kind="stable")
    fx, fy = np.asarray(x, dtype=float)[mask][order], np.asarray(y, dtype=float)[mask][order]
    ax.plot(fx, fy, ls="--", lw=1.2, color="0.45", zorder=1, label="Pareto front")
    ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="0.45", lw=1.0, zorder=1)


def _accuracy_scatter(ax, part: pd.DataFrame, xcol: str, xerr: Optional[str], styles: dict) -> None:
    for method, group in part.groupby("method", sort=False):
        color, marker = styles[method]
        group = group.dropna(subset=[xcol, "top1_mean"]).sort_values(xcol, kind="stable")
        if group.empty:
            continue
        # vertical bars: the 95% CI of the seed mean (analysis.stats), none for one seed
        ax.errorbar(group[xcol], group["top1_mean"], yerr=group["top1_ci"].fillna(0.0),
                    xerr=group[xerr].fillna(0.0) if xerr else None, color=color, marker=marker,
                    ms=11 if marker == "*" else 7, lw=1.0, capsize=2, elinewidth=0.8, label=method, zorder=3)


def plot_accuracy_vs_gflops(agg: pd.DataFrame, records: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Top-1 against GFLOPs per backbone, with the Pareto front (lower GFLOPs and higher top-1 are better)."""
    paths: list[Path] = []
    if agg.empty:
        return paths
    styles = method_styles(dict(zip(agg["method"], agg["family"])))
    for model, data, slug, part in backbones(agg):
        usable = part.dropna(subset=["gflops_mean", "top1_mean"])
        if usable.empty:
            print(f"note: no record of {model} on {data} has both FLOPs and top-1; skipped top-1 vs GFLOPs")
            continue
        families = dict(zip(part["method"], part["family"]))
        missing = sorted(set(part["method"]) - set(usable["method"]), key=lambda m: method_rank(m, families[m]))
        with figure_style():
            fig = Figure(figsize=(7.2, 4.6))
            ax = fig.subplots()
            _accuracy_scatter(ax, part, "gflops_mean", "gflops_std", styles)
            _draw_front(ax, usable["gflops_mean"], usable["top1_mean"], maximize_x=False)
            ax.set_xlabel(GFLOPS_LABEL)
            ax.set_ylabel(TOP1_LABEL)
            title = f"{model} on {data}: accuracy vs compute"
            ax.set_title(title + (f"\n(no FLOPs: {', '.join(missing)})" if missing else ""))
            legend_outside(ax, title="method")
            paths += save_figure(fig, Path(out_dir), f"top1_vs_gflops_{slug}")
    return paths


def plot_accuracy_vs_throughput(agg: pd.DataFrame, records: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Top-1 against img/s per backbone, one panel per condition, with the Pareto front (higher is better)."""
    paths: list[Path] = []
    if agg.empty:
        return paths
    conds = agg.attrs.get("conditions", [])
    if not conds:
        print("note: no record has throughput measurements; skipped top-1 vs throughput")  # for every backbone
        return paths
    styles = method_styles(dict(zip(agg["method"], agg["family"])))
    for model, data, slug, part in backbones(agg):
        present = [c for c in conds if part[[f"img_per_s_mean[{c}]", "top1_mean"]].notna().all(axis=1).any()]
        if not present:
            print(f"note: no record of {model} on {data} has both throughput and top-1; "
                  f"skipped top-1 vs throughput")
            continue
        with figure_style():
            fig = Figure(figsize=(3.6 * len(present) + 1.6, 4.4))
            axes = np.atleast_1d(fig.subplots(1, len(present), sharey=True))
            for ax, cond in zip(axes, present):
                col = f"img_per_s_mean[{cond}]"
                _accuracy_scatter(ax, part, col, None, styles)
                usable = part.dropna(subset=[col, "top1_mean"])
                _draw_front(ax, usable[col], usable["top1_mean"], maximize_x=True)
                ax.set_title(condition_title(cond))
                ax.set_xlabel("Throughput (images/s)")
            axes[0].set_ylabel(TOP1_LABEL)
            fig.suptitle(f"{model} on {data}: accuracy vs measured throughput", y=1.0)
            legend_outside(axes[-1], title="method")
            paths += save_figure(fig, Path(out_dir), f"top1_vs_throughput_{slug}")
    return paths


def _mean_curve(group: pd.DataFrame, key: str) -> Optional[np.ndarray]:
    curves = [np.asarray(t[key], dtype=float) for t in group["tokens"]
              if isinstance(t, dict) and isinstance(t.get(key), list) and t.get(key)]
    if not curves or len({len(c) for c in curves}) != 1:
        return None
    return np.mean(curves, axis=0)


def plot_tokens_per_block(agg: pd.DataFrame, records: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Survival curves: mean tokens per image at each block, one panel per method, the reference (family
    ``none``) drawn in every panel."""
    paths: list[Path] = []
    for model, data, slug, part in backbones(agg) if not agg.empty else []:
        recs = records[(records["model"] == model) & (records["data"] == data)]
        reference = part[part["family"] == REFERENCE]
        dense = pd.concat([records_of(recs, row) for _, row in reference.iterrows()]) if len(reference) else recs[:0]
        dense_curve = _mean_curve(dense, "attn_mean") if not dense.empty else None
        dense_label = reference["method"].iloc[0] if len(reference) else ""
        panels = []
        for method, settings in part[part["family"] != REFERENCE].groupby("method", sort=False):
            lines = []
            for _, row in settings.iterrows():
                group = records_of(recs, row)
                attn, mlp = _mean_curve(group, "attn_mean"), _mean_curve(group, "mlp_mean")
                if attn is not None:
                    lines.append((row["setting"], attn, mlp))
            if lines:
                panels.append((method, lines))
        if not panels:
            print(f"note: no token curves (tokens.attn_mean) for {model} on {data}; skipped tokens per block")
            continue
        ncols = min(4, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        with figure_style():
            fig = Figure(figsize=(3.3 * ncols, 3.0 * nrows + 0.4))
            axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
            for ax, (method, lines) in zip(axes, panels):
                palette = sns.color_palette("viridis", max(len(lines), 2))
                if dense_curve is not None:
                    ax.plot(np.arange(len(dense_curve)), dense_curve, color="0.6", lw=1.5, label=dense_label)
                for (label, attn, mlp), color in zip(lines, palette):
                    blocks = np.arange(len(attn))
                    ax.plot(blocks, attn, color=color, lw=1.8, marker="o", ms=3, label=wrap(label, 26))
                    if mlp is not None and len(mlp) == len(attn) and not np.allclose(mlp, attn):
                        ax.plot(blocks, mlp, color=color, lw=1.2, ls=":")
                ax.set_title(method)
                ax.legend(fontsize=7, frameon=False, loc="lower left")
                ax.set_ylim(bottom=0)
            for ax in axes[len(panels):]:
                ax.set_visible(False)
            for i, ax in enumerate(axes[:len(panels)]):
                if i + ncols >= len(panels):  # the lowest panel of its column
                    ax.set_xlabel("Block index (0-based)")
                    ax.tick_params(labelbottom=True)
            for ax in axes[::ncols]:
                ax.set_ylabel("Tokens per image\n(incl. CLS)")
            fig.suptitle(f"{model} on {data}: tokens per block (solid: attention; dotted: MLP, where it differs)",
                         y=1.0)
            fig.tight_layout()
            paths += save_figure(fig, Path(out_dir), f"tokens_per_block_{slug}")
    return paths


def recorded_prior_target(group: pd.DataFrame, depth: int) -> Optional[np.ndarray]:
    """The prior target the method used, from the first record of ``group`` (by seed) whose
    ``method_info.prior_target`` is a list of ``depth`` numbers: index ``d - 1`` is the target probability of
    halting depth ``d``. ``None`` when no record carries one (the method alone knows its target)."""
    for _, rec in group.sort_values("seed", key=load.text_sort_key, kind="stable").iterrows():
        info = rec["method_info"] if isinstance(rec["method_info"], dict) else {}
        target = info.get("prior_target")
        if isinstance(target, list) and len(target) == depth:
            values = np.asarray([load.number(v) for v in target])
            if np.isfinite(values).all():
                return values
    return None


def plot_depth_prior(agg: pd.DataFrame, records: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """For every method whose records carry ``method_info.prior_target``: its halting-depth distribution
    (bars, mean over seeds) against that target (line), one panel per setting, one figure per backbone."""
    paths: list[Path] = []
    with_prior = sorted({m for m, info in zip(records["method"], records["method_info"])
                         if isinstance(info, dict) and isinstance(info.get("prior_target"), list)}) \
        if not records.empty else []
    if agg.empty or not with_prior:
        print("note: no record carries method_info.prior_target; skipped the depth-prior figure")
        return paths
    for model, data, slug, part in backbones(agg):
        for method in with_prior:
            paths += _depth_prior_figure(part[part["method"] == method], records, model, data, slug, method,
                                         out_dir)
    return paths


def _depth_prior_figure(settings: pd.DataFrame, records: pd.DataFrame, model: str, data: str, slug: str,
                        method: str, out_dir: str | Path) -> list[Path]:
    panels = []
    for _, row in settings.iterrows():
        group = records_of(records, row)
        hists = [h for h in (load.depth_histogram(t) for t in group["tokens"]) if h is not None]
        if hists and len({len(h) for h in hists}) == 1:
            prior = recorded_prior_target(group, len(hists[0]) - 1)
            if prior is None:
                print(f"note: {method} {row['setting']} on {model}/{data}: no method_info.prior_target in its "
                      f"records; its halting histogram is drawn without a prior target")
            panels.append((row, np.mean(hists, axis=0), prior))
    if not panels:
        if not settings.empty:
            print(f"note: {method} records of {model} on {data} lack tokens.depth_histogram; skipped")
        return []
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    with figure_style():
        fig = Figure(figsize=(4.2 * ncols, 3.3 * nrows + 0.4))
        # own y-ranges: prior=official's target is not normalised (its peak can exceed 1)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, (row, hist, prior) in zip(axes, panels):
            depth = len(hist) - 1
            d = np.arange(depth + 1)
            ax.bar(d, hist, width=0.8, color=sns.color_palette("colorblind")[0], alpha=0.85,
                   label="observed")
            if prior is not None:
                total = None if math.isclose(prior.sum(), 1.0, abs_tol=1e-6) else f"sums to {prior.sum():.2f}"
                detail = ", ".join(filter(None, (row["method_params"].get("prior"), total)))
                ax.plot(d[1:], prior, color="black", marker="o", ms=3, lw=1.3,
                        label="prior target" + (f" ({detail})" if detail else ""))
            observed_mean = float(np.sum(hist * d))
            ax.axvline(observed_mean, color=sns.color_palette("colorblind")[3], ls="--", lw=1.2,
                       label=f"observed mean {observed_mean:.2f}")
            ax.set_title(wrap(row["setting"], 40), fontsize=9)
            ax.set_xlabel("Halting depth (blocks that processed the token)")
            ax.set_xticks(d[:: 2 if depth > 12 else 1])
            ax.legend(fontsize=7, frameon=False, loc="upper left")
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        for ax in axes[::ncols]:
            ax.set_ylabel("Fraction of patch tokens")
        fig.suptitle(f"{model} on {data}: {method} halting depth vs prior target", y=1.0)
        fig.tight_layout()
        return save_figure(fig, Path(out_dir), f"{method}_depth_{slug}")


FIGURES = (plot_accuracy_vs_gflops, plot_accuracy_vs_throughput, plot_tokens_per_block, plot_depth_prior,
           plot_depth_maps, plot_object_depth, plot_mean_depth, plot_kept_iou)


def write_figures(agg: pd.DataFrame, records: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Every figure for every backbone, all from the one ``agg`` (module docstring); returns the written paths."""
    if agg.empty:
        print("note: no run or measure records, no figures written")
        return []
    paths: list[Path] = []
    for figure in FIGURES:
        paths += figure(agg, records, out_dir)
    return paths
