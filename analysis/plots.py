"""Figures of the report (seaborn on matplotlib ``Figure`` objects, no pyplot state): owns every plot and the
per-block kept-token IoU computation. Each figure is written as PNG and PDF; every function returns the paths
it wrote and prints a ``note:`` instead of failing when the records lack what it needs.

Every figure takes ``(agg, records, out_dir)``: ``records`` are the run and measure records
(``tables.without_tradeoff``) and ``agg`` is ``tables.aggregate(records)``, computed once by the caller
(:func:`write_figures` passes it on). The look (style, colours, saving) is :mod:`analysis.style`'s.

Per backbone (``model`` on ``data``):

- ``top1_vs_gflops``: top-1 vs GFLOPs, one marker per method, settings of a method joined, Pareto front dashed;
- ``top1_vs_throughput``: the same against img/s, one panel per device / batch size / dtype;
- ``tokens_per_block``: tokens each block's attention (solid) and MLP (dotted) ran on, one panel per method;
- ``adavit_depth``: A-ViT's halting-depth histogram against the prior target the method used, read from the
  record (``method_info.prior_target``: the target probability of halting depth 1..L, as the method computed
  it for its ``prior`` mode); a record without it gets no target line and a ``note:``;
- ``depth_maps``: per-image token depth overlaid on a few validation images (as in the A-ViT paper);
- ``mean_depth``: per-patch average depth over the validation set;
- ``kept_iou``: IoU of the kept-token sets between methods at a few blocks (as in the TokenReduction suite):
  a patch is kept at block ``l`` (0-based) when its depth is greater than ``l``; images are matched by
  ``index`` and records by seed. The values also go to ``kept_iou_<backbone>.csv``.

The three token-map figures compare one setting per method: the one whose FLOPs ratio is closest to the
median ratio of all reduced settings (a common budget), see :func:`representative_settings`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from . import load, tables
from .formatting import DASH, condition_title, method_rank
from .style import GFLOPS_LABEL, TOP1_LABEL, figure_style, legend_outside, method_styles, save_figure, wrap


def _backbones(agg: pd.DataFrame) -> list[tuple[str, str, str, pd.DataFrame]]:
    return [(m, d, s, g.reset_index(drop=True)) for (m, d, s), g in agg.groupby(["model", "data", "slug"], sort=True)]


def _depth_of(records: pd.DataFrame) -> Optional[int]:
    """Block count L: from the token curves (or the depth histogram) of the records."""
    for tokens in records["tokens"]:
        curve = (tokens or {}).get("attn_mean")
        if isinstance(curve, list) and curve:
            return len(curve)
        hist = (tokens or {}).get("depth_histogram")
        if isinstance(hist, list) and len(hist) > 1:
            return len(hist) - 1
    return None


def _draw_front(ax, x: pd.Series, y: pd.Series, maximize_x: bool) -> None:
    mask = tables.pareto_front(x, y, maximize_x=maximize_x)
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
        ax.errorbar(group[xcol], group["top1_mean"], yerr=group["top1_std"].fillna(0.0),
                    xerr=group[xerr].fillna(0.0) if xerr else None, color=color, marker=marker,
                    ms=11 if marker == "*" else 7, lw=1.0, capsize=2, elinewidth=0.8, label=method, zorder=3)


def plot_accuracy_vs_gflops(agg: pd.DataFrame, records: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Top-1 against GFLOPs per backbone, with the Pareto front (lower GFLOPs and higher top-1 are better)."""
    paths: list[Path] = []
    if agg.empty:
        return paths
    styles = method_styles(list(agg["method"]))
    for model, data, slug, part in _backbones(agg):
        usable = part.dropna(subset=["gflops_mean", "top1_mean"])
        if usable.empty:
            print(f"note: no record of {model} on {data} has both FLOPs and top-1; skipped top-1 vs GFLOPs")
            continue
        missing = sorted(set(part["method"]) - set(usable["method"]), key=method_rank)
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
    styles = method_styles(list(agg["method"]))
    for model, data, slug, part in _backbones(agg):
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
    """Survival curves: mean tokens per image at each block, one panel per method, dense as reference."""
    paths: list[Path] = []
    for model, data, slug, part in _backbones(agg) if not agg.empty else []:
        recs = records[(records["model"] == model) & (records["data"] == data)]
        dense = recs[recs["method"] == "dense"]
        dense_curve = _mean_curve(dense, "attn_mean") if not dense.empty else None
        panels = []
        for method, settings in part.groupby("method", sort=False):
            if method == "dense":
                continue
            lines = []
            for _, row in settings.iterrows():
                group = _records_of(recs, row)
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
                    ax.plot(np.arange(len(dense_curve)), dense_curve, color="0.6", lw=1.5, label="dense")
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


def plot_adavit_depth(agg: pd.DataFrame, records: pd.DataFrame, out_dir: str | Path,
                      method: str = "adavit") -> list[Path]:
    """A-ViT's halting-depth distribution (bars, mean over seeds) against the recorded prior target (line)."""
    paths: list[Path] = []
    if agg.empty or not (agg["method"] == method).any():
        print(f"note: no {method} records; skipped the halting-depth histogram")
        return paths
    for model, data, slug, part in _backbones(agg):
        settings = part[part["method"] == method]
        panels = []
        for _, row in settings.iterrows():
            group = _records_of(records, row)
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
            continue
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
            fig.suptitle(f"{model} on {data}: A-ViT halting depth vs prior target", y=1.0)
            fig.tight_layout()
            paths += save_figure(fig, Path(out_dir), f"adavit_depth_{slug}")
    return paths


def representative_settings(agg: pd.DataFrame, records: pd.DataFrame, model: str, data: str,
                            need: str = "maps") -> pd.DataFrame:
    """One setting per reduction method (dense excluded) whose records carry ``tokens.<need>``: the one with
    FLOPs ratio closest to the median ratio of all such settings (ties and missing FLOPs: sort order)."""
    part = agg[(agg["model"] == model) & (agg["data"] == data) & (agg["method"] != "dense")]
    recs = records[(records["model"] == model) & (records["data"] == data)]
    has = set()
    for _, rec in recs.iterrows():
        tokens = rec["tokens"] or {}
        ok = bool(load.depth_maps(tokens)) if need == "maps" else load.mean_patch_depth(tokens) is not None
        if ok:
            has.add((rec["method"], rec["params_key"], rec["kind"]))
    # a boolean array, not a list: an empty list would select columns (a backbone with dense records only)
    part = part[np.array([key in has for key in zip(part["method"], part["params_key"], part["kind"])], dtype=bool)]
    if (part["kind"] == "run").any():
        part = part[part["kind"] == "run"]  # trained models, when there are any
    if part.empty:
        return part
    target = part["flops_ratio_mean"].median()
    chosen = []
    for _, settings in part.groupby("method", sort=False):
        distance = (settings["flops_ratio_mean"] - target).abs().fillna(np.inf)
        chosen.append(settings.index[int(np.argmin(distance.to_numpy()))])
    return part.loc[chosen]


def _records_of(records: pd.DataFrame, row: pd.Series) -> pd.DataFrame:
    """The records behind one aggregated row (same backbone, method, params and kind)."""
    return records[(records["model"] == row["model"]) & (records["data"] == row["data"]) &
                   (records["method"] == row["method"]) & (records["params_key"] == row["params_key"]) &
                   (records["kind"] == row["kind"])]


def _maps_by_seed(records: pd.DataFrame, row: pd.Series) -> dict:
    group = _records_of(records, row)
    group = group.sort_values("seed", key=load.text_sort_key, kind="stable")
    out = {}
    for _, rec in group.iterrows():
        maps = load.depth_maps(rec["tokens"])
        if maps:
            out[rec["seed"]] = {m["index"]: m for m in maps}
    return out


def plot_depth_maps(agg: pd.DataFrame, records: pd.DataFrame, out_dir: str | Path,
                    max_images: int = 4) -> list[Path]:
    """Per-image token depth overlaid on validation images: one row per method, one column per image."""
    paths: list[Path] = []
    for model, data, slug, part in _backbones(agg) if not agg.empty else []:
        recs = records[(records["model"] == model) & (records["data"] == data)]
        chosen = representative_settings(agg, records, model, data, "maps")
        if chosen.empty:
            print(f"note: no tokens.maps in the records of {model} on {data}; skipped depth maps")
            continue
        rows = []
        for _, row in chosen.iterrows():
            by_seed = _maps_by_seed(recs, row)
            rows.append((row, next(iter(by_seed.values()))))
        if any(np.ndim(entry["depth"]) == 3 for _, maps in rows for entry in maps.values()):
            print(f"note: {model} on {data} is a video backbone: its per-frame depth maps are in the video "
                  "section (analysis/video.py)")
            continue
        common = [i for i in rows[0][1] if all(i in maps for _, maps in rows)][:max_images]
        if not common:
            print(f"note: the token maps of {model} on {data} share no image index; skipped depth maps")
            continue
        depth = _depth_of(recs) or int(max(np.max(maps[i]["depth"]) for _, maps in rows for i in common))
        norm = Normalize(vmin=0, vmax=depth)
        n_rows, n_cols = len(rows) + 1, len(common)
        with figure_style():
            fig = Figure(figsize=(1.7 * n_cols + 3.0, 1.75 * n_rows + 0.4), layout="constrained")
            axes = fig.subplots(n_rows, n_cols, squeeze=False)
            image = None
            for c, index in enumerate(common):
                sample = rows[0][1][index]
                label = sample.get("label")
                axes[0, c].set_title(f"image {index}" + (f" (class {label})" if label is not None else ""),
                                     fontsize=8)
                if sample["image"] is not None:
                    axes[0, c].imshow(sample["image"], cmap="gray", vmin=0, vmax=1, extent=(0, 1, 1, 0))
                for r, (row, maps) in enumerate(rows, start=1):
                    entry = maps[index]
                    if entry["image"] is not None:
                        axes[r, c].imshow(entry["image"], cmap="gray", vmin=0, vmax=1, extent=(0, 1, 1, 0))
                    image = axes[r, c].imshow(entry["depth"], cmap="viridis", norm=norm, alpha=0.65,
                                              extent=(0, 1, 1, 0), interpolation="nearest")
            for ax in axes.ravel():
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
            axes[0, 0].set_ylabel("input", rotation=0, ha="right", va="center", fontsize=8.5)
            for r, (row, _) in enumerate(rows, start=1):
                text = f"{row['method']}\n{wrap(row['setting'], 22)}"
                if not math.isnan(row["gflops_mean"]):
                    text += f"\n{row['gflops_mean']:.3f} GFLOPs"
                axes[r, 0].set_ylabel(text, rotation=0, ha="right", va="center", fontsize=8)
            cbar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, aspect=30)
            cbar.set_label("Token depth (blocks that processed the patch)")
            fig.suptitle(f"{model} on {data}: per-image token depth")
            paths += save_figure(fig, Path(out_dir), f"depth_maps_{slug}")
    return paths


def plot_mean_depth(agg: pd.DataFrame, records: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Per-patch average depth over the validation set, one heatmap per reduction setting (mean over seeds)."""
    paths: list[Path] = []
    for model, data, slug, part in _backbones(agg) if not agg.empty else []:
        recs = records[(records["model"] == model) & (records["data"] == data)]
        panels = []
        for _, row in part[part["method"] != "dense"].iterrows():
            group = _records_of(recs, row)
            grids = [g for g in (load.mean_patch_depth(t) for t in group["tokens"]) if g is not None]
            if grids and len({g.shape for g in grids}) == 1:
                panels.append((row, np.mean(grids, axis=0)))
        if not panels:
            print(f"note: no tokens.mean_patch_depth for {model} on {data}; skipped the mean depth heatmaps")
            continue
        depth = _depth_of(recs) or int(np.ceil(max(g.max() for _, g in panels)))
        norm = Normalize(vmin=0, vmax=depth)
        ncols = min(5, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        with figure_style():
            fig = Figure(figsize=(2.3 * ncols + 1.2, 2.75 * nrows + 0.3))
            axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
            image = None
            for ax, (row, grid) in zip(axes, panels):
                image = ax.imshow(grid, cmap="viridis", norm=norm, interpolation="nearest")
                ax.set_title(f"{row['method']}\n{wrap(row['setting'], 24)}\nmean {grid.mean():.2f}", fontsize=8)
            for ax in axes:
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
            for ax in axes[len(panels):]:
                ax.set_visible(False)
            cbar = fig.colorbar(image, ax=axes.tolist(), shrink=0.85, pad=0.02)
            cbar.set_label("Mean token depth over the validation set (blocks)")
            fig.suptitle(f"{model} on {data}: per-patch average depth (dense: {depth} everywhere)", y=1.0)
            paths += save_figure(fig, Path(out_dir), f"mean_depth_{slug}")
    return paths


def kept_iou(depth_a: np.ndarray, depth_b: np.ndarray, block: int) -> float:
    """IoU of the patches kept at ``block`` (0-based; kept means depth > block) by two depth maps; NaN when
    neither keeps any."""
    keep_a, keep_b = np.asarray(depth_a) > block, np.asarray(depth_b) > block
    union = np.logical_or(keep_a, keep_b).sum()
    return float(np.logical_and(keep_a, keep_b).sum() / union) if union else math.nan


def iou_blocks(depth: int) -> list[int]:
    """The blocks the IoU figure shows: about a quarter, half and three quarters in, and the last."""
    return sorted({min(depth - 1, math.ceil(depth * f)) for f in (0.25, 0.5, 0.75)} | {depth - 1})


def kept_iou_frame(agg: pd.DataFrame, records: pd.DataFrame, model: str, data: str,
                   blocks: Optional[list[int]] = None) -> pd.DataFrame:
    """Mean kept-token IoU between the representative settings of each pair of methods, per block.

    Columns ``block`` (0-based), ``method_a``, ``method_b``, ``iou`` (mean over matched seeds and shared
    images), ``n`` (image pairs). Seeds are matched when both methods have them, else the first of each.
    """
    columns = ["block", "method_a", "method_b", "iou", "n"]
    if agg.empty:
        return pd.DataFrame(columns=columns)
    recs = records[(records["model"] == model) & (records["data"] == data)]
    chosen = representative_settings(agg, records, model, data, "maps")
    depth = _depth_of(recs)
    if chosen.empty or depth is None:
        return pd.DataFrame(columns=columns)
    blocks = iou_blocks(depth) if blocks is None else blocks
    maps = {row["method"]: _maps_by_seed(recs, row) for _, row in chosen.iterrows()}
    rows = []
    for a in maps:
        for b in maps:
            seeds = [s for s in maps[a] if s in maps[b]]
            pairs = [(maps[a][s], maps[b][s]) for s in seeds] or [(next(iter(maps[a].values())),
                                                                    next(iter(maps[b].values())))]
            for block in blocks:
                values = [kept_iou(ma[i]["depth"], mb[i]["depth"], block)
                          for ma, mb in pairs for i in ma if i in mb and ma[i]["depth"].shape == mb[i]["depth"].shape]
                finite = [v for v in values if not math.isnan(v)]
                rows.append({"block": block, "method_a": a, "method_b": b,
                             "iou": float(np.mean(finite)) if finite else math.nan, "n": len(finite)})
    return pd.DataFrame(rows, columns=columns)


def plot_kept_iou(agg: pd.DataFrame, records: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Heatmaps of the kept-token IoU between methods at a few blocks; also writes the values as CSV."""
    paths: list[Path] = []
    for model, data, slug, _ in _backbones(agg) if not agg.empty else []:
        frame = kept_iou_frame(agg, records, model, data)
        methods = list(dict.fromkeys(frame["method_a"]))
        if len(methods) < 2:
            print(f"note: fewer than two methods with tokens.maps for {model} on {data}; skipped kept-token IoU")
            continue
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        csv = out / f"kept_iou_{slug}.csv"
        csv.write_text(frame.to_csv(index=False, float_format="%.6f", lineterminator="\n"), encoding="utf-8")
        paths.append(csv)
        blocks = sorted(frame["block"].unique())
        chosen = representative_settings(agg, records, model, data, "maps")
        ylabels = [f"{r['method']} ({wrap(r['setting'], 26)})" if r["setting"] not in ("default", DASH)
                   else r["method"] for _, r in chosen.iterrows()]
        ncols = min(2, len(blocks))
        nrows = math.ceil(len(blocks) / ncols)
        size = 0.55 * len(methods) + 1.2
        with figure_style():
            fig = Figure(figsize=(size * ncols + 3.4, size * nrows + 0.8), layout="constrained")
            axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
            mesh = None
            for ax, block in zip(axes, blocks):
                matrix = (frame[frame["block"] == block].pivot(index="method_a", columns="method_b", values="iou")
                          .reindex(index=methods, columns=methods))
                sns.heatmap(matrix, ax=ax, vmin=0, vmax=1, cmap="mako", annot=True, fmt=".2f",
                            annot_kws={"fontsize": 7.5}, square=True, cbar=False, xticklabels=methods,
                            yticklabels=ylabels, linewidths=0.5, linecolor="white")
                mesh = ax.collections[0]
                ax.set_title(f"block {block} (0-based)")
                ax.set_xlabel("")
                ax.set_ylabel("")
                ax.tick_params(axis="x", labelrotation=45, labelsize=8)
                ax.tick_params(axis="y", labelsize=8)
                for label in ax.get_xticklabels():
                    label.set_horizontalalignment("right")
            for ax in axes[len(blocks):]:
                ax.set_visible(False)
            cbar = fig.colorbar(mesh, ax=axes.tolist(), shrink=0.7, aspect=30)
            cbar.set_label("IoU of kept patch tokens (mean over images)")
            fig.suptitle(f"{model} on {data}: kept-token IoU between methods\n(kept at block l: depth > l)")
            paths += save_figure(fig, out, f"kept_iou_{slug}")
    return paths


FIGURES = (plot_accuracy_vs_gflops, plot_accuracy_vs_throughput, plot_tokens_per_block, plot_adavit_depth,
           plot_depth_maps, plot_mean_depth, plot_kept_iou)


def write_figures(agg: pd.DataFrame, records: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Every figure for every backbone, all from the one ``agg`` (module docstring); returns the written paths."""
    if agg.empty:
        print("note: no run or measure records, no figures written")
        return []
    paths: list[Path] = []
    for figure in FIGURES:
        paths += figure(agg, records, out_dir)
    return paths
