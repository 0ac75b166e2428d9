"""Pure tensor functions shared by the methods (no modules, no timm), in the spirit of ToMe's ``merge.py``.

Token tensors are ``[B, N, C]`` with CLS at index 0. Index tensors address patch positions in the current
(already reduced) sequence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def kept_patch_count(num_patches: int, keep_rate: float, mode: str = "floor") -> int:
    """Patch tokens kept out of ``num_patches`` at ``keep_rate``: ``floor`` (DynamicViT) or ``ceil`` (EViT).
    A rate that keeps no patch is an error (``methods.params.check_cumulative_keep`` names the parameter)."""
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate={keep_rate} is outside (0, 1]")
    exact = num_patches * keep_rate
    # Guard against float noise such as 196 * 0.7 = 137.19999999999998 -> 137 is right, but 0.5*... exact ints.
    count = math.floor(exact + 1e-9) if mode == "floor" else math.ceil(exact - 1e-9)
    if count < 1:
        raise ValueError(f"keep_rate={keep_rate:.6g} keeps no patch token: {mode}({num_patches} x {keep_rate:.6g}) = 0")
    return min(num_patches, count)


def as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, without dispatching the no-op ``aten::to`` when ``x`` already has it (per-op overhead)."""
    return x if x.dtype == dtype else x.to(dtype)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, i]]`` for ``x`` ``[B, N, C]`` and ``index`` ``[B, K]`` -> ``[B, K, C]`` (the index
    broadcast over the channels by ``take_along_dim``: the same gather, fewer ops than expanding it here)."""
    return torch.take_along_dim(x, index.unsqueeze(-1), dim=1)


def topk_patches(scores: Tensor, k: int, sort_indices: bool = False) -> tuple[Tensor, Tensor]:
    """Indices of the ``k`` highest-scoring patches and of the rest, from per-patch ``scores`` ``[B, P]``.

    Returns ``(keep, drop)``, patch indices (0-based over patches, CLS excluded). Kept indices come in
    descending score order unless ``sort_indices`` puts them back in positional order.
    """
    order = scores.argsort(dim=1, descending=True)
    keep, drop = order[:, :k], order[:, k:]
    if sort_indices:
        keep = keep.sort(dim=1).values
    return keep, drop


# --- EViT: fusion of the inattentive tokens ----------------------------------------------------------------


def fuse_tokens(tokens: Tensor, weights: Tensor) -> Tensor:
    """EViT's fusion token: ``sum_i weights[b, i] * tokens[b, i]``, ``[B, M, C]``, ``[B, M]`` -> ``[B, 1, C]``.

    The weights are used as given (EViT passes the dropped tokens' CLS attention, not renormalised).
    """
    return torch.einsum("bm,bmc->bc", as_dtype(weights, tokens.dtype), tokens).unsqueeze(1)


# --- ToMe: bipartite soft matching and size-weighted merging ------------------------------------------------


@dataclass
class BipartiteMatch:
    """One merge decision over a sequence split alternately into A (even positions) and B (odd positions).

    Index tensors address positions inside A or B, not the full sequence, and end in a singleton dimension
    (``[B, k, 1]``) so that they broadcast over the channels (``take_along_dim``) with no expand per use.
    Merging turns ``[B, N, C]`` into ``[B, N - r, C]``: the unmerged A tokens in ascending position order (so
    CLS stays first), then all of B.
    """

    unmerged: Tensor  # [B, len(A) - r, 1] A positions kept as they are, ascending
    src: Tensor  # [B, r, 1] A positions merged away
    dst: Tensor  # [B, r, 1] B positions they merge into

    @property
    def r(self) -> int:
        return self.src.shape[1]


def clamp_merge_count(r: int, num_tokens: int, protected: int = 1) -> int:
    """ToMe's clamp: at most half of the unprotected tokens can be merged in one step."""
    return max(0, min(int(r), (num_tokens - protected) // 2))


@torch.no_grad()
def bipartite_soft_matching(metric: Tensor, r: int, protect_cls: bool = True) -> BipartiteMatch:
    """ToMe's bipartite soft matching on ``metric`` ``[B, N, D]`` (head-mean keys), without gradients.

    A = even positions, B = odd positions. Each A token picks its most cosine-similar B token; the ``r`` A
    tokens with the best such edges merge into their partners. With ``protect_cls`` the token at position 0
    (in A) never merges. ``r`` must already be clamped (:func:`clamp_merge_count`).
    """
    metric = as_dtype(metric, torch.float32)
    # F.normalize's arithmetic (x / max(||x||, eps)) without its expand_as: the division broadcasts alike
    metric = metric / torch.linalg.vector_norm(metric, dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(1, 2)  # [B, |A|, |B|] cosine similarities
    if protect_cls:
        scores[:, 0].fill_(-math.inf)
    best, partner = scores.max(dim=-1, keepdim=True)  # each A token's best B token, [B, |A|, 1]
    order = best.argsort(dim=1, descending=True)
    src = order[:, :r]
    return BipartiteMatch(unmerged=order[:, r:].sort(dim=1).values, src=src, dst=partner.gather(1, src))


def merge_tokens(x: Tensor, match: BipartiteMatch, reduce: str = "sum") -> Tensor:
    """Apply ``match`` to ``x`` ``[B, N, C]``: A sources are reduced (``sum``/``mean``/``amax``...) into B."""
    a, b = x[:, ::2], x[:, 1::2]
    src = torch.take_along_dim(a, match.src, dim=1)
    b = b.scatter_reduce(1, match.dst.expand_as(src), src, reduce=reduce)
    return torch.cat([torch.take_along_dim(a, match.unmerged, dim=1), b], dim=1)


def merge_wavg(x: Tensor, size: Tensor, match: BipartiteMatch) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge: returns the merged tokens and their sizes (``[B, N, 1]``, which add up).

    ``sum(size * x)`` and ``sum(size)`` over the sequence are unchanged by a merge, so the size-weighted
    mean of all tokens is too. The sizes ride along as one more channel of the weighted tokens, so one merge
    moves both (the sums per channel are the ones two separate merges give); the sizes returned are that
    channel, a view.
    """
    size = as_dtype(size, torch.float32)
    channels = x.shape[-1]
    merged = merge_tokens(torch.cat([as_dtype(x, torch.float32) * size, size], dim=-1), match, reduce="sum")
    new_size = merged[..., channels:]
    return as_dtype(merged[..., :channels] / new_size, x.dtype), new_size


def merge_index(index: Tensor, match: BipartiteMatch) -> tuple[Tensor, Tensor]:
    """Follow ``match`` for a per-token label ``index`` ``[B, N, 1]`` (e.g. original patch ids; the layout of
    the match's indices).

    Returns ``(surviving, removed)``: the labels of the merged sequence (a merged B token keeps its own) and
    the labels of the A tokens merged away, ``[B, N - r, 1]`` and ``[B, r, 1]``.
    """
    a, b = index[:, ::2], index[:, 1::2]
    return torch.cat([a.gather(1, match.unmerged), b], dim=1), a.gather(1, match.src)


def track_patches(batch: int, num_tokens: int, depth: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Start tracking which original patch each token is, for ``patch_depth``.

    Returns ``ids`` ``[B, N]``, the original patch id of every token (CLS, and any token standing for no single
    patch, carries ``N - 1``: a slot cut off at the end), and ``depths`` ``[B, N]`` (the patches plus that slot)
    filled with ``depth``, to be lowered where a patch leaves.
    """
    ids = (torch.arange(num_tokens, device=device) - 1).remainder(num_tokens).expand(batch, -1)
    depths = torch.full((batch, num_tokens), depth, dtype=torch.long, device=device)
    return ids, depths
