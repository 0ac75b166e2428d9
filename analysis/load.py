"""Loading results records into pandas: owns reading, validating and flattening record JSON files.

Records follow the schema in ``experiments/records/__init__.py`` (version 1); this module re-implements the little it
needs (required keys, the ``status`` check) so that ``analysis/`` never imports torch, ``methods`` or
``experiments``.

- :func:`load_records` finds every ``*.json`` under a folder (recursively; records normally sit in
  ``<folder>/runs/``), skips corrupt or incomplete files with a :class:`RecordWarning` naming the file, drops
  older duplicates of the same run, and returns one tidy DataFrame, one row per record (see ``COLUMNS``).
  Corrupt includes out-of-range values (``metrics.top1`` outside [0, 100] or non-finite, ``flops.gflops`` zero,
  negative or non-finite), a seed that is not a number, non-numeric token statistics (``tokens.attn_mean``...)
  and a ``record_id`` another file already carries (the file sorted first is kept).
  Nested parts stay as objects in the ``tokens`` and ``throughput`` columns.
- ``method_info`` is the record's ``method_info`` object (what the method reports about itself, e.g. A-ViT's
  ``prior_target``), ``None`` when the record has none.
- Records of kind ``tradeoff`` (``experiments/tradeoff.py``, one point of an accuracy-vs-compute curve) also
  fill ``knob``, ``knob_value``, ``curve`` (the curve's id) and ``curve_key`` (``method_params`` without the
  knob: points of one setting at different knob values share it); other records have ``None`` there.
- :func:`throughput_frame` expands the ``throughput`` lists into one row per record and measuring condition
  (device, batch size, dtype).
- :func:`grid_shape`, :func:`mean_patch_depth` and :func:`depth_maps` read the token statistics in the shapes
  a record may carry them.

Token-map format read by :func:`depth_maps` (``tokens.maps``, a list, one entry per image)::

    {"index": 0, "label": 3,                  # eval-set index (matches images across methods), class
     "thumbnail": PACKED or [[...], ...],     # H x W x C (C = 1: grey); lists: also 3 x H x W, 0..1 or 0..255
     "patch_depth": PACKED or [[...], ...]}   # grid rows x cols, or flat (reshaped with ``grid``)

PACKED is the compact form ``experiments/records/token_maps.py`` writes (its docstring is the specification):
``{"dtype": "uint8", "shape": [...], "filter": null | "diff2d", "zlib_base64": "..."}``, decoded by
:func:`unpack_array`; packed thumbnails hold 0..255. Plain nested lists are the form of records written before
it. ``image``/``depth`` and ``image_index`` are accepted as aliases. ``tokens.mean_patch_depth`` may be flat
(with ``tokens.grid``), nested rows, or ``{"grid": [r, c], "values": [...]}``; with a video grid
``[time, rows, cols]`` :func:`mean_patch_depth` averages over time (:mod:`analysis.video` reads the 3-D maps).
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import numbers
import warnings
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema_version", "record_id", "kind", "method", "model", "data", "seed", "metrics", "config",
                 "provenance")
REPORT_DIRNAME = "report"
COLUMNS = ("path", "record_id", "kind", "model", "architecture", "data", "method", "method_params", "params_key",
           "seed", "top1", "top5", "val_loss", "num_images", "params", "gflops", "gflops_std", "dense_gflops",
           "flops_ratio", "tokens", "throughput", "end_time", "torch", "timm", "knob", "knob_value", "curve",
           "curve_key", "img_size", "method_info")
_DTYPE_SHORT = {"float32": "fp32", "torch.float32": "fp32", "fp32": "fp32", "bfloat16": "bf16",
                "torch.bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "torch.float16": "fp16",
                "fp16": "fp16", "half": "fp16"}
_DTYPE_ORDER = {"fp32": 0, "bf16": 1, "fp16": 2}


class RecordWarning(UserWarning):
    """A record file was skipped (corrupt, incomplete, unsupported or superseded); the message names it."""


warnings.filterwarnings("always", category=RecordWarning)  # every skipped file is worth seeing, every time


class RecordError(ValueError):
    """A file that is not a usable record; the message starts with its path."""


def find_record_files(folder: str | Path) -> list[Path]:
    """Every ``*.json`` under ``folder``, recursively and sorted; skips hidden paths and ``folder/report``."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for path in root.rglob("*.json"):
        rel = path.relative_to(root).parts
        if any(part.startswith(".") for part in rel) or rel[0] == REPORT_DIRNAME or not path.is_file():
            continue
        found.append(path)
    return sorted(found)


def number(value: Any) -> float:
    """A float from a JSON value (``None``, strings and bools become NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _name(value: Any) -> Optional[str]:
    """Config-ish names: a string, or the ``name`` of a dict."""
    if isinstance(value, dict):
        value = value.get("name")
    return None if value is None else str(value)


def params_key(params: dict[str, Any]) -> str:
    """Canonical text of ``method_params``: the identity of a setting."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)


def read_record(path: str | Path) -> dict[str, Any]:
    """Read and validate one record; raises :class:`RecordError` naming the file when it is not usable."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{path}: corrupt record (not readable JSON: {error})") from error
    if not isinstance(record, dict):
        raise RecordError(f"{path}: corrupt record (a JSON {type(record).__name__}, not an object)")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise RecordError(f"{path}: incomplete record, missing {', '.join(missing)}")
    if record["schema_version"] != SCHEMA_VERSION:
        raise RecordError(f"{path}: unsupported schema_version {record['schema_version']!r} "
                          f"(this analysis reads {SCHEMA_VERSION})")
    if record.get("status", "complete") != "complete":
        raise RecordError(f"{path}: incomplete record (status {record.get('status')!r})")
    metrics = record["metrics"]
    if not isinstance(metrics, dict):
        raise RecordError(f"{path}: corrupt record, metrics is not an object")
    if record["kind"] in ("run", "tradeoff") and math.isnan(number(metrics.get("top1"))):
        raise RecordError(f"{path}: incomplete record, a {record['kind']} without a numeric metrics.top1")
    if record["kind"] == "tradeoff" and not (isinstance(record.get("tradeoff"), dict)
                                             and _name(record["tradeoff"].get("knob"))):
        raise RecordError(f"{path}: incomplete record, a tradeoff point without tradeoff.knob")
    if not _name(record["method"]) or not _name(record["model"]):
        raise RecordError(f"{path}: incomplete record, empty method or model")
    if not isinstance(record.get("method_params", {}) or {}, dict):
        raise RecordError(f"{path}: corrupt record, method_params is not an object")
    seed = record["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, float, str))):
        raise RecordError(f"{path}: corrupt record, seed={seed!r} is not a number (valid: an integer)")
    _check_values(path, record)
    return record


# field -> (lowest, highest, lowest allowed itself), as experiments/records/__init__.py checks before writing
METRIC_RANGES = {"top1": (0.0, 100.0, True), "top5": (0.0, 100.0, True), "val_loss": (0.0, math.inf, True),
                 "num_images": (0.0, math.inf, True)}
FLOPS_RANGES = {"gflops": (0.0, math.inf, False), "dense_gflops": (0.0, math.inf, False),
                "gflops_min": (0.0, math.inf, False), "gflops_max": (0.0, math.inf, False),
                "gflops_std": (0.0, math.inf, True), "flops_ratio": (0.0, math.inf, False)}
TOKEN_LISTS = ("attn_mean", "mlp_mean", "depth_histogram")  # per-block / per-depth counts: non-negative numbers


def _range_text(low: float, high: float, closed: bool) -> str:
    if math.isfinite(high):
        return f"{'[' if closed else '('}{low:g}, {high:g}]"
    return f"{'>=' if closed else '>'} {low:g}"


def _check_range(path: Path, field: str, value: Any, low: float, high: float, closed: bool) -> None:
    if value is None:
        return
    valid = _range_text(low, high, closed)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RecordError(f"{path}: corrupt record, {field}={value!r} is not a number (valid: {valid})")
    if not (math.isfinite(value) and (value >= low if closed else value > low) and value <= high):
        raise RecordError(f"{path}: corrupt record, {field}={value!r} is outside the valid range {valid}")


def _check_values(path: Path, record: dict[str, Any]) -> None:
    """Out-of-range metrics and costs, and non-numeric token statistics, make a record unusable."""
    for field, (low, high, closed) in METRIC_RANGES.items():
        _check_range(path, f"metrics.{field}", record["metrics"].get(field), low, high, closed)
    flops = record.get("flops")
    if flops is not None and not isinstance(flops, dict):
        raise RecordError(f"{path}: corrupt record, flops is not an object")
    for field, (low, high, closed) in FLOPS_RANGES.items():
        _check_range(path, f"flops.{field}", (flops or {}).get(field), low, high, closed)
    tokens = record.get("tokens")
    if tokens is not None and not isinstance(tokens, dict):
        raise RecordError(f"{path}: corrupt record, tokens is not an object")
    for field in TOKEN_LISTS:
        values = (tokens or {}).get(field)
        if values is None:
            continue
        if not isinstance(values, list):
            raise RecordError(f"{path}: corrupt record, tokens.{field}={values!r} is not a list of numbers")
        for index, value in enumerate(values):
            _check_range(path, f"tokens.{field}[{index}]", value, 0.0, math.inf, True)


def _flatten(record: dict[str, Any], rel: str) -> dict[str, Any]:
    metrics = record["metrics"]
    flops = record.get("flops") if isinstance(record.get("flops"), dict) else {}
    tokens = record.get("tokens") if isinstance(record.get("tokens"), dict) else None
    throughput = record.get("throughput") if isinstance(record.get("throughput"), list) else None
    provenance = record.get("provenance") if isinstance(record.get("provenance"), dict) else {}
    packages = provenance.get("packages") if isinstance(provenance.get("packages"), dict) else {}
    method_params = record.get("method_params") or {}
    point = record.get("tradeoff") if isinstance(record.get("tradeoff"), dict) else {}
    config = record["config"] if isinstance(record["config"], dict) else {}
    data_config = config.get("data") if isinstance(config.get("data"), dict) else {}
    knob = _name(point.get("knob"))
    gflops, dense = number(flops.get("gflops")), number(flops.get("dense_gflops"))
    ratio = number(flops.get("flops_ratio"))
    if math.isnan(ratio) and dense > 0:
        ratio = gflops / dense
    return {
        "path": rel, "record_id": str(record["record_id"]), "kind": str(record["kind"]),
        "model": _name(record["model"]), "architecture": _name(record.get("architecture")),
        "data": _name(record["data"]) or "unknown", "method": _name(record["method"]), "method_params": method_params,
        "params_key": params_key(method_params), "seed": record["seed"],
        "top1": number(metrics.get("top1")), "top5": number(metrics.get("top5")),
        "val_loss": number(metrics.get("val_loss")), "num_images": number(metrics.get("num_images")),
        "params": number(record.get("params")), "gflops": gflops, "gflops_std": number(flops.get("gflops_std")),
        "dense_gflops": dense, "flops_ratio": ratio, "tokens": tokens, "throughput": throughput,
        "end_time": str(provenance.get("end_time") or ""), "torch": packages.get("torch"),
        "timm": packages.get("timm"), "knob": knob, "knob_value": point.get("value") if knob else None,
        "curve": _name(point.get("curve")),
        "curve_key": params_key({k: v for k, v in method_params.items() if k != knob}) if knob else None,
        "img_size": number(data_config.get("img_size")),
        "method_info": record["method_info"] if isinstance(record.get("method_info"), dict) else None,
    }


def load_records(folder: str | Path) -> pd.DataFrame:
    """All usable records under ``folder`` as one DataFrame (columns ``COLUMNS``), deterministically sorted.

    Never raises for bad content: corrupt, incomplete or unsupported files are skipped with a
    :class:`RecordWarning` naming the file, as is an older duplicate of the same run (same model, data, method,
    params, kind and seed; the newest ``provenance.end_time`` wins). Records of kind ``measure`` (costs of an
    untrained model, ``metrics.top1`` null) are kept with a NaN top-1; a ``run`` needs a numeric top-1.
    A missing or empty folder gives an empty frame; :func:`summary` explains it.
    """
    root = Path(folder)
    rows = []
    seen: dict[str, Path] = {}  # record_id -> the file that first carried it
    for path in find_record_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            row = _flatten(read_record(path), rel)
        except RecordError as error:
            warnings.warn(f"skipping {error}", RecordWarning, stacklevel=2)
            continue
        if row["record_id"] in seen:  # a copy, or a clash: one id must name one record
            warnings.warn(f"skipping {path}: duplicate record_id {row['record_id']!r}, already read from "
                          f"{seen[row['record_id']]}", RecordWarning, stacklevel=2)
            continue
        seen[row["record_id"]] = path
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    if frame.empty:
        return frame
    identity = ["model", "data", "method", "params_key", "kind", "seed"]
    frame = frame.sort_values(identity + ["end_time", "record_id"], kind="stable", key=text_sort_key)
    dupes = frame.duplicated(identity, keep="last")
    for _, row in frame[dupes].iterrows():
        warnings.warn(f"skipping {root / row['path']}: superseded by a newer record of the same run "
                      f"({row['kind']} {row['method']} {row['params_key']} seed {row['seed']})", RecordWarning,
                      stacklevel=2)
    return frame[~dupes].reset_index(drop=True)


def text_sort_key(column: pd.Series) -> pd.Series:
    """Sort mixed/None values as text, so ordering never depends on file order."""
    def text(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return f"{float(value) + 1e12:030.9f}"  # numbers sort numerically, after the empty string
        return str(value)

    return column.map(text)


def summary(records: pd.DataFrame, folder: str | Path) -> str:
    """One paragraph on what was loaded; a clear message when nothing was."""
    root = Path(folder)
    if not root.is_dir():
        return (f"No results folder at {root.resolve()}: nothing to report. Pass an existing folder "
                f"(make report RESULTS=path) that holds records in runs/*.json.")
    if records.empty:
        n_files = len(find_record_files(root))
        found = f"{n_files} JSON file(s), none of them a usable record" if n_files else "no *.json record files"
        return (f"No usable records under {root.resolve()} ({found}): nothing to report. Run experiments "
                f"first; records are written to <results>/runs/*.json.")
    groups = records.groupby(["model", "data"], sort=True)
    parts = [f"{model} on {data}: {len(g)} records, {g['method'].nunique()} methods, "
             f"{len(g.drop_duplicates(['method', 'params_key']))} settings" for (model, data), g in groups]
    return f"Loaded {len(records)} records from {root}: " + "; ".join(parts) + "."


def dtype_short(dtype: Any) -> str:
    text = str(dtype)
    return _DTYPE_SHORT.get(text, text.replace("torch.", ""))


def throughput_frame(records: pd.DataFrame) -> pd.DataFrame:
    """One row per record and throughput condition.

    Columns: the record's identity (``model``, ``data``, ``method``, ``params_key``, ``seed``, ``record_id``),
    ``device``, ``batch_size``, ``dtype`` (short: fp32/bf16/fp16), ``condition`` (a label such as
    ``cpu b32 fp32``), ``img_per_s``, ``dense_img_per_s``, ``speedup`` (the record's ``speedup_vs_dense``,
    measured against dense in the same process; ``img_per_s / dense_img_per_s`` if absent), ``peak_mem_mb``,
    ``timed_flops_ratio`` (the FLOPs ratio of the images that were timed, which efficiency divides by; NaN for
    entries older than timing protocol 2) and ``condition_order`` (sorts conditions by device, dtype, batch
    size). CPU conditions name their thread count (``cpu b32 fp32 t1``): timings at different thread counts
    are different conditions, never averaged together.
    """
    rows = []
    for _, rec in records.iterrows():
        for entry in rec["throughput"] or []:
            if not isinstance(entry, dict):
                continue
            img, dense = number(entry.get("img_per_s")), number(entry.get("dense_img_per_s"))
            speedup = number(entry.get("speedup_vs_dense"))
            if math.isnan(speedup) and dense > 0:
                speedup = img / dense
            batch = entry.get("batch_size")
            device, dtype = str(entry.get("device", "?")), dtype_short(entry.get("dtype", "?"))
            threads = entry.get("threads") if device == "cpu" else None
            label = f"{device} b{batch} {dtype}" + (f" t{threads}" if isinstance(threads, int) else "")
            rows.append({"model": rec["model"], "data": rec["data"], "method": rec["method"],
                         "params_key": rec["params_key"], "seed": rec["seed"], "record_id": rec["record_id"],
                         "device": device, "batch_size": batch, "dtype": dtype,
                         "condition": label, "img_per_s": img, "dense_img_per_s": dense,
                         "speedup": speedup, "peak_mem_mb": number(entry.get("peak_mem_mb")),
                         "timed_flops_ratio": number(entry.get("flops_ratio"))
                         if entry.get("timing_protocol", 1) >= 2 else math.nan,
                         "condition_order": (device, _DTYPE_ORDER.get(dtype, 9), dtype,
                                             threads if isinstance(threads, int) else 0,
                                             batch if isinstance(batch, int) else 0)})
    columns = ["model", "data", "method", "params_key", "seed", "record_id", "device", "batch_size", "dtype",
               "condition", "img_per_s", "dense_img_per_s", "speedup", "peak_mem_mb", "timed_flops_ratio",
               "condition_order"]
    return pd.DataFrame(rows, columns=columns)


def conditions(throughput: pd.DataFrame) -> list[str]:
    """The distinct condition labels, in a fixed order (device, dtype, batch size)."""
    if throughput.empty:
        return []
    first = throughput.drop_duplicates("condition")
    return [c for _, c in sorted(zip(first["condition_order"], first["condition"]))]


# --- token statistics -----------------------------------------------------------------------------------------

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


PACKED_KEYS = ("dtype", "shape", "filter", "zlib_base64")
_PACKED_DTYPES = ("uint8",)


def is_packed(value: Any) -> bool:
    """Whether ``value`` is a PACKED array (module docstring)."""
    return isinstance(value, dict) and "zlib_base64" in value


def unpack_array(value: dict[str, Any]) -> np.ndarray:
    """A PACKED array (module docstring) as a numpy array of its dtype; raises ``ValueError`` when malformed."""
    missing = [key for key in PACKED_KEYS if key not in value]
    if missing:
        raise ValueError(f"packed array lacks {', '.join(missing)}")
    if value["dtype"] not in _PACKED_DTYPES:
        raise ValueError(f"packed array dtype {value['dtype']!r} unknown; valid: {', '.join(_PACKED_DTYPES)}")
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


def _image(value: Any) -> Optional[np.ndarray]:
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


def depth_maps(tokens: Optional[dict]) -> list[dict[str, Any]]:
    """``tokens.maps`` as ``[{"index", "label", "image" (array or None), "depth" (rows x cols, or time x rows x
    cols for a video model)}]``; entries
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
                    "image": _image(entry.get("thumbnail", entry.get("image")))})
    return out
