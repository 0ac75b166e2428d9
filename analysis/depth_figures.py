"""Token-map figures of the report: owns the per-image depth maps, the per-patch mean depth heatmaps and the
kept-token IoU between methods (with its CSV). Each compares one setting per method
(:func:`analysis.figure_data.representative_settings`); each takes ``(agg, records, out_dir)`` like every
figure of :mod:`analysis.plots` and prints a ``note:`` instead of failing when the records lack what it needs.

- ``depth_maps``: per-image token depth overlaid on a few validation images (as in the A-ViT paper);
- ``mean_depth``: per-patch average depth over the validation set;
- ``kept_iou``: IoU of the kept-token sets between methods at a few blocks (as in the TokenReduction suite):
  a patch is kept at block ``l`` (0-based) when its depth is greater than ``l``; images are matched by
  ``index`` and records by seed. The values also go to ``kept_iou_<backbone>.csv``.
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

from . import load
from .figure_data import backbones, depth_of, records_of, representative_settings
from .formatting import DASH, REFERENCE
from .style import figure_style, save_figure, wrap


def label_row(ax, row: pd.Series) -> None:
    """A figure row's label on its first axes: method, setting (wrapped) and mean GFLOPs."""
    text = f"{row['method']}\n{wrap(str(row['setting']), 22)}"
    if not math.isnan(row["gflops_mean"]):
        text += f"\n{row['gflops_mean']:.3f} GFLOPs"
    ax.set_ylabel(text, rotation=0, ha="right", va="center", fontsize=8)


def _maps_by_seed(records: pd.DataFrame, row: pd.Series) -> dict:
    group = records_of(records, row)
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
    for model, data, slug, part in backbones(agg) if not agg.empty else []:
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
        depth = depth_of(recs) or int(max(np.max(maps[i]["depth"]) for _, maps in rows for i in common))
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
                label_row(axes[r, 0], row)
            cbar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, aspect=30)
            cbar.set_label("Token depth (blocks that processed the patch)")
            fig.suptitle(f"{model} on {data}: per-image token depth")
            paths += save_figure(fig, Path(out_dir), f"depth_maps_{slug}")
    return paths


def plot_mean_depth(agg: pd.DataFrame, records: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Per-patch average depth over the validation set, one heatmap per reduction setting (mean over seeds)."""
    paths: list[Path] = []
    for model, data, slug, part in backbones(agg) if not agg.empty else []:
        recs = records[(records["model"] == model) & (records["data"] == data)]
        panels = []
        for _, row in part[part["family"] != REFERENCE].iterrows():
            group = records_of(recs, row)
            grids = [g for g in (load.mean_patch_depth(t) for t in group["tokens"]) if g is not None]
            if grids and len({g.shape for g in grids}) == 1:
                panels.append((row, np.mean(grids, axis=0)))
        if not panels:
            print(f"note: no tokens.mean_patch_depth for {model} on {data}; skipped the mean depth heatmaps")
            continue
        depth = depth_of(recs) or int(np.ceil(max(g.max() for _, g in panels)))
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
    depth = depth_of(recs)
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
    for model, data, slug, _ in backbones(agg) if not agg.empty else []:
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
