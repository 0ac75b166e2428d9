"""The timing pool: the images every throughput run cycles through (``experiments/cost/throughput.py`` owns the
protocol). The caller passes the FLOPs ratio of exactly these images, so a speedup and a FLOPs saving describe
the same inputs; without images the pool is seeded noise of the backbone's input shape.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn


def pool_batches(batch: int, device: torch.device, pool: Optional[Tensor] = None,
                 shape: Optional[Sequence[int]] = None, pool_size: int = 64) -> list[Tensor]:
    """One pass of ``[batch, 3, H, W]`` fp32 batches on ``device`` over the image pool: ``pool`` (CPU tensor),
    else ``pool_size`` images of seeded noise of ``shape``. Consecutive batches continue where the last one
    ended, wrapping around, and the pass ends when it is back at image 0, so each pool image appears
    ``batch * len(batches) / P`` times: ``P / gcd(P, batch)`` batches."""
    if pool is None or not len(pool):
        pool = noise_pool(pool_size, shape)
    size = pool.shape[0]
    count = size // math.gcd(size, batch)
    index = torch.arange(count * batch) % size
    return list(pool[index].float().to(device).split(batch))


def noise_pool(size: int, shape: Sequence[int]) -> Tensor:
    """The timing pool without images: ``size`` seeded noise images (seed 0) of ``shape``."""
    return torch.randn(size, *shape, generator=torch.Generator().manual_seed(0))


def input_shape_of(vit: nn.Module) -> tuple[int, ...]:
    """One input's shape: ``(C, H, W)``, or a video embedding's own ``input_size`` ``(C, T, H, W)``."""
    embed = vit.patch_embed
    return tuple(getattr(embed, "input_size", None) or (embed.proj.in_channels, *embed.img_size))


def pool_label(pool: Optional[Tensor], pool_size: int) -> str:
    """How records name the timed images."""
    return f"val[0:{len(pool)}]" if pool is not None and len(pool) else f"noise[0:{pool_size}] (seed 0)"
