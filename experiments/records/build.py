"""Building a record: owns the record id and the one builder of ``run``, ``measure`` and ``tradeoff`` records."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from experiments.records.provenance import provenance
from experiments.records.schema import SCHEMA_VERSION, check_values


def new_record_id(method: str, model: str, seed: int) -> str:
    """Unique across concurrent array jobs: time, names, seed and a random suffix."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}_{method}_{model}_s{seed}_{uuid.uuid4().hex[:8]}"


def build_record(kind: str, config: dict[str, Any], method: str, method_params: dict[str, Any],
                 metrics: dict[str, Any], tokens: dict[str, Any], costs: dict[str, Any], train: dict[str, Any],
                 start_time: str, run_dir: str | None, params: int, method_info: dict[str, Any] | None = None,
                 **extra: Any) -> dict[str, Any]:
    """The one record builder of ``run``, ``measure`` and ``tradeoff`` records. ``config`` is the resolved config;
    ``method_params`` have the factory's defaults applied (a record written before a parameter existed stays
    comparable); ``extra`` adds top-level entries (``tradeoff``, ``subset_metrics``)."""
    check_values({"metrics": metrics, "flops": costs.get("flops")})  # before anything else: never written
    model = config["model"]
    short = str(model.get("short_name") or model["name"])
    return {
        "schema_version": SCHEMA_VERSION,
        "record_id": new_record_id(method, short, config["seed"]),
        "kind": kind,
        "status": "complete",
        "method": method,
        "method_params": method_params,
        "method_info": method_info or {},
        "model": short,
        "architecture": model["name"],
        "data": config["data"]["name"],
        "seed": config["seed"],
        "metrics": metrics,
        "params": params,
        "tokens": tokens,
        "flops": costs.get("flops"),
        "throughput": costs.get("throughput"),
        "train": train,
        "config": config,
        "provenance": provenance(start_time, run_dir),
        **extra,
    }
