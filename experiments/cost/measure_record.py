"""The ``measure`` record: build a method without training it, count its tokens on ``measure.images`` validation
images, measure its costs and write one results record of kind ``measure``.

:func:`measure_run` is what ``experiments/measure.py`` (the Hydra entry point) and ``experiments/bench.py`` (one
call per table row) run; :func:`summary_line` is the one JSON line they print. The costs themselves come from
``experiments/cost/costs.py``, which ``run.py`` and ``tradeoff.py`` call too, so every record carries the same
entries. The ``measure:`` settings are typed and range-checked with the rest of the config
(``experiments/config.py``, ``MeasureConfig``).

Records of kind ``measure`` follow the run schema; ``metrics`` holds ``null`` for every registered metric (the
weights are usually random and the images few) but ``num_images``; ``subset_metrics`` keeps the accuracy on the
measured images as a sanity check of loaded weights.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

import methods
from experiments import identity, pipeline, records
from experiments.build import build_method, resolve_device
from experiments.cost import costs, per_image
from experiments.data.registry import build_data
from experiments.plan import validate
from experiments.train import engine, metrics
from experiments.train.checkpoints import file_sha256, seed_everything

log = logging.getLogger(__name__)


def measure_run(cfg: DictConfig) -> dict[str, Any]:
    """Build the method (no training), count tokens on ``measure.images`` images, measure, record."""
    start_time = records.now_iso()
    plan = validate(cfg, cfg.measure.num_classes, train=False)  # measure.py never trains
    config, measure = plan.config, plan.config.measure
    device = resolve_device(config.device)
    seed_everything(config.seed)
    data = build_data(config.data, plan.data_scan)
    count = measure.images
    if count > len(data.val):
        log.warning("measure.images=%d but the validation split has %d images: using all", count, len(data.val))
    images, labels = costs.load_images(data.val, max(count, costs.images_needed(measure, device)),
                                       config.num_workers, config.seed)
    del data  # only these images are needed from here on
    count = min(count, len(images))

    seed_everything(config.seed)
    method = build_method(plan).to(device).eval()
    weights = plan.weights.label if plan.weights.kind != "baseline" else "random"  # measure.py trains nothing
    log.info("measuring %s on %s (weights: %s) with %d images", plan.method_name, config.model.name, weights, count)
    loader = DataLoader(TensorDataset(images[:count], labels[:count] % plan.num_classes),
                        batch_size=config.eval.batch_size)
    result = engine.evaluate(method, loader, device, None, config.eval.map_images, progress=config.progress)
    tokens = pipeline.token_summary(method, result, config.eval.map_images)
    measured = costs.measure_costs(method, result, measure, device, images)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    start = file_sha256(plan.weights.path) if plan.weights.kind == "checkpoint" else None
    ident = identity.result_identity(resolved, plan.method_name, plan.recorded_params, "measure", False, start,
                                     plan.data_files)
    record = records.build_record(
        "measure", resolved, plan.method_name, plan.recorded_params,
        {**dict.fromkeys(metrics.METRICS), "num_images": count}, tokens, measured,
        {"epochs": 0, "history": [], "wall_time_s": 0.0, "init": weights}, start_time, config.paths.run_dir,
        sum(p.numel() for p in method.parameters()), methods.method_info(plan.method_name, method),
        methods.default_params(plan.method_name, plan.config.model.short_name), subset_metrics={**result.metrics, "weights": weights},
        identity=ident, compute_per_image=per_image.compute_per_image(method, result) if measure.flops else None,
        weights={"start_sha256": start, "evaluated_sha256": start})
    if measure.record:
        record["path"] = str(records.write_record(Path(config.paths.results_dir), record))
        log.info("results record: %s", record["path"])
    return record


def summary_line(record: dict[str, Any]) -> dict[str, Any]:
    """The one-line JSON summary ``measure.py`` prints."""
    fl = record.get("flops") or {}
    keys = ("device", "device_name", "batch_size", "dtype", "img_per_s", "dense_img_per_s", "speedup_vs_dense",
            "flops_ratio", "efficiency", "dense_reference", "dense_wrapper_vs_timm", "timed_images", "timed_gflops",
            "peak_mem_mb", "threads", "compile", "compile_s", "fused_attn")
    return {
        "record": record.get("path"), "kind": record["kind"], "method": record["method"],
        "method_params": record["method_params"], "model": record["model"], "weights": record["train"]["init"],
        "images": record["metrics"]["num_images"], "gflops": fl.get("gflops"), "gflops_std": fl.get("gflops_std"),
        "gflops_min": fl.get("gflops_min"), "gflops_max": fl.get("gflops_max"),
        "dense_gflops": fl.get("dense_gflops"), "flops_ratio": fl.get("flops_ratio"),
        **{k: v for k, v in fl.items() if k.startswith("gflops_") and k not in ("gflops_std", "gflops_min",
                                                                                  "gflops_max")},
        "params_m": record["params"] / 1e6,
        "tokens_attn_mean": [round(v, 2) for v in record["tokens"]["attn_mean"]],
        "tokens_mlp_mean": [round(v, 2) for v in record["tokens"]["mlp_mean"]],
        "throughput": [{k: e.get(k) for k in keys} for e in record["throughput"]]
        if record.get("throughput") else None,
    }
