"""The object-outline figure: owns drawing each method's per-token depth over the ground-truth object outline.

For every backbone whose records carry the object masks of their mapped images (``tokens.maps[].object_mask``
or ``object_tokens``, written on data with ground truth such as ``data=digit_scenes``;
``experiments/records/token_maps.py``): one column per validation image (the first ``max_images`` that every
shown setting mapped, matched by ``index``), one row per method at its default setting (as its records state
it; a method without one: the setting :func:`analysis.figure_data.representative_settings` picks), the first
seed. Each panel is the image in grey, the token depth over it and the object's outline (the pixel mask where
the record has it, else the object tokens' outline), with that image's object recall (object tokens that reach
the last block). The reference (family ``none``) keeps every token and is left out. Writes
``object_depth_<backbone>.{png,pdf}``; prints a ``note:`` where the records have no masks.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from .depth_figures import _maps_by_seed, label_row
from .figure_data import backbones, depth_of, representative_settings
from .formatting import REFERENCE
from .style import figure_style, save_figure

OUTLINE = "#ff3b30"  # red: visible over viridis and over grey


def outline_mask(entry: dict) -> Optional[np.ndarray]:
    """The mask whose outline a panel draws: the pixel mask, else the object tokens, else ``None``."""
    for key in ("object_mask", "object_tokens"):
        if entry.get(key) is not None and np.ndim(entry[key]) == 2:
            return entry[key]
    return None


def image_recall(entry: dict, depth: int) -> float:
    """The share of the image's object tokens whose depth is ``depth`` (reach the last block); NaN without
    object tokens, or when none is an object token or the grids differ."""
    tokens = entry.get("object_tokens")
    if tokens is None or np.shape(tokens) != np.shape(entry["depth"]) or not np.any(tokens):
        return math.nan
    return float(np.mean(np.asarray(entry["depth"])[np.asarray(tokens, dtype=bool)] >= depth))


def chosen_settings(agg: pd.DataFrame, records: pd.DataFrame, model: str, data: str) -> pd.DataFrame:
    """One row per reduction method: its default run setting where its records state it, else the
    representative one; only settings whose records carry masks in their maps."""
    part = agg[(agg["model"] == model) & (agg["data"] == data) & (agg["family"] != REFERENCE)]
    fallback = representative_settings(agg, records, model, data, "maps")
    chosen = []
    for method, settings in part.groupby("method", sort=False):
        defaults = settings[(settings["kind"] == "run") &
                            settings["is_default"].map(lambda v: isinstance(v, (bool, np.bool_)) and bool(v))]
        pick = defaults if len(defaults) else fallback[fallback["method"] == method]
        for index, row in pick.iterrows():
            maps = _maps_by_seed(records, row)
            if maps and any(outline_mask(e) is not None for e in next(iter(maps.values())).values()):
                chosen.append(index)
                break
    return part.loc[chosen]


def plot_object_depth(agg: pd.DataFrame, records: pd.DataFrame, out_dir: str | Path,
                      max_images: int = 4) -> list[Path]:
    """The figure of the module docstring, per backbone with masks; returns the written paths."""
    paths: list[Path] = []
    for model, data, slug, _ in backbones(agg) if not agg.empty else []:
        recs = records[(records["model"] == model) & (records["data"] == data)]
        chosen = chosen_settings(agg, records, model, data)
        if chosen.empty:
            if any(outline_mask(m) is not None for t in recs["tokens"] for m in _entries(t)):
                print(f"note: the masked token maps of {model} on {data} belong to the reference only; "
                      "skipped the object-outline figure")
            continue
        rows = [(row, next(iter(_maps_by_seed(recs, row).values()))) for _, row in chosen.iterrows()]
        if any(np.ndim(entry["depth"]) == 3 for _, maps in rows for entry in maps.values()):
            continue  # video: the outline figure is drawn for images
        common = [i for i in rows[0][1] if all(i in maps for _, maps in rows)][:max_images]
        if not common:
            print(f"note: the masked token maps of {model} on {data} share no image index; skipped the "
                  "object-outline figure")
            continue
        depth = depth_of(recs) or int(max(np.max(maps[i]["depth"]) for _, maps in rows for i in common))
        paths += _draw(rows, common, depth, model, data, slug, Path(out_dir))
    return paths


def _entries(tokens) -> list[dict]:
    from . import load
    return load.depth_maps(tokens) if isinstance(tokens, dict) else []


def _draw(rows: list, common: list, depth: int, model: str, data: str, slug: str, out: Path) -> list[Path]:
    norm = Normalize(vmin=0, vmax=depth)
    with figure_style():
        fig = Figure(figsize=(1.8 * len(common) + 3.0, 1.85 * len(rows) + 0.5), layout="constrained")
        axes = fig.subplots(len(rows), len(common), squeeze=False)
        image = None
        for r, (row, maps) in enumerate(rows):
            for c, index in enumerate(common):
                ax, entry = axes[r, c], maps[index]
                if entry["image"] is not None:
                    ax.imshow(entry["image"], cmap="gray", vmin=0, vmax=1, extent=(0, 1, 1, 0))
                image = ax.imshow(entry["depth"], cmap="viridis", norm=norm, alpha=0.6, extent=(0, 1, 1, 0),
                                  interpolation="nearest")
                mask = outline_mask(entry)
                if mask is not None and mask.any() and not mask.all():
                    ax.contour(mask.astype(float), levels=[0.5], colors=OUTLINE, linewidths=1.1,
                               extent=(0, 1, 1, 0), origin="upper")
                recall = image_recall(entry, depth)
                if not math.isnan(recall):
                    ax.set_xlabel(f"recall {100 * recall:.0f}%", fontsize=7.5, labelpad=1)
                if r == 0:
                    label = entry.get("label")
                    ax.set_title(f"image {index}" + (f" (class {label})" if label is not None else ""), fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
            label_row(axes[r, 0], row)
        cbar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, aspect=30)
        cbar.set_label("Token depth (blocks that processed the patch)")
        fig.suptitle(f"{model} on {data}: per-token depth over the object outline (red)")
        return save_figure(fig, out, f"object_depth_{slug}")
