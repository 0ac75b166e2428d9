"""Reduction at the start of fixed blocks, before their attention: the engine of TokenReduction's family.

Haurum et al., "Which Tokens to Use? Investigating Token Reduction in Vision Transformers", ICCVW 2023
(https://github.com/JoakimHaurum/TokenReduction) reduce the patch tokens at the start of blocks 3, 6 and 9 (their
"4th, 7th and 10th block"), before that block's attention; CLS is set aside and put back in front. A subclass of
:class:`StagedReduction` says how, in :meth:`StagedReduction.reduce`: it maps the current patch tokens
``[B, P, C]`` to ``K`` new ones and says which input token, if any, each output still *is*
(:class:`Reduced`). ``kmedoids``, ``dpcknn``, ``sit``, ``patchmerger``, ``sinkhorn`` and ``heuristic`` are built
on it.

How many patch tokens each stage leaves: with one keep rate ``kr``, stage ``i = 0, 1, 2, ...`` leaves
``K_i = int(P * kr ** (i + 1))`` of the ``P`` original patches, cumulative, computed in floating point exactly as
the official code does (``kr = 0.7`` on DeiT-S: 137, 96, 67). ``patch_counts`` gives the per-stage counts
explicitly instead (the official code accepts a list too). Counts are the same for every image, so the
batch stays rectangular and training runs the very path that inference runs (no masks).

``patch_depth`` follows the convention that ToMe uses here: an original patch counts the blocks whose attention
saw it as itself. At a stage in block ``l`` a patch that is no output's identity (not a medoid, a density
centre, a kept token) leaves with depth ``l``: blocks ``0 .. l - 1`` saw it. Soft mixtures (SiT, PatchMerger,
Sinkhorn) make tokens that are no input token, so there every patch leaves at the first stage.

``param_groups``: the method's own modules (:attr:`StagedReduction.reducers`) train at the full learning rate
(``lr_scale`` 1), as TokenReduction's "new" group does; the backbone at ``backbone_lr_scale`` times it (default
1: one learning rate for all, as the official recipe). The official grouping also keeps the head, position and
patch embeddings at the full rate; with a ``backbone_lr_scale`` other than 1 they scale here with the backbone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn

from . import backbone, params, tokens
from .base import MethodOutput, TokenReducer
from .params import ParamError


@dataclass
class Reduced:
    """What one stage makes of the patch tokens it was given."""

    tokens: Tensor  # [B, K, C] the new patch tokens (CLS is put back in front by the engine)
    # [B, K] long: the position, among the input patch tokens, of the token each output still is (a medoid, a
    # centre, a kept token); None where every output is a mixture that no input token is.
    identity: Optional[Tensor]


class StagedReduction(TokenReducer):
    """Reduce the patch tokens at the start of fixed blocks; subclasses implement :meth:`reduce`."""

    # The summed attention of the block before each stage is passed to reduce() (K-Medoids' token weights).
    needs_previous_attention: ClassVar[bool] = False

    def __init__(self, vit: nn.Module, keep_rate: float, locations: Sequence[int],
                 patch_counts: Optional[Sequence[int]] = None, backbone_lr_scale: float = 1.0) -> None:
        """
        Args:
            keep_rate: in (0, 1]; stage i leaves ``int(P * keep_rate ** (i + 1))`` patch tokens.
            locations: strictly increasing block indices; each stage runs at the start of its block.
            patch_counts: explicit patch tokens left by each stage (one per location, non-increasing, >= 1);
                replaces ``keep_rate``.
            backbone_lr_scale: learning-rate factor of the backbone relative to the method's own modules.

        Ranges are the factories' signatures' (``methods.params``, checked by the plan); here only what needs
        the model: locations against its depth, the counts against its patches.
        """
        super().__init__(vit)
        first = 1 if self.needs_previous_attention else 0
        self.locations = params.check_locations(locations, self.depth, first=first)
        self.keep_rate = None if patch_counts is not None else float(keep_rate)
        self.patch_counts = stage_counts(keep_rate, patch_counts, self.num_patches, len(self.locations))
        self.backbone_lr_scale = float(backbone_lr_scale)
        self.reducers = nn.ModuleList()  # subclasses append one module per stage if they learn something

    @property
    def stage_inputs(self) -> list[int]:
        """Patch tokens entering each stage."""
        return [self.num_patches] + self.patch_counts[:-1]

    def reduce(self, stage: int, patches: Tensor, attention: Optional[Tensor]) -> Reduced:  # pragma: no cover
        """Make ``self.patch_counts[stage]`` tokens of ``patches`` ``[B, P, C]``. ``attention`` ``[B, P]``: per
        patch, its attention received in the block before, summed over heads and all queries (CLS included),
        when :attr:`needs_previous_attention` is set; else ``None``."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> MethodOutput:
        x = backbone.embed(self.vit, images)
        batch, num_tokens, _ = x.shape
        patches = num_tokens - 1
        ids, depth = tokens.track_patches(batch, num_tokens, self.depth, x.device)  # mixtures carry `patches`
        patch_ids, no_patch = ids[:, 1:], ids[:, :1]  # the ids of the patch tokens; CLS's slot for mixtures
        stage_at = {location: stage for stage, location in enumerate(self.locations)}
        previous = {location - 1 for location in self.locations} if self.needs_previous_attention else set()
        attention, counts = None, []
        for index, block in enumerate(self.vit.blocks):
            if index in stage_at:
                reduced = self.reduce(stage_at[index], x[:, 1:], attention)
                x, patch_ids = self._replace_patches(x, patch_ids, no_patch, reduced, depth, index)
            if index in previous:
                summed = []
                x, _ = backbone.attn_residual(block, x, lambda attn, heads: _summing_attention(attn, heads, summed))
                attention = summed[0][:, 1:]
            else:
                x, _ = backbone.attn_residual(block, x)
            counts.append((x.shape[1], x.shape[1]))
            x = backbone.mlp_residual(block, x)
        token_counts = torch.tensor(counts, dtype=torch.long, device=x.device).expand(batch, -1, -1).clone()
        return MethodOutput(backbone.head(self.vit, x), token_counts, depth[:, :patches],
                            final_tokens=self.vit.norm(x))

    def _replace_patches(self, x: Tensor, patch_ids: Tensor, no_patch: Tensor, reduced: Reduced, depth: Tensor,
                         index: int) -> tuple[Tensor, Tensor]:
        """CLS + the stage's tokens, and the ids of the new patch tokens; every patch leaving here gets depth
        ``index``."""
        expected = self.patch_counts[list(self.locations).index(index)]
        if reduced.tokens.shape[1] != expected:  # a subclass bug, not a user error
            raise RuntimeError(f"{type(self).__name__}.reduce made {reduced.tokens.shape[1]} tokens, not {expected}")
        depth.scatter_(1, patch_ids, index)
        if reduced.identity is None:
            kept = no_patch.expand(-1, reduced.tokens.shape[1])  # no patch: the slot cut off at the end
        else:
            kept = patch_ids.gather(1, reduced.identity)
            depth.scatter_(1, kept, self.depth)  # still themselves: not left yet
        return torch.cat([x[:, :1], reduced.tokens], dim=1), kept

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The weight-decay groups of the base class, each split into own modules (lr_scale 1) and backbone."""
        own = {id(p) for p in self.reducers.parameters()}
        groups = []
        for group in super().param_groups(weight_decay):
            members = list(group["params"])
            for scale, is_own in ((1.0, True), (self.backbone_lr_scale, False)):
                chosen = [p for p in members if (id(p) in own) == is_own]
                if chosen:
                    groups.append({**group, "params": chosen, "lr_scale": scale})
        return groups

    def stage_sizes(self, token_counts: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per stage, ``(P_in, K)`` as float64 ``[B]``: patch tokens entering it and leaving it, read from the
        counts a forward reported (for :meth:`extra_macs`)."""
        sizes = []
        for location in self.locations:
            entering = token_counts[:, location - 1, 1] if location > 0 else torch.full_like(
                token_counts[:, 0, 0], self.num_tokens)
            sizes.append(((entering - 1).double(), (token_counts[:, location, 0] - 1).double()))
        return sizes

    def record_info(self) -> dict:
        return {"patch_counts": list(self.patch_counts), "locations": list(self.locations)}


class SoftMixing(StagedReduction):
    """A stage whose learned module (``self.reducers[stage]``, returning ``(tokens, weights)``) makes new tokens
    that are mixtures of the inputs, so no output is any input token (SiT, PatchMerger, Sinkhorn)."""

    def reduce(self, stage: int, patches: Tensor, attention: Optional[Tensor]) -> Reduced:
        out, _ = self.reducers[stage](patches)
        return Reduced(out, identity=None)

    def mixing_macs(self, token_counts: Tensor) -> Tensor:
        """Per image and stage, ``2 * K * N * C``: the ``K x N`` weights from the ``N`` entering tokens, then the
        ``K`` outputs they mix (PatchMerger's logits and mix, Sinkhorn's scores and output matmuls)."""
        macs = torch.zeros(token_counts.shape[0], dtype=torch.float64, device=token_counts.device)
        for entering, made in self.stage_sizes(token_counts):
            macs += 2 * made * entering * self.embed_dim
        return macs


def _summing_attention(attn: nn.Module, heads: backbone.Heads, out: list) -> Tensor:
    """Plain softmax attention that also appends, to ``out``, each key's attention summed over heads and all
    queries ``[B, N]``. Explicit (not fused) so the sums come from the very probabilities the block uses."""
    logits = (heads.q * attn.scale) @ heads.k.transpose(-2, -1)
    probs = logits.softmax(dim=-1)
    out.append(probs.sum(dim=(1, 2)))
    return attn.attn_drop(probs) @ heads.v


def stage_counts(keep_rate: float, patch_counts: Optional[Sequence[int]], num_patches: int,
                 stages: int) -> list[int]:
    """Patch tokens left by each stage: ``patch_counts`` checked against the model (one per location,
    non-increasing, at most ``num_patches``), or ``int(P * keep_rate ** (i + 1))``, which must leave a patch."""
    if patch_counts is not None:
        key = "method.params.patch_counts"
        valid = f"{stages} non-increasing integers in [1, {num_patches}] (one per location)"
        counts = params.check_one_per_location(key, patch_counts, stages, valid)
        if any(not 1 <= v <= num_patches for v in counts) or any(b > a for a, b in zip(counts, counts[1:])):
            raise ParamError(f"{key}={counts!r} is not {valid}")
        return counts
    rate = float(keep_rate)
    counts = [int(num_patches * rate ** (stage + 1)) for stage in range(stages)]  # the official rounding
    if counts[-1] < 1:
        smallest = math.ceil((1.0 / num_patches) ** (1.0 / stages) * 1e4) / 1e4
        raise ParamError(f"method.params.keep_rate={keep_rate!r} leaves fewer than 1 patch token (cluster) at stage "
                         f"{stages}: int({num_patches} x {keep_rate!r}^{stages}) = 0; valid: a rate in "
                         f"[{smallest:.4f}, 1] for {num_patches} patches and {stages} stages")
    return counts

