"""The compact form of a record's token maps (``tokens.maps``): owns encoding the per-image patch depths and
thumbnails into small JSON values and decoding them (:func:`unpack_array`, which ``analysis`` reads them with;
``tests/test_analysis.py`` checks the round trip). numpy only.

``tokens.maps`` is a list, one entry per eval image (the first ``eval.map_images`` of the eval set)::

    {"index": 0,                                   # eval-set index: matches images across records
     "patch_depth": PACKED uint8 [rows, cols],     # blocks that processed each patch (flat [P] without a grid)
     "thumbnail": PACKED uint8 [H, W, C],          # 0..255, min-max scaled per image; C = 1 when grey
     "object_mask": PACKED uint8 [H, W],           # data with ground truth only: 1 = object pixel, at the
                                                   # thumbnail's resolution (a pixel is object when at least half
                                                   # of the pixels it covers are)
     "object_tokens": PACKED uint8 [rows, cols]}   # data with ground truth only: 1 = object token (the tokens
                                                   # the record's ``tokens.objects`` scores count)

For a video model (``tokens.grid`` ``[time, rows, cols]``) ``patch_depth`` is ``[time, rows, cols]`` and the
thumbnail is a filmstrip ``[H, time * W, C]``: the first frame of each time slot (tubelet), left to right.

where PACKED is ``{"dtype": "uint8", "shape": [...], "filter": null | "diff2d", "zlib_base64": "..."}``: the
array's bytes in C order, zlib-compressed (level 9), base64-encoded (ASCII). ``filter: "diff2d"`` (thumbnails)
stores the differences along axis 0 and then axis 1 modulo 256 instead of the values, which compresses smooth
images about twice as well; decoding takes the cumulative sums along axis 1 and then axis 0, modulo 256.
A thumbnail whose channels are all equal keeps one channel. Records written before this format hold plain
nested lists there; ``analysis`` reads both.
"""
from __future__ import annotations

import base64
import binascii
import zlib
from typing import Any, Optional, Sequence

import numpy as np

DTYPE = "uint8"
FILTERS = (None, "diff2d")
PACKED_KEYS = ("dtype", "shape", "filter", "zlib_base64")


def pack(values: np.ndarray, filter: Optional[str] = None) -> dict[str, Any]:
    """``values`` (integers in 0..255, any shape) as a PACKED dict (module docstring)."""
    if filter not in FILTERS:
        raise ValueError(f"filter={filter!r} is not one of {FILTERS}")
    array = np.asarray(values)
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"token maps are packed as uint8: values must lie in 0..255, got {array.min()}.."
                         f"{array.max()}")
    data = np.ascontiguousarray(array, dtype=np.uint8)
    if filter == "diff2d":
        data = np.diff(np.diff(data, axis=0, prepend=np.uint8(0)), axis=1, prepend=np.uint8(0))  # uint8 wraps
    text = base64.b64encode(zlib.compress(data.tobytes(), 9)).decode("ascii")
    return {"dtype": DTYPE, "shape": list(array.shape), "filter": filter, "zlib_base64": text}


def pack_depth(patch_depth: np.ndarray, grid: Optional[Sequence[int]]) -> dict[str, Any]:
    """One image's patch depths ``[P]`` as PACKED ``grid`` (``[rows, cols]``, or ``[time, rows, cols]`` for a
    video model); flat ``[P]`` when ``grid`` does not fit."""
    depth = np.asarray(patch_depth)
    if grid is not None and depth.ndim == 1 and int(np.prod([int(g) for g in grid])) == depth.size:
        depth = depth.reshape([int(g) for g in grid])
    return pack(depth)


def pack_thumbnail(thumbnail: np.ndarray) -> dict[str, Any]:
    """One uint8 thumbnail ``[H, W, C]`` as PACKED, filtered; one channel when all channels are equal."""
    thumb = np.asarray(thumbnail)
    if thumb.ndim != 3:
        raise ValueError(f"a thumbnail is [H, W, C], got shape {list(thumb.shape)}")
    if thumb.shape[-1] > 1 and (thumb == thumb[..., :1]).all():
        thumb = thumb[..., :1]  # grey: one channel is the whole image
    return pack(thumb, filter="diff2d")


def pack_mask(mask: np.ndarray) -> dict[str, Any]:
    """A boolean (or 0/1) mask of any shape as PACKED uint8 0/1, unfiltered (runs of equal values compress well)."""
    array = np.asarray(mask)
    if array.size and not np.isin(array, (0, 1)).all():
        raise ValueError(f"a mask holds 0/1 (or bool) values, got {np.unique(array)[:5].tolist()}")
    return pack(array.astype(np.uint8))


def encode_maps(patch_depth: np.ndarray, thumbnails: Optional[np.ndarray], grid: Optional[Sequence[int]],
                object_masks: Optional[np.ndarray] = None,
                object_tokens: Optional[np.ndarray] = None) -> list[dict[str, Any]]:
    """``tokens.maps`` for images ``0..n-1``: ``patch_depth`` ``[n, P]`` integer depths, ``thumbnails``
    ``[n, H, W, C]`` uint8 (or ``None``), ``grid`` ``(rows, cols)`` of the patches (or ``None``); on data with
    ground truth ``object_masks`` ``[n, H, W]`` bool at the thumbnails' resolution and ``object_tokens``
    ``[n, P]`` bool (each ``None`` otherwise)."""
    maps = []
    for i, depth in enumerate(np.asarray(patch_depth)):
        entry: dict[str, Any] = {"index": i, "patch_depth": pack_depth(depth, grid)}
        if thumbnails is not None:
            entry["thumbnail"] = pack_thumbnail(thumbnails[i])
        if object_masks is not None:
            entry["object_mask"] = pack_mask(object_masks[i])
        if object_tokens is not None:
            tokens = np.asarray(object_tokens[i])
            if grid is not None and tokens.ndim == 1 and int(np.prod([int(g) for g in grid])) == tokens.size:
                tokens = tokens.reshape([int(g) for g in grid])
            entry["object_tokens"] = pack_mask(tokens)
        maps.append(entry)
    return maps


def is_packed(value: Any) -> bool:
    """Whether ``value`` is a PACKED array (module docstring)."""
    return isinstance(value, dict) and "zlib_base64" in value


def unpack_array(value: dict[str, Any]) -> np.ndarray:
    """A PACKED array (module docstring) as a numpy array of its dtype; raises ``ValueError`` when malformed."""
    missing = [key for key in PACKED_KEYS if key not in value]
    if missing:
        raise ValueError(f"packed array lacks {', '.join(missing)}")
    if value["dtype"] != DTYPE:
        raise ValueError(f"packed array dtype {value['dtype']!r} unknown; valid: {DTYPE}")
    try:
        raw = zlib.decompress(base64.b64decode(value["zlib_base64"], validate=True))
        array = np.frombuffer(raw, dtype=value["dtype"]).reshape([int(n) for n in value["shape"]])
    except (binascii.Error, zlib.error, TypeError, ValueError) as error:
        raise ValueError(f"packed array is corrupt ({error})") from error
    if value["filter"] == "diff2d":  # differences along axes 0 and 1, modulo 256: undo with running sums
        return np.cumsum(np.cumsum(array, axis=1, dtype=array.dtype), axis=0, dtype=array.dtype)
    if value["filter"] is not None:
        raise ValueError(f"packed array filter {value['filter']!r} unknown; valid: null, diff2d")
    return array.copy()
