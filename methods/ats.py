"""``ats``: Adaptive Token Sampling (Fayyaz et al., ECCV 2022, https://arxiv.org/abs/2111.15667).

Official code: https://github.com/adaptivetokensampling/ATS (``libs/models/transformers/ats_block.py``).
No new parameters: runs off the shelf on a dense checkpoint and can be fine-tuned with the task loss alone.

Mechanism, in each ATS block (``locations``; default blocks 3 to the last, the official DeiT-S placement
3..11), after the block's attention and before its MLP:

1. significance of patch token j: ``s_j = (sum over heads of A[0, j]) * ||v_j||``, with ``A`` the block's
   softmax attention over the image's present tokens and ``v_j`` the value vector over all heads (length C);
   normalised over the patch tokens;
2. sorted ascending, cumulative sum, min-max normalised to ``cbar`` (so the least significant present token has
   ``cbar = 0``); ``c0`` = the smallest non-zero ``cbar``;
3. ``M`` sample points evenly spaced on ``[c0, 1]``; each picks the token with the **nearest** ``cbar`` (not the
   first ``cbar >= y``), ties to the lower one, as the official ``argmin``;
4. the block keeps CLS and the distinct sampled tokens (de-duplication), so an image keeps at most
   ``min(M, present patches)`` patches and usually fewer: the count depends on the image. The least
   significant token is never sampled (its ``cbar = 0 < c0``) unless it is the only patch left.
   The kept rows are the block's attention-residual rows of those tokens; the MLP runs on them only.

Budget (``budget``, the inference knob). The released code runs only ``K = N`` (its sampling expands to
``n_tokens - 1`` rows, which fails for any other K), so every ATS block draws ``M = 196`` points on DeiT-S:
adaptivity comes from de-duplication alone. That is the default here (``budget=null``: ``M`` = the patches at the
network input, in every block). A budget K (CLS included) draws ``M = K - 1`` points in each ATS block, the
paper's per-stage budget as the commented official line suggests: an int token count in [8, N] (8 is the
official minimum) or a float fraction of the input tokens in (0, 1] (``round(fraction * N)``, at least 8),
one value for every ATS block or a list with one per location. ``budget=1.0`` equals the default.

Outputs: ``token_counts[..., 0]`` the tokens a block's attention saw, ``[..., 1]`` those its MLP ran on;
``patch_depth``: a patch that is not sampled in block l was still seen by block l's attention, so its depth is
``l + 1``. ``extra_macs`` counts the significance, ``2 * N * C`` per ATS block (the CLS attention row
recomputed from the keys and the value norms); the sampling's comparisons are not multiply-adds.

Training (``train()``) keeps the batch rectangular: dropped tokens are zeroed and masked as attention keys,
which gives the same logits and counts as the inference path (``eval()``), where dropped tokens leave the
packed batch of the ragged runtime (``methods/ragged.py``) and each image keeps its own count.

Where we deviate from the official code (no switch: each makes the result depend on the image alone):

- The official batch path compacts the batch to its longest image and keeps zero rows for the others; those
  zero-score rows enter the min-max of the CDF, so an image's sampled set depends on the other images in its
  batch (the least significant token becomes sampleable when padding is present). Here the CDF is taken over
  the image's present tokens only, which is the official result at batch size 1 in every block.
- Masked softmax: the official ``(exp * P + eps/N) / (sum + eps)`` with ``eps = 1e-6`` is replaced by an exact
  mask (dropped keys get no weight); the difference is below 1e-6 per weight.
- The official de-duplication compares the last sorted index with a pad value 1.0; taking the distinct
  indices drops that quirk.
- Tokens keep their original order (the official code reorders them by ascending significance, CLS first);
  attention and the MLP do not depend on the order.

Official checkpoints (``model.checkpoint``, layout registered with ``methods.official``). The official ``ViT``
(``libs/models/transformers/vit.py``) saves timm's DeiT keys (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2``, ``norm``, ``head``;
``ALinear`` is an ``nn.Linear``), which map to ``vit.`` + key, plus one ``blocks.{i}.attn.out_zero_mask``
(``[1, C]``, zeros, ``requires_grad=False``) per ATS block: a constant, not a weight, checked to be zero and not
loaded; its blocks are the file's ATS blocks, refused when they differ from ``locations``. Its trainer
(``libs/utils/checkpoint.py`` ``save_checkpoint``, SlowFast's) writes ``{'epoch', 'model_state',
'optimizer_state', 'cfg'}`` (``cfg`` a YAML dump), the state unwrapped from DDP. ``budget`` stays the inference
knob. Released: no ATS checkpoint. The README evaluates the stock DeiT-S file
``deit_small_patch16_224-cd65a155.pth`` (facebookresearch/deit) with ``configs/ImageNet/DeiT_S.yaml`` (ATS
blocks 3..11, ``NUM_TOKENS`` 197): that is a plain DeiT checkpoint here, ``method=ats model=deit_small
model.pretrained=true`` or ``model.checkpoint=deit_small_patch16_224-cd65a155.pth``. No accuracy is stated in
the repository (the issue tracker quotes 2.9 GFLOPs from the paper and a user's 79.13 % at 3.4 GFLOPs off the
shelf). The mapping was checked against the official code only, not against a released file (none exists).
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Optional, Sequence, Union

import torch
from pydantic import Field
from torch import Tensor, nn

from . import backbone, official, params, ragged, ragged_attention
from .base import MethodOutput, TokenReducer
from .params import MAX_BLOCKS, MAX_TOKENS, AttnGroup, Locations, ParamError
from .registry import register_method

MIN_BUDGET = 8  # the official clamp: a budget below 8 tokens becomes 8; here it is refused instead
FIRST_OFFICIAL_BLOCK = 3  # the official DeiT-S placement starts at block 3 (0-based)

BudgetCount = Annotated[int, Field(ge=MIN_BUDGET, le=MAX_TOKENS)]  # tokens, CLS included (at most this model's)
BudgetFraction = Annotated[float, Field(gt=0, le=1)]  # of the input tokens
BudgetList = Annotated[Sequence[Union[BudgetCount, BudgetFraction]], Field(min_length=1, max_length=MAX_BLOCKS)]
Budget = Optional[Union[BudgetCount, BudgetFraction, BudgetList]]  # null: the official K = N


@torch.no_grad()
def inverse_transform_sample(scores: Tensor, valid: Tensor, samples: int) -> Tensor:
    """ATS's sampling on per-patch significance ``scores`` ``[R, P]`` (``valid`` ``[R, P]`` bool marks the
    present patches): ``samples`` points on ``[c0, 1]``, each picking the present patch with the nearest
    normalised CDF value. Returns ``keep`` ``[R, P]`` bool (the distinct picks). A row whose CDF has no non-zero
    value (one present patch, or all scores zero) keeps every present patch: there is nothing to rank."""
    scores = torch.where(valid, scores.float(), 0.0)
    norm = scores / scores.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    order = torch.where(valid, norm, math.inf).argsort(dim=1, stable=True)  # present ascending, absent last
    present = valid.gather(1, order)
    cdf = norm.gather(1, order).cumsum(dim=1)
    low = cdf[:, :1]
    high = torch.where(present, cdf, -math.inf).amax(dim=1, keepdim=True)
    cbar = (cdf - low) / (high - low).clamp_min(torch.finfo(torch.float32).tiny)
    cbar = torch.where(present, cbar, math.inf)
    c0 = torch.where(present & (cbar > 0), cbar, math.inf).amin(dim=1, keepdim=True)
    degenerate = torch.isinf(c0)[:, 0]
    c0 = torch.where(torch.isinf(c0), 1.0, c0)
    steps = torch.linspace(0.0, 1.0, samples, device=scores.device)
    points = c0 + (1.0 - c0) * steps  # [R, M]
    nearest = (points[:, :, None] - cbar[:, None, :]).abs().argmin(dim=-1)  # first index on ties
    picked = torch.zeros_like(present).scatter_(1, nearest, torch.ones_like(nearest, dtype=torch.bool)) & present
    keep = torch.zeros_like(valid).scatter_(1, order, picked)
    return torch.where(degenerate[:, None], valid, keep)


class ATS(TokenReducer):
    """Adaptive token sampling in the ATS blocks: masked in training, physical per-image removal in eval."""

    def __init__(self, vit: nn.Module, locations: list[int], samples: list[int],
                 attn_group: Optional[int]) -> None:
        """Built by :func:`build_ats`, whose signature holds the defaults and ranges. ``samples``: points drawn
        per location."""
        super().__init__(vit)
        self.locations = locations
        self.samples = dict(zip(locations, samples))
        self.attn_group = attn_group

    def forward(self, images: Tensor) -> MethodOutput:
        return self.forward_masked(images) if self.training else self.forward_ragged(images)

    # ------------------------------------------------------------------------------------ significance
    @staticmethod
    def _significance(cls_attention: Tensor, values: Tensor) -> Tensor:
        """``sum_h A[0, j] * ||v_j||``: ``cls_attention`` ``[..., heads]``, ``values`` ``[..., C]`` -> ``[...]``."""
        return cls_attention.sum(dim=-1) * values.float().norm(dim=-1)

    def forward_masked(self, images: Tensor) -> MethodOutput:
        """The training path: every row stays; dropped tokens are zeroed and masked as keys."""
        x = backbone.embed(self.vit, images)
        batch, num_tokens, dim = x.shape
        present = torch.ones(batch, num_tokens, dtype=torch.bool, device=x.device)
        depth_of = torch.full((batch, num_tokens), self.depth, dtype=torch.long, device=x.device)
        counts = []
        for index, block in enumerate(self.vit.blocks):
            attn = block.attn
            heads = backbone.project_qkv(attn, block.norm1(x))
            mask = present[:, None, None, :]
            out = backbone.softmax_attention(attn, heads, key_mask=mask)
            x = x + block.drop_path1(block.ls1(backbone.project_out(attn, out)))
            seen = present.sum(dim=1)
            if index in self.samples:
                with torch.no_grad():
                    logits = ((heads.q[:, :, :1] * attn.scale) @ heads.k.transpose(-2, -1)).float()
                    cls_row = logits.masked_fill(~mask, -math.inf).softmax(dim=-1)[:, :, 0]  # [B, H, N]
                    values = heads.v.transpose(1, 2).reshape(batch, num_tokens, dim)
                    scores = self._significance(cls_row.transpose(1, 2), values)
                    keep = inverse_transform_sample(scores[:, 1:], present[:, 1:], self.samples[index])
                    new_present = torch.cat([present[:, :1], keep], dim=1)
                depth_of = torch.where(present & ~new_present, index + 1, depth_of)
                present = new_present
                x = x * present[..., None].to(x.dtype)
            counts.append(torch.stack([seen, present.sum(dim=1)], dim=-1))
            x = backbone.mlp_residual(block, x)
            x = x * present[..., None].to(x.dtype)
        return MethodOutput(backbone.head(self.vit, x), torch.stack(counts, dim=1), depth_of[:, 1:])

    def forward_ragged(self, images: Tensor) -> MethodOutput:
        """The inference path: unsampled tokens leave the packed batch (``methods/ragged.py``)."""
        x = backbone.embed(self.vit, images)
        batch, num_tokens, dim = x.shape
        device = x.device
        packed = ragged.Packed.pack(x)
        depth_of = torch.full((batch * num_tokens,), self.depth, dtype=torch.long, device=device)
        backend = self.runtime.backend_for(device)
        group = ragged_attention.group_for(self.attn_group, device)
        counts = []
        for index, block in enumerate(self.vit.blocks):
            layout = packed.layout
            attn = block.attn
            qkv = attn.qkv(block.norm1(packed.x))
            rows = backbone.attn_out_residual(
                block, packed.x, ragged_attention.attention(attn, qkv, packed, backend, group))
            packed = packed.with_rows(rows)
            seen = layout.image_lengths
            if index in self.samples:
                keep = self._sample_packed(attn, qkv, layout, self.samples[index])
                # the dropped rows' depth, written without a boolean index (a host sync on a GPU)
                depth_of.index_copy_(0, layout.source, depth_of.index_select(0, layout.source)
                                     .masked_fill_(~keep, index + 1))
                (packed,) = packed.keep(keep)
            counts.append(torch.stack([seen, packed.layout.image_lengths], dim=-1))
            packed = packed.with_rows(backbone.mlp_residual(block, packed.x))
        x = packed.unpack()  # CLS is every image's first token and is never dropped
        depth_of = depth_of.view(batch, num_tokens)
        return MethodOutput(backbone.head(self.vit, x), torch.stack(counts, dim=1), depth_of[:, 1:])

    @torch.no_grad()
    def _sample_packed(self, attn: nn.Module, qkv: Tensor, layout: ragged.Layout, samples: int) -> Tensor:
        """``keep`` ``[T]`` bool for packed QKV rows: CLS and the sampled patches of each image."""
        total = qkv.shape[0]
        q, k, v = qkv.view(total, 3, attn.num_heads, attn.head_dim).unbind(1)
        q, k = attn.q_norm(q), attn.k_norm(k)
        segment, images = layout.segment, layout.lengths.shape[0]
        logits = ((q.index_select(0, layout.starts).index_select(0, segment) * k).sum(dim=-1) * attn.scale).float()
        # Softmax of each image's CLS row over that image's rows, per head ([T, heads]).
        expanded = segment[:, None].expand_as(logits)
        peak = logits.new_full((images, attn.num_heads), -math.inf).scatter_reduce(
            0, expanded, logits, reduce="amax", include_self=True)
        weights = (logits - peak.index_select(0, segment)).exp()
        sums = logits.new_zeros(images, attn.num_heads).index_add_(0, segment, weights)
        cls_row = weights / sums.index_select(0, segment)
        scores = self._significance(cls_row, v.reshape(total, -1))
        position = layout.source.remainder(layout.tokens)
        grid = scores.new_zeros(images, layout.tokens).index_put_((segment, position), scores)
        valid = torch.zeros(images, layout.tokens, dtype=torch.bool, device=qkv.device).index_put_(
            (segment, position), torch.ones_like(position, dtype=torch.bool))
        keep = inverse_transform_sample(grid[:, 1:], valid[:, 1:], samples)
        keep = torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)
        return keep[segment, position]

    def extra_macs(self, token_counts: Tensor) -> Tensor:
        """``2 * N * C`` per ATS block (CLS attention row and value norms over its N attention tokens)."""
        blocks = torch.tensor([i in self.samples for i in range(self.depth)], device=token_counts.device)
        attn = token_counts[..., 0].double() * blocks
        return (2.0 * attn * self.embed_dim).sum(dim=1)


# ------------------------------------------------------------------------------------------------ factory
def parse_budget(budget: Budget, num_tokens: int, stages: int, key: str = "method.params.budget") -> list[int]:
    """Sample points per ATS location: ``budget`` None -> the input patches (official K = N); else ``K - 1``
    for each budget K (an int token count in [8, N] or a fraction of N in (0, 1]); see the module docstring."""
    valid = (f"null (official: K = N = {num_tokens}), an int token count in [{MIN_BUDGET}, {num_tokens}] or a "
             f"fraction in ({MIN_BUDGET / num_tokens:.4g}, 1] of the {num_tokens} input tokens, one value or a "
             f"list of {stages} (one per location)")
    if budget is None:
        return [num_tokens - 1] * stages
    values = list(budget) if isinstance(budget, Sequence) else [budget]
    if len(values) not in (1, stages):
        raise ParamError(f"{key}={budget!r} has {len(values)} entries for {stages} ATS locations; valid: {valid}")
    points = []
    for value in values:
        count = round(value * num_tokens) if isinstance(value, float) else value
        if not MIN_BUDGET <= count <= num_tokens:
            raise ParamError(f"{key}={value!r} gives K={count} tokens, outside [{MIN_BUDGET}, {num_tokens}] "
                             f"(the official minimum and the token count); valid: {valid}")
        points.append(count - 1)
    return points * stages if len(points) == 1 else points


@register_method("ats", family="pruning", inference_knob="budget", counterpart="evit",
                 tradeoff_values=(0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0), stronger={"budget": 0.5})
def build_ats(vit: nn.Module, budget: Budget = None, locations: Optional[Locations] = None,
              attn_group: AttnGroup = None) -> ATS:
    """ATS: keep the distinct tokens an inverse-CDF sampler draws from CLS attention x value norm (per image).

    ``locations`` None: blocks 3 to the last (the official DeiT-S placement 3..11); a model with 3 blocks or fewer
    needs them set. ``budget``: see the module docstring. ``attn_group``: images per padded attention call on the
    ragged runtime (None: the device default)."""
    depth = len(vit.blocks)
    if locations is None:
        if depth <= FIRST_OFFICIAL_BLOCK:
            raise ParamError(f"method.params.locations=null places ATS at blocks {FIRST_OFFICIAL_BLOCK}.."
                             f"{depth - 1}, which a {depth}-block model lacks; set method.params.locations to "
                             f"block indices in [0, {depth - 1}]")
        locations = list(range(FIRST_OFFICIAL_BLOCK, depth))
    locations = params.check_locations(locations, depth)
    num_tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
    samples = parse_budget(budget, num_tokens, len(locations))
    return ATS(vit, locations, samples, attn_group)


# ------------------------------------------------------------------------------- the official checkpoint layout
_ZERO_MASK = re.compile(r"blocks\.(\d+)\.attn\.out_zero_mask")


def _official_ats_blocks(content) -> list[int]:
    """The ATS blocks of an official file: those whose attention carries ``out_zero_mask``."""
    return sorted(int(found.group(1)) for key in content["model"] if (found := _ZERO_MASK.fullmatch(key)))


def _check_official_blocks(method: ATS, content) -> Optional[str]:
    trained = _official_ats_blocks(content)
    if trained == sorted(method.locations):
        return None
    return (f"its ATS blocks are {trained} (the blocks with attn.out_zero_mask), but method.params.locations="
            f"{sorted(method.locations)}; valid: method.params.locations={trained}")


official.register_layout(official.OfficialLayout(
    method="ats", code="adaptivetokensampling/ATS libs/models/transformers/vit.py",
    detect=lambda content: bool(_official_ats_blocks(content)), to_ours=lambda key: f"vit.{key}",
    to_official=lambda key: key[len("vit."):] if key.startswith("vit.") else f"(none: {key} is ours only)",
    check=_check_official_blocks, fixed=lambda key: 0.0 if _ZERO_MASK.fullmatch(key) else None,
    settings=lambda content: {"locations": _official_ats_blocks(content)}))
