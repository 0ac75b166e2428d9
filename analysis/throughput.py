"""Throughput entries of records as a tidy frame: owns one row per record and measuring condition, the one
timing protocol per column, and the condition the main table shows.

:func:`throughput_frame` expands each record's ``throughput`` list (device, batch size, dtype, threads, compiled);
:func:`conditions` orders the condition labels; :func:`single_protocol` keeps one timing protocol per backbone
and condition (the newest present) and lists the entries it left out; :func:`headline_condition` picks the one
condition of a backbone's main table.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import pandas as pd

from analysis.token_stats import number

_DTYPE_SHORT = {"float32": "fp32", "torch.float32": "fp32", "fp32": "fp32", "bfloat16": "bf16",
                "torch.bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "torch.float16": "fp16",
                "fp16": "fp16", "half": "fp16"}
_DTYPE_ORDER = {"fp32": 0, "bf16": 1, "fp16": 2}


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
    size), ``protocol`` (the entry's ``timing_protocol``, 1 for entries written before it existed). CPU
    conditions name their thread count (``cpu b32 fp32 t1``), compiled models say so (``... compiled``): timings
    at different thread counts, or compiled and eager, are different conditions, never averaged together.
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
            label += " compiled" if entry.get("compile") is True else ""  # never averaged with eager timings
            rows.append({"model": rec["model"], "data": rec["data"], "method": rec["method"],
                         "params_key": rec["params_key"], "seed": rec["seed"], "record_id": rec["record_id"],
                         "device": device, "batch_size": batch, "dtype": dtype,
                         "condition": label, "img_per_s": img, "dense_img_per_s": dense,
                         "speedup": speedup, "peak_mem_mb": number(entry.get("peak_mem_mb")),
                         "timed_flops_ratio": number(entry.get("flops_ratio"))
                         if protocol_of(entry) >= 2 else math.nan, "protocol": protocol_of(entry),
                         "condition_order": (device, _DTYPE_ORDER.get(dtype, 9), dtype,
                                             threads if isinstance(threads, int) else 0,
                                             batch if isinstance(batch, int) else 0,
                                             entry.get("compile") is True)})
    columns = ["model", "data", "method", "params_key", "seed", "record_id", "device", "batch_size", "dtype",
               "condition", "img_per_s", "dense_img_per_s", "speedup", "peak_mem_mb", "timed_flops_ratio",
               "protocol", "condition_order"]
    return pd.DataFrame(rows, columns=columns)


def conditions(throughput: pd.DataFrame) -> list[str]:
    """The distinct condition labels, in a fixed order (device, dtype, batch size)."""
    if throughput.empty:
        return []
    first = throughput.drop_duplicates("condition")
    return [c for _, c in sorted(zip(first["condition_order"], first["condition"]))]


def protocol_of(entry: dict[str, Any]) -> int:
    """An entry's ``timing_protocol`` (1: written before the field existed)."""
    value = entry.get("timing_protocol", 1)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 1


def single_protocol(throughput: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """One timing protocol per column: for each backbone (``model``, ``data``) and condition, only the entries of
    the newest protocol present are kept. Returns the kept entries and, for each entry left out, ``record_id``,
    ``model``, ``data``, ``condition``, ``protocol`` and ``kept_protocol``, sorted: the report names them."""
    if throughput.empty:
        return throughput, []
    newest = throughput.groupby(["model", "data", "condition"])["protocol"].transform("max")
    keep = throughput["protocol"] == newest
    left = throughput[~keep].assign(kept_protocol=newest[~keep])
    left_out = [{"record_id": r.record_id, "model": r.model, "data": r.data, "condition": r.condition,
                 "protocol": int(r.protocol), "kept_protocol": int(r.kept_protocol)}
                for r in left.sort_values(["model", "data", "condition", "record_id"]).itertuples()]
    return throughput[keep].reset_index(drop=True), left_out


def headline_condition(measured: dict[str, int]) -> Optional[str]:
    """The condition a main table shows, among ``measured`` (condition -> settings measured under it): the one
    measured for the most settings, then fp32, eager, the largest batch (the regime token reduction targets),
    then the label; ``None`` when nothing was measured."""
    present = [c for c, n in measured.items() if n > 0]
    if not present:
        return None

    def rank(condition: str) -> tuple:
        parts = condition.split(" ")
        batch = int(parts[1][1:]) if len(parts) > 1 and parts[1][1:].isdigit() else 0
        return (measured[condition], len(parts) > 2 and parts[2] == "fp32", "compiled" not in parts, batch,
                condition)

    return max(present, key=rank)
