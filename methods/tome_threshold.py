"""Threshold token merging (DToMe, from DyMU): ``tome`` with ``method.params.threshold``, and its calibration.

Paper: Wang et al., "DyMU: Dynamic Merging and Virtual Unmerging for Efficient VLMs", arXiv 2504.17040.
Official code: https://github.com/MikeWangWZHL/dymu (``src/open_clip/tome.py``: the merge, the batch threshold,
the running mean; ``src/open_clip_train/threshold_finder.py``: the calibration pass).

Mechanism, in every block whose threshold is below 1, between the attention residual and the MLP: ToMe's
bipartite matching on the head-mean keys (A = even positions of the image's current sequence, B = odd, cosine
similarity, CLS protected, each A token's best B token), then **every** A token whose best edge is above the
block's threshold ``tau_l`` merges into its partner (size-weighted average, sizes add up; the order becomes
ToMe's: unmerged A, then B). So an image merges as many tokens as it has similar pairs: counts vary per image.
Proportional attention (``+ log(size)`` on the keys) as in ToMe. At batch size 1 this is DyMU's inference rule
(``r_eff`` = the edges above ``tau_l``, capped at half the non-CLS tokens, which the A set already is).

Thresholds are cosine similarities. Valid values are [0, 1], the range DyMU's calibration produces (its batch
threshold is clamped to >= 0, its buffer starts at 1.0); 1 merges nothing (an edge must be strictly above it,
and similarities are clamped to 1, so float rounding of identical tokens cannot cross it). A negative
threshold would merge pairs of dissimilar tokens, which no calibration gives, so it is refused as bad input.

Calibration (:meth:`ThresholdToMe.calibration_pass`, run by ``experiments/calibrate.py``), DyMU's estimation: for
target merges ``r_l`` per block (ToMe's ``r``), each calibration batch of B images runs the same forward, but in
block l the batch's top ``r_l * B`` edges merge, across the batch (so per-image counts vary), and the batch
threshold is the best *unmerged* edge (sorted position ``r_l * B``), clamped to >= 0. A block's threshold is the
running mean of its batch thresholds over the batches; blocks with ``r_l = 0`` keep 1 (never merge).

Runtime: ``eval()`` removes merged tokens physically on the ragged runtime (``methods/ragged.py``): the batch's
rows are packed, each image keeps its own count, no padding; one host sync per merging block (the compaction).
``train()`` keeps the batch rectangular: merged tokens are masked as keys and skipped by the matching, which
gives the same logits (to float rounding) and the same counts. An image's result never depends on the other
images of its batch in either path.

Where we deviate from the official code:

- Calibration runs in eval mode (no dropout, no drop-path: DyMU's CLIP encoders have none, DeiT has drop-path),
  in the run's dtype (DyMU: bf16) on one process (DyMU: DDP, an all-reduce of the batch thresholds).
- The official non-fused attention adds the log-size bias after the softmax (a bug); we add it to the logits.
- An image whose block merges nothing keeps its token order, as DyMU does at batch size 1 (ToMe returns early
  at ``r = 0``); DyMU's batched path reorders it to [A, B] anyway, which changes later pairings, so its result
  depended on the batch. Here an image's result is its batch-size-1 result.
- ``max_r_per_instance_ratio`` (an optional per-image cap, default None) is not supported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backbone, ragged, ragged_attention
from .base import MethodOutput, TokenReducer
from .params import ParamError

CALIBRATE_COMMAND = ("python -m experiments.calibrate method=tome method.params.r=<target r> "
                     "model.checkpoint=<weights> (avb-calibrate)")
NEVER = 1.0  # the threshold of a block that does not merge (cosine similarity never exceeds it)

Decide = Callable[[int, Tensor], Tensor]  # (block, best edges [R, |A|], -inf where none) -> merge [R, |A|] bool


class UncalibratedError(ParamError):
    """``threshold=calibrated`` without calibrated thresholds in the weights; names the calibration command."""


def uncalibrated_message(where: str) -> str:
    return (f"method.params.threshold=calibrated but {where} holds no calibrated thresholds; valid: the "
            f"checkpoint written by {CALIBRATE_COMMAND}, or explicit thresholds in [0, 1] "
            f"(method.params.threshold=0.9 or a per-block list)")


# ------------------------------------------------------------------------------------------ matching on rows
@dataclass
class RowMatch:
    """Bipartite matching over rows of several images (packed, or all slots of a rectangular batch)."""

    best: Tensor  # [R, |A|] fp32 each A position's best similarity (-inf: CLS, absent)
    partner: Tensor  # [R, |A|] its best B position
    grid: Tensor  # [R, N + 1] row at each sequence position (-1: none; column N collects absent rows)
    rank: Tensor  # [T] each row's position in its image's current sequence (N for absent rows)


@torch.no_grad()
def match_rows(keys: Tensor, segment: Tensor, starts: Tensor, order: Tensor, present: Tensor,
               images: int, tokens: int) -> RowMatch:
    """ToMe's bipartite matching per image on rows: ``keys`` ``[T, D]`` (head-mean keys), ``segment`` ``[T]``
    the image of each row, ``starts`` ``[R]`` each image's first row, ``order`` ``[T]`` the sequence order key
    within an image (< 2 * tokens), ``present`` ``[T]`` bool. No host sync."""
    total, dim = keys.shape
    width = 2 * tokens + 1
    sort_key = segment * (2 * width) + torch.where(present, order, width + order)  # absent rows last
    sorted_rows = sort_key.argsort()
    rank = torch.empty_like(sorted_rows).index_copy_(
        0, sorted_rows, torch.arange(total, device=keys.device) - starts.index_select(0, segment[sorted_rows]))
    rank = torch.where(present, rank, tokens)
    grid = torch.full((images, tokens + 1), -1, dtype=torch.long, device=keys.device)
    grid.index_put_((segment, rank), torch.arange(total, device=keys.device))
    metric = keys.new_zeros(images, tokens + 1, dim, dtype=torch.float32)
    metric.index_put_((segment, rank), F.normalize(keys.float(), dim=-1))
    grid, metric = grid[:, :tokens], metric[:, :tokens]
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = (a @ b.transpose(1, 2)).masked_fill((grid[:, 1::2] < 0)[:, None, :], -math.inf)
    scores[:, 0, :] = -math.inf  # CLS (position 0, in A) never merges
    best, partner = scores.max(dim=-1)
    best = best.clamp(max=1.0).masked_fill(grid[:, ::2] < 0, -math.inf)
    return RowMatch(best, partner, torch.cat([grid, grid.new_full((images, 1), -1)], dim=1), rank)


def merge_rows(x: Tensor, size: Tensor, match: RowMatch, merge: Tensor, segment: Tensor,
               present: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Apply ``merge`` (``[R, |A|]`` bool) to rows ``x`` ``[T, C]`` with sizes ``size`` ``[T]`` fp32: merged A
    rows are added, size-weighted, into their partners. Returns ``(x, size, merged [T] bool, order [T])``, the
    new order key putting the unmerged A rows first, then B, as ToMe (in images that merged). No host sync."""
    tokens = match.grid.shape[1] - 1
    rank = match.rank
    is_a = present & (rank.remainder(2) == 0)
    a_index = torch.where(is_a, rank // 2, 0)
    merged = is_a & merge[segment, a_index]
    partner_rank = 2 * match.partner[segment, a_index] + 1
    rows = torch.arange(x.shape[0], device=x.device)
    target = torch.where(merged, match.grid[segment, partner_rank.clamp(max=tokens)], rows)
    weight = torch.where(merged, size, 0.0)
    total = x.float() * size[:, None]
    new_total = total.index_add(0, target, total * merged[:, None])
    new_size = size.index_add(0, target, weight)
    reordered = merge.any(dim=1)[segment]  # an image that merges nothing keeps its order (ToMe at r = 0)
    order = torch.where(reordered & (rank.remainder(2) == 1), rank + tokens, rank)
    return (new_total / new_size[:, None]).to(x.dtype), new_size, merged, order


def above(thresholds: Sequence[float]) -> Decide:
    """Inference: every edge strictly above the block's threshold merges."""
    return lambda block, best: best > thresholds[block]


class BatchTopR:
    """DyMU's calibration decision: the batch's ``r_l * B`` best edges merge; the best unmerged edge (clamped to
    >= 0) is the batch threshold, collected per block (tensors, read once at the end)."""

    def __init__(self, schedule: Sequence[int], batch: int) -> None:
        self.schedule, self.batch = list(schedule), batch
        self.found: dict[int, Tensor] = {}

    def __call__(self, block: int, best: Tensor) -> Tensor:
        flat = best.flatten()
        count = min(self.schedule[block] * self.batch, flat.numel())
        values, index = flat.topk(min(count + 1, flat.numel()))
        tau = values[count] if count < values.numel() else values.new_tensor(-math.inf)
        self.found[block] = tau.clamp(min=0.0)
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen.index_copy_(0, index[:count], torch.isfinite(values[:count]))
        return chosen.view_as(best)


# ------------------------------------------------------------------------------------------------- method
def short_schedule(schedule: Sequence[int]) -> Any:
    """A per-block r as the command line would give it: one int when every block has the same."""
    return schedule[0] if len(set(schedule)) == 1 else list(schedule)


@dataclass
class ThresholdToMeState:
    size: Tensor  # [B, N] fp32 original tokens each token stands for, at its original position (0: merged away)


class ThresholdToMe(TokenReducer):
    """ToMe with per-block similarity thresholds (DToMe); see the module docstring."""

    def __init__(self, vit: nn.Module, thresholds: Optional[Sequence[float]], prop_attn: bool,
                 calibration_target: Optional[Sequence[int]] = None) -> None:
        """``thresholds``: one per block, or None for ``threshold=calibrated`` (read from the weights).
        ``calibration_target``: the per-block r the calibrated weights must have been calibrated for (None: any)."""
        super().__init__(vit)
        self.calibration_target = None if calibration_target is None else [int(r) for r in calibration_target]
        self.prop_attn = bool(prop_attn)
        self.calibrated = thresholds is None
        values = torch.full((self.depth,), math.nan) if thresholds is None else torch.tensor(thresholds)
        # calibrated thresholds are part of the weights (state dict key ``thresholds``); given ones are params
        self.register_buffer("thresholds", values.float(), persistent=self.calibrated)
        if self.calibrated:  # what the calibration targeted, for the record (-1 / 0: not calibrated)
            self.register_buffer("calibration_r", torch.full((self.depth,), -1, dtype=torch.long))
            self.register_buffer("calibration_images", torch.zeros((), dtype=torch.long))
        self._values: Optional[list[float]] = None if thresholds is None else [float(v) for v in thresholds]
        self.register_load_state_dict_post_hook(lambda module, keys: module._refresh())

    def _refresh(self) -> None:
        self._values = None if self.thresholds.is_meta else self.thresholds.tolist()

    def threshold_values(self) -> list[float]:
        """The per-block thresholds as floats (read once per load); uncalibrated ones raise."""
        if self._values is None:
            self._refresh()
        if self._values is None or any(math.isnan(v) for v in self._values):
            raise UncalibratedError(uncalibrated_message("the model's weights"))
        return self._values

    def missing_state(self, state: Optional[Mapping[str, Tensor]]) -> Optional[str]:
        if self.calibrated and (state is None or "thresholds" not in state):
            return uncalibrated_message("the checkpoint" if state is not None else "no checkpoint")
        found = state.get("calibration_r") if self.calibrated and self.calibration_target is not None else None
        if found is not None and not found.is_meta and found.tolist() != self.calibration_target:
            wanted, saved = short_schedule(self.calibration_target), short_schedule(found.tolist())
            return (f"method.params.r={wanted} names the calibration's target, but the checkpoint's thresholds were "
                    f"calibrated for r={saved}; valid: method.params.r={saved}, or calibrate for r={wanted} "
                    f"(python -m experiments.calibrate method.params.r=... model.checkpoint=...)")
        return None

    def calibration_error(self) -> Optional[str]:
        return ("method.params.threshold is set, but calibration computes the thresholds for a target "
                "method.params.r; valid: threshold=null and r >= 1")

    def record_info(self) -> dict:
        info = {"thresholds": None if self.thresholds.is_meta else [round(v, 6) for v in self.thresholds.tolist()],
                "threshold_source": "calibrated" if self.calibrated else "given",
                "counterpart": "tome"}  # per-image merges against ToMe's fixed r (the report's oracle question)
        if self.calibrated and not self.thresholds.is_meta:
            info.update(calibration_r=self.calibration_r.tolist(), calibration_images=int(self.calibration_images))
        return info

    def forward(self, images: Tensor) -> MethodOutput:
        decide = above(self.threshold_values())
        return self.forward_masked(images, decide) if self.training else self.forward_ragged(images, decide)[0]

    def merging_blocks(self, decide: Decide) -> list[bool]:
        if isinstance(decide, BatchTopR):
            return [r > 0 for r in decide.schedule]
        return [value < NEVER for value in self.threshold_values()]

    def forward_ragged(self, images: Tensor, decide: Decide) -> tuple[MethodOutput, Tensor]:
        """The inference path: merged A rows leave the packed batch. Returns the output and the sizes ``[T]``."""
        x = backbone.embed(self.vit, images)
        batch, tokens, _ = x.shape
        device = x.device
        packed = ragged.Packed.pack(x)
        size = torch.ones(batch * tokens, dtype=torch.float32, device=device)
        order = torch.arange(tokens, device=device).repeat(batch)
        depth_of = torch.full((batch * tokens,), self.depth, dtype=torch.long, device=device)
        backend, group = self.runtime.backend_for(device), ragged_attention.group_for(None, device)
        merging, merged_once = self.merging_blocks(decide), False
        counts = []
        for index, block in enumerate(self.vit.blocks):
            layout, attn = packed.layout, block.attn
            bias = size.log() if self.prop_attn and merged_once else None
            qkv = attn.qkv(block.norm1(packed.x))
            out = ragged_attention.attention(attn, qkv, packed, backend, group, key_bias=bias)
            rows = backbone.attn_out_residual(block, packed.x, out)
            seen = layout.image_lengths
            if merging[index]:
                keys = _head_mean_keys(attn, qkv)
                present = torch.ones_like(order, dtype=torch.bool)
                match = match_rows(keys, layout.segment, layout.starts, order, present, layout.lengths.shape[0],
                                   tokens)
                rows, size, merged, order = merge_rows(rows, size, match, decide(index, match.best),
                                                       layout.segment, present)
                depth_of.index_copy_(0, layout.source, depth_of.index_select(0, layout.source)
                                     .masked_fill_(merged, index + 1))
                packed, size, order = packed.with_rows(rows).keep(~merged, size, order)
                merged_once = True
            else:
                packed = packed.with_rows(rows)
            counts.append(torch.stack([seen, packed.layout.image_lengths], dim=-1))
            packed = packed.with_rows(backbone.mlp_residual(block, packed.x))
        layout = packed.layout
        final = torch.zeros(batch * tokens, dtype=torch.float32, device=device).index_copy_(0, layout.source, size)
        out = MethodOutput(backbone.head(self.vit, packed.unpack()), torch.stack(counts, dim=1),
                           depth_of.view(batch, tokens)[:, 1:], state=ThresholdToMeState(final.view(batch, tokens)))
        return out, size

    def forward_masked(self, images: Tensor, decide: Decide) -> MethodOutput:
        """The training path: every slot stays; merged tokens are masked as keys and skipped by the matching."""
        x = backbone.embed(self.vit, images)
        batch, tokens, dim = x.shape
        device = x.device
        present = torch.ones(batch * tokens, dtype=torch.bool, device=device)
        size = torch.ones(batch * tokens, dtype=torch.float32, device=device)
        order = torch.arange(tokens, device=device).repeat(batch)
        segment = torch.arange(batch, device=device).repeat_interleave(tokens)
        starts = torch.arange(batch, device=device) * tokens
        depth_of = torch.full((batch * tokens,), self.depth, dtype=torch.long, device=device)
        merging, merged_once = self.merging_blocks(decide), False
        counts = []
        for index, block in enumerate(self.vit.blocks):
            grid = present.view(batch, tokens)
            bias = size.log() if self.prop_attn and merged_once else torch.zeros_like(size)
            bias = bias.masked_fill(~present, -math.inf).view(batch, 1, 1, tokens)
            mix = (lambda attn, heads: backbone.softmax_attention(attn, heads, key_bias=bias)) \
                if merged_once else (lambda attn, heads: backbone.softmax_attention(attn, heads))
            y, heads = backbone.attn_residual(block, x, mix)
            seen = grid.sum(dim=1)
            if merging[index]:
                keys = heads.k.mean(dim=1).reshape(batch * tokens, -1)
                match = match_rows(keys, segment, starts, order, present, batch, tokens)
                rows, size, merged, order = merge_rows(y.reshape(batch * tokens, dim), size, match,
                                                       decide(index, match.best), segment, present)
                depth_of = depth_of.masked_fill(merged, index + 1)
                present = present & ~merged
                y = rows.view(batch, tokens, dim)
                merged_once = True
            counts.append(torch.stack([seen, present.view(batch, tokens).sum(dim=1)], dim=-1))
            x = backbone.mlp_residual(block, y)
        final = torch.where(present, size, 0.0).view(batch, tokens)
        return MethodOutput(backbone.head(self.vit, x), torch.stack(counts, dim=1),
                            depth_of.view(batch, tokens)[:, 1:], state=ThresholdToMeState(final))

    def extra_macs(self, token_counts: Tensor) -> Tensor:
        """``ceil(N/2) * floor(N/2) * C`` per block with a threshold below 1 (it matches, merging or not)."""
        blocks = torch.tensor([v < NEVER for v in self.threshold_values()], device=token_counts.device)
        attn = token_counts[..., 0].double()
        matching = torch.ceil(attn / 2) * torch.floor(attn / 2) * self.embed_dim
        return (matching * blocks).sum(dim=1)


def _head_mean_keys(attn: nn.Module, qkv: Tensor) -> Tensor:
    """Head-mean keys ``[T, head_dim]`` (after ``k_norm``) from packed QKV rows."""
    k = qkv.view(qkv.shape[0], 3, attn.num_heads, attn.head_dim)[:, 1]
    return attn.k_norm(k).mean(dim=1)


# ---------------------------------------------------------------------------------------------- calibration
@torch.no_grad()
def calibrate(method: ThresholdToMe, schedule: Sequence[int], batches: Iterable[Tensor]) -> tuple[list[float], int]:
    """DyMU's threshold estimation for target merges ``schedule`` (one per block) over ``batches`` of images:
    per block, the running mean of the batch thresholds (1 for blocks with ``r = 0``). Runs ``method`` in eval
    mode (it is restored). Returns ``(thresholds, images)``; no batch, or only empty ones, raises ``ValueError``."""
    was_training = method.training
    method.eval()
    sums = torch.zeros(method.depth, dtype=torch.float64)
    count, images = 0, 0
    try:
        for batch in batches:
            if batch.shape[0] == 0:
                continue
            decide = BatchTopR(schedule, batch.shape[0])
            method.forward_ragged(batch, decide)
            for block, tau in decide.found.items():
                sums[block] += float(tau)
            count, images = count + 1, images + batch.shape[0]
    finally:
        method.train(was_training)
    if count == 0:
        raise ValueError("calibration needs at least one image; got none")
    return [float(sums[i] / count) if schedule[i] > 0 else NEVER for i in range(method.depth)], images
