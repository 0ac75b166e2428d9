"""Cost measurement for a record: FLOPs (``experiments/flops.py``) and throughput (``experiments/throughput.py``)
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

from . import flops, throughput
from .config import MeasureConfig
from .data import make_loader

log = logging.getLogger(__name__)


def settings_for(measure: MeasureConfig, device: torch.device) -> throughput.Settings:
    """Throughput settings from ``measure`` with the device's defaults filled in."""
    return throughput.Settings(
        batch_sizes=list(measure.batch_sizes) if measure.batch_sizes is not None
        else throughput.default_batch_sizes(device),
        dtypes=list(measure.dtypes) if measure.dtypes is not None else throughput.default_dtypes(device),
        warmup=measure.warmup, repeats=measure.repeats, min_time_s=float(measure.min_time_s),
        compile=measure.compile, fused_attn=measure.fused_attn, threads=measure.threads,
    )


def images_needed(measure: MeasureConfig, device: torch.device) -> int:
    """How many validation images the measurement uses: fvcore's and the largest timed batch."""
    timed = settings_for(measure, device).batch_sizes if measure.throughput else []
    return max([measure.fvcore_images, *timed])


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
    entries = None
    if measure.throughput:
        dense = None if isinstance(method, Dense) else methods.create_method("dense", method.vit)
        started = time.perf_counter()
        entries = throughput.measure(method, dense, device, settings_for(measure, device),
                                     summary["flops_ratio"] if summary else None, images)
        log.info("throughput timed in %.1f s: %s", time.perf_counter() - started,
                 ", ".join(f"b{e['batch_size']} {e['dtype']} {e['img_per_s']:.1f} img/s "
                           f"(x{e['speedup_vs_dense']:.2f})" for e in entries))
    return {"flops": summary, "throughput": entries}


def warn_if_nothing_removed(method: methods.TokenReducer, token_counts: torch.Tensor) -> None:
    """A reducing method whose settings remove nothing at this token grid (e.g. EViT on 4 patches) says so."""
    if isinstance(method, Dense):
        return
    if bool((token_counts == method.num_tokens).all()):
        grid = "x".join(str(s) for s in method.vit.patch_embed.grid_size)
        log.warning("%s removes no token at this input (%s patch grid, %d tokens per block in every block): its "
                    "settings are too weak for this grid; the measurement equals dense", type(method).__name__,
                    grid, method.num_tokens)

