"""``heuristic``: a fixed radial pruning mask on the patch grid, from block 3 to block 9; no parameters.

From Haurum et al., "Which Tokens to Use? Investigating Token Reduction in Vision Transformers", ICCVW 2023
(https://github.com/JoakimHaurum/TokenReduction, ``models/heuristic.py``): the centre-distance baseline. It keeps
the patches near the centre of the image and drops the others, the same ones for every image: it is not input
dependent and learns nothing (a pruning method, not a merging one). It runs on the engine of
:mod:`methods.staged`: each stage acts at the start of its block, before the attention, on the patch tokens (CLS
set aside and put back in front).

**Distances.** On the ``g x g`` patch grid (``g = sqrt(P)``: 14 on DeiT at 224 px, 8 on the embedded
``deit_digits_patch4_32``) both coordinates are ``linspace(-g/2, g/2, g)`` (official 14: ``linspace(-7, 7, 14)``)
and a patch's distance from the centre is ``|x| + |y|`` (``pattern=l1``, the official default), ``sqrt(x^2 + y^2)``
(``l2``) or ``max(|x|, |y|)`` (``linf``), computed in float32 exactly as the official code does. A stage with
radius ``r`` keeps the patches with distance ``<= r``, in grid order. ``z_max`` is the largest distance (a
corner's).

**Default: contiguous mode** (``contiguous=true``, the official default). Every block from ``min(locations)`` to
``max(locations)`` reduces (blocks 3, 4, ..., 9 by default), not just the ``locations``, and **the keep rate is
ignored**: the counts follow from the grid alone. The radii are ``linspace(z_max, min_radius, end - start + 3)``
(``min_radius`` official 1.0), front-padded with ``max(start - 1, 0)`` copies of ``z_max`` (and back-padded with
its last entry, never read: the masks are set only at ``start .. end``); block ``b`` takes entry ``b`` of the padded
list, so blocks ``start .. end`` take the inner entries ``1 .. end - start + 1`` of the linspace:
neither ``z_max`` nor ``min_radius`` itself is ever used. Blocks after ``end`` keep block ``end``'s tokens. L1 on
DeiT's 14 x 14 grid: radii 12.375, 10.75, 9.125, 7.5, 5.875, 4.25, 2.625 keep 184, 156, 136, 84, 60, 24, 12 patch
tokens at blocks 3 .. 9; on the embedded 8 x 8 grid 60, 52, 40, 24, 24, 12, 4.

**contiguous=false** (official ``--not_contiguous``): only the ``locations`` reduce, and stage ``i`` takes the
radius, among the distinct distances of the grid, whose kept count is closest to ``int(P * keep_rate ** (i + 1))``
(the family's cumulative rule; a rate whose count is 0 is refused). Ties go to the smaller radius (the official
search runs over the distances in ascending order and moves on only for a strictly closer count).
``min_radius`` is not used in this mode.

**Mechanics.** The official code keeps every token in the tensor and masks attention (queries and keys, with
``-finfo.max``). Its radii never grow with depth, so the masks are nested and no kept token ever attends to a
masked one: removing the masked tokens physically gives the official CLS output, at the reduced cost. That is
what this module does (a gather at the start of the block). The counts are the same for every image and
``train()`` runs the very path ``eval()`` runs.

**Learned:** nothing. Registered off the shelf (``finetune=False``); ``experiment.train=true`` fine-tunes the
backbone (all of it at the full learning rate: there are no own modules).

**patch_depth:** a pruned patch leaves at the stage that drops it (depth = that block's index: the blocks
before it saw it); a kept patch stays itself (depth = the model's depth).

**Inference knob: none.** In the default contiguous mode the keep rate changes nothing, so a keep-rate sweep
would be a flat curve labelled a trade-off. ``min_radius`` does change the compute in that mode, but only the
last radii move and a sweep would be a new, unofficial curve; ``contiguous=false`` with a keep rate is its own
configuration (its own records), not a knob of the default.

**extra_macs:** zero (a fixed index gather; no matmul).

**Quirks of the official code kept:**

- contiguous mode (the default) ignores ``keep_rate``;
- float32 distances: equal distances can differ in the last bit, which splits some rings of equal distance.
  L1 on 14 x 14 has 16 distinct float32 distances, not 13, so not-contiguous mode can keep part of a ring (keep
  rate 0.7: targets 137, 96, 67 -> 136, 92, 68 patches, where exact rings would give 136, 84, 60). The default
  contiguous radii stay at least 0.003 away from every distance (all patterns, DeiT's and the embedded grid);
- ``min_radius=0`` stands for the distance of patch ``[g // 2, g // 2]`` (the official fallback for
  ``min_radius <= 0``; with an even ``g`` it is the smallest distance);
- with ``min(locations) = 0`` the front padding is empty, so block ``b`` takes linspace entry ``b``: block 0
  keeps everything and the radii run one step larger than with a later start.

**Deviations:** ``-g/2`` is a true half: the official ``-P//2`` floors, which for an odd grid shifts the centre
by half a patch (even grids, DeiT's and the embedded one, are the same). A non-square or non-2-D patch grid (a video ViT's 3-D one too) is
refused (the official code silently takes ``int(sqrt(P))``); so is a plan that keeps no patch token (a small
``min_radius`` on a long range; the error gives the smallest valid value), and, in not-contiguous mode, a keep rate
whose target ``int(P * keep_rate ** (i + 1))`` is 0 (the official search would keep the innermost ring; refused
as in the rest of the family). ``keep_rate`` is range-checked in contiguous mode too, though unused there.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal, Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from . import backbone, params, tokens
from .params import KeepRate, Locations, ParamError
from .registry import register_method
from .staged import Reduced, StagedReduction, stage_counts

Pattern = Literal["l1", "l2", "linf"]
# in patches from the grid centre: at most the side of the largest grid (a 16384 px image in 16 px patches)
Radius = Annotated[float, Field(ge=0, le=1024)]


def grid_side(vit: nn.Module) -> int:
    """The side ``g`` of the model's square 2-D patch grid; anything else is refused."""
    embed = vit.patch_embed
    grid = tuple(getattr(embed, "grid_size", None) or ())
    if len(grid) == 3:  # a video ViT's (time, rows, columns): the official rule has no time axis
        raise ValueError(f"heuristic is defined on a square 2-D image grid (distance from the image centre); this "
                         f"model's token grid is 3-D, {' x '.join(map(str, grid))} (time x rows x columns), and "
                         "the suite does not invent a space-time radius for it; valid: an image model (e.g. "
                         "model=deit_digits) or another method")
    if len(grid) != 2 or grid[0] != grid[1]:
        raise ValueError(f"heuristic needs a square 2-D patch grid, but this model's grid is "
                         f"{' x '.join(map(str, grid)) or 'unknown'} (img_size {getattr(embed, 'img_size', None)}, "
                         f"patch_size {getattr(embed, 'patch_size', None)}); use a square data.img_size")
    return int(grid[0])


def centre_distances(side: int, pattern: str) -> Tensor:
    """Float32 distance of each patch from the grid centre, ``[side * side]`` in token (row-major) order."""
    coords = torch.linspace(-side / 2, side / 2, side, dtype=torch.float32, device="cpu")
    x, y = torch.meshgrid(coords, coords, indexing="ij")
    if pattern == "l1":
        z = x.abs() + y.abs()
    elif pattern == "l2":
        z = torch.sqrt(x * x + y * y)
    else:
        z = torch.maximum(x.abs(), y.abs())
    return z.reshape(-1)


def contiguous_radii(z: Tensor, side: int, start: int, end: int, min_radius: float) -> Tensor:
    """Radii of blocks ``start .. end`` in contiguous mode (float32 ``[end - start + 1]``), see the docstring."""
    if min_radius <= 0:  # the official fallback
        min_radius = float(z.view(side, side)[side // 2, side // 2])
    line = torch.linspace(float(z.max()), min_radius, end - start + 3, dtype=torch.float32, device="cpu")
    pad = max(start - 1, 0)  # front padding with z_max: block b takes entry b - pad of the linspace
    return line[start - pad:end - pad + 1]


def closest_radii(z: Tensor, targets: Sequence[int]) -> Tensor:
    """Per target count, the distinct distance whose kept count (``z <= d``) is closest; ties: the smaller."""
    distances = torch.unique(z)  # ascending
    within = (z[None, :] <= distances[:, None]).sum(dim=1).tolist()
    chosen = [min(range(len(within)), key=lambda i: abs(within[i] - target)) for target in targets]  # first min
    return distances[chosen]


class Heuristic(StagedReduction):
    """Fixed centre-distance pruning of the patch grid; see the module docstring."""

    def __init__(self, vit: nn.Module, keep_rate: float, locations: Sequence[int], pattern: Pattern,
                 contiguous: bool, min_radius: float) -> None:
        """Defaults and ranges live in :func:`build_heuristic`.

        Args:
            keep_rate: in (0, 1]; used only with ``contiguous=False``.
            locations: strictly increasing block indices; with ``contiguous`` only their min and max count.
            pattern: ``l1``, ``l2`` or ``linf`` distance from the grid centre.
            contiguous: reduce at every block from min to max of ``locations`` on a fixed radius schedule.
            min_radius: in [0, 1024] (0: the official fallback); the end of the contiguous radius schedule.
        """
        backbone.check_supported(vit)
        radius = float(min_radius)
        rate = float(keep_rate)
        given = params.check_locations(locations, len(vit.blocks))
        side = grid_side(vit)
        z = centre_distances(side, pattern)
        if contiguous:
            blocks = list(range(given[0], given[-1] + 1))
            radii = contiguous_radii(z, side, given[0], given[-1], radius)
        else:
            blocks = given
            radii = closest_radii(z, stage_counts(rate, None, side * side, len(given)))
        kept = [torch.nonzero(z <= r).squeeze(1) for r in radii]  # grid positions, ascending
        if kept[-1].numel() == 0:
            raise ParamError(self._empty_plan_message(min_radius, z, given, blocks, radii, side, pattern))
        super().__init__(vit, rate, blocks, patch_counts=[k.numel() for k in kept])
        self.keep_rate = None if contiguous else rate  # the contiguous mode ignores it
        self.pattern, self.contiguous, self.min_radius = pattern, contiguous, radius
        self.radii = [float(r) for r in radii]
        previous = torch.arange(side * side, device="cpu")
        for stage, positions in enumerate(kept):
            if not bool(torch.isin(positions, previous).all()):  # radii never grow: the sets are nested
                raise RuntimeError(f"heuristic: stage {stage} keeps patches an earlier stage dropped")
            # positions among the patches entering the stage, which are the previous stage's, in grid order
            self.register_buffer(f"keep_{stage}", torch.searchsorted(previous, positions), persistent=False)
            previous = positions

    @staticmethod
    def _empty_plan_message(min_radius, z: Tensor, given: list[int], blocks: list[int], radii: Tensor, side: int,
                            pattern: str) -> str:
        """Contiguous mode (not-contiguous keeps the smallest ring at least): the smallest valid ``min_radius``."""
        start, end = given[0], given[-1]
        z_max, z_min = float(z.max()), float(z.min())
        steps, entry = end - start + 3, end - max(start - 1, 0)  # entry >= 1 here: entry 0 is z_max
        bound = math.ceil((z_max - (z_max - z_min) * (steps - 1) / entry) * 1e4) / 1e4
        return (f"method.params.min_radius={min_radius!r} leaves no patch token at block {blocks[-1]}: its radius "
                f"{float(radii[-1]):.4g} is below the nearest patch's {pattern} distance {z_min:.4g} on the "
                f"{side}x{side} grid (contiguous mode, blocks {start}..{end}); valid: 0 (the official fallback, the "
                f"centre patch's distance) or a min_radius >= {bound}")

    def reduce(self, stage: int, patches: Tensor, attention=None) -> Reduced:
        if patches.shape[1] != self.stage_inputs[stage]:
            raise ValueError(f"heuristic was built for {self.num_patches} patches, but stage {stage} got "
                             f"{patches.shape[1]} instead of {self.stage_inputs[stage]}: the input size changed")
        index = getattr(self, f"keep_{stage}")[None].expand(patches.shape[0], -1)
        return Reduced(tokens.gather_tokens(patches, index), identity=index)

    def extra_macs(self, token_counts: Tensor) -> Tensor:
        """Zero: a fixed gather, no matmul."""
        return torch.zeros(token_counts.shape[0], dtype=torch.float64, device=token_counts.device)

    def record_info(self) -> dict:
        return {**super().record_info(), "radii": list(self.radii)}


@register_method("heuristic", family="pruning", inference_knob=None, finetune=False,
                 stronger={"contiguous": False, "keep_rate": 0.5})  # contiguous mode ignores the keep rate
def build_heuristic(vit: nn.Module, keep_rate: KeepRate = 0.7, locations: Locations = (3, 6, 9),
                    pattern: Pattern = "l1", contiguous: bool = True, min_radius: Radius = 1.0) -> Heuristic:
    """Heuristic: keep the patches nearest the grid centre, a radius shrinking over blocks 3-9 (fixed mask)."""
    return Heuristic(vit, keep_rate=keep_rate, locations=locations, pattern=pattern, contiguous=contiguous,
                     min_radius=min_radius)
