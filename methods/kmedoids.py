"""``kmedoids``: K-Medoids token clustering before blocks 3/6/9; no new parameters, runs off the shelf.

From Haurum et al., "Which Tokens to Use?", ICCVW 2023 (https://github.com/JoakimHaurum/TokenReduction,
``models/kmedoids.py``), on the engine of :mod:`methods.staged` (reduction at the start of each location's
block, before its attention; stage i leaves ``int(P * keep_rate ** (i + 1))`` patch tokens).

At each stage, on the patch tokens entering the block (CLS set aside):

- token weight ``w_j``: the attention patch ``j`` received in the block before, summed over heads and all
  queries, CLS's row included (so locations start at block 1);
- initial medoids: the ``K`` tokens of largest ``w`` (the official ``equal_weight=False`` default; its
  farthest-point alternative is not offered);
- ``D = cdist(x, x)``, Euclidean on the block's input features (fp32);
- ``iterations`` (official 3) rounds of: assign every token to its nearest medoid (``argmin_k D[i, m_k]``, the
  first on ties), then move each medoid to the member ``i`` minimising ``w_i * sum_j D_ij``;
- the output is the medoid tokens themselves (hard selection, no averaging), in medoid order.

Quirk kept by default (``medoid_cost=all_tokens``): in the official update the sum runs over **all** tokens, not
over the cluster's members, so the cost ``w_i * sum_j D_ij`` does not depend on the assignment and each medoid
moves to the cheapest member of its cluster. ``medoid_cost=members`` sums over the members only
(``w_i * sum_{j in k} D_ij``), the k-medoids update the code means to implement. A cluster left empty (a medoid
whose features equal another's) keeps its medoid.

``patch_depth``: a medoid stays itself; every other patch leaves at the stage (it is merged into its medoid, the
convention ToMe uses here). ``extra_macs``: the distances, ``P^2 * C`` per stage (``torch.cdist``, which fvcore
counts through our handle), plus ``P^2 * K`` per iteration for ``medoid_cost=members`` (the member sums, a
matmul). The attention weights come from the block's own softmax (computed unfused there), so they cost
nothing extra. Inference knob: ``keep_rate`` (no parameter depends on it).

Official checkpoints (``model.checkpoint``, layout registered with ``methods.official``, shared rules in
``methods/tokenreduction_layout.py``): ``kmedoids_{tiny,small,base}_patch16_224`` saves timm's DeiT keys (->
``vit.`` + key) and no ``cluster_layers`` key (``KMedoids`` holds no parameter): the layout is the backbone's,
timm's DeiT keys -> ``vit.`` + key (its own ``Block`` keeps timm's names); recognised by its ``args`` alone (a bare
state dict is a DeiT checkpoint); ``args.cluster_iters`` must equal ``iterations``, ``args.equal_weight=True``
(farthest-point initial medoids) is refused, as it is not offered here; ``keep_rate`` stays the inference knob.
Released: the repository's README names no checkpoint; the reference spec sheet cites a Hugging Face model card
``joakimbh/TokenReduction`` (keep rates 0.9 / 0.7 / 0.5 / 0.25 on DeiT-T/S/B) whose file names and accuracies could
not be read here (unverified), so none is listed. The mapping was checked against the official code only, not
against a released file.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from . import tokens
from .evit import KEEP_RATE_GRID
from .registry import register_method
from . import tokenreduction_layout
from .params import KeepRate, Locations, PatchCounts, Rounds
from .staged import Reduced, StagedReduction

MedoidCost = Literal["all_tokens", "members"]


def kmedoids(x: Tensor, weights: Tensor, k: int, iterations: int, medoid_cost: MedoidCost = "all_tokens") -> Tensor:
    """Medoid positions ``[B, k]`` of ``x`` ``[B, P, C]`` under token weights ``weights`` ``[B, P]`` (see the
    module docstring for the rule). Runs without gradients."""
    with torch.no_grad():
        x, weights = x.float(), weights.float()
        batch, count, _ = x.shape
        dist = torch.cdist(x, x)  # [B, P, P]
        medoids = weights.topk(k, dim=1).indices
        if medoid_cost == "all_tokens":
            cost_all = (weights * dist.sum(dim=-1))[:, :, None].expand(-1, -1, k)  # [B, P, k]
        for _ in range(iterations):
            to_medoid = dist.gather(2, medoids[:, None, :].expand(-1, count, -1))  # [B, P, k]
            members = nn.functional.one_hot(to_medoid.argmin(dim=-1), k).bool()  # [B, P, k]
            if medoid_cost == "all_tokens":
                cost = cost_all
            else:
                cost = weights[:, :, None] * (dist @ members.float())
            moved = cost.masked_fill(~members, float("inf")).argmin(dim=1)  # [B, k], first on ties
            medoids = torch.where(members.any(dim=1), moved, medoids)
    return medoids


class KMedoids(StagedReduction):
    """K-Medoids clustering of the patch tokens at each location; see the module docstring."""

    needs_previous_attention = True

    def __init__(self, vit: nn.Module, keep_rate: float, locations: Sequence[int],
                 patch_counts: Optional[Sequence[int]], iterations: int, medoid_cost: MedoidCost) -> None:
        """Defaults and ranges live in :func:`build_kmedoids`; ``iterations``: assignment/update rounds, in
        [1, 100] (``methods.params.Rounds``)."""
        super().__init__(vit, keep_rate, locations, patch_counts)
        self.iterations = iterations
        self.medoid_cost = medoid_cost

    def reduce(self, stage: int, patches: Tensor, attention: Optional[Tensor]) -> Reduced:
        medoids = kmedoids(patches, attention, self.patch_counts[stage], self.iterations, self.medoid_cost)
        return Reduced(tokens.gather_tokens(patches, medoids), identity=medoids)

    def extra_macs(self, token_counts: Tensor) -> Tensor:
        """Per image and stage, ``P^2 * C`` (distances), plus ``iterations * P^2 * K`` with ``members``."""
        macs = torch.zeros(token_counts.shape[0], dtype=torch.float64, device=token_counts.device)
        for entering, kept in self.stage_sizes(token_counts):
            macs += entering ** 2 * self.embed_dim
            if self.medoid_cost == "members":
                macs += self.iterations * entering ** 2 * kept
        return macs


@register_method("kmedoids", family="clustering", inference_knob="keep_rate",
                 knob_fixed_by=("patch_counts",), tradeoff_values=KEEP_RATE_GRID,
                 stronger={"keep_rate": 0.5})
def build_kmedoids(vit: nn.Module, keep_rate: KeepRate = 0.7, locations: Locations = (3, 6, 9),
                   patch_counts: PatchCounts = None, iterations: Rounds = 3,
                   medoid_cost: MedoidCost = "all_tokens") -> KMedoids:
    """K-Medoids: cluster the patches before blocks 3/6/9, keep the medoids (attention-weighted, 3 rounds)."""
    return KMedoids(vit, keep_rate=keep_rate, locations=locations, patch_counts=patch_counts,
                    iterations=iterations, medoid_cost=medoid_cost)


# ------------------------------------------------------------------------------- the official checkpoint layout
def _refuse_equal_weight(args) -> Optional[str]:
    if not getattr(args, "equal_weight", False):
        return None
    return ("it was trained with args.equal_weight=True (farthest-point initial medoids), which is not "
            "implemented here; valid: a file trained with equal_weight=False (the official default)")


tokenreduction_layout.register("kmedoids", "kmedoids", [],
                               options={"cluster_iters": "iterations"},
                               counts_fixed=False, refuse=_refuse_equal_weight)
