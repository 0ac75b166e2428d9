"""``sit``: SiT token slimming before blocks 3/6/9: a learned MLP mixes the patches softly into fewer tokens.

From Haurum et al., "Which Tokens to Use?", ICCVW 2023 (https://github.com/JoakimHaurum/TokenReduction,
``models/sit.py``, ``TokenSlimmingModule``: their version of the token slimming module of Zong et al.,
"Self-slimmed Vision Transformer", ECCV 2022), on the engine of :mod:`methods.staged`: each stage runs at the
start of its location's block, before its attention, on the patch tokens (CLS set aside and put back in front),
and stage i makes ``K_i = int(P * keep_rate ** (i + 1))`` tokens, cumulative (DeiT-S, 0.7: 137, 96, 67), or the
explicit ``patch_counts``. Locations: ``locations``, default ``(3, 6, 9)`` (the paper's "4th, 7th and 10th
block").

At each stage, on the ``P`` patch tokens ``x`` ``[B, P, C]`` entering the block (:class:`TokenSlimming`):

- logits ``W = MLP(x) * scale`` ``[B, P, K]``, with ``MLP = LayerNorm(C) -> Linear(C, H) -> GELU ->
  Linear(H, K)``, ``H = int(C * 0.5)`` (official ``ratio=0.5``: 192 on DeiT-S), and ``scale`` a learned scalar,
  initialised 1 (official shape ``[1, 1, 1]``, kept, so the state dict and the weight-decay grouping match);
- ``A = softmax(W)`` over the **input tokens** (dim 1; official ``F.softmax(weight * scale, dim=1)``), so each of
  the ``K`` outputs has weights summing to 1 over the ``P`` tokens;
- ``out = A^T x`` ``[B, K, C]``: each output is a convex combination of the **raw** block-input tokens. The
  LayerNorm is the MLP's first layer only: it shapes the weights, not the mixed features (official
  ``torch.bmm(weight, x)`` with the ``x`` the module was given).

Note on a discrepancy: the project's task text said "PatchMerger and SiT mix layer-normalised tokens into the
residual stream". For SiT this is not what the official code does (above; the reference spec, section 4c, says
so too): SiT mixes the raw tokens and only PatchMerger (:mod:`methods.patchmerger`) mixes layer-normalised ones.
We follow the official code.

Learned (:attr:`reducers`, one :class:`TokenSlimming` per stage): the MLP and ``scale``. Initialisation as the
official ``self.apply(self._init_weights)`` of timm 0.4.12 leaves them (the stock DeiT checkpoint, loaded with
``strict=False``, has none of them): both ``Linear`` layers truncated normal with std 0.02 and bias 0, the
LayerNorm ones and zeros, ``scale`` 1. With these small weights the logits are near 0 at the start, so the
softmax is near uniform and every output starts close to the mean patch token; fine-tuning has to make them
differ. The stock DeiT has no such modules, so the method needs fine-tuning (``finetune=True``). The weight
decay follows timm's grouping (as the official ``optim.py``): the two weight matrices and ``scale`` (3-D, not
1-D) decay; biases and the LayerNorm do not.

No inference knob: ``K`` is the output width of the last ``Linear`` (a parameter shape), so a checkpoint serves
one ``keep_rate`` (or ``patch_counts``) only. ``patch_depth``: an output is a soft mixture that no input token
is, so every patch leaves at the first stage (depth = the first location), the convention of
:mod:`methods.staged` for soft mixtures. Counts are fixed per image and training runs the path evaluation runs
(the module has no dropout).

``extra_macs``, per image and stage with ``P`` tokens entering and ``K`` leaving: ``P * C * H + P * H * K`` (the
MLP's two linears) plus ``K * P * C`` (the mix ``A^T x``), what fvcore counts; the LayerNorm, GELU, ``scale``
and softmax are not counted (the field's convention).

Quirks of the official code that we keep (none is a plain bug, so none has a switch): the softmax runs over the
tokens, not over the outputs, so a token may feed every output or none (no token is forced to be used); the
outputs mix raw tokens while the weights see normalised ones; ``H`` is rounded down (``int``).

Deviations from the official code: the softmax and the mix are computed in fp32 (``float64`` stays
``float64``) and the tokens returned in the input dtype (the official code runs in the input dtype); identical
in fp32. Under autocast the linears and the mix run in autocast's dtype, as the official code's do under
``--use_amp``.

Official checkpoints (``model.checkpoint``, layout registered with ``methods.official``, shared rules in
``methods/tokenreduction_layout.py``): ``sit_{tiny,small,base}_patch16_224`` saves timm's DeiT keys (-> ``vit.`` +
key) and ``cluster_layers.{s}.weight.{0,1,3}`` (``TokenSlimmingModule.weight``: LayerNorm, Linear C->C/2, Linear
C/2->K) -> ``reducers.{s}.mlp.{0,1,3}``, ``cluster_layers.{s}.scale`` -> ``reducers.{s}.scale``. Released: the
repository's README names no checkpoint; the reference spec sheet cites a Hugging Face model card
``joakimbh/TokenReduction`` (keep rates 0.9 / 0.7 / 0.5 / 0.25 on DeiT-T/S/B) whose file names and accuracies could
not be read here (unverified), so none is listed. The mapping was checked against the official code only, not
against a released file.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .params import KeepRate, Locations, PatchCounts, Weight
from .registry import register_method
from . import tokenreduction_layout
from .staged import SoftMixing

HIDDEN_RATIO = 0.5  # official TokenSlimmingModule(ratio=0.5): hidden = int(C * 0.5)


def hidden_width(width: int) -> int:
    """The MLP's hidden width ``int(C * 0.5)``, rounded down as the official code does."""
    return int(width * HIDDEN_RATIO)


class TokenSlimming(nn.Module):
    """One stage: ``K`` outputs, each a softmax-over-tokens mixture of the raw input tokens; module docstring."""

    def __init__(self, width: int, outputs: int) -> None:
        super().__init__()
        hidden = hidden_width(width)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(),
                                 nn.Linear(hidden, outputs))
        self.scale = nn.Parameter(torch.ones(1, 1, 1))  # official shape and init
        with torch.no_grad():  # what timm 0.4.12's _init_weights, applied by the official model, leaves
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    nn.init.trunc_normal_(layer.weight, std=0.02)
                    nn.init.zeros_(layer.bias)

    def mixing(self, x: Tensor) -> Tensor:
        """``A`` ``[B, P, K]``: softmax over the tokens (dim 1) of ``MLP(x) * scale``; fp32 (or wider)."""
        logits = self.mlp(x) * self.scale
        return logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(out, A)``: ``out = A^T x`` ``[B, K, C]`` in ``x``'s dtype, ``A`` ``[B, P, K]``."""
        mix = self.mixing(x)
        out = torch.bmm(mix.transpose(1, 2), x.to(mix.dtype))
        return out.to(x.dtype), mix


class SiT(SoftMixing):
    """SiT token slimming at each location; see the module docstring."""

    def __init__(self, vit: nn.Module, keep_rate: float, locations: Sequence[int],
                 patch_counts: Optional[Sequence[int]], backbone_lr_scale: float) -> None:
        """Defaults and ranges live in :func:`build_sit`; the arguments are those of :class:`StagedReduction`."""
        super().__init__(vit, keep_rate, locations, patch_counts, backbone_lr_scale)
        for count in self.patch_counts:
            self.reducers.append(TokenSlimming(self.embed_dim, count))

    def extra_macs(self, token_counts: Tensor) -> Tensor:
        """Per image and stage, ``P * C * H + P * H * K`` (the MLP) plus ``K * P * C`` (the mix)."""
        macs = torch.zeros(token_counts.shape[0], dtype=torch.float64, device=token_counts.device)
        width, hidden = self.embed_dim, hidden_width(self.embed_dim)
        for entering, made in self.stage_sizes(token_counts):
            macs += entering * width * hidden + entering * hidden * made + made * entering * width
        return macs


@register_method("sit", family="merging", inference_knob=None, finetune=True,
                 stronger={"keep_rate": 0.5})
def build_sit(vit: nn.Module, keep_rate: KeepRate = 0.7, locations: Locations = (3, 6, 9),
              patch_counts: PatchCounts = None, backbone_lr_scale: Weight = 1.0) -> SiT:
    """SiT: a learned MLP mixes the patches into fewer tokens before blocks 3/6/9 (softmax over tokens, trained)."""
    return SiT(vit, keep_rate=keep_rate, locations=locations, patch_counts=patch_counts,
               backbone_lr_scale=backbone_lr_scale)


# ------------------------------------------------------------------------------- the official checkpoint layout
tokenreduction_layout.register("sit", "sit", [("weight.", "mlp."), ("scale", "scale")],
                               options={}, counts_fixed=True)
