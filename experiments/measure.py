"""Cost measurement: orchestration for run records (``measure_for_record``) and the ``measure.py`` script.

``python experiments/measure.py model=deit_small data.img_size=224 method=evit method.params.keep_rate=0.7``
measures one method without training it: random weights, or ``model.checkpoint=PATH`` (``model.pretrained``
is honoured too). It takes the same Hydra config and overrides as ``run.py``, uses the data only for
``measure.images`` validation images (per-image token counts and throughput inputs), prints one JSON line and
writes a results record of kind ``measure`` (unless ``measure.record=false``). No baseline is trained.

What it owns: validating the ``measure:`` config section (errors name the key and the valid choices, before
anything is built or written), putting FLOPs (``experiments/flops.py``) and throughput
(``experiments/throughput.py``) together into the record's ``flops`` and ``throughput`` entries, and the
``measure`` record. ``run.py`` calls :func:`measure_for_record` after evaluation, so every run record carries
the same entries.

Records of kind ``measure`` follow the run schema; ``metrics`` holds ``null`` accuracies (the weights are
usually random and the images few) and ``num_images``; ``subset_metrics`` keeps the accuracy on the measured
images as a sanity check of loaded weights.

The CPU throughput table (DeiT-S, every method, batch 1 and 32, fp32; run it on a quiet machine: timing on a
shared CPU with two threads per process is dominated by thread contention, where ``measure.threads=1`` helps)::

    python experiments/measure.py -m model=deit_small data.img_size=224 measure.num_classes=1000 \\
        method=dense,dynamicvit,evit,tome,topk,random measure.batch_sizes=[1,32] progress=false

``adavit`` belongs in the list only with ``model.checkpoint=...`` of a trained A-ViT: with random weights
nothing halts. On a GPU the defaults give the full table (batch 1/64/256, fp32 and bf16)::

    python experiments/measure.py -m model=deit_tiny,deit_small data.img_size=224 measure.num_classes=1000 \\
        method=dense,dynamicvit,evit,tome,topk,random device=cuda progress=false
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

if __package__ in (None, ""):  # run as a script: make the repository importable, as experiments/run.py does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods  # noqa: E402
from methods.dense import Dense  # noqa: E402
from experiments import flops, pipeline, records, throughput  # noqa: E402
from experiments.schema import ConfigError  # noqa: E402

log = logging.getLogger(__name__)

_KNOWN_KEYS = ("flops", "fvcore_images", "throughput", "images", "num_classes", "batch_sizes", "dtypes", "warmup",
               "repeats", "min_time_s", "compile", "fused_attn", "threads", "record")


# ----------------------------------------------------------------------------------------------- validation
def check_config(cfg: DictConfig) -> None:
    """Check ``cfg.measure`` (and its device-dependent choices) before anything is built or written."""
    section = cfg.get("measure")
    if section is None:
        raise ConfigError("measure: section missing from the config")
    unknown = sorted(set(section) - set(_KNOWN_KEYS))
    if unknown:
        raise ConfigError(f"measure: unknown key(s) {unknown}; valid: {', '.join(_KNOWN_KEYS)}")
    for key in ("flops", "throughput", "compile", "record"):
        if not isinstance(section.get(key), bool):
            raise ConfigError(f"measure.{key}={section.get(key)!r} must be true or false")
    if section.get("fused_attn") is not None and not isinstance(section.fused_attn, bool):
        raise ConfigError(f"measure.fused_attn={section.fused_attn!r}; valid: null, true, false")
    _positive_int(section, "images")
    _positive_int(section, "repeats")
    _positive_int(section, "warmup", minimum=0)
    _positive_int(section, "fvcore_images", minimum=0)
    for key in ("threads", "num_classes"):
        if section.get(key) is not None:
            _positive_int(section, key)
    min_time = section.get("min_time_s")
    if isinstance(min_time, bool) or not isinstance(min_time, (int, float)) or min_time < 0:
        raise ConfigError(f"measure.min_time_s={min_time!r} must be a number >= 0 (seconds)")
    sizes = section.get("batch_sizes")
    if sizes is not None:
        sizes = _as_list(sizes, "measure.batch_sizes", "a list of positive integers, e.g. [1, 32]")
        bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s <= 0]
        if bad or not sizes:
            raise ConfigError(f"measure.batch_sizes={sizes}: {bad or 'empty'}; valid: positive integers, "
                                f"e.g. [1, 32]")
    dtypes = section.get("dtypes")
    if dtypes is not None:
        dtypes = _as_list(dtypes, "measure.dtypes", f"a list of {', '.join(throughput.DTYPES)}")
        bad = [d for d in dtypes if d not in throughput.DTYPES]
        if bad or not dtypes:
            raise ConfigError(f"measure.dtypes={dtypes}: unknown dtype(s) {bad or '(empty list)'}; valid: "
                                f"{', '.join(throughput.DTYPES)}")
    device = cfg.get("device", "auto")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is available; use device=cpu or device=auto "
                            "(measurements are never silently taken on the CPU instead)")
    if section.throughput and device in ("cuda", "auto") and torch.cuda.is_available() and dtypes and \
            "bf16" in dtypes and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"measure.dtypes={dtypes}: bf16 is not supported by {torch.cuda.get_device_name()}; "
                            f"valid here: fp32, fp16")


def _positive_int(section: DictConfig, key: str, minimum: int = 1) -> int:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"measure.{key}={value!r} must be an integer >= {minimum}")
    return value


def _as_list(value: Any, key: str, expected: str) -> list:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        value = [value]  # measure.batch_sizes=32 on the command line
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}={value!r} must be {expected}")
    return list(value)


def settings_for(cfg: DictConfig, device: torch.device) -> throughput.Settings:
    """Throughput settings from ``cfg.measure`` with the device's defaults filled in (call check_config first)."""
    section = cfg.measure
    sizes = section.batch_sizes
    dtypes = section.dtypes
    return throughput.Settings(
        batch_sizes=_as_list(sizes, "measure.batch_sizes", "") if sizes is not None
        else throughput.default_batch_sizes(device),
        dtypes=_as_list(dtypes, "measure.dtypes", "") if dtypes is not None else throughput.default_dtypes(device),
        warmup=section.warmup, repeats=section.repeats, min_time_s=float(section.min_time_s),
        compile=section.compile, fused_attn=section.fused_attn, threads=section.threads,
    )


# ------------------------------------------------------------------------------------------------- measuring
def load_images(dataset, count: int, cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images (and labels) of ``dataset`` in order, as CPU tensors (all if fewer)."""
    from torch.utils.data import Subset

    from experiments.data import make_loader

    count = min(count, len(dataset))
    loader = make_loader(Subset(dataset, range(count)), min(count, 256), False, cfg.num_workers, cfg.seed)
    images, labels = [], []
    for batch, targets in loader:
        images.append(batch)
        labels.append(targets)
    return torch.cat(images), torch.cat(labels)


def measure_costs(method: methods.TokenReducer, token_counts: torch.Tensor, alt_counts: Optional[dict],
                  cfg: DictConfig, device: torch.device, images: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """``{"flops": ..., "throughput": ...}`` for a record; each is ``None`` when switched off."""
    section = cfg.measure
    summary = None
    if section.flops:
        summary = flops.flops_summary(method, token_counts, alt_counts)
        if section.fvcore_images and images is not None:
            sample = images[: section.fvcore_images].to(device)
            summary["fvcore_check"] = flops.fvcore_crosscheck(method, sample)
    entries = None
    if section.throughput:
        dense = None if isinstance(method, Dense) else methods.create_method("dense", method.vit)
        started = time.perf_counter()
        entries = throughput.measure(method, dense, device, settings_for(cfg, device),
                                     summary["flops_ratio"] if summary else None, images)
        log.info("throughput timed in %.1f s: %s", time.perf_counter() - started,
                 ", ".join(f"b{e['batch_size']} {e['dtype']} {e['img_per_s']:.1f} img/s "
                           f"(x{e['speedup_vs_dense']:.2f})" for e in entries))
    return {"flops": summary, "throughput": entries}


def measure_for_record(method: methods.TokenReducer, result, cfg: DictConfig, device: torch.device,
                       dataset=None) -> dict[str, Any]:
    """Costs for a run's record after evaluation: FLOPs from the evaluation's per-image token counts, and
    throughput timed on the first validation images of ``dataset`` (seeded noise without one)."""
    check_config(cfg)
    images = None
    need = max([cfg.measure.fvcore_images] + _timed_batch_sizes(cfg, device))
    if dataset is not None and need:
        images, _ = load_images(dataset, need, cfg)
    return measure_costs(method, result.token_counts, result.alt_token_counts, cfg, device, images)


def _timed_batch_sizes(cfg: DictConfig, device: torch.device) -> list[int]:
    return list(settings_for(cfg, device).batch_sizes) if cfg.measure.throughput else []


# -------------------------------------------------------------------------------------------------- the CLI
def measure_run(cfg: DictConfig) -> dict[str, Any]:
    """Build the method (no training), count tokens on ``measure.images`` images, measure, record."""
    from experiments import engine
    from experiments.data import build_data
    from torch.utils.data import DataLoader, TensorDataset

    start_time = records.now_iso()
    check_config(cfg)  # first: a bad measure section creates nothing, not even the results folder
    pipeline.validate(cfg, cfg.measure.num_classes)
    device = pipeline.resolve_device(cfg)
    pipeline.seed_everything(cfg.seed)
    data = build_data(cfg)
    num_classes = cfg.measure.num_classes or data.num_classes
    count = cfg.measure.images
    if count > len(data.val):
        log.warning("measure.images=%d but the validation split has %d images: using all", count, len(data.val))
    need = max([count, cfg.measure.fvcore_images] + _timed_batch_sizes(cfg, device))
    images, labels = load_images(data.val, need, cfg)
    del data  # only these images are needed from here on
    count = min(count, len(images))

    init = "random"
    if cfg.model.checkpoint:
        init = f"checkpoint:{cfg.model.checkpoint}"
    elif cfg.model.pretrained:
        init = "pretrained:timm"
    pipeline.seed_everything(cfg.seed)
    method = pipeline.build_method(cfg, num_classes).to(device).eval()
    log.info("measuring %s on %s (weights: %s) with %d images", cfg.method.name, cfg.model.name, init, count)

    loader = DataLoader(TensorDataset(images[:count], labels[:count] % num_classes),
                        batch_size=cfg.eval.batch_size)
    result = engine.evaluate(method, loader, device, None, cfg.eval.map_images, progress=cfg.progress)
    grid = tuple(method.vit.patch_embed.grid_size)
    tokens = engine.token_summary(result, method.depth, grid, cfg.eval.map_images)
    costs = measure_costs(method, result.token_counts, result.alt_token_counts, cfg, device, images)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    model_name = str(cfg.model.get("short_name", cfg.model.name))
    record = {
        "schema_version": records.SCHEMA_VERSION,
        "record_id": records.new_record_id(cfg.method.name, model_name, cfg.seed),
        "kind": "measure",
        "status": "complete",
        "method": cfg.method.name,
        "method_params": resolved["method"].get("params") or {},
        "model": model_name,
        "architecture": cfg.model.name,
        "data": cfg.data.name,
        "seed": cfg.seed,
        "metrics": {"top1": None, "top5": None, "val_loss": None, "num_images": count},
        "subset_metrics": {**result.metrics, "weights": init},
        "params": sum(p.numel() for p in method.parameters()),
        "tokens": tokens,
        "flops": costs["flops"],
        "throughput": costs["throughput"],
        "train": {"epochs": 0, "history": [], "wall_time_s": 0.0, "init": init},
        "config": resolved,
        "provenance": records.provenance(start_time, str(cfg.paths.run_dir)),
    }
    if cfg.measure.record:
        record["path"] = str(records.write_record(Path(cfg.paths.results_dir), record))
        log.info("results record: %s", record["path"])
    return record


def summary_line(record: dict[str, Any]) -> dict[str, Any]:
    """The one-line JSON summary ``measure.py`` prints."""
    fl = record.get("flops") or {}
    keys = ("device", "device_name", "batch_size", "dtype", "img_per_s", "dense_img_per_s", "speedup_vs_dense",
            "flops_ratio", "efficiency", "peak_mem_mb", "threads", "compile", "fused_attn")
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


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    record = measure_run(cfg)
    print(json.dumps(summary_line(record)), flush=True)
    return (record.get("flops") or {}).get("gflops")


if __name__ == "__main__":
    main()
