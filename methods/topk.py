"""``topk`` and ``random``: static token pruning baselines, no new parameters, no training needed.

``topk`` keeps the non-CLS tokens with the highest CLS attention (head mean) at fixed blocks; it is EViT without
fusion (Liang et al., ICLR 2022, https://github.com/youweiliang/evit) and the "Top-K" baseline of Haurum et al.,
"Which Tokens to Use? Investigating Token Reduction in Vision Transformers", ICCVW 2023
(https://github.com/JoakimHaurum/TokenReduction). ``random`` keeps the same number of tokens chosen at random: the
sanity floor. Both share EViT's engine (:class:`methods.evit.AttentionPruning`): a location prunes inside
its block, between attention and MLP, scored by that block's attention. (Pruning after the MLP instead
would change nothing but cost: the MLP works per token, and the kept tokens are the same.)

How many tokens are kept, CLS always kept on top:

- ``schedule=dynamicvit`` (default): stage s = 1, 2, ... keeps ``floor(P * keep_rate ** s)`` of the P original
  patches, DynamicViT's cumulative rule. DeiT-S, 0.7, locations 3/6/9: attention of blocks 0-3 runs on 197
  tokens, the MLP of block 3 and the blocks up to 6 on 138, then 97, then 68. Same token counts as
  ``dynamicvit``, but one block later: DynamicViT prunes *before* its locations with a predictor.
- ``schedule=evit``: each stage keeps ``ceil(keep_rate * current)`` (139 / 98 / 69 tokens); then ``topk`` equals
  ``evit`` with ``fuse=false`` exactly (same code path).
- ``token_counts``: an explicit list, the tokens (CLS included) each block's attention runs on, e.g. taken from
  another method to match its FLOPs. It must start at the full count (block 0 sees every token), may not
  increase, and may be shorter than the depth (the last count repeats). Where the count drops from block l to
  l + 1 the pruning happens in block l, so block l's MLP already runs on the new count. When given, it
  replaces ``keep_rate``, ``locations`` and ``schedule``.

``random`` draws its subsets from a ``torch.Generator`` seeded with ``seed``. In ``eval()`` mode the generator is
reset at every forward and one subset per stage is shared by every image of the batch, so results do not
depend on the batch an image is in and a run repeats exactly; in expectation over seeds this is the same as
per-image random subsets. In ``train()`` mode the generator runs on and every image draws its own subset.
The generator state is not checkpointed.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from . import params, tokens
from .evit import KEEP_RATE_GRID, AttentionPruning, evit_plan
from .params import KeepRate, Locations, ParamError, TokenCount
from .registry import register_method

Schedule = Literal["dynamicvit", "evit"]
TokenCounts = Optional[Annotated[Sequence[TokenCount], Field(min_length=1, max_length=params.MAX_BLOCKS)]]
Seed = Annotated[int, Field(ge=0, le=2 ** 32 - 1)]  # the config's seed range (experiments.config.MAX_SEED)


class TopK(AttentionPruning):
    """Static CLS-attention top-k pruning; see the module docstring."""

    def __init__(self, vit: nn.Module, keep_rate: float, locations: Sequence[int], schedule: Schedule,
                 token_counts: Optional[Sequence[int]]) -> None:
        """Defaults and ranges live in :func:`build_topk`.

        Args:
            keep_rate: per-stage keep ratio in (0, 1].
            locations: strictly increasing block indices in [0, depth - 1] to prune in (after attention).
            schedule: ``dynamicvit`` (cumulative, rounded down) or ``evit`` (per stage, rounded up).
            token_counts: explicit non-increasing tokens per block, starting at the full count; replaces the
                three arguments above (they are then neither checked nor used).
        """
        super().__init__(vit, fuse=False)
        self.token_counts: Optional[list[int]] = None
        if token_counts is not None:  # replaces the other three, which are then not checked
            self.token_counts = check_token_counts(token_counts, self.depth, self.num_tokens)
            self.keep_rate, self.schedule = None, None
            self.locations = [i for i, plan in enumerate(self.keep_plan(self.num_tokens)) if plan is not None]
            return
        self.keep_rate = float(keep_rate)
        self.locations = params.check_locations(locations, self.depth)
        self.schedule = schedule
        if schedule == "dynamicvit":  # floor counts (evit's ceil always keeps a patch)
            params.check_cumulative_keep("method.params.keep_rate", self.keep_rate, self.num_patches,
                                         len(self.locations))

    def keep_plan(self, num_tokens: int) -> list[Optional[int]]:
        if self.token_counts is not None:
            if num_tokens != self.token_counts[0]:
                raise ValueError(f"method.params.token_counts starts at {self.token_counts[0]} tokens, but the "
                                 f"input has {num_tokens}")
            counts = self.token_counts
            return [after - 1 if after < before else None for before, after in zip(counts, counts[1:] + counts[-1:])]
        if self.schedule == "evit":
            return evit_plan(num_tokens, self.depth, self.keep_rate, self.locations, fuse=False)
        plan: list[Optional[int]] = [None] * self.depth
        for stage, location in enumerate(self.locations, start=1):
            plan[location] = tokens.kept_patch_count(num_tokens - 1, self.keep_rate ** stage, mode="floor")
        return plan


class RandomPruning(TopK):
    """The same counts as :class:`TopK`, chosen at random from a seeded generator; see the module docstring."""

    def __init__(self, vit: nn.Module, keep_rate: float, locations: Sequence[int], schedule: Schedule,
                 token_counts: Optional[Sequence[int]], seed: int) -> None:
        super().__init__(vit, keep_rate=keep_rate, locations=locations, schedule=schedule,
                         token_counts=token_counts)
        self.seed = seed
        self._train_generator = torch.Generator().manual_seed(seed)
        self._eval_generator = torch.Generator()

    def forward(self, images: Tensor):
        if not self.training:
            self._eval_generator.manual_seed(self.seed)  # every evaluation pass draws the same subsets
        return super().forward(images)

    def token_scores(self, cls_attn: Tensor) -> Tensor:
        batch, count = cls_attn.shape
        if self.training:
            scores = torch.rand(batch, count, generator=self._train_generator)
        else:
            scores = torch.rand(1, count, generator=self._eval_generator).expand(batch, -1)
        return scores.to(cls_attn.device)


def check_token_counts(value, depth: int, num_tokens: int, key: str = "method.params.token_counts") -> list[int]:
    """A non-increasing list of at most ``depth`` ints in [1, num_tokens], starting at ``num_tokens``; padded
    to ``depth`` by repeating its last entry. (Its type, a non-empty list of counts >= 1, is the signature's.)"""
    valid = f"at most {depth} non-increasing integers in [1, {num_tokens}], the first equal to {num_tokens}"
    counts = list(value)
    if len(counts) > depth:
        raise ParamError(f"{key} has {len(counts)} entries but the model has {depth} blocks; valid: {valid}")
    bad = [v for v in counts if not 1 <= v <= num_tokens]
    if bad:
        raise ParamError(f"{key}={counts}: {bad} outside [1, {num_tokens}]; valid: {valid}")
    if counts[0] != num_tokens:
        raise ParamError(f"{key}={counts} starts at {counts[0]}; block 0 runs on all {num_tokens} tokens "
                         f"(its attention scores the first pruning); valid: {valid}")
    rises = [i for i in range(1, len(counts)) if counts[i] > counts[i - 1]]
    if rises:
        raise ParamError(f"{key}={counts} increases at block(s) {rises}; valid: {valid}")
    return counts + counts[-1:] * (depth - len(counts))


@register_method("topk", family="pruning", inference_knob="keep_rate",
                 knob_fixed_by=("token_counts",), tradeoff_values=KEEP_RATE_GRID,
                 stronger={"keep_rate": 0.5})
def build_topk(vit: nn.Module, keep_rate: KeepRate = 0.7, locations: Locations = (3, 6, 9),
               schedule: Schedule = "dynamicvit", token_counts: TokenCounts = None) -> TopK:
    """Top-k: keep the tokens with the highest CLS attention at fixed blocks (EViT without fusion)."""
    return TopK(vit, keep_rate=keep_rate, locations=locations, schedule=schedule, token_counts=token_counts)


@register_method("random", family="pruning", inference_knob="keep_rate",
                 knob_fixed_by=("token_counts",), tradeoff_values=KEEP_RATE_GRID,
                 stronger={"keep_rate": 0.5})
def build_random(vit: nn.Module, keep_rate: KeepRate = 0.7, locations: Locations = (3, 6, 9),
                 schedule: Schedule = "dynamicvit", token_counts: TokenCounts = None,
                 seed: Seed = 0) -> RandomPruning:
    """Random: top-k's token counts, tokens chosen by a seeded generator (the sanity floor)."""
    return RandomPruning(vit, keep_rate=keep_rate, locations=locations, schedule=schedule,
                         token_counts=token_counts, seed=seed)
