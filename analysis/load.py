"""Loading results records into pandas: owns reading, validating and flattening record JSON files.

Records follow the schema of ``experiments/records`` (the typed model in ``experiments/records/schema.py``),
which this module reads them with: required keys, version (older versions upgraded in memory), types and
valid ranges are checked there, never repeated here. The records package imports neither torch nor
``methods``, and neither does ``analysis/``.

- :func:`load_records` finds every ``*.json`` under a folder (recursively; records normally sit in
  ``<folder>/runs/``), skips corrupt or incomplete files with a :class:`RecordWarning` naming the file, drops
  older duplicates of the same run, and returns one tidy DataFrame, one row per record (see :func:`columns`);
  ``frame.attrs["skipped"]`` (path, reason) and ``frame.attrs["superseded"]`` name what it did not read.
  ``provenance_issues`` lists what a clone could not follow in a record (:mod:`analysis.provenance`: absolute
  paths, missing or uncommitted checkpoints, a dirty tree); ``method_defaults`` is the method's default
  setting as the record states it (``None`` in older records).
  Corrupt includes whatever the schema refuses (``metrics.top1`` outside [0, 100] or non-finite, ``flops.gflops``
  zero, negative or non-finite, a seed that is not a number, non-numeric token statistics...) and a
  ``record_id`` another file already carries (the file sorted first is kept).
  Every numeric ``metrics.*`` becomes a column of its name (NaN where a record lacks it): a new metric needs no
  code here. Nested parts stay as objects in the ``tokens`` and ``throughput`` columns.
- ``compute_per_image`` is the record's per-image compute entry (``experiments/cost/per_image.py``), ``None``
  where it has none; :mod:`analysis.adaptivity` reads it.
- ``method_info`` is the record's ``method_info`` object (what the method reports about itself, e.g. A-ViT's
  ``prior_target``), ``None`` when the record has none.
- Records of kind ``tradeoff`` (``experiments/tradeoff.py``, one point of an accuracy-vs-compute curve) also
  fill ``knob``, ``knob_value``, ``curve`` (the curve's id) and ``curve_key`` (``method_params`` without the
  knob: points of one setting at different knob values share it); other records have ``None`` there.
- :func:`throughput_frame` (:mod:`analysis.throughput`) expands the ``throughput`` lists into one row per record
  and measuring condition; :func:`grid_shape`, :func:`mean_patch_depth`, :func:`depth_histogram` and
  :func:`depth_maps` (:mod:`analysis.token_stats`) read the token statistics; both are re-exported here.
"""
from __future__ import annotations

import json
import math
import numbers
import warnings
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from analysis.controls import control_fields
from analysis.provenance import record_issues
from analysis.throughput import conditions, dtype_short, throughput_frame  # noqa: F401 (re-exported)
from analysis.token_stats import (depth_histogram, depth_maps, grid_shape, image_array,  # noqa: F401
                                  mean_patch_depth, number)
from experiments.records import migrate
from experiments.records.identity import identity_of
from experiments.records.schema import IncompleteRecordError, RecordValueError
from experiments.records.store import find_record_files  # noqa: F401 (re-exported)
from experiments.records.token_maps import is_packed, unpack_array  # noqa: F401 (re-exported)
from experiments.train.metrics import METRICS

_image = image_array  # the name analysis.video reads thumbnails with
BEFORE_METRICS = ("path", "record_id", "kind", "model", "architecture", "data", "method", "method_params",
                  "params_key", "seed", "run_key", "setting_key")
AFTER_METRICS = ("params", "gflops", "gflops_std", "dense_gflops", "flops_ratio", "tokens", "throughput",
                 "end_time", "torch", "timm", "knob", "knob_value", "curve", "curve_key", "img_size", "method_info",
                 "fine_tuned", "recipe", "control_context", "start_sha256", "compute_per_image", "method_defaults",
                 "git_commit", "provenance_issues")

FIXED_COLUMNS = frozenset(BEFORE_METRICS + AFTER_METRICS)  # a metric of one of these names has no column


def columns(metric_names: Any = ()) -> list[str]:
    """The frame's columns: identity, then one per metric (the registered ones first, in registration order, then
    ``metric_names`` the records carry, sorted), then costs, token statistics and provenance."""
    names = list(METRICS) + sorted(set(metric_names) - set(METRICS) - FIXED_COLUMNS)
    return [*BEFORE_METRICS, *names, *AFTER_METRICS]


COLUMNS = tuple(columns())  # with the registered metrics only


class RecordWarning(UserWarning):
    """A record file was skipped (corrupt, incomplete, unsupported or superseded); the message names it."""


warnings.filterwarnings("always", category=RecordWarning)  # every skipped file is worth seeing, every time


class RecordError(ValueError):
    """A file that is not a usable record; the message starts with its path."""


def _name(value: Any) -> Optional[str]:
    """Config-ish names: a string, or the ``name`` of a dict."""
    if isinstance(value, dict):
        value = value.get("name")
    return None if value is None else str(value)


def params_key(params: dict[str, Any]) -> str:
    """Canonical text of ``method_params``: the identity of a setting."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)


def read_record(path: str | Path) -> dict[str, Any]:
    """Read one record and validate it against the records schema (upgraded to its current version); raises
    :class:`RecordError` naming the file when it is not usable."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{path}: corrupt record (not readable JSON: {error})") from error
    if not isinstance(record, dict):
        raise RecordError(f"{path}: corrupt record (a JSON {type(record).__name__}, not an object)")
    try:
        return migrate.as_current(record)
    except IncompleteRecordError as error:
        raise RecordError(f"{path}: incomplete record, {error}") from error
    except RecordValueError as error:
        raise RecordError(f"{path}: corrupt record, {error}") from error


def _flatten(record: dict[str, Any], rel: str) -> dict[str, Any]:
    metrics = record["metrics"]
    identity = identity_of(record)
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
        "run_key": identity["key"], "setting_key": identity["setting"],
        **{name: number(value) for name, value in metrics.items() if name not in FIXED_COLUMNS},
        "params": number(record.get("params")), "gflops": gflops, "gflops_std": number(flops.get("gflops_std")),
        "dense_gflops": dense, "flops_ratio": ratio, "tokens": tokens, "throughput": throughput,
        "end_time": str(provenance.get("end_time") or ""), "torch": packages.get("torch"),
        "timm": packages.get("timm"), "knob": knob, "knob_value": point.get("value") if knob else None,
        "curve": _name(point.get("curve")),
        "curve_key": params_key({k: v for k, v in method_params.items() if k != knob}) if knob else None,
        "img_size": number(data_config.get("img_size")),
        "method_info": record["method_info"] if isinstance(record.get("method_info"), dict) else None,
        **control_fields(record, identity),  # what the paired Δ top-1 matches its control on (analysis.controls)
        # per-image compute (analysis.adaptivity); None in records written before it or without FLOPs
        "compute_per_image": record["compute_per_image"] if isinstance(record.get("compute_per_image"), dict)
        else None,
        "method_defaults": record["method_defaults"] if isinstance(record.get("method_defaults"), dict) else None,
        "git_commit": provenance.get("git_commit"),
        "provenance_issues": record_issues(record),  # absolute paths, missing checkpoints (analysis.provenance)
    }


def load_records(folder: str | Path) -> pd.DataFrame:
    """All usable records under ``folder`` as one DataFrame (:func:`columns`), deterministically sorted.

    Never raises for bad content: corrupt, incomplete or unsupported files are skipped with a
    :class:`RecordWarning` naming the file, as is an older duplicate of the same run: the same record identity
    (``run_key``, ``experiments/records/identity.py``: the resolved configuration that determines the result,
    the data files and the starting weights included); the newest ``provenance.end_time`` wins, and
    ``frame.attrs["superseded"]`` lists what was dropped and by which file. Records of different identities are
    never merged; ``setting_key`` is the identity without the seed. Records of kind ``measure`` (costs of an
    untrained model, ``metrics.top1`` null) are kept with a NaN top-1; a ``run`` needs a numeric top-1.
    A missing or empty folder gives an empty frame; :func:`summary` explains it.
    """
    root = Path(folder)
    rows = []
    seen: dict[str, Path] = {}  # record_id -> the file that first carried it
    skipped: list[dict[str, str]] = []  # files not read, and why: the report's header lists them
    for path in find_record_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            row = _flatten(read_record(path), rel)
        except RecordError as error:
            warnings.warn(f"skipping {error}", RecordWarning, stacklevel=2)
            skipped.append({"path": rel, "reason": str(error).removeprefix(f"{path}: ")})
            continue
        if row["record_id"] in seen:  # a copy, or a clash: one id must name one record
            warnings.warn(f"skipping {path}: duplicate record_id {row['record_id']!r}, already read from "
                          f"{seen[row['record_id']]}", RecordWarning, stacklevel=2)
            skipped.append({"path": rel, "reason": f"duplicate record_id {row['record_id']!r}, already read from "
                                                   f"{seen[row['record_id']].relative_to(root).as_posix()}"})
            continue
        seen[row["record_id"]] = path
        rows.append(row)
    frame = pd.DataFrame(rows, columns=columns({name for row in rows for name in row}))
    frame.attrs["skipped"] = skipped
    if frame.empty:
        return frame
    order = ["model", "data", "method", "params_key", "kind", "seed", "run_key"]
    frame = frame.sort_values(order + ["end_time", "record_id"], kind="stable", key=text_sort_key)
    dupes = frame.duplicated("run_key", keep="last")
    newest = frame[~dupes].set_index("run_key")["path"]
    superseded = []
    for _, row in frame[dupes].iterrows():
        superseded.append({"path": row["path"], "record_id": row["record_id"], "by": newest[row["run_key"]]})
        warnings.warn(f"skipping {root / row['path']}: superseded by a newer record of the same run "
                      f"({newest[row['run_key']]}: {row['kind']} {row['method']} {row['params_key']} seed "
                      f"{row['seed']}, identity {row['run_key']})", RecordWarning, stacklevel=2)
    kept = frame[~dupes].reset_index(drop=True)
    kept.attrs["superseded"] = superseded  # the report's header lists them
    kept.attrs["skipped"] = skipped
    return kept


def text_sort_key(column: pd.Series) -> pd.Series:
    """Sort mixed/None values as text, so ordering never depends on file order."""
    def text(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return f"{float(value) + 1e12:030.9f}"  # numbers sort numerically, after the empty string
        return str(value)

    return column.map(text)


REPOSITORY = Path(__file__).resolve().parents[1]


def shown_path(folder: Path) -> str:
    """``folder`` as a committed report names it: relative to the repository when inside it (never this
    machine's absolute path), else as given."""
    try:
        return Path(folder).resolve().relative_to(REPOSITORY).as_posix()
    except ValueError:
        return str(folder)


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
             f"{g['setting_key'].nunique()} settings" for (model, data), g in groups]
    text = f"Loaded {len(records)} records from {shown_path(root)}: " + "; ".join(parts) + "."
    superseded = records.attrs.get("superseded", [])
    if superseded:
        shown = "; ".join(f"{item['path']} (by {item['by']})" for item in superseded[:10])
        more = f"; and {len(superseded) - 10} more" if len(superseded) > 10 else ""
        text += (f" Superseded by a newer record of the same identity, and left out: {len(superseded)}: "
                 f"{shown}{more}.")
    return text
