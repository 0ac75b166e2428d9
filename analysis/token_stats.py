"""Token statistics of a record (``tokens``): owns reading them in the shapes a record may carry them.

- :func:`grid_shape`, :func:`mean_patch_depth`, :func:`depth_histogram` and :func:`depth_maps`;
  :func:`image_array` reads one thumbnail.

Token-map format read by :func:`depth_maps` (``tokens.maps``, a list, one entry per image)::

    {"index": 0, "label": 3,                  # eval-set index (matches images across methods), class
     "thumbnail": PACKED or [[...], ...],     # H x W x C (C = 1: grey); lists: also 3 x H x W, 0..1 or 0..255
     "patch_depth": PACKED or [[...], ...]}   # grid rows x cols, or flat (reshaped with ``grid``)

PACKED is the compact form of ``experiments/records/token_maps.py`` (its docstring is the specification),
decoded by its ``unpack_array``; packed thumbnails hold 0..255. Plain nested lists are the form of records
written before it. ``image``/``depth`` and ``image_index`` are accepted as aliases. ``tokens.mean_patch_depth``
may be flat (with ``tokens.grid``), nested rows, or ``{"grid": [r, c], "values": [...]}``; with a video grid
``[time, rows, cols]`` :func:`mean_patch_depth` averages over time (:mod:`analysis.video` reads the 3-D maps).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from experiments.records.token_maps import is_packed, unpack_array


def number(value: Any) -> float:
    """A float from a JSON value (``None``, strings and bools become NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def grid_shape(tokens: Optional[dict], count: Optional[int] = None) -> Optional[tuple[int, int]]:
    """The patch grid ``(rows, cols)``: ``tokens.grid``, else a square root of ``count``."""
    grid = (tokens or {}).get("grid")
    if isinstance(grid, (list, tuple)) and len(grid) == 2:
        return int(grid[0]), int(grid[1])
    if count:
        side = math.isqrt(count)
        if side * side == count:
            return side, side
    return None


def _packed_or_none(value: Any) -> Optional[np.ndarray]:
    try:
        return unpack_array(value)
    except ValueError:
        return None  # like a malformed list: the map entry is dropped, the report goes on


def _as_grid(values: Any, grid: Optional[tuple[int, int]]) -> Optional[np.ndarray]:
    if is_packed(values):
        values = _packed_or_none(values)
        if values is None:
            return None
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        return None
    if array.ndim in (2, 3):  # 3: a video model's [time, rows, cols]
        return array
    if array.ndim == 1 and array.size:
        shape = grid if grid and grid[0] * grid[1] == array.size else grid_shape(None, array.size)
        return array.reshape(shape) if shape else None
    return None


def _time_mean(value: Any, grid: Any) -> Any:
    """A video model's depths (``grid`` ``[time, rows, cols]``, flat time-major or nested) as their mean over
    time, ``rows x cols``; anything else unchanged."""
    if not (isinstance(grid, (list, tuple)) and len(grid) == 3 and isinstance(value, list)):
        return value
    try:
        array = np.asarray(value, dtype=float).reshape([int(g) for g in grid])
    except (TypeError, ValueError):
        return value  # does not fit the grid: read as before
    return array.mean(axis=0)


def mean_patch_depth(tokens: Optional[dict]) -> Optional[np.ndarray]:
    """``tokens.mean_patch_depth`` as a ``rows x cols`` array, or ``None`` when absent or malformed. For a video
    model (``tokens.grid`` ``[time, rows, cols]``) it is the mean over time."""
    value = _time_mean((tokens or {}).get("mean_patch_depth"), (tokens or {}).get("grid"))
    grid = grid_shape(tokens)
    if isinstance(value, dict):
        grid = grid_shape(value) or grid
        value = value.get("values", value.get("mean"))
    return None if value is None else _as_grid(value, grid)


def depth_histogram(tokens: Optional[dict]) -> Optional[np.ndarray]:
    """``tokens.depth_histogram`` (patch tokens by blocks seen, 0..depth) normalised to sum 1, or ``None``."""
    value = (tokens or {}).get("depth_histogram")
    if not isinstance(value, (list, tuple)) or not value:
        return None
    hist = np.asarray([number(v) for v in value])
    total = np.nansum(hist)
    return hist / total if total > 0 else None


def image_array(value: Any) -> Optional[np.ndarray]:
    packed = is_packed(value)
    if packed:  # H x W x C in 0..255, whatever its maximum
        image = _packed_or_none(value)
        if image is None:
            return None
        image = image.astype(float) / 255.0
    else:
        try:
            image = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            return None
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or not image.size:
        return None
    if not packed and np.nanmax(image) > 1.0:
        image = image / 255.0
    return np.clip(image, 0.0, 1.0)


def mask_array(value: Any) -> Optional[np.ndarray]:
    """A packed 0/1 mask (``object_mask``, ``object_tokens``) as a bool array; ``None`` when absent or corrupt."""
    if not is_packed(value):
        return None
    array = _packed_or_none(value)
    return None if array is None else array.astype(bool)


def depth_maps(tokens: Optional[dict]) -> list[dict[str, Any]]:
    """``tokens.maps`` as ``[{"index", "label", "image" (array or None), "depth" (rows x cols, or time x rows x
    cols for a video model), "object_mask" (bool, the image's resolution) and "object_tokens" (bool, rows x
    cols), each None where the data has no ground truth}]``; entries
    without a usable depth map are dropped. ``index`` falls back to the entry's position."""
    maps = (tokens or {}).get("maps")
    if not isinstance(maps, list):
        return []
    out = []
    for position, entry in enumerate(maps):
        if not isinstance(entry, dict):
            continue
        grid = grid_shape(entry) or grid_shape(tokens)
        depth = _as_grid(entry.get("patch_depth", entry.get("depth")), grid)
        if depth is None:
            continue
        index = entry.get("index", entry.get("image_index", position))
        out.append({"index": index, "label": entry.get("label"), "depth": depth,
                    "image": image_array(entry.get("thumbnail", entry.get("image"))),
                    "object_mask": mask_array(entry.get("object_mask")),
                    "object_tokens": mask_array(entry.get("object_tokens"))})
    return out
