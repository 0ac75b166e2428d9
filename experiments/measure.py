"""Cost measurement: orchestration for run records (``measure_for_record``) and the ``measure.py`` script.

``python experiments/measure.py model=deit_small method=evit method.params.keep_rate=0.7`` (at DeiT-S's native
224 px: ``data.img_size`` follows the model)
measures one method without training it: random weights, or ``model.checkpoint=PATH`` (``model.pretrained``
is honoured too). It takes the same Hydra config and overrides as ``run.py``, uses the data only for
``measure.images`` validation images (per-image token counts and throughput inputs), prints one JSON line and
writes a results record of kind ``measure`` (unless ``measure.record=false``). No baseline is trained.

It owns the ``measure`` record; the costs themselves come from ``experiments/cost/costs.py``, which ``run.py`` and
``tradeoff.py`` call too, so every record carries the same entries. The ``measure:`` settings are typed and
range-checked with the rest of the config (``experiments/config.py``, ``MeasureConfig``).

Records of kind ``measure`` follow the run schema; ``metrics`` holds ``null`` for every registered metric (the
weights are usually random and the images few) but ``num_images``; ``subset_metrics`` keeps the accuracy on the measured
images as a sanity check of loaded weights.

The benchmark tables (every method at its default and a stronger setting, DeiT-S on CPU, DeiT-S/B on GPU, the
embedded model with ``make demo``'s A-ViT checkpoint) are ``experiments/bench.py`` (``make bench-cpu``,
``make bench-gpu``), which runs this script's ``measure_run`` once per row. A single row::

    python experiments/measure.py model=deit_small measure.num_classes=1000 method=tome \
        'measure.batch_sizes=[1,32,64]' measure.threads=1 progress=false

``adavit`` on random weights halts nothing with its trained gate constants; give it ``gate_scale=10
gate_center=4.7`` (about 0.65x FLOPs on DeiT-S) or ``model.checkpoint=...`` of a trained A-ViT.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

if __package__ in (None, ""):  # run as a script: make the repository importable, as experiments/run.py does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods  # noqa: E402
from experiments import pipeline, records  # noqa: E402
from experiments.config import register_configs  # noqa: E402
from experiments.cost import costs
from experiments.train import engine, metrics
from experiments.build import build_method, resolve_device  # noqa: E402
from experiments.train.checkpoints import seed_everything  # noqa: E402
from experiments.data.registry import build_data  # noqa: E402
from experiments.plan import validate  # noqa: E402
from experiments.refusal import leave_nothing_on_refusal  # noqa: E402

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
    record = records.build_record(
        "measure", OmegaConf.to_container(cfg, resolve=True), plan.method_name, plan.recorded_params,
        {**dict.fromkeys(metrics.METRICS), "num_images": count}, tokens, measured,
        {"epochs": 0, "history": [], "wall_time_s": 0.0, "init": weights}, start_time, config.paths.run_dir,
        sum(p.numel() for p in method.parameters()), methods.method_info(plan.method_name, method),
        subset_metrics={**result.metrics, "weights": weights})
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


register_configs()  # the schemas main() composes against


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@leave_nothing_on_refusal
def main(cfg: DictConfig) -> Optional[float]:
    record = measure_run(cfg)
    print(json.dumps(summary_line(record)), flush=True)
    return (record.get("flops") or {}).get("gflops")


if __name__ == "__main__":
    main()
