"""``adavit``: A-ViT, adaptive token halting (Yin et al., CVPR 2022, https://arxiv.org/abs/2112.07658).

Official code: https://github.com/NVlabs/A-ViT (``timm/models/act_vision_transformer.py``, ``engine_act.py``).

This module owns the method (its two forward paths, outputs, losses and registration); the halting rules and
the prior are ``methods/halting.py``'s, the eval pass ``methods/adavit_ragged.py``'s and the official
checkpoint layout ``methods/adavit_layout.py``'s.

Mechanism (no new parameters). After block l, token k gets the halting score
``h = sigmoid(gate_scale * x[k, 0] - gate_center)`` from channel 0 of the block's output and accumulates
``c += h``; it halts at the first block N_k where ``c > 1 - eps`` (h is forced to 1 at the last block, for the
accumulation only). Its output is the mix ``sum_{l<N_k} h_l x_l + r_k x_{N_k}`` with remainder
``r_k = 1 - sum_{l<N_k} h_l``; the final norm and the head read the CLS token's mix, while the next block
receives the raw block output. The ponder cost is ``rho_k = N_k + r_k``. The loss adds
``ponder_weight * mean(rho)`` (over images and all tokens) and ``prior_weight * KL`` between the observed
halting distribution over blocks and a Gaussian target.

Training (``train()``) masks instead of removing, as the official code: halted tokens are zeroed and masked
as attention keys with a finite bias (-1000, never -inf: an all-masked row would give NaN); the block at
which a token halts still sees it (the mask is updated after the block).

Inference (``eval()``) removes halted tokens physically, which no released A-ViT code does, on the shared
ragged-token runtime: once an image's CLS token halts, all of its tokens leave the batch
(``methods/adavit_ragged.py`` says how, and what it equals).

Outputs, per image, the same in both modes (training reports what the removal path would execute).
``token_counts`` ``[B, depth, 2]``: executed counts (tokens still running when their CLS halts stop with
it); ``patch_depth``: blocks each patch ran. ``state`` (:class:`AdaViTState`): ``halting_depth`` ``[B, N]``
(1-based block at which each token, CLS first, stopped, in that executed sense) and ``cls_output`` (the CLS
mix before the final norm); training adds a :class:`HaltingTrace` with what the losses need: ``rho``,
``halting_scores`` and ``ran`` (``[B, depth, N]``: raw h, and whether the token ran the block) and
``halting_depth_official``. The hook ``alt_token_counts(images, out)["official"]`` gives the counts as the
official code runs them, every token running until it halts itself. Training knows them already; in eval
mode they need a second, masked pass over the images whose CLS halted while other tokens ran, which the hook
runs when measurement calls it (never inside ``model(images)``, so timing is not charged for it; the output
keeps only the mask of those images, not the batch).

Halting prior, ``method.params.prior`` (README paragraph): ``correct`` (default) follows the paper, KL(observed
|| target) with a normalised Gaussian target over the 1-based halting block; ``official`` reproduces
``engine_act.py``'s quirks and loss values (``methods/halting.py`` states both forms in full). The target a built
model uses is in ``record_info()["prior_target"]``, which records keep.

Halting source, ``method.params.halting`` (the paper's ablation of where the score comes from):
    ``channel0`` (default, the paper's method) reads channel 0 of the block output, no new parameters;
    ``head`` adds one learned ``Linear(C, 1)`` per block (``halting_heads``), initialised to read channel 0
    (weight ``e_0``, bias 0), so a fresh head model computes exactly what ``channel0`` does and training
    then frees channel 0 from halting duty. This variant is ours: the official code has only channel 0.

Deviations from the official code, and the switch that restores it:
    - the prior: ``prior=official`` (above);
    - gradients, with either prior: the official forward zeroes halted tokens with ``out.data = out.data *
      mask``, which autograd does not see (it treats the zeroing as the identity and sends gradient through
      the halted tokens' values); we multiply by the mask, so our gradient is the true gradient of the loss
      the forward computes. Hence ``prior=official`` reproduces the official loss values, not its gradients
      (no switch: the official gradient is not the gradient of any loss);
    - a token whose accumulation equals ``1 - eps`` exactly halts in neither branch of the official code (it
      is dropped without adding its remainder); here "not halted" is the exact complement of "halted" (no
      switch: a measure-zero case);
    - gate constants per backbone (``GATE_DEFAULTS``) rather than per run script; set ``gate_scale`` and
      ``gate_center`` to override.

Official checkpoints (``model.checkpoint``): the released A-ViT-T and A-ViT-S files load as they are; their layout
and the checks on their gate constants are ``methods/adavit_layout.py``'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Literal, Optional

import torch
from pydantic import Field
from torch import Tensor, nn

from . import adavit_ragged, backbone
from .base import MethodOutput, TokenReducer
from .halting import check_prior_target, counts_from_depth, halting_step, prior_kl, prior_target
from .params import MAX_BLOCKS, AttnGroup, ParamError, Weight
from .registry import register_method

MASK_BIAS = -1000.0  # the official finite key bias for halted tokens

# (gate_scale, gate_center) by timm architecture. DeiT-T and -S are the official recipes. The embedded
# model's values were chosen for a short fine-tune from its dense baseline (see the factory docstring).
GATE_DEFAULTS: dict[str, tuple[float, float]] = {
    "deit_tiny_patch16_224": (10.0, 30.0),
    "deit_small_patch16_224": (10.0, 75.0),
    "deit_digits_patch4_32": (5.0, 10.0),
    # video backbones (methods/video.py): the embedded one like the embedded image model (its baseline is
    # trained the same way); ViT-S over tubelets borrows DeiT-S's, untuned
    "vit_video_digits": (5.0, 10.0),
    "vit_video_small_patch16_224": (10.0, 75.0),
}

Prior = Literal["correct", "official"]
Halting = Literal["channel0", "head"]
# gate constants of the fp32 halting logit gate_scale * s - gate_center: the official ones are 10 and 30-75; a
# bound keeps the logit finite (a huge scale against a huge centre would give inf - inf = NaN)
GateScale = Annotated[float, Field(gt=0, le=1e6)]
GateShift = Annotated[float, Field(ge=-1e6, le=1e6)]
# a target halting depth in blocks (at most this model's depth, checked in build_adavit) and its spread
TargetDepth = Annotated[float, Field(ge=1, le=MAX_BLOCKS)]
TargetStd = Annotated[float, Field(gt=0, le=MAX_BLOCKS)]


# ------------------------------------------------------------------------------------------------ outputs
@dataclass
class HaltingTrace:
    """Per token and block, what the training path records for the losses (``[B, depth, N]`` or ``[B, N]``)."""

    rho: Tensor  # [B, N] ponder cost N_k + r_k
    halting_scores: Tensor  # [B, depth, N] raw h of every token at every block (fp32)
    ran: Tensor  # [B, depth, N] bool: the token ran the block (had not halted before it)
    halting_depth_official: Tensor  # [B, N] 1-based halting block, every token running until it halts itself


@dataclass
class AdaViTState:
    """What an A-ViT pass leaves besides the shared outputs; see the module docstring."""

    halting_depth: Tensor  # [B, N] 1-based block at which each token (CLS first) stopped, as executed
    cls_output: Tensor  # [B, C] fp32: the CLS token's halting mix, before the final norm
    official_counts: Optional[Tensor] = None  # [B, depth, 2] official-convention counts, when known (training)
    rerun: Optional[Tensor] = None  # [B] bool (eval): images whose official counts need a masked pass
    trace: Optional[HaltingTrace] = None  # training only


# ------------------------------------------------------------------------------------------------- method
class AdaViT(TokenReducer):
    """A-ViT token halting on a timm DeiT: masked in training, physical per-image removal in eval."""

    def __init__(self, vit: nn.Module, gate_scale: float, gate_center: float, eps: float, ponder_weight: float,
                 prior_weight: float, target_depth: float, target_std: float, prior: str,
                 attn_group: Optional[int], inference_gate_shift: float, halting: str) -> None:
        """Defaults and ranges live in :func:`build_adavit`'s signature (checked by the plan); the depth target
        against this model and the prior's width (:func:`check_prior_target`) are checked there too."""
        super().__init__(vit)
        self.halting_heads: Optional[nn.ModuleList] = None
        if halting == "head":
            self.halting_heads = nn.ModuleList(_channel0_head(vit.embed_dim) for _ in range(self.depth))
        self.gate_scale, self.gate_center, self.eps = gate_scale, gate_center, eps
        self.inference_gate_shift = inference_gate_shift
        self.ponder_weight, self.prior_weight = ponder_weight, prior_weight
        self.target_depth, self.target_std, self.prior = target_depth, target_std, prior
        self.attn_group = attn_group

    def halting_score(self, x: Tensor, block: int) -> Tensor:
        """``sigmoid(gate_scale * s - gate_center)`` in fp32 from block ``block``'s output tokens, with ``s``
        channel 0 or the block's halting head. In ``eval()`` mode the centre moves by
        ``inference_gate_shift``: one trained checkpoint, a range of compute levels (a larger shift lowers the
        scores, so tokens halt later)."""
        signal = x[..., 0] if self.halting_heads is None else self.halting_heads[block](x)[..., 0]
        center = self.gate_center if self.training else self.gate_center + self.inference_gate_shift
        signal = signal if signal.dtype == torch.float32 else signal.float()
        return torch.sigmoid(self.gate_scale * signal - center)

    def forward(self, images: Tensor) -> MethodOutput:
        return self.forward_masked(images) if self.training else self.forward_removal(images)

    def forward_masked(self, images: Tensor) -> MethodOutput:
        """The training path: every token runs every block, halted ones zeroed and masked as keys."""
        x = backbone.embed(self.vit, images)
        batch, tokens, _ = x.shape
        active = torch.ones(batch, tokens, dtype=torch.bool, device=x.device)
        c = x.new_zeros(batch, tokens, dtype=torch.float32)
        remainder, rho = torch.ones_like(c), torch.zeros_like(c)
        cls_out = x.new_zeros(batch, x.shape[-1], dtype=torch.float32)
        depth_of = torch.full((batch, tokens), self.depth, dtype=torch.long, device=x.device)
        scores, ran = [], []
        for index, block in enumerate(self.vit.blocks):
            keep = active.to(x.dtype)
            x = x * keep[..., None]
            bias = ((1.0 - keep) * MASK_BIAS)[:, None, None, :]
            x, _ = backbone.attn_residual(block, x, partial(backbone.softmax_attention, key_bias=bias))
            x = backbone.mlp_residual(block, x)  # the next block reads this raw output
            h = self.halting_score(x, index)
            c, weight, halted, remainder = halting_step(c, remainder, h, index == self.depth - 1, self.eps)
            halted = halted & active  # tokens halted earlier keep halted=True; only new halts count
            weight = weight * active
            cls_out = cls_out + weight[:, :1] * x[:, 0].float()
            rho = rho + active + weight * halted  # N_k blocks run, plus the remainder at the halting block
            depth_of = torch.where(halted, index + 1, depth_of)
            scores.append(h)
            ran.append(active)
            active = active & ~halted
        logits = backbone.head(self.vit, cls_out[:, None].to(x.dtype))
        official = torch.stack(ran, dim=1).sum(dim=-1)  # [B, depth]: every token runs until it halts
        executed = torch.minimum(depth_of, depth_of[:, :1])  # the CLS halting stops the image
        trace = HaltingTrace(rho, torch.stack(scores, dim=1), torch.stack(ran, dim=1), depth_of)
        state = AdaViTState(executed, cls_out, official_counts=torch.stack([official, official], dim=-1),
                            trace=trace)
        return MethodOutput(logits, counts_from_depth(executed, self.depth), executed[:, 1:], state=state)

    def forward_removal(self, images: Tensor) -> MethodOutput:
        """The inference path on the ragged runtime: halted tokens leave the packed batch; an image stops
        when its CLS halts. Per block, beyond the block itself: the halting score, one fused update of the
        per-row state, the CLS mix of the running images and one compaction (``methods/adavit_ragged.py``)."""
        logits, depth_of, cls_out = adavit_ragged.removal_pass(self.vit, images, self.halting_score, self.eps,
                                                               self.runtime, self.attn_group)
        counts = counts_from_depth(depth_of, self.depth)
        # Images that stopped early with other tokens running may have been cut short (or those tokens halted
        # with the CLS; the re-run then finds official = executed).
        stop = depth_of[:, 0]
        cut = (stop < self.depth) & (counts[:, :, 0].gather(1, (stop - 1)[:, None]).squeeze(1) > 1)
        return MethodOutput(logits, counts, depth_of[:, 1:], state=AdaViTState(depth_of, cls_out, rerun=cut))
    def alt_token_counts(self, images: Tensor, out: MethodOutput) -> dict[str, Tensor]:
        """``{"official": counts}``: every token runs until it halts itself, as the official code runs them.

        A training output has them already. For an eval output, images whose tokens all halted by the time
        their CLS did have official = executed counts; the others re-run through the masked path."""
        state: AdaViTState = out.state
        if state.official_counts is not None:
            return {"official": state.official_counts}
        counts = out.token_counts.clone()
        if state.rerun.any():
            with torch.inference_mode():
                counts[state.rerun] = self.forward_masked(images[state.rerun]).state.official_counts
        return {"official": counts}

    def record_info(self) -> dict[str, Any]:
        """``prior_target``: the target halting distribution the prior compares with, one entry per block
        (entry l for halting at 1-based block l + 1), as the configured ``prior`` mode builds it: normalised
        for ``correct``, the official code's unnormalised pdf for ``official``."""
        return {"prior_target": self.prior_target().tolist()}

    def prior_target(self) -> Tensor:
        return prior_target(self.depth, self.target_depth, self.target_std, self.prior)

    def extra_macs(self, token_counts: Tensor) -> Tensor:
        """The halting heads' ``C`` MACs per token and block run (``halting=head``); channel 0 costs nothing."""
        macs = torch.zeros(token_counts.shape[0], dtype=torch.float64, device=token_counts.device)
        if self.halting_heads is not None:
            macs += token_counts[:, :, 1].double().sum(dim=1) * self.vit.embed_dim
        return macs

    def loss_terms(self, out: MethodOutput, targets: Tensor, teacher_out: Optional[MethodOutput] = None):
        """``ponder_weight * mean(rho)`` and ``prior_weight * KL``, from a training-mode output."""
        trace = out.state.trace if isinstance(out.state, AdaViTState) else None
        if trace is None:
            raise ValueError("adavit loss terms need the output of the training path (model.train())")
        terms = {"ponder": self.ponder_weight * trace.rho.mean()}
        prior = torch.zeros((), device=out.logits.device)
        if self.prior_weight > 0:
            prior = self.prior_weight * prior_kl(trace.halting_scores, trace.ran, self.prior_target(), self.prior)
        terms["prior"] = prior
        return terms


def _channel0_head(dim: int) -> nn.Linear:
    """A halting head that starts as channel 0's read-out (weight e_0, bias 0)."""
    head = nn.Linear(dim, 1)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0, 0] = 1.0
        head.bias.zero_()
    return head


# ------------------------------------------------------------------------------------------------ factory
@register_method("adavit", family="halting", inference_knob="inference_gate_shift", finetune=True,
                 counterpart="topk",
                 tradeoff_values=(-8, -6, -4, -2, -1, 0, 1, 2, 4, 8), stronger={"inference_gate_shift": -2},
                 # random weights halt nothing at the default gates: constants giving 0.6-0.7x dense FLOPs
                 # (DeiT-S 0.68x/0.60x, DeiT-B 0.61x/0.53x on the benchmark images)
                 bench_settings={"deit_small": ({"gate_scale": 10, "gate_center": 4.0},
                                                {"gate_scale": 10, "gate_center": 3.5}),
                                 "deit_base": ({"gate_scale": 10, "gate_center": 7.0},
                                               {"gate_scale": 10, "gate_center": 5.0})})
def build_adavit(
    vit: nn.Module,
    gate_scale: Optional[GateScale] = None,
    gate_center: Optional[GateShift] = None,
    eps: Annotated[float, Field(gt=0, lt=1)] = 0.01,
    ponder_weight: Weight = 5e-4,
    prior_weight: Weight = 1e-3,
    target_depth: Optional[TargetDepth] = None,
    target_std: TargetStd = 1.0,
    prior: Prior = "correct",
    attn_group: AttnGroup = None,
    inference_gate_shift: GateShift = 0.0,
    halting: Halting = "channel0",
) -> AdaViT:
    """A-ViT: tokens halt on a score read from their block output; removed per image at inference (trained).

    ``gate_scale``/``gate_center`` None take the backbone's entry in ``GATE_DEFAULTS``;
    ``target_depth`` None is 8/12 of the depth (the official 8 of 12). ``inference_gate_shift`` is added to
    ``gate_center`` in ``eval()`` mode only: the post-training compute knob (larger = more compute).
    ``halting``: ``channel0`` (the paper) or ``head`` (a learned linear read-out per block; module docstring).

    Embedded model (``deit_digits_patch4_32``): gate 5/10, i.e. h = 0.5 at channel-0 value 2. Its dense
    baseline is trained from scratch, so channel 0 has no designed scale: in the default baseline (seed 0)
    patch tokens lie in about [-2.5, 4.5] (5-95%) with a median near 1. A softer scale than the official 10
    keeps h graded over that range, and the centre puts the start near 0.6x compute with an accuracy dip
    that the 4-epoch fine-tune repairs (compute rises again as accuracy recovers).
    Measured with the default recipe, seed 0 (dense 94.4%): 5/10 gives 95.0% at 0.70x FLOPs; 10/30 94.7%
    at 0.92x; 5/8 92.5% at 0.60x; 5/4 91.7% at 0.43x. The scale differs between training seeds (seed 1:
    5/10 gives 0.89x), so set ``gate_center`` per baseline where the compute level matters.
    """
    arch = (getattr(vit, "pretrained_cfg", None) or {}).get("architecture")
    if gate_scale is None or gate_center is None:
        if arch not in GATE_DEFAULTS:
            missing = "gate_scale" if gate_scale is None else "gate_center"
            raise ParamError(
                f"method.params.{missing}=null but architecture {arch!r} has no default gate constants "
                f"(defaults exist for {', '.join(GATE_DEFAULTS)}); set method.params.gate_scale and "
                f"method.params.gate_center, e.g. 10 and 30 as for DeiT-T")
        default_scale, default_center = GATE_DEFAULTS[arch]
        gate_scale = default_scale if gate_scale is None else gate_scale
        gate_center = default_center if gate_center is None else gate_center
    depth = len(vit.blocks)
    if target_depth is None:
        target_depth = depth * 8.0 / 12.0
    if not 1.0 <= target_depth <= depth:
        raise ParamError(f"method.params.target_depth={target_depth!r} is outside [1, {depth}] (the model's depth)")
    if prior_weight > 0:
        check_prior_target(depth, float(target_depth), float(target_std), prior)
    return AdaViT(vit, float(gate_scale), float(gate_center), float(eps), float(ponder_weight),
                  float(prior_weight), float(target_depth), float(target_std), prior, attn_group,
                  float(inference_gate_shift), halting)
