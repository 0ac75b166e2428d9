"""Re-time committed records whose throughput predates the current timing protocol.

``python experiments/remeasure.py [results/runs] [--dry-run]``

Records measured with timing protocol 1 (batch ``b`` timed the first ``b`` images against FLOPs averaged over
all images, with the ``dense`` wrapper as the reference) are brought to the current protocol
(``experiments/cost/throughput.py``: the timed pool is the image set whose FLOPs are reported; timm's forward is the
reference):

- **Methods with fixed token counts** (every image of the record had the same FLOPs: ``gflops_std == 0``) do
  not depend on the weights for their speed, so each distinct setting (method, parameters, model, input size,
  batch sizes, dtypes, threads) is timed once on seeded random weights over the record's first 64 validation
  images, and every record of that setting gets the new entries (seeds share them). Each entry says so in
  ``remeasured``.
- **Input-dependent methods** (A-ViT) cannot be re-timed without their trained weights, which records do not
  keep: their old entries are withdrawn (``throughput: null``) and ``throughput_withdrawn`` says why. Their
  accuracy and FLOPs stay; rerunning the run re-measures them.

Every record is rewritten atomically; ``--dry-run`` prints the plan only.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods  # noqa: E402
from experiments import records  # noqa: E402
from experiments.cost import costs, throughput
from experiments.build import create_vit  # noqa: E402
from experiments.train.checkpoints import seed_everything  # noqa: E402
from experiments.config import MeasureConfig  # noqa: E402
from experiments.data.registry import build_data, check_data, count_classes  # noqa: E402
from experiments.plan import typed_config  # noqa: E402


def outdated(record: dict[str, Any]) -> bool:
    entries = record.get("throughput")
    return bool(entries) and any(e.get("timing_protocol", 1) < throughput.TIMING_PROTOCOL for e in entries)


def input_dependent(record: dict[str, Any]) -> bool:
    summary = record.get("flops") or {}
    return (summary.get("gflops_std") or 0.0) > 0 or summary.get("gflops_min") != summary.get("gflops_max")


def setting_key(record: dict[str, Any]) -> str:
    entries = record["throughput"]
    config = record["config"]
    return json.dumps({
        "method": record["method"], "params": record["method_params"],
        "model": {k: v for k, v in config["model"].items() if k not in ("checkpoint", "pretrained")},
        "data": config["data"], "classes": record.get("num_classes") or config["measure"].get("num_classes"),
        "batch_sizes": sorted({e["batch_size"] for e in entries}), "dtypes": sorted({e["dtype"] for e in entries}),
        "threads": sorted({e["threads"] for e in entries}), "device": sorted({e["device"] for e in entries}),
    }, sort_keys=True, default=str)


def num_classes_of(record: dict[str, Any], config, scan: Any = None) -> int:
    """The record's head size: ``measure.num_classes`` where set (measure records), else the data's (``scan``:
    its startup check's result, made here when None)."""
    head = record["config"]["measure"].get("num_classes")
    return int(head) if head else count_classes(config.data, scan)


def current_schema(config: dict[str, Any]) -> dict[str, Any]:
    """A record's config in today's schema: records written before ``model.img_size`` existed ran at their
    ``data.img_size``, which is what the key now holds."""
    model = dict(config["model"])
    model.setdefault("img_size", config["data"]["img_size"])
    return {**config, "model": model}


def time_setting(record: dict[str, Any], images: int = 64) -> list[dict[str, Any]]:
    """Current-protocol throughput entries for ``record``'s setting, on seeded random weights."""
    config = typed_config(OmegaConf.create(current_schema(record["config"])))
    entries = record["throughput"]
    (threads,) = {e["threads"] for e in entries}
    (device,) = {e["device"] for e in entries}
    seed_everything(0)
    scan = check_data(config.data)  # one scan of folder data, for the head and the images
    vit = create_vit(config, num_classes_of(record, config, scan))
    method = methods.create_method(record["method"], vit, **record["method_params"]).eval()
    pool, _ = costs.load_images(build_data(config.data, scan).val, images, 0, 0)
    measure = MeasureConfig(flops=False, batch_sizes=sorted({e["batch_size"] for e in entries}),
                            dtypes=sorted({e["dtype"] for e in entries}), threads=threads, timing_images=images,
                            wrapper_check=False)
    return costs.timed_entries(method, measure, torch.device(device), pool)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="?", default="results/runs")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    paths = sorted(Path(args.runs).glob("*.json"))
    loaded = {path: records.load_record(path) for path in paths}
    stale = {path: record for path, record in loaded.items() if outdated(record)}
    withdraw = [path for path, record in stale.items() if input_dependent(record)]
    groups: dict[str, list[Path]] = defaultdict(list)
    for path, record in stale.items():
        if path not in withdraw:
            groups[setting_key(record)].append(path)
    print(f"{len(stale)} of {len(paths)} records use timing protocol 1: {len(groups)} fixed-count settings to "
          f"re-time ({len(stale) - len(withdraw)} records), {len(withdraw)} input-dependent records to withdraw")
    if args.dry_run:
        return 0
    date = records.now_iso()
    for path in withdraw:
        record = stale[path]
        record["throughput"] = None
        record["throughput_withdrawn"] = {
            "date": date, "protocol": 1,
            "reason": "timed under protocol 1 (batch b timed the first b images, not the images whose FLOPs "
                      "were averaged); this method's counts depend on its trained weights, which the record "
                      "does not keep, so it cannot be re-timed: rerun the run to measure it"}
        records.atomic_write_json(path, record)
    for key, members in tqdm(groups.items(), desc="re-timing settings"):
        entries = time_setting(stale[members[0]])
        for entry in entries:
            entry["remeasured"] = {"date": date, "weights": "random (seed 0): fixed token counts, so the speed "
                                                            "does not depend on the weights",
                                   "replaces_protocol": 1}
        for path in members:
            record = stale[path]
            record["throughput"] = entries
            records.atomic_write_json(path, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
