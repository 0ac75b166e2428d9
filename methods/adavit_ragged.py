"""A-ViT's inference pass on the ragged-token runtime (``methods/ragged.py``): halted tokens leave the batch.

Inference (``eval()``) removes halted tokens physically, which no released A-ViT code does, on the shared
ragged-token runtime (``methods/ragged.py``). The active tokens of the whole batch are packed into one
``[T, C]`` tensor, so norms, QKV, projection and MLP run on active tokens only; attention runs per image over
its own tokens through the run's backend (``eval.ragged_backend``: on CPU, images sorted by token count are
taken ``attn_group`` at a time, each call padded to its longest image with the padding masked as keys; 8 per
call by default). Once an image's CLS token halts its logits are final, so the image stops there: all of its
tokens leave the batch. Per block, beyond the block itself, the pass does the halting score, one fused update
of the per-row ACT state, the CLS mix of the running images and, only when rows leave, one compaction; the
executed counts come from the halting depths at the end instead of per-block bookkeeping. Logits and halting
depths equal the masked path's (``forward_masked``) on the same weights, bit for bit equal those of the
removal path before the runtime (``tests/test_ragged.py``), and an image's result does not depend on the
other images in its batch.

:func:`removal_pass` is the pass itself, with the halting score passed in; ``AdaViT.forward_removal``
(``methods/adavit.py``) wraps its result into the method's output. The halting rule it applies is
:func:`methods.halting.halting_step`'s, reduced to the rows that stay (they never halted).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from . import backbone, ragged, ragged_attention


def removal_pass(vit: nn.Module, images: Tensor, score: Callable[[Tensor, int], Tensor], eps: float,
                 runtime: ragged_attention.Runtime, attn_group: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``vit`` on ``images`` with A-ViT halting by physical removal; ``score(x, block)`` is the halting score
    of the packed rows ``x`` after block ``block``. Returns ``(logits, depth_of, cls_out)``: the logits from the
    CLS mix, the 1-based block at which each token (CLS first) stopped ``[B, N]`` (an image's tokens stop with
    its CLS), and the CLS mix before the final norm ``[B, C]`` (fp32)."""
    depth = len(vit.blocks)
    x = backbone.embed(vit, images)
    batch, tokens, dim = x.shape
    device = x.device
    packed = ragged.Packed.pack(x)
    # Per-row ACT state (c, remainder), one tensor so that a compaction gathers it in one op.
    state = torch.stack([x.new_zeros(batch * tokens, dtype=torch.float32),
                         x.new_ones(batch * tokens, dtype=torch.float32)], dim=1)
    step = torch.tensor([1.0, -1.0], device=device)  # c += h, remainder -= h, in one op
    threshold = 1.0 - eps
    cls_out = x.new_zeros(batch, dim, dtype=torch.float32)
    depth_of = torch.zeros(batch * tokens, dtype=torch.long, device=device)
    backend = runtime.backend_for(device)
    group = ragged_attention.group_for(attn_group, device)
    for index, block in enumerate(vit.blocks):
        x = ragged_attention.attn_residual(block, packed, backend, group)
        x = backbone.mlp_residual(block, x)
        last = index == depth - 1
        h = score(x, index)
        layout = packed.layout  # the images present are those whose CLS runs; it is their first row
        cls_rows = layout.starts
        cls_state, cls_h = state.index_select(0, cls_rows), h.index_select(0, cls_rows)
        if last:  # forced halting: every CLS spends its remainder
            stop, weight = None, cls_state[:, 1]
        else:
            stop = cls_state[:, 0] + cls_h > threshold
            weight = torch.where(stop, cls_state[:, 1], cls_h)
        cls_x = x.index_select(0, cls_rows)
        cls_out.index_add_(0, layout.images, weight[:, None] * (cls_x if cls_x.dtype == torch.float32
                                                                else cls_x.float()))
        if last:
            depth_of.index_fill_(0, layout.source, index + 1)
            break
        # Rows that stay never halted, so for them halting_step's where() reduces to this update.
        state.addcmul_(h[:, None], step)
        leave = state[:, 0] > threshold
        leave |= stop.index_select(0, layout.segment)  # an image stops with its CLS
        packed = packed.with_rows(x)
        # The compaction's one host sync tells whether any row leaves; only then the layout (and its
        # cached indices) changes.
        kept, kept_state = packed.keep(~leave, state)
        if kept is not packed:
            depth_of.index_fill_(0, layout.source, index + 1)  # the last block a leaving row ran
            packed, state = kept, kept_state
            if packed.x.shape[0] == 0:
                break
    logits = backbone.head(vit, cls_out[:, None].to(x.dtype))
    return logits, depth_of.view(batch, tokens), cls_out
