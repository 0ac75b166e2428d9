"""The shared timm DeiT backbone, taken apart into the pieces token-reduction methods need.

This is the only module that knows timm's ``VisionTransformer`` internals: the embedding, the attention
and MLP halves of each ``Block`` (with ``ls1``/``ls2``, ``drop_path1``/``drop_path2``, ``q_norm``/``k_norm``),
the final norm and the head. Methods call these functions instead of copying timm's forwards, so a change
in timm's block order breaks ``tests/test_backbone.py`` here, once, rather than every method silently.

``attention`` is the one attention routine of the suite. Besides the output it can return the head-mean
attention of the CLS query (EViT, top-k) and the head-mean keys (ToMe), and it accepts an additive key bias
(A-ViT's halting mask, ToMe's log-size) or a multiplicative key policy (DynamicViT's masked softmax).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.models.vision_transformer import Block, VisionTransformer

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTN_PARTS = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop", "num_heads", "head_dim")


@dataclass
class AttentionResult:
    """Output of :func:`attention`; the optional fields are filled only when asked for."""

    out: Tensor  # [B, N, C], after the output projection
    cls_attn: Optional[Tensor] = None  # [B, N] head-mean softmax row of the CLS query (CLS column included)
    keys: Optional[Tensor] = None  # [B, N, head_dim] keys averaged over heads (ToMe's similarity metric)


def check_supported(vit: nn.Module) -> None:
    """Raise a clear error unless ``vit`` is a plain timm ViT with CLS token whose blocks we can take apart."""
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"token reduction needs a timm VisionTransformer, got {type(vit).__name__}")
    if vit.cls_token is None or vit.num_prefix_tokens != 1 or vit.global_pool != "token":
        raise ValueError("token reduction needs a ViT with exactly one CLS token and global_pool='token' (DeiT)")
    for index, block in enumerate(vit.blocks):
        missing = [p for p in _BLOCK_PARTS if not hasattr(block, p)]
        missing += [f"attn.{p}" for p in _ATTN_PARTS if not hasattr(block.attn, p)]
        if type(block) is not Block or missing or getattr(block.attn, "gate", None) is not None:
            raise ValueError(f"block {index} ({type(block).__name__}) is not a plain timm Block; missing {missing}")


def embed(vit: VisionTransformer, images: Tensor) -> Tensor:
    """Patch embedding, CLS token and position embedding: ``[B, 3, H, W] -> [B, N, C]``."""
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def head(vit: VisionTransformer, tokens: Tensor) -> Tensor:
    """Final norm and classifier on the CLS token (``tokens[:, 0]``): ``[B, N, C] -> [B, classes]``."""
    return vit.forward_head(vit.norm(tokens[:, :1]))


def attention(
    attn: nn.Module,
    x: Tensor,
    key_bias: Optional[Tensor] = None,
    key_policy: Optional[Tensor] = None,
    return_cls_attn: bool = False,
    return_keys: bool = False,
) -> AttentionResult:
    """Multi-head self-attention of a timm ``Attention`` module over ``x`` ``[B, N, C]``.

    Args:
        key_bias: additive logit bias broadcastable to ``[B, heads, N, N]``, e.g. ``[B, 1, 1, N]``.
        key_policy: ``[B, N]`` keep weights in [0, 1]. Key j is weighted by ``policy[j]`` inside a masked
            softmax computed in fp32, and each query always attends to itself (DynamicViT's training rule).
        return_cls_attn: also return the head-mean attention row of the CLS query.
        return_keys: also return the head-mean keys.
    """
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout = attn.attn_drop.p if attn.training else 0.0

    if key_policy is not None:
        out = _policy_attention(q * attn.scale, k, v, key_policy, key_bias, attn.attn_drop)
    elif attn.fused_attn:
        mask = key_bias.to(q.dtype) if key_bias is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if key_bias is not None:
            logits = logits + key_bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v

    cls_attn = None
    if return_cls_attn:
        # Only the CLS row is needed; recomputing it keeps the fused kernel for the full attention.
        cls_logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
        if key_bias is not None:
            cls_logits = cls_logits + key_bias[..., :1, :]
        cls_attn = cls_logits.float().softmax(dim=-1).mean(dim=1)[:, 0].to(x.dtype)

    out = out.transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim)
    out = attn.proj_drop(attn.proj(attn.norm(out)))
    return AttentionResult(out=out, cls_attn=cls_attn, keys=k.mean(dim=1) if return_keys else None)


def _policy_attention(q: Tensor, k: Tensor, v: Tensor, policy: Tensor, key_bias, attn_drop, eps: float = 1e-6):
    """Softmax whose keys are weighted by ``policy`` (self always kept), in fp32 with a small eps."""
    logits = (q @ k.transpose(-2, -1)).float()
    if key_bias is not None:
        logits = logits + key_bias.float()
    tokens = policy.shape[1]
    eye = torch.eye(tokens, dtype=torch.float32, device=policy.device)
    weight = policy.float()[:, None, None, :]  # [B, 1, 1, N]
    weight = weight + (1.0 - weight) * eye[None, None]  # the diagonal is always 1
    logits = logits - logits.max(dim=-1, keepdim=True).values
    scores = logits.exp() * weight
    probs = (scores + eps / tokens) / (scores.sum(dim=-1, keepdim=True) + eps)
    return attn_drop(probs.to(v.dtype)) @ v


def attn_residual(block: Block, x: Tensor, **attention_kwargs) -> tuple[Tensor, AttentionResult]:
    """The attention half of a timm ``Block``: ``x + drop_path1(ls1(attn(norm1(x))))``."""
    result = attention(block.attn, block.norm1(x), **attention_kwargs)
    return x + block.drop_path1(block.ls1(result.out)), result


def mlp_residual(block: Block, x: Tensor) -> Tensor:
    """The MLP half of a timm ``Block``: ``x + drop_path2(ls2(mlp(norm2(x))))``."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def packed_attn_residual(block: Block, x: Tensor, lengths: Tensor, group: int = 0) -> Tensor:
    """The attention half of a timm ``Block`` on sequences packed one after another in ``x`` ``[T, C]``.

    ``lengths`` (``[S]``, summing to T) are the sequence lengths, e.g. the active tokens of each image. Norm,
    QKV and output projection run on the T real tokens only; softmax attention runs within each sequence.
    Sequences are sorted by length and attended ``group`` at a time, each call padded to its longest member
    with the padding masked as keys: ``group=1`` is one call per sequence (no padding), ``0`` one call for
    all. Equal lengths always take a single unpadded call.
    """
    attn = block.attn
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(block.norm1(x))  # [T, 3 * heads * head_dim]
    sizes = lengths.tolist()
    count, total = len(sizes), x.shape[0]

    def attend(rows: Tensor, batch: int, tokens: int, key_mask: Optional[Tensor]) -> Tensor:
        q, k, v = rows.view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        dropout = attn.attn_drop.p if attn.training else 0.0
        if attn.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout)
        else:
            logits = (q * attn.scale) @ k.transpose(-2, -1)
            if key_mask is not None:
                logits = logits.masked_fill(~key_mask, float("-inf"))
            out = attn.attn_drop(logits.softmax(dim=-1)) @ v
        return out.transpose(1, 2).reshape(batch * tokens, heads * head_dim)

    if min(sizes) == max(sizes):
        out = attend(qkv, count, sizes[0], None)
    else:
        # Row of each sequence's first token in a padded buffer that holds the calls one after another.
        group = count if group <= 0 else group
        order = sorted(range(count), key=sizes.__getitem__)
        base, calls, rows = [0] * count, [], 0
        for first in range(0, count, group):
            members = order[first: first + group]
            longest = sizes[members[-1]]
            for j, seq in enumerate(members):
                base[seq] = rows + j * longest
            calls.append((rows, [sizes[seq] for seq in members], longest))
            rows += len(members) * longest
        sequence = torch.repeat_interleave(torch.arange(count, device=x.device), lengths)
        offset = torch.tensor(base, device=x.device) - (torch.cumsum(lengths, 0) - lengths)
        slot = offset[sequence] + torch.arange(total, device=x.device)
        # Gather (much faster than a scatter on CPU); padding rows repeat row 0, finite and masked as keys.
        source = torch.zeros(rows, dtype=torch.long, device=x.device)
        source[slot] = torch.arange(total, device=x.device)
        padded = qkv.index_select(0, source)
        outs = []
        for start, members, longest in calls:
            mask = None
            if members[0] != longest:
                valid = torch.tensor(members, device=x.device)[:, None]
                mask = (torch.arange(longest, device=x.device) < valid)[:, None, None, :]
            outs.append(attend(padded[start: start + len(members) * longest], len(members), longest, mask))
        out = torch.cat(outs).index_select(0, slot)
    out = attn.proj_drop(attn.proj(attn.norm(out)))
    return x + block.drop_path1(block.ls1(out))


def mlp_ratio(vit: VisionTransformer) -> float:
    """Hidden width of the MLP over the embedding width (4 for DeiT)."""
    return vit.blocks[0].mlp.fc1.out_features / vit.embed_dim
