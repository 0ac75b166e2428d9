"""``dpcknn``: DPC-KNN token clustering before blocks 3/6/9, clusters merged by a learned weighted mean.

From Haurum et al., "Which Tokens to Use?", ICCVW 2023 (https://github.com/JoakimHaurum/TokenReduction,
``models/dpcknn.py``, the clustering and merging of TCFormer, Zeng et al., CVPR 2022), on the engine of
:mod:`methods.staged`: each stage runs at the start of its location's block, before its attention, on the patch
tokens (CLS set aside and put back in front), and stage i leaves ``K_i = int(P * keep_rate ** (i + 1))`` patch
tokens, cumulative (DeiT-S, 0.7: 137, 96, 67), or the explicit ``patch_counts``. Locations: ``locations``,
default ``(3, 6, 9)`` (the paper's "4th, 7th and 10th block").

At each stage, on the ``P`` patch tokens ``x`` entering the block, the clustering (:func:`dpc_knn_centres`,
without gradients, in fp32):

- ``D = cdist(x, x) / sqrt(C)``, Euclidean on the block's input features;
- density ``rho_i = exp(-mean of D_ij^2 over the k_neighbors nearest j)`` (official ``k_neighbors = 5``); the
  nearest include the token itself (``D_ii = 0``); plus ``1e-6 * U[0, 1)`` noise against ties;
- ``delta_i = min D_ij over the j with rho_j > rho_i``; for the densest token, the largest entry of ``D``
  (over the whole matrix);
- centres: the ``K`` tokens of largest ``rho * delta``, in descending order (the output order); every token
  joins its nearest centre (the first on ties) and every centre joins itself.

Merge (:func:`merge_clusters`): output ``k`` is ``sum_{i in k} w_i x_i / (sum_{i in k} w_i + 1e-6)`` with
``w = exp(score(x))``, ``score`` a learned ``Linear(C, 1)`` per stage (:attr:`reducers`), initialised as the
official ``self.apply(self._init_weights)`` of timm 0.4.12 leaves it (truncated normal, std 0.02, bias 0): the
stock DeiT weights do not contain it, so the method needs fine-tuning (``finetune=True``). The score head gets
its gradient through the merge weights only; the clustering itself has none. ``equal_weight=true`` (official
``--equal_weight``) uses ``w = 1`` and has no score head, so nothing of its own is learned.

``patch_depth``: an output is a weighted mean, not a token; we give each cluster's output the identity of its
centre (the cluster is merged into its centre, as a merged B token keeps its identity in ToMe), so a centre goes
on counting and every other patch leaves at the stage. ``keep_rate = 1`` is well defined: ``K = P``, every token
is a centre and its own one-token cluster, so the output is each token times ``w / (w + 1e-6)``, in score order
(a permutation: attention does not see the order), and every patch keeps its depth.

Inference knob: ``keep_rate``; the score head does not depend on the count, so one checkpoint serves every rate.
``extra_macs``, per image and stage with ``P`` tokens entering: ``P^2 * C`` (the distances, ``torch.cdist``,
counted by fvcore through our handle), ``P * C`` (the score head; none with ``equal_weight``) and ``P * C`` (the
merge: one multiply-add per token coordinate, a scatter-add that fvcore does not count; negligible).
Top-k, sorting, the density's squares and exponentials and the noise are not counted (the field's convention).

Quirks of the official code that we keep (none is a plain bug, so none has a switch): the token counts as one of
its own ``k_neighbors`` nearest; the densest token's ``delta`` is the largest distance of the whole matrix, not
of its own row; a cluster's output is the weighted mean, not its centre; the score head sees the raw block
input, and the clustering ignores the scores; ``1e-6`` in the merge's denominator.

Deviations from the official code:

- The noise is not a fresh ``torch.rand`` per call and image. It is drawn once, at construction, from a
  ``torch.Generator`` seeded 0 (one row of ``num_patches`` values per stage, a non-persistent buffer, so
  checkpoints do not change), and the same values are added to every image at that stage (``noise[:P]``, by
  position). So an image's result does not depend on its batch or on earlier forwards, evaluation repeats
  exactly and tracing sees a constant. The noise only breaks exact ties of the density (identical tokens, rare
  after the position embedding); with one shared draw, a tie is broken the same way in every image.
- The merge weights and the merge are computed in fp32 and the tokens returned in the input dtype (the official
  code merges in the input dtype); identical in fp32.
- The official merge divides each weight by its cluster's ``sum + 1e-6`` before summing; we sum, then divide.
  The same up to rounding.
- In the official code a ``k_neighbors`` above a stage's token count fails inside ``topk`` at the first
  forward; we refuse it in the constructor: ``k_neighbors`` must be in ``[1, fewest patch tokens entering a
  stage]`` (DeiT-S: 196, 137, 96 enter at 0.7; 196, 49, 12 at 0.25).

Official checkpoints (``model.checkpoint``, layout registered with ``methods.official``, shared rules in
``methods/tokenreduction_layout.py``): ``dpcknn_{tiny,small,base}_patch16_224`` saves timm's DeiT keys (-> ``vit.``
+ key) and ``cluster_layers.{s}.score`` (``CTM.score``, Linear C->1; absent with ``--equal_weight``) ->
``reducers.{s}`` (``weight``, ``bias``); ``args.k_neighbors`` / ``args.equal_weight`` must equal ours;
``keep_rate`` stays the inference knob (no weight depends on it). Released: the repository's README names no
checkpoint; the reference spec sheet cites a Hugging Face model card ``joakimbh/TokenReduction`` (keep rates 0.9 /
0.7 / 0.5 / 0.25 on DeiT-T/S/B) whose file names and accuracies could not be read here (unverified), so none is
listed. The mapping was checked against the official code only, not against a released file.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .evit import KEEP_RATE_GRID
from .params import KeepRate, Locations, ParamError, PatchCounts, TokenCount, Weight
from .registry import register_method
from . import tokenreduction_layout
from .staged import Reduced, StagedReduction

NOISE_SCALE = 1e-6  # official: density + torch.rand(...) * 1e-6
NOISE_SEED = 0
MERGE_EPS = 1e-6  # official: all_weight + 1e-6


class DPCClusters(NamedTuple):
    """The result of :func:`dpc_knn_centres` for ``x`` ``[B, P, C]`` and ``k`` centres."""

    centres: Tensor  # [B, k] long: the centre tokens' positions, by descending rho * delta (the output order)
    assignment: Tensor  # [B, P] long: the cluster (0 .. k - 1, a position in `centres`) of every token
    density: Tensor  # [B, P] fp32: rho, noise included
    delta: Tensor  # [B, P] fp32: the distance to the nearest denser token (the densest: max D)


def dpc_knn_centres(x: Tensor, k: int, k_neighbors: int, noise: Tensor) -> DPCClusters:
    """DPC-KNN clustering of ``x`` ``[B, P, C]`` into ``k`` clusters (rule in the module docstring); ``noise``
    ``[P]`` or ``[B, P]`` is added to the density as given (the method passes ``1e-6 * U[0, 1)``). Runs without
    gradients, in fp32."""
    with torch.no_grad():
        x = x.float()
        batch, count, width = x.shape
        dist = torch.cdist(x, x) / math.sqrt(width)  # [B, P, P]
        nearest = dist.topk(k_neighbors, dim=-1, largest=False).values  # itself included (D_ii = 0)
        density = (-(nearest ** 2).mean(dim=-1)).exp() + noise.float()
        denser = density[:, None, :] > density[:, :, None]  # [b, i, j]: token j is denser than token i
        largest = dist.flatten(1).max(dim=-1).values[:, None, None]
        delta = torch.where(denser, dist, largest).min(dim=-1).values
        centres = (density * delta).topk(k, dim=-1).indices  # [B, k]
        to_centre = dist.gather(1, centres[:, :, None].expand(-1, -1, count))  # [B, k, P]
        assignment = to_centre.argmin(dim=1)  # the first centre on ties
        own = torch.arange(k, device=x.device).expand(batch, -1)
        assignment = assignment.scatter(1, centres, own)  # every centre joins itself
    return DPCClusters(centres, assignment, density, delta)


def merge_clusters(x: Tensor, assignment: Tensor, weights: Tensor, k: int) -> Tensor:
    """``[B, k, C]``: per cluster, ``sum w_i x_i / (sum w_i + 1e-6)`` over its members, for ``x`` ``[B, P, C]``,
    ``assignment`` ``[B, P]`` (cluster ids in ``[0, k)``) and ``weights`` ``[B, P]``; fp32."""
    x, weights = x.float(), weights.float()
    batch, _, width = x.shape
    total = weights.new_zeros(batch, k).scatter_add(1, assignment, weights)
    summed = x.new_zeros(batch, k, width).scatter_add(1, assignment[:, :, None].expand(-1, -1, width),
                                                      x * weights[:, :, None])
    return summed / (total[:, :, None] + MERGE_EPS)


class DPCKNN(StagedReduction):
    """DPC-KNN clustering and weighted merging of the patch tokens at each location; see the module docstring."""

    def __init__(self, vit: nn.Module, keep_rate: float, locations: Sequence[int],
                 patch_counts: Optional[Sequence[int]], k_neighbors: int, equal_weight: bool,
                 backbone_lr_scale: float) -> None:
        """Defaults and ranges live in :func:`build_dpcknn`.

        Args:
            k_neighbors: neighbours (the token itself included) of the density, in [1, the fewest patch tokens
                entering a stage].
            equal_weight: merge with ``w = 1`` (no score head) instead of ``w = exp(score(x))``.
        """
        super().__init__(vit, keep_rate, locations, patch_counts, backbone_lr_scale)
        fewest = min(self.stage_inputs)
        if k_neighbors > fewest:
            raise ParamError(f"method.params.k_neighbors={k_neighbors!r} is not an integer in [1, {fewest}] (at "
                             f"most the fewest patch tokens entering a stage; they are {self.stage_inputs})")
        self.k_neighbors = k_neighbors
        self.equal_weight = bool(equal_weight)
        if not self.equal_weight:
            for _ in self.locations:
                score = nn.Linear(self.embed_dim, 1)
                nn.init.trunc_normal_(score.weight, std=0.02)
                nn.init.zeros_(score.bias)
                self.reducers.append(score)
        generator = torch.Generator(device="cpu").manual_seed(NOISE_SEED)
        noise = torch.rand(len(self.locations), self.num_patches, generator=generator, device="cpu") * NOISE_SCALE
        self.register_buffer("noise", noise, persistent=False)  # [stages, num_patches]

    def reduce(self, stage: int, patches: Tensor, attention: Optional[Tensor]) -> Reduced:
        count, k = patches.shape[1], self.patch_counts[stage]
        clusters = dpc_knn_centres(patches, k, self.k_neighbors, self.noise[stage, :count])
        if self.equal_weight:
            weights = patches.new_ones(patches.shape[:2], dtype=torch.float32)
        else:
            weights = self.reducers[stage](patches)[..., 0].float().exp()
        merged = merge_clusters(patches, clusters.assignment, weights, k)
        return Reduced(merged.to(patches.dtype), identity=clusters.centres)

    def extra_macs(self, token_counts: Tensor) -> Tensor:
        """Per image and stage, ``P^2 * C`` (distances) + ``P * C`` (merge) + ``P * C`` (score head, if any)."""
        macs = torch.zeros(token_counts.shape[0], dtype=torch.float64, device=token_counts.device)
        per_token = 1 if self.equal_weight else 2
        for entering, _ in self.stage_sizes(token_counts):
            macs += entering ** 2 * self.embed_dim + per_token * entering * self.embed_dim
        return macs


@register_method("dpcknn", family="clustering", inference_knob="keep_rate",
                 knob_fixed_by=("patch_counts",), finetune=True,
                 tradeoff_values=KEEP_RATE_GRID, stronger={"keep_rate": 0.5})
def build_dpcknn(vit: nn.Module, keep_rate: KeepRate = 0.7, locations: Locations = (3, 6, 9),
                 patch_counts: PatchCounts = None, k_neighbors: TokenCount = 5, equal_weight: bool = False,
                 backbone_lr_scale: Weight = 1.0) -> DPCKNN:
    """DPC-KNN: density-peak clusters of the patches before blocks 3/6/9, merged by a learned weighted mean."""
    return DPCKNN(vit, keep_rate=keep_rate, locations=locations, patch_counts=patch_counts,
                  k_neighbors=k_neighbors, equal_weight=equal_weight, backbone_lr_scale=backbone_lr_scale)


# ------------------------------------------------------------------------------- the official checkpoint layout
tokenreduction_layout.register("dpcknn", "dpcknn", [("score.", "")],
                               options={"k_neighbors": "k_neighbors", "equal_weight": "equal_weight"},
                               counts_fixed=False)
