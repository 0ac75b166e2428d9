"""``patchmerger``: PatchMerger before blocks 3/6/9: learned queries mix the patches softly into fewer tokens.

From Haurum et al., "Which Tokens to Use?", ICCVW 2023 (https://github.com/JoakimHaurum/TokenReduction,
``models/patchmerger.py``, class ``PatchMerger``: their version of Renggli et al., "Learning to Merge Tokens in
Vision Transformers", 2022), on the engine of :mod:`methods.staged`: each stage runs at the start of its
location's block, before its attention, on the patch tokens (CLS set aside and put back in front), and stage i
makes ``K_i = int(P * keep_rate ** (i + 1))`` tokens, cumulative (DeiT-S, 0.7: 137, 96, 67), or the explicit
``patch_counts``. Locations: ``locations``, default ``(3, 6, 9)`` (the paper's "4th, 7th and 10th block").

At each stage, on the ``P`` patch tokens ``x`` ``[B, P, C]`` entering the block (:class:`PatchMergerStage`):

- ``y = LN(x)``, the stage's own LayerNorm;
- logits ``L = Q y^T * scale`` ``[B, K, P]``, with the stage's learned queries ``Q`` ``[K, C]``; ``scale = 1``
  (official ``scaled_attention=False``, the default), or ``C ** -0.5`` with ``scaled_attention=true`` (the
  official switch, off in the paper's runs);
- ``A = softmax(L)`` over the **tokens** (the last axis, ``P``; official ``sim.softmax(dim=-1)``), so each of
  the ``K`` outputs has weights summing to 1 over the tokens;
- ``out = A y`` ``[B, K, C]``: each output is a convex combination of the **layer-normalised** tokens
  (``mix_normalized=true``, the official behaviour), or of the raw tokens ``x`` (``mix_normalized=false``).

Mixing layer-normalised tokens into the residual stream is a quirk of the official code, kept by default. The
pre-norm blocks' residual stream carries un-normalised tokens whose scale grows with depth, and CLS stays raw;
after a stage the patch tokens are suddenly LayerNorm outputs (unit RMS per token at initialisation, then
LayerNorm's learned affine), of another scale than the tokens the following pretrained blocks were trained on,
and of another scale than CLS beside them. Fine-tuning has to absorb that shift. ``mix_normalized=false`` mixes
the raw tokens instead (the LayerNorm then only shapes the weights, as in :mod:`methods.sit`), which keeps the
residual stream's statistics: choose it to compare merging rules without that shift, or when fine-tuning is
short. The parameters are the same either way, so checkpoints load across the switch (the outputs differ).

Learned (:attr:`reducers`, one :class:`PatchMergerStage` per stage): the queries, initialised ``torch.randn``
(N(0, 1), untouched by the official ``self.apply(self._init_weights)``, which only re-initialises ``Linear``
and norm modules), and the LayerNorm (ones and zeros). The stock DeiT has neither, so the method needs
fine-tuning (``finetune=True``). Weight decay follows timm's grouping (as the official ``optim.py``): the queries
(2-D) decay, the LayerNorm does not. At initialisation, with ``scale = 1``, a logit ``q . LN(x)`` has a standard
deviation of about ``sqrt(C)`` (about 20 on DeiT-S), so the softmax is nearly one-hot: each output starts close
to one single (normalised) token (on DeiT-S a query's largest weight averages about 0.9 at initialisation);
``scaled_attention=true`` brings the logits to about unit scale, a soft mix.

No inference knob: ``K`` is the number of queries (a parameter shape), so a checkpoint serves one ``keep_rate``
(or ``patch_counts``) only. ``patch_depth``: an output is a soft mixture that no input token is, so every patch
leaves at the first stage (depth = the first location), the convention of :mod:`methods.staged` for soft
mixtures. Counts are fixed per image and training runs the path evaluation runs (no dropout).

``extra_macs``, per image and stage with ``P`` tokens entering and ``K`` leaving: ``K * P * C`` (the logits)
plus ``K * P * C`` (the mix), the two matmuls fvcore counts; the LayerNorm, scale and softmax are not counted
(the field's convention).

Quirks of the official code that we keep: the softmax runs over the tokens, not over the outputs, so a token
may feed every output or none; unscaled logits (``scaled_attention=false``) with ``randn`` queries; the mix of
layer-normalised tokens (switch ``mix_normalized``, above).

Deviations from the official code: the softmax and the mix are computed in fp32 (``float64`` stays ``float64``)
and the tokens returned in the input dtype (the official code runs in the input dtype); identical in fp32.
Under autocast the two matmuls run in autocast's dtype, as the official code's do under ``--use_amp``. The
``mix_normalized`` switch is ours (default: official).

Official checkpoints (``model.checkpoint``, layout registered with ``methods.official``, shared rules in
``methods/tokenreduction_layout.py``): ``patchmerger_{tiny,small,base}_patch16_224`` saves timm's DeiT keys (->
``vit.`` + key) and ``cluster_layers.{s}.queries`` ``[K, C]`` and ``cluster_layers.{s}.norm`` ->
``reducers.{s}.queries`` / ``reducers.{s}.norm`` (``scaled_attention`` is not saved: the official builders leave it
off, our default). Released: the repository's README names no checkpoint; the reference spec sheet cites a Hugging
Face model card ``joakimbh/TokenReduction`` (keep rates 0.9 / 0.7 / 0.5 / 0.25 on DeiT-T/S/B) whose file names and
accuracies could not be read here (unverified), so none is listed. The mapping was checked against the official
code only, not against a released file.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .params import KeepRate, Locations, PatchCounts, Weight
from .registry import register_method
from . import tokenreduction_layout
from .staged import SoftMixing


class PatchMergerStage(nn.Module):
    """One stage: ``K`` learned queries, each a softmax-over-tokens mixture of the tokens; module docstring."""

    def __init__(self, outputs: int, width: int, scaled_attention: bool, mix_normalized: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.randn(outputs, width))  # official: randn, N(0, 1)
        self.scale = width ** -0.5 if scaled_attention else 1.0
        self.mix_normalized = mix_normalized

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(out, A)``: ``out`` ``[B, K, C]`` in ``x``'s dtype, ``A`` ``[B, K, P]`` (rows sum to 1)."""
        normed = self.norm(x)  # [B, P, C]
        logits = torch.matmul(normed, self.queries.t()).transpose(1, 2) * self.scale  # [B, K, P]
        mix = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)  # over the tokens
        source = normed if self.mix_normalized else x
        return torch.matmul(mix, source.to(mix.dtype)).to(x.dtype), mix


class PatchMerger(SoftMixing):
    """PatchMerger at each location; see the module docstring."""

    def __init__(self, vit: nn.Module, keep_rate: float, locations: Sequence[int],
                 patch_counts: Optional[Sequence[int]], scaled_attention: bool, mix_normalized: bool,
                 backbone_lr_scale: float) -> None:
        """Defaults and ranges live in :func:`build_patchmerger`.

        Args:
            scaled_attention: scale the logits by ``C ** -0.5`` (official switch, default off).
            mix_normalized: mix the layer-normalised tokens (official) or, if false, the raw ones.
        """
        super().__init__(vit, keep_rate, locations, patch_counts, backbone_lr_scale)
        self.scaled_attention = bool(scaled_attention)
        self.mix_normalized = bool(mix_normalized)
        for count in self.patch_counts:
            self.reducers.append(PatchMergerStage(count, self.embed_dim, self.scaled_attention, self.mix_normalized))

    def extra_macs(self, token_counts: Tensor) -> Tensor:
        """Per image and stage, ``2 * K * P * C``: the logits and the mix."""
        return self.mixing_macs(token_counts)


@register_method("patchmerger", family="merging", inference_knob=None, finetune=True,
                 stronger={"keep_rate": 0.5})
def build_patchmerger(vit: nn.Module, keep_rate: KeepRate = 0.7, locations: Locations = (3, 6, 9),
                      patch_counts: PatchCounts = None, scaled_attention: bool = False,
                      mix_normalized: bool = True, backbone_lr_scale: Weight = 1.0) -> PatchMerger:
    """PatchMerger: learned queries mix the layer-normalised patches into fewer tokens before blocks 3/6/9 (trained)."""
    return PatchMerger(vit, keep_rate=keep_rate, locations=locations, patch_counts=patch_counts,
                       scaled_attention=scaled_attention, mix_normalized=mix_normalized,
                       backbone_lr_scale=backbone_lr_scale)


# ------------------------------------------------------------------------------- the official checkpoint layout
tokenreduction_layout.register("patchmerger", "patchmerger", [("queries", "queries"), ("norm.", "norm.")],
                               options={}, counts_fixed=True)
