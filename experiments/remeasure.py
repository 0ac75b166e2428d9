"""Re-time committed records whose throughput predates the current timing protocol.

``python experiments/remeasure.py [results/runs] [--dry-run] [--images 64]`` (also ``python -m
experiments.remeasure`` and ``avb-remeasure``)

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

Every record is checked (readable, one thread count and device per record, a config that types, a registered
method) and every new entry computed before the first file is rewritten, so a bad record stops the command with
nothing changed; each file is then rewritten atomically. A missing or empty input folder, a bad flag or a bad
record prints one ``error:`` line naming it and exits with status 2. ``--dry-run`` prints the plan only.
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
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

import methods
from experiments import records
from experiments.build import create_vit
from experiments.config import MeasureConfig
from experiments.cost import costs, throughput
from experiments.data.registry import build_data, check_data, count_classes
from experiments.plan import typed_config
from experiments.train.checkpoints import seed_everything

REFUSAL_STATUS = 2  # argparse's status for bad arguments


class RemeasureError(ValueError):
    """A record or folder this command cannot re-time; the message names the file and what is wrong."""


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
    scan = check_data(config.data, needs_train=False)  # one scan of folder data, for the head and the val images
    vit = create_vit(config, num_classes_of(record, config, scan))
    method = methods.create_method(record["method"], vit, **record["method_params"]).eval()
    pool, _ = costs.load_images(build_data(config.data, scan).val, images, 0, 0)
    measure = MeasureConfig(flops=False, batch_sizes=sorted({e["batch_size"] for e in entries}),
                            dtypes=sorted({e["dtype"] for e in entries}), threads=threads, timing_images=images,
                            wrapper_check=False)
    return costs.timed_entries(method, measure, torch.device(device), pool)


def folder(text: str) -> Path:
    """argparse type of the ``runs`` argument: an existing folder."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"runs={text!r} is not a folder; valid: the folder of the records "
                                          "(results/runs)")
    return path


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--images={text!r}; valid: a whole number >= 1")
    return value


def check_record(path: Path, record: dict[str, Any]) -> None:
    """What :func:`time_setting` needs from ``record``, checked before anything is timed or written."""
    entries = record["throughput"]
    for key in ("threads", "device", "batch_size", "dtype"):
        if any(key not in entry for entry in entries):
            raise RemeasureError(f"{path}: a throughput entry has no {key!r}; valid: entries as "
                                 "experiments/cost/throughput.py writes them")
    for key in ("threads", "device"):
        values = {str(entry[key]) for entry in entries}
        if len(values) != 1:
            raise RemeasureError(f"{path}: throughput entries with {key}={sorted(values)}; valid: one {key} per "
                                 "record")
    if record["method"] not in methods.list_methods():
        raise RemeasureError(f"{path}: method={record['method']!r} is not registered; valid: "
                             f"{', '.join(methods.list_methods())}")
    try:
        config = record["config"]
        config["measure"]
        typed_config(OmegaConf.create(current_schema(config)))
    except (KeyError, TypeError, ValueError, OmegaConfBaseException) as error:
        raise RemeasureError(f"{path}: its config cannot be re-run: {' '.join(str(error).split())}") from error


def load_all(paths: list[Path]) -> dict[Path, dict[str, Any]]:
    try:
        return {path: records.load_record(path) for path in paths}
    except ValueError as error:  # load_record names the file
        raise RemeasureError(str(error)) from error


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="?", type=folder, default="results/runs",
                        help="the folder of the records to re-time (default: results/runs)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, time and write nothing")
    parser.add_argument("--images", type=positive_int, default=64,
                        help="validation images timed per setting (default: 64)")
    args = parser.parse_args(argv)
    try:
        return remeasure(args.runs, args.dry_run, args.images)
    except RemeasureError as error:
        print(f"error: {error}", file=sys.stderr)
        return REFUSAL_STATUS


def remeasure(runs: Path, dry_run: bool = False, images: int = 64) -> int:
    """Check every record, time every stale fixed-count setting, then rewrite the files; see the module docstring."""
    paths = sorted(runs.glob("*.json"))
    if not paths:
        raise RemeasureError(f"runs={str(runs)!r} holds no *.json records; valid: the folder of the records "
                             "(results/runs)")
    stale = {path: record for path, record in load_all(paths).items() if outdated(record)}
    withdraw = [path for path, record in stale.items() if input_dependent(record)]
    groups: dict[str, list[Path]] = defaultdict(list)
    for path, record in stale.items():
        if path not in withdraw:
            check_record(path, record)
            groups[setting_key(record)].append(path)
    print(f"{len(stale)} of {len(paths)} records use timing protocol 1: {len(groups)} fixed-count settings to "
          f"re-time ({len(stale) - len(withdraw)} records), {len(withdraw)} input-dependent records to withdraw")
    if dry_run:
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
    for key, members in tqdm(groups.items(), desc="re-timing settings"):
        entries = time_setting(stale[members[0]], images)
        for entry in entries:
            entry["remeasured"] = {"date": date, "weights": "random (seed 0): fixed token counts, so the speed "
                                                            "does not depend on the weights",
                                   "replaces_protocol": 1}
        for path in members:
            stale[path]["throughput"] = entries
    for path, record in stale.items():  # every new entry exists: only now is a file rewritten
        records.atomic_write_json(path, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
