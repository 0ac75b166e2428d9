"""``tome``: Token Merging. No new parameters, no extra loss, works on a dense checkpoint without training.

Paper: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (https://arxiv.org/abs/2210.09461).
Official code: https://github.com/facebookresearch/ToMe (``tome/merge.py``, ``tome/patch/timm.py``).

In every block, between attention and the MLP, ``r`` tokens are merged away by bipartite soft matching on the
block's attention keys averaged over heads (:func:`methods.tokens.bipartite_soft_matching`: A = even
positions, B = odd, cosine similarity, CLS protected, each A token picks its best B token, the ``r`` best
edges merge). Matching runs without gradients. Merged tokens are size-weighted averages and their sizes add
up; with ``prop_attn`` (default) the following blocks add ``log(size)`` to the attention logits (proportional
attention, needed for supervised DeiT). ``r`` is clamped in each block to half of the non-CLS tokens, so large
``r`` stops merging when two tokens are left. DeiT-S at 224 px, ``r=8``: blocks' attention runs on
197, 189, 181, ..., 109 tokens and the MLP of each on 8 fewer.

``patch_depth``: a merged B token keeps its own identity and goes on counting; a token merged away in block l
has depth ``l + 1``. ``extra_macs`` counts the matching, ``|A| * |B| * C`` per merging block (about
``(N/2)^2 * C``, the suite's convention; the official similarity uses the head-mean keys, ``C / heads`` wide).

Threshold merging (DToMe, from DyMU): ``threshold`` replaces ``r`` by a per-block cosine-similarity threshold
in [0, 1] (one for every block, a per-block list, or ``calibrated``: calibrated for a target ``r`` by
``experiments/calibrate.py`` and read from the weights), so counts vary per image; see
``methods/tome_threshold.py``. ``r`` and ``threshold`` are exclusive (``r`` left at its default). The inference
knob stays ``r``: a threshold curve is one calibrated checkpoint per target ``r`` (or a sweep of fixed
thresholds, ``+sweep=tome_threshold``), since the thresholds are weights, not a knob.

Where we deviate from the official code:

- ``r`` is an int or a per-block list; a list shorter than the depth is padded with zeros (as ToMe's
  ``parse_r``), a longer one is an error. ToMe's ``(r, inflection)`` schedules are not supported: pass the
  per-block list instead.
- The official timm patch copies timm 0.4.12's block forward and so skips LayerScale and qk-norm on current timm;
  we run the real block halves (``methods.backbone``). Identical for DeiT.
- Sizes are kept in fp32 and the merge is computed in fp32 (the official code uses the input dtype).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Iterable, Literal, Optional, Sequence, Union

import torch
from pydantic import Field
from torch import Tensor, nn

from . import backbone, tokens
from .base import MethodOutput, TokenReducer
from .params import MAX_BLOCKS, MAX_TOKENS, ParamError
from .registry import register_method
from .tome_threshold import NEVER, ThresholdToMe, calibrate, short_schedule

Merged = Annotated[int, Field(ge=0, le=MAX_TOKENS)]  # tokens merged in a block (ToMe clamps to half of them)
R = Union[Merged, Annotated[Sequence[Merged], Field(max_length=MAX_BLOCKS)]]  # one for all blocks, or per block
DEFAULT_R = 13  # the ToMe paper's DeiT-S setting
Threshold = Annotated[float, Field(ge=0, le=1)]  # cosine similarity; DyMU's calibration gives [0, 1]
# threshold ToMe (methods/tome_threshold.py): one threshold for every block, a per-block list, or "calibrated"
Thresholds = Optional[Union[Literal["calibrated"], Threshold,
                            Annotated[Sequence[Threshold], Field(min_length=1, max_length=MAX_BLOCKS)]]]


@dataclass
class ToMeState:
    """What a ToMe pass leaves besides the shared outputs."""

    size: Tensor  # [B, K] fp32: original tokens (CLS counts 1) each final token stands for; sums to N per image


class ToMe(TokenReducer):
    """Token merging in every block; see the module docstring."""

    def __init__(self, vit: nn.Module, r: Union[int, Sequence[int]], prop_attn: bool) -> None:
        """Defaults and ranges live in :func:`build_tome`.

        Args:
            r: tokens merged per block, an int for every block or a per-block list (at most ``depth`` long).
                A plain knob: assigning ``method.r = 8`` re-parses it, e.g. for an inference-time sweep.
            prop_attn: add ``log(size)`` of each key to the attention logits (proportional attention).
        """
        super().__init__(vit)
        self.schedule = parse_r(r, self.depth)
        self.prop_attn = bool(prop_attn)

    @property
    def r(self) -> list[int]:
        return list(self.schedule)

    @r.setter
    def r(self, value: Union[int, Sequence[int]]) -> None:
        self.schedule = parse_r(value, self.depth)

    def forward(self, images: Tensor) -> MethodOutput:
        x = backbone.embed(self.vit, images)
        batch, num_tokens, _ = x.shape
        patches = num_tokens - 1
        ids, depth = tokens.track_patches(batch, num_tokens, self.depth, x.device)  # CLS/fused carry `patches`
        ids, depth_at = ids.unsqueeze(-1), depth.unsqueeze(-1)  # [B, N, 1], the layout of the match's indices
        size = None  # [B, N, 1] fp32 patches per token, created at the first merge
        counts = []
        for index, block in enumerate(self.vit.blocks):
            attn_tokens = x.shape[1]
            r = tokens.clamp_merge_count(self.schedule[index], attn_tokens)
            bias = size.log().reshape(batch, 1, 1, -1) if self.prop_attn and size is not None else None
            x, heads = backbone.attn_residual(block, x, partial(backbone.softmax_attention, key_bias=bias))
            if r > 0:
                match = tokens.bipartite_soft_matching(heads.k.mean(dim=1), r)  # head-mean keys
                if size is None:
                    size = x.new_ones(batch, attn_tokens, 1, dtype=torch.float32)
                x, size = tokens.merge_wavg(x, size, match)
                ids, merged = tokens.merge_index(ids, match)
                depth_at.scatter_(1, merged, index + 1)  # writes through to `depth`
            counts.append((attn_tokens, x.shape[1]))
            x = backbone.mlp_residual(block, x)
        if size is None:
            size = x.new_ones(batch, x.shape[1], 1, dtype=torch.float32)
        token_counts = torch.tensor(counts, dtype=torch.long, device=x.device).expand(batch, -1, -1).clone()
        return MethodOutput(backbone.head(self.vit, x), token_counts, depth[:, :patches],
                            final_tokens=self.vit.norm(x), state=ToMeState(size=size[..., 0]))

    def calibration_error(self) -> Optional[str]:
        if not any(self.schedule):
            return (f"method.params.r={self.schedule} merges nothing, so there is no threshold to calibrate; "
                    "valid: r >= 1 in some block (the calibration's target merges per block)")
        return None

    def calibrate(self, batches: Iterable[Tensor]) -> tuple[TokenReducer, dict[str, Any]]:
        """DToMe's thresholds for this ToMe's ``r`` per block (``methods/tome_threshold.py``): the threshold
        ToMe sharing this backbone, its thresholds and calibration facts in its buffers (its state dict)."""
        error = self.calibration_error()
        if error:
            raise ParamError(error)
        method = ThresholdToMe(self.vit, None, self.prop_attn)
        method.runtime = self.runtime
        thresholds, images = calibrate(method, self.schedule, batches)
        with torch.no_grad():
            method.thresholds.copy_(torch.tensor(thresholds))
            method.calibration_r.copy_(torch.tensor(self.schedule))
            method.calibration_images.fill_(images)
        method._refresh()
        return method, {"threshold": "calibrated", "r": short_schedule(self.schedule),
                        "prop_attn": self.prop_attn}

    def extra_macs(self, token_counts: Tensor) -> Tensor:
        """Per image, ``ceil(N/2) * floor(N/2) * C`` for each block that merged (N = its attention tokens)."""
        attn, mlp = token_counts[..., 0].double(), token_counts[..., 1].double()
        matching = torch.ceil(attn / 2) * torch.floor(attn / 2) * self.embed_dim
        return (matching * (mlp < attn)).sum(dim=1)


def parse_r(r: Union[int, Sequence[int]], depth: int, key: str = "method.params.r") -> list[int]:
    """An int or a per-block list of tokens to merge -> one int >= 0 per block (a short list is padded with 0).
    The values' type and range are the signature's (:data:`R`); a list longer than this model's depth is refused."""
    if isinstance(r, int):
        return [r] * depth
    schedule = list(r)
    if len(schedule) > depth:
        raise ParamError(f"{key} has {len(schedule)} entries but the model has {depth} blocks; valid: an integer "
                         f">= 0 or a list of at most {depth} integers >= 0 (one per block)")
    return schedule + [0] * (depth - len(schedule))


def parse_threshold(threshold: Union[str, float, Sequence[float]], depth: int,
                    key: str = "method.params.threshold") -> Optional[list[float]]:
    """``calibrated`` -> None (the thresholds come with the weights); a float -> one per block; a list of at most
    ``depth`` -> padded with 1 (never merge), as ``r`` lists are padded with 0. Ranges are the signature's."""
    if isinstance(threshold, str):
        return None
    if isinstance(threshold, (int, float)):
        return [float(threshold)] * depth
    values = [float(v) for v in threshold]
    if len(values) > depth:
        raise ParamError(f"{key} has {len(values)} entries but the model has {depth} blocks; valid: a number in "
                         f"[0, 1], a list of at most {depth} numbers in [0, 1] (one per block) or 'calibrated'")
    return values + [NEVER] * (depth - len(values))


@register_method("tome", family="merging", inference_knob="r", tradeoff_values=(0, 1, 2, 3, 4, 6, 8, 13, 16),
                 stronger={"r": 16},  # the embedded 65 tokens: r=13 would empty them
                 bench_settings={"deit_digits": ({"r": 4}, {"r": 5}), "deit_scenes": ({"r": 4}, {"r": 5})},
                 knob_fixed_by=("threshold",), knob_names_target={"threshold": "calibrated"})
def build_tome(vit: nn.Module, r: R = DEFAULT_R, prop_attn: bool = True, threshold: Thresholds = None) -> TokenReducer:
    """ToMe: merge the r most similar token pairs in every block (bipartite matching), proportional attention.

    ``threshold`` (DToMe, ``methods/tome_threshold.py``): instead of ``r``, merge every pair whose similarity is
    above the block's threshold, so counts vary per image; ``calibrated`` reads the thresholds from the weights
    (``experiments/calibrate.py`` writes them). Exclusive with ``r``: leave ``r`` at its default; with
    ``threshold=calibrated``, ``r`` may name the calibration's target r (the weights must have been calibrated for
    it), so that thresholds calibrated for different targets are different settings in the records."""
    if threshold is None:
        return ToMe(vit, r=r, prop_attn=prop_attn)
    if threshold == "calibrated":  # r names the calibration's target, checked against the weights' (if not default)
        target = None if r == DEFAULT_R else parse_r(r, len(vit.blocks))
        return ThresholdToMe(vit, None, prop_attn, calibration_target=target)
    if r != DEFAULT_R:
        raise ParamError(f"method.params.r={r!r} and method.params.threshold={threshold!r} are exclusive: r merges a "
                         f"fixed count, threshold every pair above it; valid: threshold=null to use r, or leave r at "
                         f"its default ({DEFAULT_R})")
    return ThresholdToMe(vit, parse_threshold(threshold, len(vit.blocks)), prop_attn)
