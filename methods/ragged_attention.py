"""Attention on the packed rows of the ragged-token runtime (``methods/ragged.py``), within each image's own rows,
and the choice of its backend.

- :func:`attn_residual`: the attention half of a timm block on packed rows (norm, QKV and projection on the
  rows only); :func:`attention`: the same from QKV rows a method reads itself (ATS's significance, threshold
  ToMe's size bias);
- :class:`Runtime`, :func:`resolve_backend`, :func:`group_for`: which backend and how many images per padded
  call a run uses (``eval.ragged_backend``; the harness sets ``method.runtime``).

Attention backends (``eval.ragged_backend`` in the run config, chosen by device and availability with
:func:`resolve_backend`):

- ``padded`` (CPU default; any device): images sorted by length are attended ``group`` at a time through
  SDPA, each call padded to its longest member with the padding masked as keys (``group=0``: one call for
  all; off the CPU that call is padded to ``tokens``, which needs no host sync). Equal lengths take one
  unpadded call.
- ``flex``: FlexAttention with a document mask (rows attend rows of their own image), where the installed
  torch has it. Eager FlexAttention materialises the full ``[T, T]`` score matrix (and builds its block mask
  per layout): on the tiny test model it took 4 s where ``padded`` took 0.05 s, so it is here for compiled
  runs and as an independent check of ``padded`` in the tests, never a default.
- ``varlen`` (CUDA default where available): ``torch.nn.attention.varlen.varlen_attn`` on ``cu_seqlens``
  with ``tokens`` as the ``max_seqlen`` bound, so no host sync. It is a flash kernel: fp16/bf16 only, so
  fp32 inputs take ``padded`` with ``group=0`` (also sync-free).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from timm.models.vision_transformer import Block

from . import backbone
from .ragged import Layout, Packed

BACKENDS = ("auto", "padded", "flex", "varlen")
HALF_DTYPES = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------- backend choice
@functools.lru_cache(maxsize=None)  # asked on every forward; the answer never changes in a process
def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _has_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends(device: torch.device | str) -> list[str]:
    """The concrete backends that can run on ``device`` with the installed torch."""
    device_type = torch.device(device).type
    names = ["padded"]
    if _has_flex():
        names.append("flex")
    if device_type == "cuda" and _has_varlen():
        names.append("varlen")
    return names


def resolve_backend(name: str, device: torch.device | str) -> str:
    """``auto`` -> ``varlen`` on CUDA where available, else ``padded``; a named backend that cannot run on
    ``device`` raises ``ValueError`` naming the setting and the backends that can."""
    available = available_backends(device)
    if name == "auto":
        return "varlen" if "varlen" in available else "padded"
    if name not in available:
        why = "unknown backend" if name not in BACKENDS else f"not available on {torch.device(device).type} " \
                                                             f"with torch {torch.__version__}"
        raise ValueError(f"ragged_backend={name!r}: {why}; available here: auto, {', '.join(available)}")
    return name


@dataclass
class Runtime:
    """How ragged methods execute at inference (``eval.ragged_backend`` in the run config). Changes no result
    beyond float rounding between backends; the training (masked) path does not read it."""

    backend: str = "auto"

    def backend_for(self, device: torch.device) -> str:
        return resolve_backend(self.backend, device)


def group_for(group: Optional[int], device: torch.device) -> int:
    """Images per padded attention call: ``group``, or the device's measured default when None."""
    return group if group is not None else AUTO_GROUP.get(device.type, 0)


# Images per padded attention call by device type, measured on CPU (8 per call beat one call per image and
# one padded call for the batch at DeiT-S and on the embedded model); elsewhere one sync-free call.
AUTO_GROUP = {"cpu": 8}
# Device types where the padded backend reads the lengths on the host to plan its calls (free on CPU); elsewhere
# ``group=0`` takes the sync-free call padded to ``tokens``. The sync-counting tests empty it to run that path.
SIZES_ON_HOST = ("cpu",)



# ------------------------------------------------------------------------------------------ attention
def attn_residual(block: Block, packed: Packed, backend: str = "padded", group: int = 0) -> Tensor:
    """The attention half of a timm ``Block`` on packed rows: ``x + drop_path1(ls1(attn(norm1(x))))`` with
    softmax attention within each image's rows. Norm, QKV and output projection run on the T rows only.
    Returns the new rows ``[T, C]``."""
    if packed.x.shape[0] == 0:  # every image has left: nothing to attend
        return packed.x
    qkv = block.attn.qkv(block.norm1(packed.x))  # [T, 3 * heads * head_dim]
    return backbone.attn_out_residual(block, packed.x, attention(block.attn, qkv, packed, backend, group))


def attention(attn, qkv: Tensor, packed: Packed, backend: str = "padded", group: int = 0,
              key_bias: Optional[Tensor] = None) -> Tensor:
    """Softmax attention of a timm ``Attention`` within each image's rows, from QKV rows ``qkv``
    ``[T, 3 * heads * head_dim]`` of ``packed``; merged heads ``[T, heads * head_dim]``. For methods that read
    the QKV rows themselves (ATS's significance) before the output projection.

    ``key_bias`` ``[T]``: added to the logits of every query for each row as a key (ToMe's proportional attention,
    ``log(size)``). The varlen kernel takes no bias, so with one ``varlen`` runs the sync-free padded call."""
    if backend == "varlen" and qkv.dtype in HALF_DTYPES and key_bias is None:
        return _varlen_attention(attn, qkv, packed)
    if backend == "flex":
        return _flex_attention(attn, qkv, packed, key_bias)
    # varlen on fp32 rows (or with a bias): the flash kernel has no fp32, and group 0 needs no host sync either
    return _padded_attention(attn, qkv, packed, 0 if backend == "varlen" else group, key_bias)


def _heads(attn, rows: Tensor, batch: int, tokens: int, dtype: torch.dtype) -> backbone.Heads:
    return backbone.split_heads(attn, rows, batch, tokens, dtype)


@dataclass
class PaddedPlan:
    """How a layout's rows go into padded attention calls: built once per layout and group size."""

    gather: Optional[Tensor]  # [rows of the padded buffer] source row of each slot (None: no padding at all)
    slot: Optional[Tensor]  # [T] slot of each row in the padded buffer
    calls: list  # (first slot, images, longest, key mask or None) per SDPA call


def _padded_plan(layout: Layout, group: int) -> PaddedPlan:
    sizes = layout.sizes
    count, device = len(sizes), layout.lengths.device
    if min(sizes) == max(sizes):
        return PaddedPlan(None, None, [(0, count, sizes[0], None)])
    # Row of each image's first row in a padded buffer that holds the calls one after another.
    group = count if group <= 0 else group
    order = sorted(range(count), key=sizes.__getitem__)
    ordered = torch.tensor([sizes[seq] for seq in order], device=device)
    # one key mask for all calls, [R, 1, 1, longest]; each call takes a view of its rows and width
    masks = (torch.arange(max(sizes), device=device) < ordered[:, None])[:, None, None, :]
    base, calls, rows = [0] * count, [], 0
    for first in range(0, count, group):
        members = order[first: first + group]
        longest = sizes[members[-1]]
        for j, seq in enumerate(members):
            base[seq] = rows + j * longest
        mask = masks[first: first + len(members), ..., :longest] if sizes[members[0]] != longest else None
        calls.append((rows, len(members), longest, mask))
        rows += len(members) * longest
    total = layout.source.shape[0]
    offset = torch.tensor(base, device=device) - layout.starts
    slot = offset[layout.segment] + torch.arange(total, device=device)
    # Gather (much faster than a scatter on CPU); padding slots repeat row 0, finite and masked as keys.
    gather = torch.zeros(rows, dtype=torch.long, device=device)
    gather[slot] = torch.arange(total, device=device)
    return PaddedPlan(gather, slot, calls)


def _padded_attention(attn, qkv: Tensor, packed: Packed, group: int, key_bias: Optional[Tensor] = None) -> Tensor:
    """Per-image attention through padded SDPA calls; ``[T, heads * head_dim]``. A ``key_bias`` ``[T]`` travels
    with the rows; padding keys then get ``-inf`` in the bias instead of a boolean mask."""
    heads, head_dim, dtype = attn.num_heads, attn.head_dim, packed.x.dtype

    def attend(rows: Tensor, batch: int, tokens: int, key_mask: Optional[Tensor],
               bias: Optional[Tensor] = None) -> Tensor:
        split = _heads(attn, rows, batch, tokens, dtype)
        if bias is None:
            out = backbone.softmax_attention(attn, split, key_mask=key_mask)
        else:
            bias = bias.view(batch, 1, 1, tokens)
            if key_mask is not None:
                bias = bias.masked_fill(~key_mask, float("-inf"))
            out = backbone.softmax_attention(attn, split, key_bias=bias)
        return out.transpose(1, 2).reshape(batch * tokens, heads * head_dim)

    layout = packed.layout
    if group <= 0 and qkv.device.type not in SIZES_ON_HOST:
        return _padded_one_call(attend, qkv, layout, key_bias)
    plan = layout.cached(("padded", group), lambda: _padded_plan(layout, group))
    if plan.gather is None:
        (_, count, longest, _), = plan.calls
        return attend(qkv, count, longest, None, key_bias)
    padded = qkv.index_select(0, plan.gather)
    bias = key_bias.index_select(0, plan.gather) if key_bias is not None else None
    outs = [attend(padded[start: start + count * longest], count, longest, mask,
                   None if bias is None else bias[start: start + count * longest])
            for start, count, longest, mask in plan.calls]
    return torch.cat(outs).index_select(0, plan.slot)


def _padded_one_call(attend, qkv: Tensor, layout: Layout, key_bias: Optional[Tensor] = None) -> Tensor:
    """All present images in one call padded to ``tokens``, computed on the device without a host sync."""
    count, tokens = layout.lengths.shape[0], layout.tokens
    slot = layout.cached("one_call_slot", lambda: layout.segment * tokens + layout.source.remainder(tokens))
    mask = layout.cached("one_call_mask", lambda: torch.zeros(count * tokens, dtype=torch.bool,
                                                              device=qkv.device).index_fill_(0, slot, True)
                         .view(count, 1, 1, tokens))
    buffer = qkv.new_zeros(count * tokens, qkv.shape[1]).index_copy_(0, slot, qkv)
    if key_bias is None:
        return attend(buffer, count, tokens, mask).index_select(0, slot)
    bias = key_bias.new_zeros(count * tokens).index_copy_(0, slot, key_bias)
    return attend(buffer, count, tokens, mask, bias).index_select(0, slot)


def _flex_attention(attn, qkv: Tensor, packed: Packed, key_bias: Optional[Tensor] = None) -> Tensor:
    """Document-masked FlexAttention over all rows at once (one sequence of length T)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    total = qkv.shape[0]
    heads = _heads(attn, qkv, 1, total, packed.x.dtype)
    layout = packed.layout
    segment = layout.segment

    def same_image(b, h, q_index, kv_index):
        return segment[q_index] == segment[kv_index]

    block_mask = layout.cached("flex_mask", lambda: create_block_mask(same_image, None, None, total, total,
                                                                      device=str(qkv.device)))
    with warnings.catch_warnings():  # eager FlexAttention warns that it is unfused; documented above
        warnings.simplefilter("ignore", UserWarning)
        score_mod = None if key_bias is None else (lambda score, b, h, q_index, kv_index: score + key_bias[kv_index])
        out = flex_attention(heads.q, heads.k, heads.v, block_mask=block_mask, scale=attn.scale,
                             score_mod=score_mod)
    return out.transpose(1, 2).reshape(total, attn.num_heads * attn.head_dim)


def _varlen_attention(attn, qkv: Tensor, packed: Packed) -> Tensor:
    """``varlen_attn`` over the images' rows; ``tokens`` bounds ``max_seqlen`` (no host sync)."""
    from torch.nn.attention.varlen import varlen_attn

    total = qkv.shape[0]
    q, k, v = qkv.view(total, 3, attn.num_heads, attn.head_dim).unbind(1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    layout = packed.layout
    cu = layout.cu_seqlens()
    out = varlen_attn(q, k, v, cu, cu, layout.tokens, layout.tokens, scale=attn.scale)
    return out.reshape(total, attn.num_heads * attn.head_dim)
