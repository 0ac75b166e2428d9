"""The shared timm DeiT backbone, taken apart into the pieces token-reduction methods need.

This is the only module that knows timm's ``VisionTransformer`` internals: the embedding, the attention
and MLP halves of each ``Block`` (with ``ls1``/``ls2``, ``drop_path1``/``drop_path2``, ``q_norm``/``k_norm``),
the final norm and the head. Methods call these functions instead of copying timm's forwards, so a change
in timm's block order breaks ``tests/test_backbone.py`` here, once, rather than every method silently.

Attention comes in small pieces that a method combines instead of asking one routine for a flag per method:
:func:`project_qkv` (norm'ed heads), a mixing step (:func:`softmax_attention` with an additive key bias or a
boolean key mask, fused or not as the timm module says; :func:`policy_attention`, DynamicViT's masked softmax),
:func:`project_out` (merge heads, output projection) and :func:`cls_attention` (the head-mean CLS row, EViT and
top-k's score). :func:`attn_residual` runs a block's attention half with any mixing step and returns the heads,
so a method reads e.g. the keys (ToMe) or the CLS row from them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.models.vision_transformer import Block, VisionTransformer

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTN_PARTS = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop", "num_heads", "head_dim")


@dataclass
class Heads:
    """Per-head queries, keys and values ``[B, heads, N, head_dim]`` (after ``q_norm``/``k_norm``)."""

    q: Tensor
    k: Tensor
    v: Tensor
    dtype: torch.dtype  # of the tokens they were projected from (results derived from them return to it)


Mix = Callable[[nn.Module, Heads], Tensor]  # (timm Attention, heads) -> per-head outputs [B, heads, N, head_dim]


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


def project_qkv(attn: nn.Module, x: Tensor) -> Heads:
    """The QKV projection of a timm ``Attention`` over ``x`` ``[B, N, C]``, split into heads."""
    return split_heads(attn, attn.qkv(x), *x.shape[:2], x.dtype)


def split_heads(attn: nn.Module, qkv: Tensor, batch: int, tokens: int, dtype: torch.dtype) -> Heads:
    """Heads from QKV rows ``[batch * tokens, 3 * heads * head_dim]`` (or ``[batch, tokens, ...]``)."""
    q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return Heads(attn.q_norm(q), attn.k_norm(k), v, dtype)


def softmax_attention(attn: nn.Module, heads: Heads, key_bias: Optional[Tensor] = None,
                      key_mask: Optional[Tensor] = None) -> Tensor:
    """Softmax attention ``[B, heads, N, head_dim]``, through SDPA when ``attn.fused_attn`` is set.

    Args:
        key_bias: additive logit bias broadcastable to ``[B, heads, N, N]``, e.g. ``[B, 1, 1, N]`` (A-ViT's
            halting mask, ToMe's log-size).
        key_mask: boolean, broadcastable likewise, ``True`` where a key may be attended (padding masks);
            not combined with ``key_bias``.
    """
    q, k, v = heads.q, heads.k, heads.v
    dropout = attn.attn_drop.p if attn.training else 0.0
    if attn.fused_attn:
        mask = key_mask if key_bias is None else key_bias if key_bias.dtype == q.dtype else key_bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if key_bias is not None:
        logits = logits + key_bias
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask, float("-inf"))
    return attn.attn_drop(logits.softmax(dim=-1)) @ v


def policy_attention(attn: nn.Module, heads: Heads, policy: Tensor, key_bias: Optional[Tensor] = None,
                     eps: float = 1e-6) -> Tensor:
    """DynamicViT's masked softmax: key j is weighted by ``policy[:, j]`` (``[B, N]`` in [0, 1]) inside a
    softmax computed in fp32 with a small ``eps``, and each query always attends to itself."""
    logits = ((heads.q * attn.scale) @ heads.k.transpose(-2, -1)).float()
    if key_bias is not None:
        logits = logits + key_bias.float()
    tokens = policy.shape[1]
    eye = torch.eye(tokens, dtype=torch.float32, device=policy.device)
    weight = policy.float()[:, None, None, :]  # [B, 1, 1, N]
    weight = weight + (1.0 - weight) * eye[None, None]  # the diagonal is always 1
    logits = logits - logits.max(dim=-1, keepdim=True).values
    scores = logits.exp() * weight
    probs = (scores + eps / tokens) / (scores.sum(dim=-1, keepdim=True) + eps)
    return attn.attn_drop(probs.to(heads.v.dtype)) @ heads.v


def cls_attention(attn: nn.Module, heads: Heads, key_bias: Optional[Tensor] = None) -> Tensor:
    """The head-mean softmax row of the CLS query ``[B, N]`` (CLS column included), in fp32, returned in the
    tokens' dtype. Recomputed from the heads so that the full attention may still take the fused kernel."""
    cls_logits = (heads.q[:, :, :1] * attn.scale) @ heads.k.transpose(-2, -1)
    if key_bias is not None:
        cls_logits = cls_logits + key_bias[..., :1, :]
    probs = cls_logits if cls_logits.dtype == torch.float32 else cls_logits.float()
    mean = probs.softmax(dim=-1).mean(dim=(1, 2))  # [B, heads, 1, N] -> [B, N]
    return mean if mean.dtype == heads.dtype else mean.to(heads.dtype)


def project_out(attn: nn.Module, out: Tensor) -> Tensor:
    """Merge the heads of ``out`` ``[B, heads, N, head_dim]`` and apply the output projection: ``[B, N, C]``."""
    batch, _, tokens, _ = out.shape
    out = out.transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim)
    return attn.proj_drop(attn.proj(attn.norm(out)))


def attn_residual(block: Block, x: Tensor, mix: Mix = softmax_attention) -> tuple[Tensor, Heads]:
    """The attention half of a timm ``Block``, ``x + drop_path1(ls1(attn(norm1(x))))``, with ``mix`` as its
    attention step (e.g. ``lambda attn, heads: softmax_attention(attn, heads, key_bias=bias)``). Returns the
    new tokens and the heads."""
    heads = project_qkv(block.attn, block.norm1(x))
    out = project_out(block.attn, mix(block.attn, heads))
    return x + block.drop_path1(block.ls1(out)), heads


def mlp_residual(block: Block, x: Tensor) -> Tensor:
    """The MLP half of a timm ``Block``: ``x + drop_path2(ls2(mlp(norm2(x))))``."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def attn_out_residual(block: Block, x: Tensor, out: Tensor) -> Tensor:
    """The rest of a block's attention half from merged per-head outputs ``out`` (``[..., heads * head_dim]``):
    ``x + drop_path1(ls1(proj(norm(out))))``. Used by the packed-row runtime (``methods/ragged.py``)."""
    attn = block.attn
    return x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(attn.norm(out)))))


def mlp_ratio(vit: VisionTransformer) -> float:
    """Hidden width of the MLP over the embedding width (4 for DeiT)."""
    return vit.blocks[0].mlp.fc1.out_features / vit.embed_dim
