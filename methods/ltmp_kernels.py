"""LTMP's per-block tensor kernels (``methods/ltmp.py`` owns the method): the bipartite partner search, the
size-weighted merge, and the inference path's padded per-image attention.

- :func:`best_partners`: each A token's most cosine-similar B token on the head-mean keys, over an explicit
  ``[B, L, L]`` edge mask (the training path, slots in the inference order);
- :func:`bipartite_partners`: the same search on the padded per-image layout of the ragged runtime, where the
  column is the token's rank, so only the ``|A| x |B|`` similarities are computed;
- :func:`merge`: the size-weighted merge with the detached hard mask (both paths);
- :class:`PadPlan` and :func:`padded_attention`: where each packed row sits in a ``[R, L]`` buffer, and the
  explicit softmax attention over it (``+ log size`` on the keys) that also returns each token's importance.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backbone, ragged, ragged_attention


def best_partners(keys: Tensor, pairs: Tensor) -> tuple[Tensor, Tensor]:
    """Each A token's most cosine-similar B token (``pairs`` ``[B, L, L]`` marks the allowed A -> B edges) on the
    head-mean keys ``[B, L, d]``: ``(node_max, partner)`` ``[B, L]``, ``-inf`` where a row has no edge."""
    metric = F.normalize(keys.float(), dim=-1)
    scores = (metric @ metric.transpose(1, 2)).masked_fill(~pairs, -math.inf)
    return scores.max(dim=-1)


def bipartite_partners(keys: Tensor, plan: PadPlan) -> tuple[Tensor, Tensor]:
    """:func:`best_partners` on the padded layout, where the column is the rank: A = even columns, B = odd, so
    only the ``|A| x |B|`` similarities are computed. Returns ``[R, L]`` (odd columns: ``-inf``)."""
    rows, width = plan.valid.shape
    pairs = (plan.even & ~plan.first)[:, ::2, None] & plan.odd[:, None, 1::2]
    metric = F.normalize(keys.float(), dim=-1)
    scores = (metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)).masked_fill(~pairs, -math.inf)
    best, partner = scores.max(dim=-1) if scores.shape[-1] else (
        scores.new_full(scores.shape[:2], -math.inf), torch.zeros(scores.shape[:2], dtype=torch.long,
                                                                  device=scores.device))
    node_max = best.new_full((rows, width), -math.inf)
    node_max[:, ::2] = best
    column = torch.arange(width, device=best.device).expand(rows, -1).clone()  # no edge: the row itself
    column[:, ::2] = torch.where(torch.isinf(best), column[:, ::2], 2 * partner + 1)
    return node_max, column


def merge(x: Tensor, size: Tensor, merged: Tensor, partner: Tensor) -> tuple[Tensor, Tensor]:
    """Size-weighted merge of the ``merged`` rows into their ``partner`` rows (``[B, L]`` indices along dim 1),
    with the detached hard mask (as the official code); the merged rows keep stale values (they leave)."""
    weight = merged.to(torch.float32)[..., None]
    total = x.float() * size
    total = total.scatter_add(1, partner[..., None].expand_as(total), total * weight)
    size = size.scatter_add(1, partner[..., None], size * weight)
    return (total / size).to(x.dtype), size


class PadPlan:
    """Where each packed row sits in a ``[R, L]`` buffer (``L``: the longest image on the CPU, where the lengths
    are free to read, else the token count: no host sync), built once per layout."""

    def __init__(self, layout: ragged.Layout) -> None:
        device = layout.lengths.device
        count = layout.lengths.shape[0]
        self.width = max(layout.sizes) if device.type in ragged_attention.SIZES_ON_HOST else layout.tokens
        self.rank = torch.arange(layout.source.shape[0], device=device) - layout.starts.index_select(0, layout.segment)
        self.slot = layout.segment * self.width + self.rank
        grid = torch.arange(self.width, device=device).expand(count, -1)
        self.valid = grid < layout.lengths[:, None]
        self.even, self.odd = self.valid & (grid % 2 == 0), self.valid & (grid % 2 == 1)
        self.first = grid == 0
        self.count = count


def padded_attention(attn: nn.Module, qkv: Tensor, size: Tensor, plan: PadPlan) -> tuple[Tensor, Tensor, Tensor]:
    """Explicit softmax attention within each image (``+ log size`` on the keys, padded keys masked): the merged
    heads ``[T, C]``, each row's importance ``[T]`` (attention received, mean over heads and the image's query
    rows) and the head-mean keys in the padded layout ``[R, L, d]``."""
    rows, width, heads, head_dim = plan.count, plan.width, attn.num_heads, attn.head_dim
    buffer = qkv.new_zeros(rows * width, qkv.shape[1]).index_copy_(0, plan.slot, qkv)
    bias = size.new_full((rows * width,), -math.inf).index_copy_(0, plan.slot, size[:, 0].log()).view(rows, width)
    parts = backbone.split_heads(attn, buffer, rows, width, qkv.dtype)
    logits = ((parts.q * attn.scale) @ parts.k.transpose(-2, -1)).float() + bias[:, None, None, :]
    probs = logits.softmax(dim=-1)
    out = probs.to(parts.v.dtype) @ parts.v  # [R, H, L, d]
    out = out.transpose(1, 2).reshape(rows * width, heads * head_dim).index_select(0, plan.slot)
    received = (probs * plan.valid[:, None, :, None]).sum(dim=(1, 2))  # padded query rows excluded
    lengths = plan.valid.sum(dim=1, keepdim=True)
    importance = (received / (heads * lengths)).flatten().index_select(0, plan.slot)
    return out, importance, parts.k.mean(dim=1)
