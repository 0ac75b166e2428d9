"""Building a record: owns the record id and the one builder of ``run``, ``measure`` and ``tradeoff`` records.

A record names files inside the repository by their path relative to it (``outputs/...``, ``.cache/...``), never
by this machine's absolute path, so committed records read the same on every clone (:func:`repository_relative`).
Paths outside the repository (a cluster's ImageNet folder) stay as the user gave them."""
from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from experiments.records.provenance import provenance
from experiments.records.schema import SCHEMA_VERSION, check_values


def new_record_id(method: str, model: str, seed: int) -> str:
    """Unique across concurrent array jobs: time, names, seed and a random suffix."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}_{method}_{model}_s{seed}_{uuid.uuid4().hex[:8]}"


REPOSITORY = Path(__file__).resolve().parents[2]


def repository_relative(value: Any, root: Path = REPOSITORY) -> Any:
    """``value`` with every string that is an absolute path inside ``root`` (or a ``label:path`` such as
    ``checkpoint:/.../final.pth``) made relative to it; lists and mappings are walked, other values returned."""
    if isinstance(value, dict):
        return {key: repository_relative(item, root) for key, item in value.items()}
    if isinstance(value, list):
        return [repository_relative(item, root) for item in value]
    if not isinstance(value, str):
        return value
    label, sep, path = value.rpartition(":") if ":/" in value else ("", "", value)
    if not os.path.isabs(path):
        return value
    try:
        relative = Path(path).resolve().relative_to(root).as_posix()
    except (ValueError, OSError):
        return value
    return f"{label}{sep}{relative}"


def build_record(kind: str, config: dict[str, Any], method: str, method_params: dict[str, Any],
                 metrics: dict[str, Any], tokens: dict[str, Any], costs: dict[str, Any], train: dict[str, Any],
                 start_time: str, run_dir: str | None, params: int, method_info: dict[str, Any] | None = None,
                 method_defaults: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The one record builder of ``run``, ``measure`` and ``tradeoff`` records. ``config`` is the resolved config;
    ``method_params`` have the factory's defaults applied (a record written before a parameter existed stays
    comparable); ``method_defaults`` are the method's parameters at its default setting (the factory's
    defaults: what the report's setting column compares ``method_params`` with); ``extra`` adds top-level
    entries (``tradeoff``, ``subset_metrics``)."""
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
        "method_defaults": method_defaults,
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
        "train": repository_relative(train),
        "config": repository_relative(config),
        "provenance": repository_relative(provenance(start_time, run_dir)),
        **repository_relative(extra),
    }
