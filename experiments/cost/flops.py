"""FLOP counting: analytic MACs from per-image token counts, and fvcore with a fused-attention op handle.

Convention (``records.FLOP_CONVENTION``, the field's): 1 multiply-add = 1 FLOP, i.e. "GFLOPs" are GMACs.
LayerNorm, softmax, GELU, gather and top-k are not counted.

Two counters, cross-checked in ``tests/test_flops.py``:

- **Analytic** (:func:`per_image_macs`, what records report): from a method's ``token_counts`` ``[B, depth, 2]``
  (tokens each block's attention and MLP ran on), per image: ``4·Na·C² + 2·Na²·C + 2·r·Nm·C²`` per block (r the
  MLP ratio, 4 for DeiT), plus the patch embedding (``P·in_ch·k²·C``), the head (``C·classes``) and the
  method's own modules (``TokenReducer.extra_macs``). Averaging happens over per-image costs, never over
  counts (attention is quadratic).
- **fvcore** (:func:`fvcore_macs`): jit-traces one input and sums fvcore's per-op handles, plus
  :func:`sdpa_flop_jit` for ``aten::scaled_dot_product_attention``, which fvcore otherwise drops silently
  (timm's default fused attention). With the handle the count does not depend on ``fused_attn``. Dense
  DeiT-T/S/B at 224 px give 1.258 / 4.608 / 17.583 G. :func:`cdist_flop_jit` counts ``torch.cdist`` (the
  clustering methods' distances, ``B·P·Q·C``), which fvcore has no handle for either. Tracing freezes data-dependent control flow, so a
  method with per-image token counts must be traced one image at a time (:func:`fvcore_per_image`).

Where the two differ, by design (documented, tested within 1%):

- fvcore counts LayerNorm (5 per element with affine); the analytic convention does not. That is the whole gap
  on dense models (+0.2% for DeiT-S: 4.608 vs 4.599 G). ``count_layernorm=False`` removes it, and then the
  two agree exactly on dense models.
- fvcore counts every matmul/linear a method runs: e.g. the CLS-attention row EViT/top-k recompute for
  scoring (``N·C`` per pruning block), DynamicViT's 2-way output layer (``C/4·2`` per token), the similarity
  matmul of ToMe's matching, an ``einsum`` in EViT's fusion, unless the method's ``extra_macs`` counts them
  the same way. Elementwise work (masking, weighted sums, scatter/gather, top-k, sort) is 0 in both.
- fvcore counts what was computed, not what mattered: a masked (not removed) token costs in full. Counting
  an eval-mode forward (physical removal) is what makes the two agree.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from math import prod
from typing import Any, Optional

import torch
from torch import Tensor, nn

from methods import TokenReducer
from methods.backbone import mlp_ratio

from experiments import records

SDPA_OP = "aten::scaled_dot_product_attention"
CDIST_OP = "aten::cdist"


# ------------------------------------------------------------------------------------------------ analytic
def block_macs(attn_tokens: Tensor, mlp_tokens: Tensor, dim: int, ratio: float) -> Tensor:
    """MACs of blocks running attention on ``attn_tokens`` and the MLP on ``mlp_tokens`` (elementwise)."""
    na, nm = attn_tokens.double(), mlp_tokens.double()
    return 4 * na * dim**2 + 2 * na**2 * dim + 2 * ratio * nm * dim**2


def per_image_macs(method: TokenReducer, token_counts: Tensor) -> Tensor:
    """Per-image MACs ``[B]`` (float64, CPU): blocks from the counts, patch embedding, head, own modules."""
    token_counts = token_counts.cpu()
    blocks = block_macs(token_counts[..., 0], token_counts[..., 1], method.embed_dim, mlp_ratio(method.vit))
    return blocks.sum(dim=1) + _embed_head_macs(method) + method.extra_macs(token_counts).double().cpu()


def dense_macs(method: TokenReducer) -> float:
    """MACs of one image through the same backbone without reduction (and without the method's modules)."""
    counts = method.full_counts(1, torch.device("cpu"))
    blocks = block_macs(counts[..., 0], counts[..., 1], method.embed_dim, mlp_ratio(method.vit))
    return blocks.sum().item() + _embed_head_macs(method)


def _embed_head_macs(method: TokenReducer) -> float:
    """Patch embedding (a ``k x k`` conv over the patches) and the linear head."""
    vit, dim = method.vit, method.embed_dim
    proj = vit.patch_embed.proj
    # the kernel's volume: p*p for an image patch, t*p*p for a video tubelet (Conv3d)
    embed = method.num_patches * proj.in_channels * prod(proj.kernel_size) * dim
    head = vit.head.in_features * vit.head.out_features if isinstance(vit.head, nn.Linear) else 0
    return float(embed + head)


def flops_summary(method: TokenReducer, token_counts: Tensor,
                  alt_counts: Optional[dict[str, Tensor]] = None) -> dict[str, Any]:
    """The record's ``flops`` entry: mean/std/min/max of per-image GFLOPs, the dense reference and the ratio.

    ``alt_counts`` (what the method's ``alt_token_counts`` hook gave, e.g. A-ViT's ``official`` masked
    convention; ``EvalResult.alt_token_counts``) add
    ``gflops_<name>`` means, and ``flops_ratio_<name>``."""
    macs = per_image_macs(method, token_counts)
    dense = dense_macs(method)
    mean = macs.mean().item()
    summary: dict[str, Any] = {
        "gflops": mean / 1e9,
        "gflops_std": macs.std(unbiased=False).item() / 1e9,
        "gflops_min": macs.min().item() / 1e9,
        "gflops_max": macs.max().item() / 1e9,
        "dense_gflops": dense / 1e9,
        "flops_ratio": mean / dense,
        "images": int(macs.numel()),
        "extra_gflops": method.extra_macs(token_counts.cpu()).double().mean().item() / 1e9,
        "method": "analytic per-image token counts",
        "convention": records.FLOP_CONVENTION,
    }
    for name, counts in (alt_counts or {}).items():
        alt = per_image_macs(method, counts).mean().item()
        summary[f"gflops_{name}"] = alt / 1e9
        summary[f"flops_ratio_{name}"] = alt / dense
    return summary


# -------------------------------------------------------------------------------------------------- fvcore
def sdpa_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: ``B·H·Nq·Nk·(dq + dv)`` MACs.

    ``Q Kᵀ`` costs ``Nq·Nk·dq`` and ``attn V`` costs ``Nq·Nk·dv`` per batch-head; the mask, scale and softmax
    are not counted (the convention), exactly what the unfused matmuls give."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    out = get_shape(outputs[0])
    return prod(out[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def cdist_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle for ``aten::cdist``: ``B·P·Q·C`` MACs for ``[B, P, C]`` against ``[B, Q, C]`` (one
    multiply-add per coordinate difference, as a Gram matrix ``x yᵀ`` would cost)."""
    from fvcore.nn.jit_handles import get_shape

    x, y = get_shape(inputs[0]), get_shape(inputs[1])
    return prod(x[:-1]) * y[-2] * x[-1]


def _zero_flop_jit(inputs: list, outputs: list) -> int:
    return 0


class _Logits(nn.Module):
    """Traceable view of a model: returns the logits tensor (``MethodOutput`` is not a traceable output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        out = self.model(images)
        return out.logits if hasattr(out, "logits") else out


@dataclass
class FvcoreCount:
    """fvcore's count of one traced input: total MACs and the split by operator and by top-level module."""

    total: int
    by_operator: dict[str, int]
    by_module: dict[str, int]


def fvcore_macs(model: nn.Module, images: Tensor, count_layernorm: bool = True) -> FvcoreCount:
    """fvcore MACs of ``model(images)`` (a timm model or a method) with the SDPA handle, in eval mode.

    ``count_layernorm=False`` drops fvcore's LayerNorm count (5 per element), which the analytic convention
    does not count. Tracing runs under ``no_grad``; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings and torch.jit deprecation notices (also on import)
            from fvcore.nn import FlopCountAnalysis

            analysis = FlopCountAnalysis(_Logits(model), (images,))
            analysis.set_op_handle(SDPA_OP, sdpa_flop_jit)
            analysis.set_op_handle(CDIST_OP, cdist_flop_jit)
            if not count_layernorm:  # (a None handle would only mark the op "ignored", still counting it)
                analysis.set_op_handle("aten::layer_norm", _zero_flop_jit)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            total = int(analysis.total())
            by_operator = {k: int(v) for k, v in analysis.by_operator().items()}
            by_module = {k.removeprefix("model."): int(v) for k, v in analysis.by_module().items()
                         if k.startswith("model.") and k.count(".") <= 2}
    finally:
        model.train(was_training)
    return FvcoreCount(total, by_operator, by_module)


def fvcore_per_image(model: nn.Module, images: Tensor, count_layernorm: bool = True) -> list[FvcoreCount]:
    """One fvcore trace per image (``images[i:i+1]``): a trace freezes the path its input took."""
    return [fvcore_macs(model, images[i: i + 1], count_layernorm) for i in range(images.shape[0])]


def fvcore_crosscheck(method: TokenReducer, images: Tensor) -> dict[str, Any]:
    """Analytic vs fvcore (LayerNorm excluded) on ``images``, one trace per image; for a record's ``flops``.

    The analytic side uses the counts of each image's own single-image forward, so it is comparable to the
    trace whatever the method's batching does."""
    fv, analytic = [], []
    was_training = method.training
    method.eval()
    try:
        with torch.inference_mode():
            counts = [method(images[i: i + 1]).token_counts.cpu() for i in range(images.shape[0])]
    finally:
        method.train(was_training)
    for i, count in enumerate(fvcore_per_image(method, images, count_layernorm=False)):
        fv.append(count.total)
        analytic.append(per_image_macs(method, counts[i]).item())
    fv_mean, an_mean = sum(fv) / len(fv), sum(analytic) / len(analytic)
    return {"images": len(fv), "fvcore_gflops": fv_mean / 1e9, "analytic_gflops": an_mean / 1e9,
            "rel_diff": fv_mean / an_mean - 1.0, "layernorm": "excluded"}

