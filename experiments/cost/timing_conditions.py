"""The machine state around a timed run (``experiments/cost/throughput.py`` owns the protocol): the dtype's
autocast, torch's thread count, timm's fused-attention switch, the garbage collector's pause, device
synchronisation, and what an entry reports of the machine (device name, peak memory).
"""
from __future__ import annotations

import contextlib
import gc
import platform
import resource
import sys
from typing import Iterator, Optional

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
