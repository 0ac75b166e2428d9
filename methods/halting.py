"""A-ViT's halting rules as plain tensor functions: the ACT accumulation, the per-block token counts implied by
halting depths, and the halting-depth prior (its target distribution, its KL term and the check that the target
stays finite).

The module (``methods/adavit.py``) owns the forward passes and the losses' weights; everything here is pure and
has no parameters, so the masked training path, the ragged inference pass (``methods/adavit_ragged.py``) and the
record fixtures compute the same numbers from one place.

ACT accumulation (:func:`halting_step`): after block l, token k with halting score ``h`` accumulates ``c += h``
and halts at the first block where ``c > 1 - eps`` (``h`` forced to 1 at the last block, for the accumulation
only); its weight in the output mix is ``h`` before, and the remainder ``r = 1 - sum h`` at the halting block.

Halting prior, ``method.params.prior`` of ``adavit`` (README paragraph):
    ``correct`` (default) follows the paper. The observed distribution is the per-block mean halting score
    over the images and the patch tokens (CLS excluded; a token that has halted scores 0), normalised over
    blocks. The target is a Gaussian over the 1-based halting block (mean ``target_depth``, std
    ``target_std``), normalised to sum 1. The loss is KL(observed || target).
    ``official`` reproduces ``engine_act.py`` and ``utils.get_distribution_target``, quirks included:
    (1) the slice ``h[1:]`` drops the first image of the batch instead of the CLS token, and the mean also
    runs over the scores of tokens that have already halted (computed from their zeroed inputs; the
    official forward also zeroes their norm outputs, so those scores, and only those, differ in detail);
    (2) the target is not normalised: pdf values at 0-based block indices 0..L-1 (so its peak sits one
    block later than the correct form's), scaled so that the first ``int(target_depth)`` entries sum to
    0.98; (3) it computes KL(target || observed) via ``KLDivLoss(reduction="batchmean")``, which on this
    1-D input divides the sum by the depth, after clamping the observed distribution to [0.01, 0.99], and
    adds the term only when it is positive. Its loss values match the official code's; its gradients do
    not: the official ``out.data = out.data * mask`` hides the zeroing of halted tokens from autograd, while
    ours is the true gradient (see the deviations in ``methods/adavit.py``).
    The target a built model uses is in ``record_info()["prior_target"]``, which records keep.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .params import MAX_BLOCKS, ParamError


def halting_step(c: Tensor, remainder: Tensor, h: Tensor, last: bool, eps: float):
    """One block of ACT accumulation for tokens that ran it.

    Returns ``(c, weight, halted, remainder)``: the new accumulation, the weight of this block's output in
    the token's mix (``h``, or the remainder at the halting block), whether the token halts here, and the new
    remainder (unchanged at the halting block, where it is spent).
    """
    if last:
        h = torch.ones_like(h)  # forced halting, for the accumulation only
    c = c + h
    halted = c > 1.0 - eps
    weight = torch.where(halted, remainder, h)
    return c, weight, halted, torch.where(halted, remainder, remainder - h)


def prior_target(depth: int, mean: float, std: float, mode: str) -> Tensor:
    """The Gaussian halting-depth target over the blocks, ``[depth]`` (float64)."""
    if mode == "correct":
        blocks = torch.arange(1, depth + 1, dtype=torch.float64)  # 1-based halting block
        density = torch.exp(-0.5 * ((blocks - mean) / std) ** 2)
        return density / density.sum()
    blocks = torch.arange(depth, dtype=torch.float64)  # official: 0-based index, pdf, top-part rescaling
    density = torch.exp(-0.5 * ((blocks - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    return density * (1.0 - 0.02) / density[: int(mean)].sum()


def prior_kl(scores: Tensor, ran: Tensor, target: Tensor, mode: str) -> Tensor:
    """KL term of the halting prior from per-block scores ``[B, depth, N]`` and run masks (unweighted)."""
    target = target.to(scores.device, torch.float32)
    if mode == "correct":
        observed = (scores * ran)[:, :, 1:].mean(dim=(0, 2))  # halted tokens score 0; CLS excluded
        observed = observed / observed.sum().clamp_min(1e-12)
        # clamp inside the log only: a block with no halting mass adds 0 and a finite gradient (xlogy's is NaN)
        return (observed * (observed.clamp_min(1e-12).log() - target.log())).sum()
    if scores.shape[0] < 2:
        raise ValueError("method.params.prior=official drops the first image of the batch (as the official "
                         "code does) and needs a batch of at least 2; use prior=correct")
    observed = scores[1:].mean(dim=(0, 2))
    observed = (observed / observed.sum()).clamp(0.01, 0.99)
    kl = F.kl_div(observed.log(), target, reduction="batchmean")
    return kl * (kl > 0)  # the official loop adds the term only when positive


def counts_from_depth(depth_of: Tensor, depth: int) -> Tensor:
    """Per-block token counts ``[B, depth, 2]`` from 1-based halting depths ``[B, N]``."""
    blocks = torch.arange(depth, device=depth_of.device)
    counts = (depth_of[:, None, :] > blocks[None, :, None]).sum(dim=-1)
    return torch.stack([counts, counts], dim=-1)


def check_prior_target(depth: int, mean: float, std: float, mode: str) -> None:
    """The prior's target must keep the KL term finite: every block above 0 in fp32 with ``correct`` (its log
    is taken), finite with ``official``. A ``target_std`` too narrow for the blocks around ``target_depth``
    underflows; the refusal names the smallest width that does not (to 0.01)."""
    def usable(width: float) -> bool:
        with torch.device("cpu"):  # also when the method is built on the meta device (experiments.plan)
            target = prior_target(depth, mean, width, mode).float()
        return bool(torch.isfinite(target).all() and (mode != "correct" or (target > 0).all()))

    if usable(std):
        return
    low, high = std, float(MAX_BLOCKS)
    for _ in range(40):  # bisection: usable is monotone in the width
        low, high = (low, (low + high) / 2) if usable((low + high) / 2) else ((low + high) / 2, high)
    raise ParamError(f"method.params.target_std={std!r} is too narrow: the halting prior around target_depth="
                     f"{mean:g} over {depth} blocks underflows to 0 in fp32 and the KL term is not finite; valid: "
                     f"target_std >= {math.ceil(high * 100) / 100:g} (or prior_weight=0)")

