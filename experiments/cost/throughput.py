"""Throughput protocol: img/s of a method and of timm's own dense forward on the same weights, in one process.

Protocol (the union of the official repos' best practice; the README's "Measuring cost" section):

- eval mode, ``torch.inference_mode``, inputs preloaded on the device (fp32; ``bf16``/``fp16`` run under
  ``torch.autocast``), ``warmup`` untimed forwards per model (protocol: >= 10) and one untimed pass over the
  image pool (the calibration below; a compiled model meets every shape there), then ``repeats`` timed runs
  (protocol: >= 5) of ``iters`` forwards each, CUDA-synchronised before and after; the median is reported.
- **The timed images are the images whose FLOPs the efficiency divides by.** Every batch size cycles through
  one pool of images (``measure.timing_images``, default 64, the first validation images): the batches of size
  ``b`` walk the pool in order, wrapping around, and a timed run is a whole number of passes over the batches,
  so every pool image is timed equally often (``P / gcd(P, b)`` batches per pass: 64 single images at batch 1;
  at batch 256 each image four times). The caller passes the FLOPs ratio of exactly that pool
  (``experiments/cost/costs.py``), and each entry says which images were timed (``timed_images``).
- ``iters`` is calibrated from the warm-up, per model and condition, so that one timed run lasts at least
  ``min_time_s`` (short forwards would otherwise time the timer), rounded up to whole passes over the pool.
- **The dense reference is timm's own forward** (``vit(images)``) of the same module (same weights, no copy),
  what a user would otherwise run. The ``dense`` method (our wrapper of the same blocks) is timed too, as a
  harness check: ``dense_wrapper_vs_timm`` should stay within 2% of 1. All models alternate within every
  repeat (and swap order each repeat), so machine drift hits them all.
- ``img_per_s`` and ``dense_img_per_s`` are the medians over repeats. ``speedup_vs_dense`` is the median over
  repeats of the paired ratio (method run / the timm run adjacent to it), which cancels drift that the ratio
  of medians (``speedup_of_medians``, also kept) does not; on a quiet machine the two agree.
  ``efficiency = speedup_vs_dense * flops_ratio``, i.e. the speedup divided by the FLOPs saving
  (``dense_gflops / gflops`` of the timed images); 1.0 means wall time tracks FLOPs exactly.
- ``compile=true``: every model is ``torch.compile``'d (``compile_backend``; ``experiments/cost/compiled.py``),
  dense the same way as the method; compilation happens in the warm-up and is excluded from the timing;
  ``compile_s`` reports it (warm-up time minus the same number of steady forwards), and the entry counts the
  frames dynamo compiled at the first forward (``compiled_frames``), after it (``recompiles``: later shapes,
  e.g. a ragged method's new packed lengths), during the timed runs (``timed_recompiles``, must be 0) and the
  graph breaks. ``compile=both``: the eager and the compiled models alternate within the same repeats, and
  each batch size gets two entries (``compile`` false, then true), each against timm's forward run the same
  way; the compiled entry also holds its speedup over the eager timm forward (``speedup_vs_eager_dense``). A
  model that cannot compile is a :class:`~experiments.cost.compiled.CompileError` naming it, never an eager run.
- Peak memory: CUDA ``max_memory_allocated`` of one forward of that model (reset before); on CPU the process
  peak RSS (``resource.getrusage``) after the method ran at that batch size. RSS peak is a process-lifetime
  high-water mark, so on CPU it never decreases within a process and includes everything loaded before
  (data, other models): compare it across batch sizes of one process only with that in mind.
- Nothing else runs in the timed region: no autograd, no allocation by the harness, Python's garbage
  collector paused.

Each result is one plain dict per (dtype, batch size), the record's ``throughput`` entry format. The image pool
is ``experiments/cost/timing_pool.py``'s, the machine state around the timed runs (autocast, threads, fused
attention, the paused collector, peak memory) ``experiments/cost/timing_conditions.py``'s.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from experiments.cost import compiled as compiling
from experiments.cost.timing_conditions import (autocast, device_name, fused_attn_set, fused_attn_state, gc_paused,
                                                peak_memory_mb, synchronize, threads_set)
from experiments.cost.timing_pool import input_shape_of, pool_batches, pool_label
from methods.dense import Dense

GPU_BATCH_SIZES = (1, 64, 256)
CPU_BATCH_SIZES = (1, 32)
GPU_DTYPES = ("fp32", "bf16")
# 2: timed images = the pool whose FLOPs are reported, timm's forward as the reference (1: the first b images
# at batch b against the dense wrapper; experiments/remeasure.py re-times or withdraws records of protocol 1)
TIMING_PROTOCOL = 2
CPU_DTYPES = ("fp32",)


@dataclass
class Settings:
    """What to time and how; see the module docstring. Built by ``costs.py`` from the ``measure:`` settings,
    which ``experiments/config.py`` (``MeasureConfig``) types and range-checks when the plan is validated."""

    batch_sizes: Sequence[int]
    dtypes: Sequence[str]
    warmup: int = 10
    repeats: int = 5
    min_time_s: float = 0.05
    compile: Union[bool, str] = False  # True: compiled only; "both": eager and compiled, interleaved
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: tracing without code generation)
    # the method's torch.compile(dynamic=...): None dynamo's automatic dynamic shapes (the protocol's; timm's
    # reference always so); experiments/compile_strategies.py compares True
    compile_dynamic: Optional[bool] = None

    @property
    def modes(self) -> tuple[bool, ...]:
        """Whether each timed variant is compiled: ``(False,)``, ``(True,)`` or ``(False, True)``."""
        if self.compile == "both":
            return (False, True)
        if self.compile in (False, True):
            return (bool(self.compile),)
        raise ValueError(f"measure.compile={self.compile!r} unknown; valid: false, true, both")
    fused_attn: Optional[bool] = None  # None: leave the modules as built
    threads: Optional[int] = None  # None: torch's default


def default_batch_sizes(device: torch.device) -> list[int]:
    return list(GPU_BATCH_SIZES if device.type == "cuda" else CPU_BATCH_SIZES)


def default_dtypes(device: torch.device) -> list[str]:
    return list(GPU_DTYPES if device.type == "cuda" else CPU_DTYPES)


class TimmForward(nn.Module):
    """timm's own forward of a backbone, ``vit(images)``: the dense reference every method is timed against."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, images: Tensor) -> Tensor:
        return self.vit(images)


def timed_run(model: nn.Module, batches: Sequence[Tensor], iters: int, device: torch.device) -> float:
    """Seconds for ``iters`` forwards cycling through ``batches``, synchronised before and after."""
    count = len(batches)
    synchronize(device)
    start = time.perf_counter()
    for step in range(iters):
        model(batches[step % count])
    synchronize(device)
    return time.perf_counter() - start


def iters_for(seconds_per_forward: float, min_time_s: float, multiple: int = 1) -> int:
    """Forwards per timed run so that one run lasts at least ``min_time_s``: at least one, rounded up to a
    ``multiple`` (whole passes over the pool)."""
    needed = 1 if min_time_s <= 0 else max(1, math.ceil(min_time_s / max(seconds_per_forward, 1e-6)))
    return multiple * math.ceil(needed / multiple)


def time_models(models: dict[str, nn.Module], batches: Sequence[Tensor], device: torch.device, dtype: str,
                settings: Settings, compiled: Optional[dict[str, str]] = None) -> dict[str, dict[str, Any]]:
    """Warm up each model, then alternate timed runs between them; per model: median img/s and details.
    ``compiled`` maps the names of compiled models to what a compile error calls them; their entries also
    count dynamo's compilations (:class:`~experiments.cost.compiled.CompileCount`)."""
    compiled = compiled or {}
    batch = batches[0].shape[0]
    names = list(models)
    result: dict[str, dict[str, Any]] = {}

    def guard(name: str):
        return compiling.strict(compiled[name], settings.compile_backend) if name in compiled \
            else contextlib.nullcontext()

    with torch.inference_mode(), autocast(device, dtype):
        for name in names:  # warm-up, then one calibration pass (every shape a compiled model will meet)
            model = models[name]
            if device.type == "cuda":
                synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            before = compiling.CompileCount.now()
            with guard(name):
                first = timed_run(model, batches[:1], 1, device)  # its peak memory is the one reported
                result[name] = {"peak_mem_mb": peak_memory_mb(device), "runs": []}
                after_first = compiling.CompileCount.now()
                rest = timed_run(model, batches[1:] + batches[:1], settings.warmup - 1, device) \
                    if settings.warmup > 1 else 0.0
                calibration = timed_run(model, batches, len(batches), device)
            warmed = compiling.CompileCount.now()
            result[name].update(warmup_s=first + rest + calibration, warmup_forwards=max(settings.warmup, 1)
                                + len(batches), first=after_first.since(before), later=warmed.since(after_first),
                                timed_frames=0)
            result[name]["iters"] = iters_for(calibration / len(batches), settings.min_time_s, len(batches))
        with gc_paused():
            for repeat in range(settings.repeats):
                order = names if repeat % 2 == 0 else names[::-1]
                for name in order:
                    before = compiling.CompileCount.now()
                    with guard(name):
                        seconds = timed_run(models[name], batches, result[name]["iters"], device)
                    result[name]["timed_frames"] += compiling.CompileCount.now().since(before).frames
                    result[name]["runs"].append(batch * result[name]["iters"] / seconds)
    for entry in result.values():
        entry["img_per_s"] = statistics.median(entry["runs"])
        steady = batch / entry["img_per_s"]  # seconds per forward
        entry["compile_s"] = max(0.0, entry["warmup_s"] - entry["warmup_forwards"] * steady)
    return result


def paired_speedup(own: dict[str, Any], ref: dict[str, Any]) -> float:
    """Median over repeats of one model's run over the adjacent run of the other."""
    return statistics.median(m / d for m, d in zip(own["runs"], ref["runs"]))


COMPILED = "@compiled"  # suffix of a compiled model's name among the timed models


def variants(models: dict[str, nn.Module], settings: Settings, label: str) -> tuple[dict[str, nn.Module],
                                                                                   dict[str, str]]:
    """The timed models of every mode in ``settings.modes`` (compiled ones named ``name@compiled``), and what
    a compile error calls each compiled one."""
    runnable, names = {}, {}
    for mode in settings.modes:
        for name, model in models.items():
            if not mode:
                runnable[name] = model
                continue
            runnable[name + COMPILED] = compiling.compile_model(
                model, settings.compile_backend, settings.compile_dynamic if name == "method" else None)
            names[name + COMPILED] = label if name == "method" else f"{label}'s {name} reference"
    return runnable, names


def compile_entry(own: dict[str, Any], ref: dict[str, Any], settings: Settings,
                  eager_ref: Optional[dict[str, Any]]) -> dict[str, Any]:
    """A compiled entry's compile keys: compile times, dynamo's frame counts and graph breaks."""
    return {"compile_backend": settings.compile_backend, "compile_s": own["compile_s"],
            "dense_compile_s": ref["compile_s"], "compiled_frames": own["first"].frames,
            "recompiles": own["later"].frames, "timed_recompiles": own["timed_frames"],
            "graph_breaks": own["first"].graph_breaks + own["later"].graph_breaks,
            "dense_compiled_frames": ref["first"].frames, "dense_recompiles": ref["later"].frames,
            "speedup_vs_eager_dense": paired_speedup(own, eager_ref) if eager_ref else None}


def measure(method: nn.Module, dense: Optional[nn.Module], device: torch.device, settings: Settings,
            flops_ratio: Optional[float], images: Optional[Tensor] = None,
            input_shape: Optional[Sequence[int]] = None, pool_size: int = 64) -> list[dict[str, Any]]:
    """The record's ``throughput`` list: one entry per dtype, batch size and mode (eager, compiled).

    ``dense`` is the ``dense`` wrapper of the same backbone (the harness check), or ``None`` when ``method`` is
    itself that wrapper or the check is off; either way the reference is timm's forward of ``method.vit``.
    ``images`` (CPU tensor) is the timing pool, and ``flops_ratio`` must be the FLOPs ratio of exactly these
    images; without them the pool is ``pool_size`` seeded noise images of ``input_shape`` (default: the
    backbone's input size)."""
    import timm

    vit = method.vit
    if input_shape is None:
        input_shape = input_shape_of(vit)
    models: dict[str, nn.Module] = {"method": method, "timm": TimmForward(vit)}
    if dense is not None:
        models["dense"] = dense
    was_training = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    runnable, compiled_names = variants(models, settings, f"method {type(method).__name__}")
    timed_images = pool_label(images, pool_size)
    entries = []
    try:
        with threads_set(settings.threads), fused_attn_set(vit, settings.fused_attn):
            fused = fused_attn_state(vit)
            for dtype in settings.dtypes:
                for batch in settings.batch_sizes:
                    batches = pool_batches(batch, device, images, input_shape, pool_size)
                    timed = time_models(runnable, batches, device, dtype, settings, compiled_names)
                    del batches
                    for mode in settings.modes:
                        suffix = COMPILED if mode else ""
                        own, ref = timed["method" + suffix], timed["timm" + suffix]
                        wrapper = timed.get("dense" + suffix, own if isinstance(method, Dense) else None)
                        # paired: each repeat's method run against the timm run next to it in time
                        speedup = paired_speedup(own, ref)
                        entries.append({
                            "device": device.type,
                            "device_name": device_name(device),
                            "batch_size": int(batch),
                            "dtype": dtype,
                            "img_per_s": own["img_per_s"],
                            "dense_img_per_s": ref["img_per_s"],
                            "dense_reference": "timm",  # vit(images); the dense wrapper is the harness check
                            "speedup_vs_dense": speedup,
                            "speedup_of_medians": own["img_per_s"] / ref["img_per_s"],
                            "dense_wrapper_img_per_s": wrapper["img_per_s"] if wrapper else None,
                            "dense_wrapper_vs_timm": paired_speedup(wrapper, ref) if wrapper else None,
                            "flops_ratio": flops_ratio,
                            "efficiency": speedup * flops_ratio if flops_ratio else None,
                            "timed_images": timed_images,
                            "timed_pool_size": len(images) if images is not None and len(images) else pool_size,
                            "peak_mem_mb": own["peak_mem_mb"],
                            "dense_peak_mem_mb": ref["peak_mem_mb"],
                            "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
                            "threads": torch.get_num_threads(),
                            "compile": mode,
                            **(compile_entry(own, ref, settings, timed.get("timm") if len(settings.modes) > 1
                                             else None) if mode else
                               dict.fromkeys(("compile_backend", "compile_s", "dense_compile_s"))),
                            "fused_attn": fused,
                            "amp": "autocast" if dtype != "fp32" else None,
                            "torch": torch.__version__,
                            "timm": timm.__version__,
                            "repeats": settings.repeats,
                            "warmup": own["warmup_forwards"],
                            "iters_per_repeat": own["iters"],
                            "dense_iters_per_repeat": ref["iters"],
                            "img_per_s_runs": own["runs"],
                            "dense_img_per_s_runs": ref["runs"],
                            "dense_measured": dense is not None,
                            "inputs": "images" if images is not None else "random",
                            "timing_protocol": TIMING_PROTOCOL,
                        })
    finally:
        for name, model in models.items():
            model.train(was_training[name])
    return entries
