"""The report's video section: owns the per-frame depth figure and the motion table of video backbones.

A video backbone (``methods/video.py``) runs on space-time tubelet tokens: its records carry ``tokens.grid``
``[T', H', W']`` (three entries, time-major), per-clip maps whose ``patch_depth`` is ``[T', H', W']`` and whose
thumbnail is a filmstrip ``[H, T' * W, C]`` (first frame of each time slot, left to right; the format is
``experiments/records/token_maps.py``'s, decoded with :mod:`analysis.load`), and, on video data with a known moving
region, ``tokens.motion`` (``experiments/train/engine.py`` ``token_summary``).

:func:`write_video_section` ``(agg, records, out_dir)`` writes, per video backbone (``<backbone>`` = the slug of
:func:`analysis.aggregation.aggregate`):

- ``video_depth_<backbone>.{png,pdf}``: halting depth over time for up to :data:`MAX_CLIPS` clips of one
  adaptive setting (a method of the halting family, as its records declare, if one has maps, else the first
  reduction method, in the report's order, whose maps vary): one row per clip, the filmstrip, then the patch depth of each time slot on a shared 0..depth scale;
- ``video_motion_<backbone>.{md,tex,csv}``: per method and setting, seed mean ± std of the moving region's
  token share, its share of the blocks run, and its mean depth over the static tokens' (:data:`FOOTNOTE`).

An item the records cannot support gets a ``note:`` line instead; image backbones (2-D grids) are not touched.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from . import aggregation, load, tables
from .figure_data import depth_of, records_of
from .formatting import REFERENCE, mean_std, plus_minus
from .style import figure_style, save_figure, wrap

MAX_CLIPS = 4
PREFERRED_FAMILY = "halting"  # tokens stop per image: their depth maps are the point of the figure
FOOTNOTE = (
    "Moving region = tokens whose tubelet holds a pixel that changes by > 0.25 (of the [0, 1] range) between "
    "frames; compute share = share of blocks run "
    "(patch depth), attention's quadratic part aside. Shares in % over all eval clips; depth ratio = mean depth "
    "of moving tokens ÷ mean depth of static tokens (1 = no preference; per seed, then averaged); mean ± sample "
    "std over seeds; — = not measured."
)


# --- reading video tokens -------------------------------------------------------------------------------------

def video_grid(tokens: Optional[dict]) -> Optional[tuple[int, int, int]]:
    """The token grid ``(time, rows, cols)`` of a video record, ``None`` for an image record (2-D or no grid)."""
    grid = (tokens or {}).get("grid")
    if isinstance(grid, (list, tuple)) and len(grid) == 3:
        return int(grid[0]), int(grid[1]), int(grid[2])
    return None


def _depth_volume(value: Any, grid: tuple[int, int, int]) -> Optional[np.ndarray]:
    """One clip's patch depth as a ``[T', H', W']`` float array (PACKED, nested or flat time-major lists)."""
    try:
        array = load.unpack_array(value) if load.is_packed(value) else np.asarray(value, dtype=float)
        array = np.asarray(array, dtype=float)
        if array.ndim == 1 and array.size == int(np.prod(grid)):
            array = array.reshape(grid)  # flat: time-major, as the tokens are ordered
    except (TypeError, ValueError):
        return None  # a malformed entry is dropped, like load.depth_maps does
    return array if array.ndim == 3 and array.size else None


def video_maps(tokens: Optional[dict]) -> list[dict[str, Any]]:
    """``tokens.maps`` of a video record as ``[{"index", "label", "depth" [T', H', W'], "image" (filmstrip array
    or None)}]``; entries without a usable 3-D depth map are dropped, image records give ``[]``."""
    grid = video_grid(tokens)
    maps = (tokens or {}).get("maps")
    if grid is None or not isinstance(maps, list):
        return []
    out = []
    for position, entry in enumerate(maps):
        if not isinstance(entry, dict):
            continue
        depth = _depth_volume(entry.get("patch_depth", entry.get("depth")), grid)
        if depth is None:
            continue
        out.append({"index": entry.get("index", position), "label": entry.get("label"), "depth": depth,
                    "image": load._image(entry.get("thumbnail", entry.get("image")))})
    return out


def motion_values(tokens: Optional[dict]) -> Optional[dict[str, float]]:
    """``tokens.motion`` as ``token_share``, ``depth_share`` and ``depth_ratio`` (moving ÷ static mean depth,
    NaN when either is missing or the static mean is 0); ``None`` without a motion summary."""
    motion = (tokens or {}).get("motion")
    if not isinstance(motion, dict):
        return None
    moving, static = load.number(motion.get("mean_depth_moving")), load.number(motion.get("mean_depth_static"))
    return {"token_share": load.number(motion.get("token_share")),
            "depth_share": load.number(motion.get("depth_share")),
            "depth_ratio": moving / static if static > 0 else math.nan}


def video_backbones(agg: pd.DataFrame, records: pd.DataFrame) -> list[tuple[str, str, str]]:
    """``(model, data, slug)`` of every backbone of ``agg`` with a record on a 3-D token grid, sorted."""
    if agg.empty or records.empty:
        return []
    video = records[[video_grid(t) is not None for t in records["tokens"]]]
    found = set(zip(video["model"], video["data"]))
    keys = agg[["model", "data", "slug"]].drop_duplicates().itertuples(index=False)
    return sorted((m, d, s) for m, d, s in keys if (m, d) in found)


# --- per-frame depth figure -----------------------------------------------------------------------------------

def _first_maps(group: pd.DataFrame) -> list[dict[str, Any]]:
    """The video maps of the first record of ``group`` (by seed) that has any."""
    for tokens in group.sort_values("seed", key=load.text_sort_key, kind="stable")["tokens"]:
        maps = video_maps(tokens)
        if maps:
            return maps
    return []


def depth_setting(part: pd.DataFrame, recs: pd.DataFrame) -> Optional[tuple[pd.Series, list[dict[str, Any]]]]:
    """The setting whose maps the figure shows, with its maps: the first setting of a halting-family method
    with maps (trained runs before measures), else the first setting of a reduction method (not the family
    ``none`` reference), in ``agg`` order, whose depths vary."""
    candidates = part[part["family"] != REFERENCE].sort_values("kind", key=lambda k: k != "run", kind="stable")
    fallback = None
    for _, row in candidates.iterrows():
        maps = _first_maps(records_of(recs, row))
        if not maps:
            continue
        if row["family"] == PREFERRED_FAMILY:
            return row, maps
        varies = len(np.unique(np.concatenate([m["depth"].ravel() for m in maps]))) > 1
        if fallback is None and varies:  # a constant map says nothing about where compute went
            fallback = (row, maps)
    return fallback


def _draw_clip(cells, entry: dict[str, Any], norm: Normalize, titled: bool):
    """One row: the filmstrip, then the depth of each time slot (titled on the top row); returns the last depth
    image (for the colorbar)."""
    strip = cells[0]
    if entry["image"] is not None:
        strip.imshow(entry["image"], cmap="gray", vmin=0, vmax=1)
    label = entry.get("label")
    strip.set_ylabel(f"clip {entry['index']}" + (f"\n(class {label})" if label is not None else ""),
                     rotation=0, ha="right", va="center", fontsize=8)
    image = None
    for slot, ax in enumerate(cells[1:]):
        image = ax.imshow(entry["depth"][slot], cmap="viridis", norm=norm, interpolation="nearest")
        if titled:
            ax.set_title(f"time slot {slot}", fontsize=8)
    return image


def plot_video_depth(part: pd.DataFrame, recs: pd.DataFrame, model: str, data: str, slug: str,
                     out_dir: Path, max_clips: int = MAX_CLIPS) -> list[Path]:
    """``video_depth_<slug>.{png,pdf}`` for one video backbone; a ``note:`` and nothing when no setting fits."""
    chosen = depth_setting(part, recs)
    if chosen is None:
        print(f"note: no adaptive setting of {model} on {data} has video token maps with varying depth; "
              f"skipped the per-frame depth figure")
        return []
    row, maps = chosen
    maps = [m for m in maps if m["depth"].shape == maps[0]["depth"].shape][:max_clips]
    slots = maps[0]["depth"].shape[0]
    depth = depth_of(records_of(recs, row)) or int(max(m["depth"].max() for m in maps))
    norm = Normalize(vmin=0, vmax=depth)
    with figure_style():
        fig = Figure(figsize=(1.3 * 2 * slots + 1.6, 1.45 * len(maps) + 0.6), layout="constrained")
        # the filmstrip holds every slot's frame side by side: as wide as the depth panels together
        axes = fig.subplots(len(maps), slots + 1, squeeze=False, width_ratios=[slots] + [1] * slots)
        image = None
        for r, (cells, entry) in enumerate(zip(axes, maps)):
            image = _draw_clip(cells, entry, norm, titled=r == 0)
        axes[0, 0].set_title("frames (first of each time slot)", fontsize=8)
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
        cbar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, aspect=30)
        cbar.set_label("Token depth (blocks run)")
        fig.suptitle(wrap(f"{model} on {data}: per-frame token depth, {row['method']} ({row['setting']})", 70))
        return save_figure(fig, out_dir, f"video_depth_{slug}")


# --- motion table ---------------------------------------------------------------------------------------------

def motion_frame(part: pd.DataFrame, recs: pd.DataFrame) -> pd.DataFrame:
    """One row per setting of ``part`` (``agg`` order) whose records carry ``tokens.motion``: ``method``,
    ``setting``, ``params_key``, ``kind``, ``n_seeds`` and ``<value>_mean``/``<value>_std`` of
    ``token_share``, ``depth_share`` and ``depth_ratio`` over seeds."""
    rows = []
    for _, row in part.iterrows():
        values = [v for v in map(motion_values, records_of(recs, row)["tokens"]) if v is not None]
        if not values:
            continue
        out: dict[str, Any] = {"method": row["method"], "setting": row["setting"], "params_key": row["params_key"],
                               "kind": row["kind"], "n_seeds": len(values)}
        for key in ("token_share", "depth_share", "depth_ratio"):
            out[f"{key}_mean"], out[f"{key}_std"] = mean_std(pd.Series([v[key] for v in values], dtype=float))
        rows.append(out)
    return pd.DataFrame(rows)


def _percent(mean: float, std: float) -> str:
    return plus_minus(mean * 100.0, std * 100.0, ".1f")


def motion_table(frame: pd.DataFrame, model: str, data: str) -> tables.Table:
    """The motion table of one backbone from :func:`motion_frame` (display in %, CSV as fractions)."""
    display = pd.DataFrame({
        "Method": frame["method"], "Setting": frame["setting"], "Seeds": frame["n_seeds"].map(str),
        "Moving tokens (%)": [_percent(m, s) for m, s in zip(frame["token_share_mean"], frame["token_share_std"])],
        "Compute on moving (%)": [_percent(m, s) for m, s in zip(frame["depth_share_mean"],
                                                                 frame["depth_share_std"])],
        "Depth moving ÷ static": [plus_minus(m, s, ".3f") for m, s in zip(frame["depth_ratio_mean"],
                                                                          frame["depth_ratio_std"])],
    })
    return tables.Table(f"Where the compute goes: moving vs static tokens, {model} on {data}", display,
                        frame.reset_index(drop=True), "lll" + "r" * 3)


# --- the section ----------------------------------------------------------------------------------------------

def write_video_section(agg: pd.DataFrame, records: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """The video figure and table of every video backbone (module docstring); returns the written paths.

    ``agg`` is :func:`analysis.aggregation.aggregate` of the run and measure records (the report's one aggregate),
    ``records`` the loaded records (``tradeoff`` points are ignored here)."""
    runs = aggregation.without_tradeoff(records)
    backbones = video_backbones(agg, runs)
    if not backbones:
        print("note: no video records (3-D token grid); no video section")
        return []
    out = Path(out_dir)
    paths: list[Path] = []
    for model, data, slug in backbones:
        part = agg[(agg["model"] == model) & (agg["data"] == data)]
        recs = runs[(runs["model"] == model) & (runs["data"] == data)]
        paths += plot_video_depth(part, recs, model, data, slug, out)
        frame = motion_frame(part, recs)
        if frame.empty:
            print(f"note: no tokens.motion in the records of {model} on {data} (video data without a moving "
                  f"region?); no motion table")
            continue
        paths += motion_table(frame, model, data).write(out / f"video_motion_{slug}", f"tab:video-motion-{slug}",
                                                        footnote=FOOTNOTE)
    return paths
