"""``sinkhorn``: learned cluster centres before blocks 3/6/9; tokens assigned by optimal transport (Sinkhorn).

From Haurum et al., "Which Tokens to Use?", ICCVW 2023 (https://github.com/JoakimHaurum/TokenReduction,
``models/sinkhorn.py``), on the engine of :mod:`methods.staged`: each stage runs at the start of its location's
block, before its attention, on the patch tokens (CLS set aside and put back in front), and stage i makes
``K_i = int(P * keep_rate ** (i + 1))`` tokens, cumulative (DeiT-S, 0.7: 137, 96, 67), or the explicit
``patch_counts``. Locations: ``locations``, default ``(3, 6, 9)`` (the paper's "4th, 7th and 10th block").

At each stage, on the ``N`` patch tokens ``x`` ``[B, N, C]`` entering the block:

- the stage's learned centres ``V`` ``[K, C]`` (:attr:`reducers`, :class:`SinkhornCentres`, initialised
  ``torch.randn`` as the official code) are first re-normalised to unit L2 norm **in place**, without gradient;
- ``x_hat = x / |x|`` and ``scores = x_hat V^T`` ``[B, N, K]`` (cosine similarities);
- :func:`sinkhorn_plan`, log-domain Sinkhorn on ``Z = scores^T / epsilon`` ``[B, K, N]`` (official
  ``epsilon = sinkhorn_eps = 1``, ``iterations = cluster_iters = 3``): from ``u = 0`` ``[K]`` and ``v = 0`` ``[N]``,
  ``iterations`` rounds of ``u = log mu - LSE_n(Z + v)`` then ``v = log nu - LSE_k(Z + u)``, with uniform
  marginals ``log mu = log nu = -log(K + N)`` (SuperGlue's normalisation, without its dustbin); the plan is
  ``P = exp(Z + u + v + log(K + N))`` ``[B, K, N]``;
- ``out_k = sum_n P_kn x_hat_n``: a sum of **normalised** tokens, not normalised per cluster (official).

What the marginals really are: ``mu`` has ``K`` entries and ``nu`` ``N`` entries, all ``1 / (K + N)``, so their
totals, ``K / (K + N)`` and ``N / (K + N)``, differ unless ``K = N``; no plan meets both. Each round ends with the
``v`` step, so the returned plan's **columns** sum to exactly 1 (each token hands out a mass of 1, whatever the
iterations); as the rounds go on, its **rows** tend to ``N / K`` each (the balanced split: every centre gathers
the same mass). With ``K = N`` both sums are 1. The inconsistency changes nothing: consistent marginals
(``mu_k = N / (K (K + N))``) shift every ``u`` by ``log(N / K)``, which the next ``v`` step takes back, so every
round's plan is the same. With the official 3 rounds the rows are only roughly equal (e.g. 1.5002 and 1.4998
for N / K = 1.5). An output token is a mixture of unit vectors with total weight its row sum, about ``N / K``
(1/0.7 per stage at keep rate 0.7), so its norm is at most that.

The centres are parameters edited during the forward, as the official code does (``v.copy_(normalize(v))``
under ``no_grad``), so that the optimizer always steps from unit vectors (the angular step does not shrink as a
norm grows; ``randn`` starts at norm ``sqrt(C)``). What this means: after any forward (training or evaluation,
also under ``torch.inference_mode`` and fvcore's tracing) the stored centres are unit vectors; the optimizer's
step then moves them off the sphere, and the next forward puts them back. A saved checkpoint holds the stepped
(not yet re-normalised) values, an EMA copy averages unit vectors and is re-normalised by its own forward; all
as in the official code. Weight decay applies to the centres (2-D parameters). The gradient reaches ``V`` as if
the normalisation were not there (it is not differentiated), as in the official code. The edit bumps the
parameter's version, so two training forwards before one backward are refused by autograd ("modified by an
inplace operation"), as with the official code; one forward per backward, as every training loop here runs, is
fine.

Quirks of the official code that we keep (none is a plain bug, so none has a switch): the uniform marginals
without a dustbin (harmless, above); only 3 rounds, so the rows are not quite balanced; the output is a sum of
normalised tokens, neither re-normalised nor brought back to the residual stream's scale; the normalisation of
``V`` is not differentiated; the in-place edit of a parameter during the forward.

Deviation, for repeatable evaluation: a row of ``V`` is re-normalised only where its norm is more than ``1e-6``
from 1. The official unconditional ``normalize`` of a unit vector moves it by a rounding error at every forward
(``~1.5e-8`` in fp32), so two evaluations of the same checkpoint would differ in the last bits; here the forward
of a normalised model is a pure function of its parameters. The difference is below ``1e-6`` relative.

Learned: the centres, one ``[K, C]`` per stage; the stock DeiT weights have none, so the method needs
fine-tuning (``finetune=True``). No inference knob: ``K`` is the shape of ``V``, so a checkpoint serves one
``keep_rate`` only. ``patch_depth``: outputs are soft mixtures that no input token is, so every patch leaves at
the first stage (depth = the first location). ``extra_macs``, per image and stage: ``K * N * C`` (the scores)
plus ``K * N * C`` (the output), the two matmuls fvcore counts; the Sinkhorn rounds are log-sum-exps (no
multiply-adds) and the normalisations elementwise, so they are not counted (the field's convention).

Precision: the tokens and centres are normalised in fp32 and the plan is computed in fp32 from the scores cast
to fp32; the tokens are returned in the input dtype (the official code runs in the input dtype). Under autocast
the two matmuls run in autocast's dtype, as the official code's do under ``--use_amp``.

Official checkpoints (``model.checkpoint``, layout registered with ``methods.official``, shared rules in
``methods/tokenreduction_layout.py``): ``sinkhorn_{tiny,small,base}_patch16_224`` saves timm's DeiT keys (->
``vit.`` + key) and ``cluster_layers.{s}.v`` ``[K, C]`` -> ``reducers.{s}.centres``; ``args.cluster_iters`` /
``args.sinkhorn_eps`` must equal ``iterations`` / ``epsilon``. Released: the repository's README names no
checkpoint; the reference spec sheet cites a Hugging Face model card ``joakimbh/TokenReduction`` (keep rates 0.9 /
0.7 / 0.5 / 0.25 on DeiT-T/S/B) whose file names and accuracies could not be read here (unverified), so none is
listed. The mapping was checked against the official code only, not against a released file.
"""
from __future__ import annotations

import math
from typing import Annotated, Optional, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from .registry import register_method
from . import tokenreduction_layout
from .params import KeepRate, Locations, PatchCounts, Rounds, Weight
from .staged import SoftMixing

# The temperature divides cosine scores in [-1, 1] in fp32: below about 1e-20 the scores / epsilon and the
# log-domain sums overflow and the plan and its gradient hold NaN (measured: finite down to 1e-19 over 1-10
# rounds, NaN from 1e-20); 1e-12 keeps a margin. Above 1e12 every score is 0 to fp32 precision: a uniform plan.
Epsilon = Annotated[float, Field(ge=1e-12, le=1e12)]
RENORM_TOLERANCE = 1e-6  # re-normalise a centre only when its norm is this far from 1 (see the module docstring)


def sinkhorn_plan(scores: Tensor, iterations: int, epsilon: float) -> Tensor:
    """The transport plan ``[B, K, N]`` of ``scores`` ``[B, N, K]`` (tokens x centres, as ``x_hat V^T``) after
    ``iterations`` log-domain Sinkhorn rounds at temperature ``epsilon``, scaled by ``K + N`` (module docstring).
    fp32."""
    z = scores.float().transpose(1, 2) / epsilon  # [B, K, N]
    batch, clusters, count = z.shape
    log_total = math.log(clusters + count)
    log_mu = log_nu = -log_total  # uniform marginals, K and N entries
    u = z.new_zeros(batch, clusters)
    v = z.new_zeros(batch, count)
    for _ in range(iterations):
        u = log_mu - torch.logsumexp(z + v[:, None, :], dim=2)
        v = log_nu - torch.logsumexp(z + u[:, :, None], dim=1)
    return (z + u[:, :, None] + v[:, None, :] + log_total).exp()


class SinkhornCentres(nn.Module):
    """One stage's ``K`` learned centres ``[K, C]`` and their transport-plan mixing; see the module docstring."""

    def __init__(self, clusters: int, width: int, iterations: int, epsilon: float) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.randn(clusters, width))  # official: randn, N(0, 1)
        self.iterations = iterations
        self.epsilon = epsilon

    def renormalise_(self) -> None:
        """Put the centres back on the unit sphere, in place and without gradient (rows already there stay)."""
        with torch.no_grad():
            norm = self.centres.norm(dim=-1, keepdim=True)
            off = (norm - 1).abs() > RENORM_TOLERANCE
            self.centres.copy_(torch.where(off, F.normalize(self.centres, dim=-1), self.centres))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(out, plan)``: ``out`` ``[B, K, C]`` in ``x``'s dtype, ``plan`` ``[B, K, N]`` fp32."""
        self.renormalise_()
        unit = F.normalize(x.float(), dim=-1)  # [B, N, C]
        scores = (unit @ self.centres.float().t()).float()  # [B, N, K]
        plan = sinkhorn_plan(scores, self.iterations, self.epsilon)
        return (plan @ unit).to(x.dtype), plan


class Sinkhorn(SoftMixing):
    """Optimal-transport clustering onto learned centres at each location; see the module docstring."""

    def __init__(self, vit: nn.Module, keep_rate: float, locations: Sequence[int],
                 patch_counts: Optional[Sequence[int]], iterations: int, epsilon: float,
                 backbone_lr_scale: float) -> None:
        """Defaults and ranges live in :func:`build_sinkhorn`.

        Args:
            iterations: Sinkhorn rounds (each a ``u`` and a ``v`` update), an integer in [1, 100].
            epsilon: the temperature dividing the scores, in [1e-12, 1e12] (``Epsilon``).
        """
        super().__init__(vit, keep_rate, locations, patch_counts, backbone_lr_scale)
        self.iterations = iterations
        self.epsilon = float(epsilon)
        for count in self.patch_counts:
            self.reducers.append(SinkhornCentres(count, self.embed_dim, self.iterations, self.epsilon))

    def extra_macs(self, token_counts: Tensor) -> Tensor:
        """Per image and stage, ``2 * K * N * C``: the scores and the output matmuls."""
        return self.mixing_macs(token_counts)


@register_method("sinkhorn", family="clustering", inference_knob=None, finetune=True,
                 stronger={"keep_rate": 0.5})
def build_sinkhorn(vit: nn.Module, keep_rate: KeepRate = 0.7, locations: Locations = (3, 6, 9),
                   patch_counts: PatchCounts = None, iterations: Rounds = 3, epsilon: Epsilon = 1.0,
                   backbone_lr_scale: Weight = 1.0) -> Sinkhorn:
    """Sinkhorn: learned centres before blocks 3/6/9 gather the patches by optimal transport (3 rounds, trained)."""
    return Sinkhorn(vit, keep_rate=keep_rate, locations=locations, patch_counts=patch_counts,
                    iterations=iterations, epsilon=epsilon, backbone_lr_scale=backbone_lr_scale)


# ------------------------------------------------------------------------------- the official checkpoint layout
tokenreduction_layout.register("sinkhorn", "sinkhorn", [("v", "centres")],
                               options={"cluster_iters": "iterations", "sinkhorn_eps": "epsilon"}, counts_fixed=True)
