"""``ltmp``: Learned Thresholds token Merging and Pruning. Two learned scalars per block decide, per image, which
tokens merge (ToMe-style) and which are pruned; the count of tokens depends on the image.

Paper: Bonnaerens & Dambre, "Learned Thresholds Token Merging and Pruning for Vision Transformers", TMLR 2023
(https://arxiv.org/abs/2307.10780). Official code: https://github.com/Mxbonn/ltmp (``ltmp/timm/lt_mergeprune.py``
the training model, ``lt_mergeprune_inference.py`` the inference model, ``threshold_masking.py``,
``tools/train.py``; read at commit ``1a9c055``).

Mechanism, in **every** block, after the attention residual and before the MLP:

1. attention with proportional attention (``+ log size`` of each key, as ToMe) over the image's present tokens;
   importance of token j = its attention received, averaged over heads and the present query rows; CLS = +inf;
2. bipartite split of the present tokens in their current order (A = even ranks, B = odd), cosine similarity of
   the head-mean keys, CLS never merges; each A token's best B partner; **merge** when ``node_max > merge
   threshold`` (size-weighted average, sizes add up; a B token's importance becomes the max of its own and its
   merged sources'); the order becomes [unmerged A, B], as the official inference model;
3. **prune** the tokens whose importance is ``<=`` the prune threshold (CLS never);
4. the MLP runs on the tokens left.

Training (``train()``): nothing is removed; each block's decisions are masks, hard in the forward pass and
straight-through in the backward pass (``sigmoid((value - threshold) / tau)``, ``tau`` = 0.5, the official
``train.py`` default that its README command uses; the model constructors' default is 0.1). A removed token is a
masked attention key (the mask multiplies the softmax numerator, so gradients reach it) and the mask values feed
the budget loss ``flops_weight * (r_FLOPs - reduction_target) ** 2`` (:func:`budget_ratio`, the official formula;
weight 10, target 0.75), returned by :meth:`LTMP.loss_terms`. The official one-epoch recipe trains only the
thresholds: the backbone is frozen (``train_backbone=false``: ``requires_grad`` off) and :meth:`LTMP.param_groups`
gives the merge thresholds lr ``merge_lr`` (5e-3) and the prune thresholds ``prune_lr`` (5e-6), absolute (they
ignore ``train.lr``), weight decay 0 and momentum 0 (read by ``train.opt=sgd``/``momentum``: the official
optimiser is timm's ``momentum`` with momentum 0, i.e. plain SGD). After every optimizer step the thresholds are
clamped to [0, 1] (:meth:`LTMP.after_optimizer_step`, as the official loop). The rest of the official recipe (1
epoch, cosine to 0, no warmup, label smoothing 0.1, no clipping) is ``experiments/conf/sweep/ltmp_target.yaml``.

Inference (``eval()``): removed tokens leave the packed batch of the ragged runtime (``methods/ragged.py``), each
image keeps its own count, no padding of the token stream; one host sync per block (the compaction's), none when
every image is down to CLS. The attention runs explicitly (its weights give the importance) on a buffer padded to
the longest image (to ``N`` off the CPU, sync-free), padded keys masked. That attention, the partner search and
the merge (both paths) are ``methods/ltmp_kernels.py``'s.

Inference knob ``threshold_scale`` (k, default 1 = as trained): the prune threshold becomes ``k * theta_p`` and the
merge threshold ``1 - k * (1 - theta_m)`` (clamped at 0): each threshold's distance from its no-op value (0:
prune nothing; 1: merge nothing) is scaled, so k = 0 is the dense model, larger k reduces more, and the learned
per-block profile is kept. Why not the target reduction: it acts only through the training loss, so changing it
on a trained checkpoint changes nothing. Why not an additive offset: the two thresholds live on unrelated scales
(cosine similarity near 0.9, mean attention near 1/N), so no single offset means the same for both.

Outputs: ``token_counts[..., 0]`` the tokens a block's attention saw, ``[..., 1]`` those its MLP ran on;
``patch_depth``: a token merged or pruned in block l was seen by block l's attention, depth ``l + 1`` (a B token
that absorbs others keeps its identity). ``extra_macs``: the matching, ``ceil(N/2) * floor(N/2) * C`` per block
(the suite's ToMe convention); importance and thresholds are additions and comparisons.

Constants: thresholds start at merge 0.9, prune 0 (official: "if we set it 1 it only learns to prune"). Without
training the model merges pairs with key cosine > 0.9 and prunes nothing.

Where we deviate from the official code (no switch: each makes training compute what inference computes):

- The official training model splits A/B over all N slots (masked ones included) and averages importance over
  all N query rows; its inference model splits and averages over the present tokens. Here training follows the
  inference model (A/B over the present tokens' ranks, importance over present rows), so ``train()`` and
  ``eval()`` give the same logits, counts and depths, and the thresholds learn the decisions inference makes.
- The official training softmax adds ``eps = 1e-5`` (``(num + eps/N) / (sum + eps)``); here masked keys get
  exactly 0 (the denominator is only kept from 0), as at inference.
- The official inference model needs equal counts across the batch (README: ``-b 1``); here images are ragged.
- Gradient paths are the official ones: merging and sizes use the detached hard mask, masks are
  straight-through, a token's mask after a block is the prune mask if it was neither merged nor absent.

Official checkpoints (``model.checkpoint``; layout registered with ``methods.official``): timm's ``train.py``
saves ``{'state_dict', 'arch', 'args', ...}`` with timm's DeiT keys at the top level plus
``blocks.{i}.merge_masker.threshold`` and ``blocks.{i}.prune_masker.threshold`` (shape ``[1]``); they map to
``merge_thresholds.{i}`` / ``prune_thresholds.{i}``, every other key to ``vit.`` + key. Checked against the
official code only (key names, shapes), not against a released file: none is released. The official
``tools/reduce_checkpoints.py`` strips a file down to the thresholds; such a file is refused (all-or-nothing
loading), load the backbone weights with it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Optional

import torch
from pydantic import Field
from torch import Tensor, nn
from timm.optim import param_groups_weight_decay

from . import backbone, ltmp_kernels, official, ragged
from .base import MethodOutput, TokenReducer
from .models import CheckpointError
from .params import ParamError, Weight
from .registry import register_method

Threshold = Annotated[float, Field(ge=0, le=1)]  # the official clamp after every step
Temperature = Annotated[float, Field(gt=0, le=100)]
LearningRate = Annotated[float, Field(gt=0, le=10)]
Ratio = Annotated[float, Field(gt=0, le=1)]  # FLOPs kept, of the dense model's
Scale = Annotated[float, Field(ge=0, le=100)]  # the inference knob
THRESHOLD_KEY = re.compile(r"(merge|prune)_thresholds\.(\d+)")


def budget_ratio(keep: Tensor, tokens: int, dim: int) -> Tensor:
    """The official FLOPs ratio of ``tools/train.py``: ``keep`` ``[depth]`` the mean mask after each block
    (``m_0 = 1`` before the first), ``(1/L) sum_l (2 m_{l-1} n d^2 + (m_{l-1} n)^2 d + 4 m_l n d^2) /
    (6 n d^2 + n^2 d)`` with ``n`` tokens and width ``d``."""
    before = torch.cat([keep.new_ones(1), keep[:-1]])
    n, d = float(tokens), float(dim)
    per_block = (2 * before * n * d ** 2 + (before * n) ** 2 * d + 4 * keep * n * d ** 2) / \
        (6 * n * d ** 2 + n ** 2 * d)
    return per_block.mean()


def straight_through(hard: Tensor, values: Tensor, threshold: Tensor, tau: float) -> Tensor:
    """``hard`` (``values > threshold``) in the forward pass, exactly; ``sigmoid((values - threshold) / tau)``'s
    gradient in the backward pass (the official ``ThresholdMasker``)."""
    soft = torch.sigmoid((values - threshold) / tau)
    return hard.to(soft.dtype) + (soft - soft.detach())


@dataclass
class LTMPState:
    """What an LTMP pass leaves for its loss."""

    keep: Tensor  # [B, depth]: fraction of the N slots present after each block (differentiable in training)


class LTMP(TokenReducer):
    """Learned-threshold merging and pruning in every block; see the module docstring."""

    def __init__(self, vit: nn.Module, merge_threshold: float, prune_threshold: float, tau: float,
                 reduction_target: float, flops_weight: float, merge_lr: float, prune_lr: float,
                 train_backbone: bool, threshold_scale: float) -> None:
        """Built by :func:`build_ltmp`, whose signature holds the defaults and ranges."""
        super().__init__(vit)
        self.merge_thresholds = nn.ParameterList(
            [nn.Parameter(torch.full((1,), float(merge_threshold))) for _ in range(self.depth)])
        self.prune_thresholds = nn.ParameterList(
            [nn.Parameter(torch.full((1,), float(prune_threshold))) for _ in range(self.depth)])
        self.tau, self.reduction_target, self.flops_weight = tau, reduction_target, flops_weight
        self.merge_lr, self.prune_lr = merge_lr, prune_lr
        self.train_backbone = train_backbone
        self.threshold_scale = threshold_scale
        if not train_backbone:
            self.vit.requires_grad_(False)
        self.register_load_state_dict_pre_hook(_check_loaded_thresholds)

    # ------------------------------------------------------------------------------------------ thresholds
    def thresholds(self, index: int) -> tuple[Tensor, Tensor]:
        """Block ``index``'s (merge, prune) thresholds with ``threshold_scale`` applied (see the docstring)."""
        merge, prune = self.merge_thresholds[index], self.prune_thresholds[index]
        scale = self.threshold_scale
        if scale == 1:
            return merge, prune
        return (1 - scale * (1 - merge)).clamp_min(0), scale * prune

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Clamp every threshold to [0, 1], as the official loop does after each step."""
        for param in (*self.merge_thresholds, *self.prune_thresholds):
            param.clamp_(0, 1)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Merge thresholds at ``merge_lr``, prune thresholds at ``prune_lr`` (no decay, momentum 0); the backbone
        (weight-decay groups at ``train.lr``) only with ``train_backbone``."""
        groups = [{"params": list(self.merge_thresholds), "lr": self.merge_lr, "weight_decay": 0.0, "momentum": 0.0},
                  {"params": list(self.prune_thresholds), "lr": self.prune_lr, "weight_decay": 0.0, "momentum": 0.0}]
        if self.train_backbone:
            groups += param_groups_weight_decay(self.vit, weight_decay, no_weight_decay_list=self.vit.no_weight_decay())
        return groups

    def loss_terms(self, out: MethodOutput, targets: Tensor, teacher_out: Optional[MethodOutput] = None
                   ) -> dict[str, Tensor]:
        """``flops``: ``flops_weight * (budget_ratio - reduction_target) ** 2`` over the batch's mean masks."""
        ratio = budget_ratio(out.state.keep.float().mean(dim=0), self.num_tokens, self.embed_dim)
        return {"flops": self.flops_weight * (ratio - self.reduction_target) ** 2}

    def record_info(self) -> dict:
        return {"merge_thresholds": [p.item() for p in self.merge_thresholds],
                "prune_thresholds": [p.item() for p in self.prune_thresholds]}

    def extra_macs(self, token_counts: Tensor) -> Tensor:
        """``ceil(N/2) * floor(N/2) * C`` per block (the matching over its N attention tokens)."""
        attn = token_counts[..., 0].double()
        return (torch.ceil(attn / 2) * torch.floor(attn / 2) * self.embed_dim).sum(dim=1)

    def forward(self, images: Tensor) -> MethodOutput:
        return self.forward_masked(images) if self.training else self.forward_ragged(images)

    # ------------------------------------------------------------------------------------- training path
    def forward_masked(self, images: Tensor) -> MethodOutput:
        """Every slot stays; removed tokens are masked keys. Slots are kept in the inference order (present
        tokens first: [unmerged A, B]), so every decision equals the ragged path's."""
        x = backbone.embed(self.vit, images)
        batch, tokens, _ = x.shape
        device = x.device
        size = x.new_ones(batch, tokens, 1, dtype=torch.float32)
        mask = x.new_ones(batch, tokens, dtype=torch.float32)  # carries the straight-through gradients
        present = torch.ones(batch, tokens, dtype=torch.bool, device=device)
        source = torch.arange(tokens, device=device).expand(batch, -1)  # original token of each slot
        depth_of = torch.full((batch, tokens), self.depth, dtype=torch.long, device=device)
        counts, keep = [], []
        for index, block in enumerate(self.vit.blocks):
            merge_at, prune_at = self.thresholds(index)
            attn = block.attn
            heads = backbone.project_qkv(attn, block.norm1(x))
            logits = ((heads.q * attn.scale) @ heads.k.transpose(-2, -1)).float() + size.log()[:, None, None, :, 0]
            weights = (logits - logits.amax(dim=-1, keepdim=True)).exp() * mask[:, None, None, :]
            probs = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            out = attn.attn_drop(probs).to(heads.v.dtype) @ heads.v
            x = x + block.drop_path1(block.ls1(backbone.project_out(attn, out)))
            seen = present.sum(dim=1)
            importance = (probs * present[:, None, :, None]).sum(dim=(1, 2)) / (attn.num_heads * seen[:, None])
            rank = present.cumsum(dim=1) - 1
            is_a, is_b = present & (rank % 2 == 0), present & (rank % 2 == 1)
            pairs = (is_a & (rank > 0))[:, :, None] & is_b[:, None, :]  # CLS (rank 0) never merges
            node_max, partner = ltmp_kernels.best_partners(heads.k.mean(dim=1), pairs)
            merged = node_max > merge_at
            merge_mask = straight_through(merged, node_max, merge_at, self.tau)
            x, size = ltmp_kernels.merge(x, size, merged, partner)
            importance = torch.where(rank == 0, math.inf, importance)
            importance = importance.scatter_reduce(1, partner, torch.where(merged, importance, 0.0), "amax")
            pruned_keep = importance > prune_at
            patch_importance = torch.where(rank == 0, 0.0, importance)  # a finite soft mask for CLS (kept)
            prune_mask = straight_through(pruned_keep, patch_importance, prune_at, self.tau)
            unmerged = torch.where(is_a, 1 - merge_mask, mask)  # the official mask after merging
            mask = torch.where(present & ~merged, prune_mask, unmerged)
            new_present = present & ~merged & pruned_keep
            depth_of = torch.where(present & ~new_present, index + 1, depth_of)
            order = torch.where(new_present, is_b.long(), 2).argsort(dim=1, stable=True)  # [unmerged A, B, gone]
            x, size = x.gather(1, order[..., None].expand_as(x)), size.gather(1, order[..., None])
            mask, present = mask.gather(1, order), new_present.gather(1, order)
            source, depth_of = source.gather(1, order), depth_of.gather(1, order)
            counts.append(torch.stack([seen, present.sum(dim=1)], dim=-1))
            keep.append(mask.mean(dim=1))
            x = backbone.mlp_residual(block, x)
        depth_by_token = torch.empty_like(depth_of).scatter_(1, source, depth_of)
        return MethodOutput(backbone.head(self.vit, x), torch.stack(counts, dim=1), depth_by_token[:, 1:],
                            state=LTMPState(keep=torch.stack(keep, dim=1)))

    # ------------------------------------------------------------------------------------ inference path
    def forward_ragged(self, images: Tensor) -> MethodOutput:
        """Merged and pruned tokens leave the packed batch; each image keeps its own count."""
        x = backbone.embed(self.vit, images)
        batch, tokens, _ = x.shape
        device = x.device
        packed = ragged.Packed.pack(x)
        size = x.new_ones(batch * tokens, 1, dtype=torch.float32)
        depth_of = torch.full((batch * tokens,), self.depth, dtype=torch.long, device=device)
        counts = []
        for index, block in enumerate(self.vit.blocks):
            merge_at, prune_at = self.thresholds(index)
            layout = packed.layout
            attn = block.attn
            plan = layout.cached("ltmp_pad", lambda: ltmp_kernels.PadPlan(layout))
            qkv = attn.qkv(block.norm1(packed.x))
            out, importance, keys = ltmp_kernels.padded_attention(attn, qkv, size, plan)
            packed = packed.with_rows(backbone.attn_out_residual(block, packed.x, out))
            seen = layout.image_lengths
            rank = plan.rank
            is_a = rank % 2 == 0
            node_max, partner = ltmp_kernels.bipartite_partners(keys, plan)
            node_max, partner = node_max.flatten().index_select(0, plan.slot), partner.flatten().index_select(
                0, plan.slot) + layout.starts.index_select(0, layout.segment)  # padded column -> packed row
            merged = node_max > merge_at
            rows, size = ltmp_kernels.merge(packed.x[None], size[None], merged[None], partner[None])
            rows, size = rows[0], size[0]
            importance = torch.where(rank == 0, math.inf, importance)
            importance = importance.scatter_reduce(0, partner, torch.where(merged, importance, 0.0), "amax")
            keep = ~merged & (importance > prune_at)
            depth_of.index_copy_(0, layout.source, depth_of.index_select(0, layout.source)
                                 .masked_fill_(~keep, index + 1))
            if layout.source.shape[0] > layout.lengths.shape[0]:  # else every image is down to CLS: nothing leaves
                order = (layout.segment * 2 + (~is_a).long()).argsort(stable=True)  # per image [A, B]
                reordered = ragged.Packed(rows.index_select(0, order), ragged.Layout(
                    layout.source.index_select(0, order), layout.lengths, layout.images, layout.tokens, layout.batch))
                packed, size = reordered.keep(keep.index_select(0, order), size.index_select(0, order))
            else:
                packed = packed.with_rows(rows)
            counts.append(torch.stack([seen, packed.layout.image_lengths], dim=-1))
            packed = packed.with_rows(backbone.mlp_residual(block, packed.x))
        x = packed.unpack()  # CLS is every image's first token and never leaves
        return MethodOutput(backbone.head(self.vit, x), torch.stack(counts, dim=1),
                            depth_of.view(batch, tokens)[:, 1:],
                            state=LTMPState(keep=torch.stack(counts, dim=1)[..., 1].float() / tokens))


def _check_loaded_thresholds(module, state_dict, prefix, *args) -> None:
    """Refuse a checkpoint whose thresholds lie outside [0, 1] (training clamps them there), naming the key."""
    for key, value in state_dict.items():
        if key.startswith(prefix) and THRESHOLD_KEY.fullmatch(key[len(prefix):]) and torch.is_tensor(value):
            bad = value[(value < 0) | (value > 1) | ~torch.isfinite(value)]
            if bad.numel():
                raise CheckpointError(f"checkpoint key {key}={bad.tolist()} is outside the valid threshold range "
                                      f"[0, 1] (LTMP clamps its thresholds there after every step)")


# --------------------------------------------------------------------------------------------------- factory
@register_method("ltmp", family="merging", inference_knob="threshold_scale", finetune=True, counterpart="tome",
                 tradeoff_values=(0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0), stronger={"threshold_scale": 2.0})
def build_ltmp(vit: nn.Module, reduction_target: Ratio = 0.75, flops_weight: Weight = 10.0, tau: Temperature = 0.5,
               merge_threshold: Threshold = 0.9, prune_threshold: Threshold = 0.0, merge_lr: LearningRate = 5e-3,
               prune_lr: LearningRate = 5e-6, train_backbone: bool = False, threshold_scale: Scale = 1.0) -> LTMP:
    """LTMP: learned per-block thresholds merge similar tokens and prune unimportant ones (per image; 1 epoch).

    ``reduction_target``: FLOPs kept, of the dense model's, that the budget loss aims at (official 0.75);
    ``merge_threshold``/``prune_threshold``: the thresholds' initial values; ``threshold_scale``: the inference
    knob (module docstring)."""
    depth = len(vit.blocks)
    tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
    # on the CPU explicitly: the plan builds methods on the meta device, where .item() has no value
    floor = budget_ratio(torch.full((depth,), 1.0 / tokens, dtype=torch.float64, device="cpu"), tokens,
                         vit.embed_dim).item()
    if reduction_target <= floor:
        raise ParamError(f"method.params.reduction_target={reduction_target!r} asks for at most the FLOPs left when "
                         f"every token but CLS is removed in the first block ({floor:.4f} of dense on this "
                         f"{tokens}-token model): it would remove every token; valid: ({floor:.4f}, 1]")
    return LTMP(vit, merge_threshold=merge_threshold, prune_threshold=prune_threshold, tau=tau,
                reduction_target=reduction_target, flops_weight=flops_weight, merge_lr=merge_lr, prune_lr=prune_lr,
                train_backbone=train_backbone, threshold_scale=threshold_scale)


# ------------------------------------------------------------------------------- the official checkpoint layout
_OFFICIAL_THRESHOLD = re.compile(r"blocks\.(\d+)\.(merge|prune)_masker\.threshold")


def official_key_to_ours(key: str) -> str:
    found = _OFFICIAL_THRESHOLD.fullmatch(key)
    return f"{found.group(2)}_thresholds.{found.group(1)}" if found else f"vit.{key}"


def our_key_to_official(key: str) -> str:
    found = THRESHOLD_KEY.fullmatch(key)
    if found:
        return f"blocks.{found.group(2)}.{found.group(1)}_masker.threshold"
    return key[len("vit."):] if key.startswith("vit.") else f"(none: {key} is ours only)"


official.register_layout(official.OfficialLayout(
    method="ltmp", code="Mxbonn/ltmp ltmp/timm/lt_mergeprune.py",
    detect=lambda content: any(_OFFICIAL_THRESHOLD.fullmatch(key) for key in content["model"]),
    to_ours=official_key_to_ours, to_official=our_key_to_official))
