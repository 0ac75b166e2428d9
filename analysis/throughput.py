"""Throughput entries of records as a tidy frame: owns one row per record and measuring condition.

:func:`throughput_frame` expands each record's ``throughput`` list (device, batch size, dtype, threads);
:func:`conditions` orders the condition labels.
"""
from __future__ import annotations

import math
from typing import Any

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
    size). CPU conditions name their thread count (``cpu b32 fp32 t1``): timings at different thread counts
    are different conditions, never averaged together; so are compiled timings (``cpu b1 fp32 t1 compiled``).
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
            label = f"{device} b{batch} {dtype}" + (f" t{threads}" if isinstance(threads, int) else "") + \
                (" compiled" if entry.get("compile") is True else "")  # never averaged with eager timings
            rows.append({"model": rec["model"], "data": rec["data"], "method": rec["method"],
                         "params_key": rec["params_key"], "seed": rec["seed"], "record_id": rec["record_id"],
                         "device": device, "batch_size": batch, "dtype": dtype,
                         "condition": label, "img_per_s": img, "dense_img_per_s": dense,
                         "speedup": speedup, "peak_mem_mb": number(entry.get("peak_mem_mb")),
                         "timed_flops_ratio": number(entry.get("flops_ratio"))
                         if entry.get("timing_protocol", 1) >= 2 else math.nan,
                         "condition_order": (device, _DTYPE_ORDER.get(dtype, 9), dtype,
                                             threads if isinstance(threads, int) else 0,
                                             batch if isinstance(batch, int) else 0,
                                             entry.get("compile") is True)})
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
