"""Cost measurement for a record: FLOPs (``experiments/cost/flops.py``) and throughput (``experiments/cost/throughput.py``)
put together into the record's ``flops`` and ``throughput`` entries.

``run.py``, ``measure.py`` and ``tradeoff.py`` all call :func:`measure_costs` after evaluation, so every record
carries the same entries in the same conventions. Nothing here writes files.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch
from torch.utils.data import Subset

import methods
from methods.dense import Dense  # the reference every method is timed against

from experiments.cost import flops, throughput, timing_pool
from experiments.config import MeasureConfig
from experiments.data.loaders import make_loader

log = logging.getLogger(__name__)


def settings_for(measure: MeasureConfig, device: torch.device) -> throughput.Settings:
    """Throughput settings from ``measure`` with the device's defaults filled in."""
    return throughput.Settings(
        batch_sizes=list(measure.batch_sizes) if measure.batch_sizes is not None
        else throughput.default_batch_sizes(device),
        dtypes=list(measure.dtypes) if measure.dtypes is not None else throughput.default_dtypes(device),
        warmup=measure.warmup, repeats=measure.repeats, min_time_s=float(measure.min_time_s),
        compile=measure.compile, compile_backend=measure.compile_backend, fused_attn=measure.fused_attn,
        threads=measure.threads,
    )


def images_needed(measure: MeasureConfig, device: torch.device) -> int:
    """How many validation images the measurement uses: fvcore's and the timing pool."""
    return max(measure.fvcore_images, measure.timing_images if measure.throughput else 0)


def load_images(dataset, count: int, num_workers: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images (and labels) of ``dataset`` in order, as CPU tensors (all if fewer)."""
    count = min(count, len(dataset))
    loader = make_loader(Subset(dataset, range(count)), min(count, 256), False, num_workers, seed)
    images, labels = [], []
    for batch, targets in loader:
        images.append(batch)
        labels.append(targets)
    return torch.cat(images), torch.cat(labels)


def measure_costs(method: methods.TokenReducer, result, measure: MeasureConfig, device: torch.device,
                  images: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """``{"flops": ..., "throughput": ...}`` for ``method`` evaluated as ``result`` (``engine.EvalResult``); each
    is ``None`` when switched off."""
    warn_if_nothing_removed(method, result.token_counts)
    summary = None
    if measure.flops:
        summary = flops.flops_summary(method, result.token_counts, result.alt_token_counts)
        if measure.fvcore_images and images is not None:
            summary["fvcore_check"] = flops.fvcore_crosscheck(method, images[: measure.fvcore_images].to(device))
    entries = timed_entries(method, measure, device, images) if measure.throughput else None
    return {"flops": summary, "throughput": entries}


def timed_entries(method: methods.TokenReducer, measure: MeasureConfig, device: torch.device,
                  images: Optional[torch.Tensor]) -> list[dict[str, Any]]:
    """The record's ``throughput`` entries: the first ``measure.timing_images`` of ``images`` (or the seeded noise
    pool) timed against timm's forward, with the FLOPs ratio of exactly those images."""
    dense = None
    if measure.wrapper_check and not isinstance(method, Dense):
        dense = methods.create_method("dense", method.vit)
    pool = images[: measure.timing_images] if images is not None and len(images) else None
    timed_flops = pool_flops(method, pool, device, measure.timing_images)
    started = time.perf_counter()
    entries = throughput.measure(method, dense, device, settings_for(measure, device), timed_flops["flops_ratio"],
                                 pool, pool_size=measure.timing_images)
    for entry in entries:
        entry["timed_gflops"] = timed_flops["gflops"]
    log.info("throughput timed in %.1f s: %s", time.perf_counter() - started,
             ", ".join(f"b{e['batch_size']} {e['dtype']} {e['img_per_s']:.1f} img/s "
                       f"(x{e['speedup_vs_dense']:.2f})" for e in entries))
    return entries


def pool_flops(method: methods.TokenReducer, pool: Optional[torch.Tensor], device: torch.device,
               pool_size: int) -> dict[str, float]:
    """Mean GFLOPs and FLOPs ratio of exactly the images the throughput pool times (``pool``, or the seeded
    noise pool ``timing_pool.pool_batches`` makes without one), from an eval pass over them."""
    was_training = method.training
    method.eval()
    try:
        if pool is None:
            pool = timing_pool.noise_pool(pool_size, timing_pool.input_shape_of(method.vit))
        with torch.inference_mode():
            counts = torch.cat([method(chunk.float().to(device)).token_counts.cpu() for chunk in pool.split(64)])
    finally:
        method.train(was_training)
    macs = flops.per_image_macs(method, counts)
    return {"gflops": macs.mean().item() / 1e9, "flops_ratio": macs.mean().item() / flops.dense_macs(method)}


def warn_if_nothing_removed(method: methods.TokenReducer, token_counts: torch.Tensor) -> None:
    """A reducing method whose settings remove nothing at this token grid (e.g. EViT on 4 patches) says so."""
    if isinstance(method, Dense):
        return
    if bool((token_counts == method.num_tokens).all()):
        grid = "x".join(str(s) for s in method.vit.patch_embed.grid_size)
        log.warning("%s removes no token at this input (%s patch grid, %d tokens per block in every block): its "
                    "settings are too weak for this grid; the measurement equals dense", type(method).__name__,
                    grid, method.num_tokens)

