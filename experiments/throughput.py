"""Throughput protocol: img/s of a method and of the dense model on the same weights, timed in one process.

Protocol (the union of the official repos' best practice, ``reference/methods.md``):

- eval mode, ``torch.inference_mode``, inputs preloaded on the device (fp32; ``bf16``/``fp16`` run under
  ``torch.autocast``), ``warmup`` untimed iterations per model (protocol: >= 10), then ``repeats`` timed runs
  (protocol: >= 5) of ``iters`` forwards each, CUDA-synchronised before and after; the median is reported.
- ``iters`` is calibrated from the last warm-up forward, per model and condition, so that one timed run lasts
  at least ``min_time_s`` (short forwards would otherwise time the timer). Each model runs ``max(warmup, 1)``
  untimed forwards, then ``repeats * iters`` timed ones.
- The dense reference is ``dense`` wrapping the *same* ``vit`` module (same weights, no copy). Dense and
  method runs alternate within every repeat (and swap order each repeat), so machine drift hits both.
- ``img_per_s`` and ``dense_img_per_s`` are the medians over repeats. ``speedup_vs_dense`` is the median over
  repeats of the paired ratio (method run / the dense run adjacent to it), which cancels drift that the ratio
  of medians (``speedup_of_medians``, also kept) does not; on a quiet machine the two agree.
  ``efficiency = speedup_vs_dense * flops_ratio``, i.e. the speedup divided by the FLOPs saving
  (``dense_gflops / gflops``); 1.0 means wall time tracks FLOPs exactly.
- Peak memory: CUDA ``max_memory_allocated`` of one forward of that model (reset before); on CPU the process
  peak RSS (``resource.getrusage``) after the method ran at that batch size. RSS peak is a process-lifetime
  high-water mark, so on CPU it never decreases within a process and includes everything loaded before
  (data, other models): compare it across batch sizes of one process only with that in mind.
- Nothing else runs in the timed region: no autograd, no allocation by the harness, Python's garbage
  collector paused.

Each result is one plain dict per (dtype, batch size), the record's ``throughput`` entry format.
"""
from __future__ import annotations

import contextlib
import gc
import math
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_BATCH_SIZES = (1, 64, 256)
CPU_BATCH_SIZES = (1, 32)
GPU_DTYPES = ("fp32", "bf16")
CPU_DTYPES = ("fp32",)


@dataclass
class Settings:
    """What to time and how; see the module docstring. Validated by ``experiments.measure.check_config``."""

    batch_sizes: Sequence[int]
    dtypes: Sequence[str]
    warmup: int = 10
    repeats: int = 5
    min_time_s: float = 0.05
    compile: bool = False
    fused_attn: Optional[bool] = None  # None: leave the modules as built
    threads: Optional[int] = None  # None: torch's default


def default_batch_sizes(device: torch.device) -> list[int]:
    return list(GPU_BATCH_SIZES if device.type == "cuda" else CPU_BATCH_SIZES)


def default_dtypes(device: torch.device) -> list[str]:
    return list(GPU_DTYPES if device.type == "cuda" else CPU_DTYPES)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(batch: int, device: torch.device, images: Optional[Tensor] = None,
                shape: Optional[Sequence[int]] = None) -> Tensor:
    """A ``[batch, 3, H, W]`` fp32 batch on ``device``: ``images`` cycled to ``batch``, else seeded noise."""
    if images is not None and len(images):
        index = torch.arange(batch) % images.shape[0]
        return images[index].float().contiguous().to(device)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *shape, generator=generator).to(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset; CPU: process peak RSS (lifetime high-water mark)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def fused_attn_state(vit: nn.Module) -> Optional[bool]:
    """True/False when every block's attention is fused/unfused; None when mixed."""
    states = {bool(getattr(block.attn, "fused_attn", False)) for block in vit.blocks}
    return states.pop() if len(states) == 1 else None


@contextlib.contextmanager
def fused_attn_set(vit: nn.Module, value: Optional[bool]) -> Iterator[None]:
    """Force ``attn.fused_attn`` on every block for the duration (``None``: leave as is)."""
    saved = [block.attn.fused_attn for block in vit.blocks]
    try:
        if value is not None:
            for block in vit.blocks:
                block.attn.fused_attn = bool(value)
        yield
    finally:
        for block, state in zip(vit.blocks, saved):
            block.attn.fused_attn = state


@contextlib.contextmanager
def threads_set(threads: Optional[int]) -> Iterator[None]:
    saved = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(int(threads))
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def timed_run(model: nn.Module, inputs: Tensor, iters: int, device: torch.device) -> float:
    """Seconds for ``iters`` forwards of ``model(inputs)``, synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        model(inputs)
    synchronize(device)
    return time.perf_counter() - start


def iters_for(seconds_per_forward: float, min_time_s: float) -> int:
    """Forwards per timed run so that one run lasts at least ``min_time_s`` (at least 1)."""
    if min_time_s <= 0:
        return 1
    return max(1, math.ceil(min_time_s / max(seconds_per_forward, 1e-6)))


def time_models(models: dict[str, nn.Module], inputs: Tensor, device: torch.device, dtype: str,
                settings: Settings) -> dict[str, dict[str, Any]]:
    """Warm up each model, then alternate timed runs between them; per model: median img/s and details."""
    batch = inputs.shape[0]
    names = list(models)
    result: dict[str, dict[str, Any]] = {}
    with torch.inference_mode(), autocast(device, dtype):
        for name in names:  # warm-up; its first forward gives the peak memory, its last the calibration
            model = models[name]
            if device.type == "cuda":
                synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            last = timed_run(model, inputs, 1, device)
            result[name] = {"peak_mem_mb": peak_memory_mb(device), "runs": []}
            for _ in range(settings.warmup - 1):
                last = timed_run(model, inputs, 1, device)
            result[name]["iters"] = iters_for(last, settings.min_time_s)
        with gc_paused():
            for repeat in range(settings.repeats):
                order = names if repeat % 2 == 0 else names[::-1]
                for name in order:
                    seconds = timed_run(models[name], inputs, result[name]["iters"], device)
                    result[name]["runs"].append(batch * result[name]["iters"] / seconds)
    for entry in result.values():
        entry["img_per_s"] = statistics.median(entry["runs"])
    return result


def measure(method: nn.Module, dense: Optional[nn.Module], device: torch.device, settings: Settings,
            flops_ratio: Optional[float], images: Optional[Tensor] = None,
            input_shape: Optional[Sequence[int]] = None) -> list[dict[str, Any]]:
    """The record's ``throughput`` list: one entry per dtype and batch size.

    ``dense`` is the dense wrapper of the same backbone, or ``None`` when ``method`` is itself dense (it is
    then its own reference: speedup 1). ``images`` (CPU tensor) are cycled into each batch; without them the
    inputs are seeded noise of ``input_shape`` (default: the backbone's input size)."""
    import timm

    vit = method.vit
    if input_shape is None:
        input_shape = (vit.patch_embed.proj.in_channels, *vit.patch_embed.img_size)
    models: dict[str, nn.Module] = {"method": method}
    if dense is not None:
        models["dense"] = dense
    was_training = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    runnable = {name: torch.compile(model) if settings.compile else model for name, model in models.items()}
    entries = []
    try:
        with threads_set(settings.threads), fused_attn_set(vit, settings.fused_attn):
            fused = fused_attn_state(vit)
            for dtype in settings.dtypes:
                for batch in settings.batch_sizes:
                    inputs = make_inputs(batch, device, images, input_shape)
                    timed = time_models(runnable, inputs, device, dtype, settings)
                    del inputs
                    own = timed["method"]
                    ref = timed.get("dense", own)
                    # paired: each repeat's method run against the dense run next to it in time
                    speedup = statistics.median(m / d for m, d in zip(own["runs"], ref["runs"]))
                    entries.append({
                        "device": device.type,
                        "device_name": device_name(device),
                        "batch_size": int(batch),
                        "dtype": dtype,
                        "img_per_s": own["img_per_s"],
                        "dense_img_per_s": ref["img_per_s"],
                        "speedup_vs_dense": speedup,
                        "speedup_of_medians": own["img_per_s"] / ref["img_per_s"],
                        "flops_ratio": flops_ratio,
                        "efficiency": speedup * flops_ratio if flops_ratio else None,
                        "peak_mem_mb": own["peak_mem_mb"],
                        "dense_peak_mem_mb": ref["peak_mem_mb"],
                        "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
                        "threads": torch.get_num_threads(),
                        "compile": bool(settings.compile),
                        "fused_attn": fused,
                        "amp": "autocast" if dtype != "fp32" else None,
                        "torch": torch.__version__,
                        "timm": timm.__version__,
                        "repeats": settings.repeats,
                        "warmup": settings.warmup,
                        "iters_per_repeat": own["iters"],
                        "dense_iters_per_repeat": ref["iters"],
                        "img_per_s_runs": own["runs"],
                        "dense_img_per_s_runs": ref["runs"],
                        "dense_measured": dense is not None,
                        "inputs": "images" if images is not None else "random",
                    })
    finally:
        for name, model in models.items():
            model.train(was_training[name])
    return entries
