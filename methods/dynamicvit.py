"""``dynamicvit``: learned token pruning with a light predictor per stage.

Paper: Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification",
NeurIPS 2021 (https://arxiv.org/abs/2106.02034). Official code: https://github.com/raoyongming/DynamicViT.

Before each block in ``locations`` (default 3, 6, 9) a predictor scores the surviving patch tokens and the
stage keeps the cumulative ratio ``keep_rate ** s`` of the patches (s = 1, 2, ...), rounded down; CLS is always
kept and never scored. For DeiT-S at 224 px and ``keep_rate=0.7`` the blocks run on 197 / 138 / 97 / 68 tokens.

- ``train()`` mode: the keep decision is a hard, straight-through Gumbel-softmax (tau = 1) times the previous
  stage's decision. Tokens stay in the batch; every block from the first stage on masks dropped tokens as
  attention keys (``backbone.policy_attention``: fp32 masked softmax, each query keeps itself).
- ``eval()`` mode: each stage gathers the top-k tokens by keep score, a fixed count per image.
- Loss terms: ``ratio`` (mean over stages and images of ``(mean keep - keep_rate ** s) ** 2``), ``kl``
  (KL(teacher || student) on the logits) and ``token_mse`` (kept final patch tokens against the teacher's),
  weighted 2.0 / 0.5 / 0.5 by default. The teacher is the frozen dense model the harness builds.
- ``param_groups``: the backbone trains at ``backbone_lr_scale`` (0.01) times the predictors' learning rate.

Where we deviate from the official code:

- The predictor's policy-weighted mean divides by ``max(sum(policy), eps)``, so a stage that happened to drop
  every patch gives zeros instead of NaN (the official code divides by the plain sum).
- ``token_counts`` in ``train()`` mode report the counts inference would run (the deployed cost), not the
  full, masked sequence the training pass computes.
- ``inference_keep_rate`` (our addition) evaluates a checkpoint at another rate; ``null`` restores the
  original behaviour (inference at the training rate).

Official checkpoints (``model.checkpoint``, layout registered with ``methods.official``). The official
``VisionTransformerDiffPruning`` (``models/dyvit.py``) saves timm's DeiT keys at the top level plus
``score_predictor.{s}.in_conv.{0,1}`` (LayerNorm, Linear C->C) and ``score_predictor.{s}.out_conv.{0,2,4}``
(Linear C->C/2, C/2->C/4, C/4->2); ``main.py`` (``utils.save_model``) wraps them as ``{'model', 'model_ema',
'optimizer', 'epoch', 'scaler', 'args', 'best', 'best_ema'}`` and ``infer.py`` evaluates ``checkpoint['model']``.
The mapping: ``score_predictor.{s}.in_conv`` -> ``predictors.{s}.embed``, ``score_predictor.{s}.out_conv`` ->
``predictors.{s}.score`` (same indices), every other key -> ``vit.`` + key. A file whose saved ``args.base_rate``
differs from ``keep_rate`` is refused (set ``inference_keep_rate`` to evaluate at another rate). The predictor
locations are not saved (the official DeiT models prune before blocks 3, 6, 9, our default); a file with
another number of predictors is refused naming the keys. Released (README "Model Zoo", ImageNet-1k top-1 and
FLOPs as the README states; the README names no file for the DeiT models, so the Google Drive id is given):

- DynamicViT-DeiT-S/0.7 (``deit-s``, Drive ``1H5kHHagdqo4emk9CgjfA7DA62XJr8Yc1``): 79.32 %, 2.9 GFLOPs.
  Here: ``model=deit_small method.params.keep_rate=0.7``.
- DynamicViT-DeiT-B/0.7 (``deit-b``, Drive ``1J9PCPiOSHmzRiWw370GDYJPEZ8r4uU3M``): 81.43 %, 11.4 GFLOPs.
  Here: ``model=deit_base method.params.keep_rate=0.7``.
- DynamicViT-DeiT-256/0.7 (``deit-256``, Drive ``1fpdTNRZtGOW25UwOadj1iUdjqmu88WkO``): 76.53 %, 1.3 GFLOPs.
  The mapping fits, but no timm model of width 256 / 4 heads is configured here.
- DynamicViT-LVViT-S/0.5, -S/0.7, -M/0.7 (the notebooks' ``dynamic-vit_lv-m_r0.7.pth``): 81.97 / 83.08 /
  83.82 %, 3.7 / 4.6 / 8.5 GFLOPs. LV-ViT backbones: not mapped.

Evaluate one: ``python experiments/run.py method=dynamicvit model=deit_small model.checkpoint=PATH.pth
data=imagefolder data.root=/datasets/imagenet experiment.train=false``.
The mapping was checked against the official code (key names, shapes, wrappers), not against a released file:
none can be downloaded here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backbone, official, params
from .base import MethodOutput, TokenReducer
from .params import KeepRate, Locations, Weight
from .registry import register_method
from .tokens import gather_tokens, kept_patch_count, topk_patches


class KeepPredictor(nn.Module):
    """Scores patch tokens from their own features and a policy-weighted global summary.

    ``LayerNorm -> Linear(C, C) -> GELU``; the first half of the channels stays per token (local), the second
    half is averaged over the kept tokens (global); the concatenation goes through
    ``Linear(C, C/2) -> GELU -> Linear(C/2, C/4) -> GELU -> Linear(C/4, 2) -> log-softmax``. Column 0 = keep.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.local_dim = dim // 2
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.score = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(),
            nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1),
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, patches: Tensor, policy: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
        """``patches`` ``[B, P, C]``, ``policy`` ``[B, P, 1]`` (1 = kept; ``None``: every patch is kept, the
        same numbers as a policy of ones, fewer ops) -> log-probabilities ``[B, P, 2]``."""
        x = self.embed(patches)
        local, glob = x[..., : self.local_dim], x[..., self.local_dim:]
        if policy is None:  # sum(glob * 1) / max(sum(1), eps) exactly: the sum over the count (>= 1 > eps)
            glob = glob.sum(dim=1, keepdim=True) / glob.new_full((1, 1, 1), float(glob.shape[1]))
        else:
            glob = (glob * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True).clamp_min(eps)
        return self.score(torch.cat([local, glob.expand(-1, local.shape[1], -1)], dim=-1))

    def macs_per_token(self) -> int:
        """``C^2 + C^2/2 + C^2/8``: the three wide linear layers (the 2-way output layer is not counted)."""
        return sum(m.in_features * m.out_features for m in self.modules()
                   if isinstance(m, nn.Linear) and m.out_features != 2)


@dataclass
class DynamicViTState:
    """What a DynamicViT pass leaves for its loss terms (the final tokens are ``MethodOutput.final_tokens``)."""

    keep_ratio: Tensor  # [B, stages]: kept fraction of the patches after each stage
    patch_index: Tensor  # [B, K]: original patch of each final patch token
    final_keep: Tensor  # [B, K]: its keep weight (the hard policy in training, else 1)


class DynamicViT(TokenReducer):
    """DeiT with a :class:`KeepPredictor` before each block in ``locations``; see the module docstring."""

    needs_teacher = True

    def __init__(self, vit: nn.Module, keep_rate: float, locations: Sequence[int], ratio_weight: float,
                 kl_weight: float, token_mse_weight: float, backbone_lr_scale: float,
                 inference_keep_rate: Optional[float]) -> None:
        """Defaults and ranges live in :func:`build_dynamicvit`.

        Args:
            keep_rate: per-stage keep ratio rho in (0, 1]; stage s keeps ``floor(rho ** s * patches)`` patches.
            locations: strictly increasing block indices in [1, depth) to prune before.
            ratio_weight, kl_weight, token_mse_weight: loss weights (official: 2.0 / 0.5 / 0.5).
            backbone_lr_scale: learning-rate factor of the backbone relative to the predictors.
            inference_keep_rate: keep rate of the ``eval()`` forward; ``None`` = ``keep_rate``.
        """
        super().__init__(vit)
        self.keep_rate = float(keep_rate)
        self.inference_keep_rate = float(keep_rate if inference_keep_rate is None else inference_keep_rate)
        self.locations = params.check_locations(locations, self.depth, first=1)
        knob = "keep_rate" if inference_keep_rate is None else "inference_keep_rate"
        params.check_cumulative_keep(f"method.params.{knob}", self.inference_keep_rate, self.num_patches,
                                     len(self.locations))
        self.ratio_weight, self.kl_weight, self.token_mse_weight = ratio_weight, kl_weight, token_mse_weight
        self.backbone_lr_scale = backbone_lr_scale
        # Target cumulative keep ratios (training) and kept patch counts (inference), one per stage.
        self.ratio_targets = [self.keep_rate ** (s + 1) for s in range(len(self.locations))]
        self.keep_counts = [kept_patch_count(self.num_patches, self.inference_keep_rate ** (s + 1))
                            for s in range(len(self.locations))]
        self.predictors = nn.ModuleList(KeepPredictor(self.embed_dim) for _ in self.locations)

    def forward(self, images: Tensor) -> MethodOutput:
        """``final_tokens`` [B, K+1, C] are taken after the final norm, as the official token loss uses them;
        ``state`` is a :class:`DynamicViTState`."""
        x = backbone.embed(self.vit, images)
        batch = x.shape[0]
        patch_depth = torch.full((batch, self.num_patches), self.depth, dtype=torch.long, device=x.device)
        run = self._forward_masked if self.training else self._forward_pruned
        x, state = run(x, patch_depth)
        counts = torch.tensor(self.block_counts(), dtype=torch.long, device=x.device)
        token_counts = counts[None, :, None].expand(batch, -1, 2).clone()
        return MethodOutput(backbone.head(self.vit, x), token_counts, patch_depth, final_tokens=self.vit.norm(x),
                            state=state)

    def _forward_masked(self, x: Tensor, patch_depth: Tensor) -> tuple[Tensor, DynamicViTState]:
        """Training: hard Gumbel decisions mask attention keys; the sequence keeps its length."""
        batch = x.shape[0]
        keep = x.new_ones(batch, self.num_patches, 1)  # cumulative decision per patch
        cls_keep = x.new_ones(batch, 1)
        policy = None
        ratios = []
        for index, block in enumerate(self.vit.blocks):
            if index in self.locations:
                stage = self.locations.index(index)
                log_probs = self.predictors[stage](x[:, 1:], keep)
                new_keep = self._sample_keep(stage, log_probs, keep)
                patch_depth[(keep[..., 0] > 0.5) & (new_keep[..., 0] < 0.5)] = index
                keep = new_keep
                ratios.append(keep[..., 0].float().mean(dim=1))
                policy = torch.cat([cls_keep, keep[..., 0]], dim=1)
            mix = backbone.softmax_attention if policy is None else partial(backbone.policy_attention, policy=policy)
            x, _ = backbone.attn_residual(block, x, mix)
            x = backbone.mlp_residual(block, x)
        patch_index = torch.arange(self.num_patches, device=x.device).expand(batch, -1)
        return x, DynamicViTState(torch.stack(ratios, dim=1), patch_index, keep[..., 0])

    def _sample_keep(self, stage: int, log_probs: Tensor, prev_keep: Tensor) -> Tensor:
        """Hard straight-through Gumbel-softmax (tau = 1) keep decision ``[B, P, 1]``, nested in ``prev_keep``.

        A separate method so that tests can replace the random draw with a deterministic decision."""
        return F.gumbel_softmax(log_probs, tau=1.0, hard=True)[..., :1] * prev_keep

    def _forward_pruned(self, x: Tensor, patch_depth: Tensor) -> tuple[Tensor, DynamicViTState]:
        """Inference: each stage gathers CLS and the top-k patches by keep score (physical removal)."""
        batch = x.shape[0]
        origin = torch.arange(self.num_patches, device=x.device).expand(batch, -1)  # original patch index
        for index, block in enumerate(self.vit.blocks):
            if index in self.locations:
                stage = self.locations.index(index)
                patches = x[:, 1:]
                log_probs = self.predictors[stage](patches)  # every patch here is kept so far
                keep, drop = topk_patches(log_probs[..., 0], self.keep_counts[stage])
                patch_depth.scatter_(1, origin.gather(1, drop), index)
                origin = origin.gather(1, keep)
                x = torch.cat([x[:, :1], gather_tokens(patches, keep)], dim=1)  # CLS and the kept patches
            x, _ = backbone.attn_residual(block, x)
            x = backbone.mlp_residual(block, x)
        ratios = torch.tensor([k / self.num_patches for k in self.keep_counts], device=x.device)
        return x, DynamicViTState(ratios.expand(batch, -1), origin, x.new_ones(origin.shape))

    def block_counts(self) -> list[int]:
        """Tokens (CLS included) each block runs on at inference, e.g. 197 x3, 138 x3, 97 x3, 68 x3."""
        counts, current = [], self.num_tokens
        for index in range(self.depth):
            if index in self.locations:
                current = 1 + self.keep_counts[self.locations.index(index)]
            counts.append(current)
        return counts

    def loss_terms(
        self, out: MethodOutput, targets: Tensor, teacher_out: Optional[MethodOutput] = None
    ) -> dict[str, Tensor]:
        keep_ratio = out.state.keep_ratio.float()  # [B, stages]
        target = torch.tensor(self.ratio_targets, device=keep_ratio.device)
        terms = {"ratio": self.ratio_weight * ((keep_ratio - target) ** 2).mean()}
        if teacher_out is None:
            return terms
        student_log = F.log_softmax(out.logits.float(), dim=-1)
        teacher_log = F.log_softmax(teacher_out.logits.float(), dim=-1)
        terms["kl"] = self.kl_weight * F.kl_div(student_log, teacher_log, reduction="batchmean", log_target=True)
        terms["token_mse"] = self.token_mse_weight * _kept_token_mse(out, teacher_out)
        return terms

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The weight-decay groups of the base class, each split into predictors (lr_scale 1) and backbone."""
        predictor_ids = {id(p) for p in self.predictors.parameters()}
        groups = []
        for group in super().param_groups(weight_decay):
            params = list(group["params"])
            for scale, is_predictor in ((1.0, True), (self.backbone_lr_scale, False)):
                chosen = [p for p in params if (id(p) in predictor_ids) == is_predictor]
                if chosen:
                    groups.append({**group, "params": chosen, "lr_scale": scale})
        return groups

    def extra_macs(self, token_counts: Tensor) -> Tensor:
        """Per image, each predictor's ``(N_s - 1) * (C^2 + C^2/2 + C^2/8)``, N_s = tokens entering its stage."""
        macs = torch.zeros(token_counts.shape[0], dtype=torch.float64, device=token_counts.device)
        for location, predictor in zip(self.locations, self.predictors):
            entering = token_counts[:, location - 1, 1].double()  # the MLP output of the block before
            macs += (entering - 1) * predictor.macs_per_token()
        return macs


def _kept_token_mse(out: MethodOutput, teacher_out: MethodOutput) -> Tensor:
    """MSE between the student's kept final patch tokens and the teacher's tokens at the same patches."""
    student = out.final_tokens[:, 1:].float()  # [B, K, C]
    index = out.state.patch_index  # [B, K] original patch index of each final token
    teacher = teacher_out.final_tokens[:, 1:].float()
    teacher = teacher.gather(1, index.unsqueeze(-1).expand(-1, -1, teacher.shape[-1]))
    kept = out.state.final_keep > 0.5
    if not kept.any():
        return student.sum() * 0.0
    return F.mse_loss(student[kept], teacher[kept])


@register_method("dynamicvit", family="pruning", inference_knob="inference_keep_rate", finetune=True,
                 tradeoff_values=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), stronger={"keep_rate": 0.5})
def build_dynamicvit(
    vit: nn.Module,
    keep_rate: KeepRate = 0.7,
    locations: Locations = (3, 6, 9),
    ratio_weight: Weight = 2.0,
    kl_weight: Weight = 0.5,
    token_mse_weight: Weight = 0.5,
    backbone_lr_scale: Weight = 0.01,
    inference_keep_rate: Optional[KeepRate] = None,
) -> DynamicViT:
    """DynamicViT: a learned predictor before blocks 3/6/9 keeps keep_rate ** s of the patches (trained)."""
    return DynamicViT(vit, keep_rate=keep_rate, locations=locations, ratio_weight=ratio_weight,
                      kl_weight=kl_weight, token_mse_weight=token_mse_weight,
                      backbone_lr_scale=backbone_lr_scale, inference_keep_rate=inference_keep_rate)


# ------------------------------------------------------------------------------- the official checkpoint layout
_OFFICIAL_PREDICTOR = re.compile(r"score_predictor\.(\d+)\.(in_conv|out_conv)\.(.+)")
_OUR_PREDICTOR = re.compile(r"predictors\.(\d+)\.(embed|score)\.(.+)")
_PART_NAMES = {"in_conv": "embed", "out_conv": "score"}


def official_key_to_ours(key: str) -> str:
    found = _OFFICIAL_PREDICTOR.fullmatch(key)
    if found:
        stage, part, rest = found.groups()
        return f"predictors.{stage}.{_PART_NAMES[part]}.{rest}"
    return f"vit.{key}"


def our_key_to_official(key: str) -> str:
    found = _OUR_PREDICTOR.fullmatch(key)
    if found:
        stage, part, rest = found.groups()
        official_part = {ours: theirs for theirs, ours in _PART_NAMES.items()}[part]
        return f"score_predictor.{stage}.{official_part}.{rest}"
    return key[len("vit."):] if key.startswith("vit.") else f"(none: {key} is ours only)"


def _check_official_keep_rate(method: DynamicViT, content) -> Optional[str]:
    trained = getattr(content.get("args"), "base_rate", None)
    if trained is None or abs(float(trained) - method.keep_rate) < 1e-9:
        return None
    return (f"it was trained at keep rate {float(trained)} (its saved args.base_rate), but "
            f"method.params.keep_rate={method.keep_rate}; valid: method.params.keep_rate={float(trained)} "
            "(method.params.inference_keep_rate evaluates it at another rate)")


official.register_layout(official.OfficialLayout(
    method="dynamicvit", code="raoyongming/DynamicViT models/dyvit.py",
    detect=lambda content: any(key.startswith("score_predictor.") for key in content["model"]),
    to_ours=official_key_to_ours, to_official=our_key_to_official, check=_check_official_keep_rate,
    settings=lambda content: ({"keep_rate": float(content["args"].base_rate)}
                              if hasattr(content.get("args"), "base_rate") else {})))
