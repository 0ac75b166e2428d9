"""``evit``: keep the attentive tokens, fuse the inattentive ones. No new parameters, no extra loss.

Paper: Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022 (https://arxiv.org/abs/2202.07800). Official code: https://github.com/youweiliang/evit
(``evit.py``: ``Attention.forward`` and ``Block.forward``).

At each block in ``locations`` (default 3, 6, 9), *between attention and the MLP*, the block keeps the
``ceil(keep_rate * (N - 1))`` non-CLS tokens with the highest CLS attention (that block's softmax row of the CLS
query, averaged over heads); N counts the tokens the block's attention ran on. With ``fuse`` the dropped tokens
are summed into one extra token, weighted by their CLS attention as it is (not renormalised), and appended
after the kept tokens. The MLP then runs on the reduced sequence, so ``token_counts`` differ between the
attention (``[..., 0]``) and the MLP (``[..., 1]``) of a pruning block.

The fused token of an earlier stage is an ordinary token at later stages, as in the official code: it counts in
``N - 1``, it is scored by its own CLS attention, and it is either kept or dropped and summed into the new fused
token. DeiT-S at 224 px, ``keep_rate=0.7``: the MLP of blocks 3 / 6 / 9 and the blocks after them run on
140 / 100 / 72 tokens with fusion and 139 / 98 / 69 without. In ``patch_depth`` a dropped patch stops counting
at the block that dropped it (depth ``l + 1``); the fused token stands for no patch.

Train mode runs the same physical removal (differentiable through the kept tokens and, with fusion, through
the attention weights), so fine-tuning works; evaluating a dense checkpoint needs no training.

Where we deviate from the official code:

- The keep-rate warm-up of the official from-scratch recipe (``--shrink_start_epoch``, ``--shrink_epochs``) is
  not implemented: the keep rate is constant. Sweep ``keep_rate`` at inference instead.
- The official ``Attention`` reads the CLS row after attention dropout; we read it before. DeiT has no
  attention dropout, so both agree there.

:class:`AttentionPruning` is the engine shared with ``topk`` and ``random`` (``methods/topk.py``), so
``topk`` with ``schedule=evit`` equals ``evit`` with ``fuse=false`` by construction.

Official checkpoints (``model.checkpoint``, layout registered with ``methods.official``). The official ``EViT``
model (``evit.py``) adds no parameter to timm's DeiT: its state dict has timm's DeiT keys, which map to
``vit.`` + key. ``main.py`` saves ``{'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler',
'args'}`` and evaluates ``checkpoint['model']`` (``--resume``). A file with EViT's saved ``args``
(``base_keep_rate`` and ``fuse_token``) is recognised, refused for another method, and refused when its
``args.fuse_token`` differs from ``fuse`` or its ``args.drop_loc`` from ``locations``; ``keep_rate`` is the
inference knob and may differ from ``args.base_keep_rate`` (a trade-off sweep of one checkpoint). A file holding
the ``model`` entry alone cannot be told from a DeiT checkpoint and loads into ``vit`` like one. Released
(README, EViT-DeiT-S, ImageNet-1k top-1 and MACs as the README states; Google Drive links, no file names):

- with fusion (``fuse=true``), keep rate 0.9 / 0.8 / 0.7 / 0.6 / 0.5: 79.8 / 79.8 / 79.5 / 78.9 / 78.5 %,
  4.0 / 3.5 / 3.0 / 2.6 / 2.3 GMACs (Drive ids ``1CmROmlLV-7nyYY-Bhph8_5ut3wFwqvny``,
  ``1BTJyIe0zVK3zYXz3BzIlSC4YZCnZu7cJ``, ``1FfvdEBss9f8gexjqEY8vOSUQe_8qwYuL``,
  ``1D1m067jDbyG0g2UjyBMaJ4NTT2Ad8vrv``, ``1-nyxAlRWjD2icbgj3Y3YWcCmYj9sTgfD``);
- without fusion (``fuse=false``), keep rate 0.9 / 0.8 / 0.7 / 0.6 / 0.5: 79.9 / 79.7 / 79.4 / 79.1 / 78.4 %,
  the same MACs (Drive ids ``1tSaPLged8ED2RTiN5ttSmeTNIw1aNNwV``, ``1zdFbHk-gOw_Wiid5_Z8NFcBa1HMI-JF-``,
  ``1VCZGphW34rFWZDXOoF7XO4EJfRLZ-YB8``, ``1okYcKryyD6FFPG9v5r40R28SRNfVZ5X0``,
  ``1qsPeLN5ytLO8pM7lUuj5bi6pyMhjiSJO``).

Evaluate one: ``python experiments/run.py method=evit model=deit_small method.params.keep_rate=0.7
model.checkpoint=PATH.pth data=imagefolder data.root=/datasets/imagenet experiment.train=false``. The mapping
was checked against the official code (key names, shapes, wrappers), not against a released file: none can be
downloaded here.
"""
from __future__ import annotations

import ast
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import backbone, official, params, tokens
from .base import MethodOutput, TokenReducer
from .params import KeepRate, Locations
from .registry import register_method


class AttentionPruning(TokenReducer):
    """Prune between attention and MLP: keep the highest-scoring non-CLS tokens, optionally fuse the rest.

    Subclasses say how many non-CLS tokens each block keeps (:meth:`keep_plan`) and may replace the score
    (:meth:`token_scores`, the CLS attention by default).
    """

    def __init__(self, vit: nn.Module, fuse: bool) -> None:
        super().__init__(vit)
        self.fuse = bool(fuse)

    def keep_plan(self, num_tokens: int) -> list[Optional[int]]:
        """Per block, the non-CLS tokens kept after its attention (``None``: no pruning in that block)."""
        raise NotImplementedError

    def token_scores(self, cls_attn: Tensor) -> Tensor:
        """Score of each non-CLS token ``[B, N - 1]`` from its CLS attention; the highest are kept."""
        return cls_attn

    def forward(self, images: Tensor) -> MethodOutput:
        x = backbone.embed(self.vit, images)
        batch, num_tokens, _ = x.shape
        patches = num_tokens - 1
        ids, depth = tokens.track_patches(batch, num_tokens, self.depth, x.device)  # CLS carries `patches`
        # the ids of the non-CLS tokens only, as each stage reads them; a fused token carries CLS's `patches` too
        rest_ids, no_patch = ids[:, 1:], ids[:, :1]
        counts = []
        for index, (block, keep) in enumerate(zip(self.vit.blocks, self.keep_plan(num_tokens))):
            attn_tokens = x.shape[1]
            prune = keep is not None and keep < attn_tokens - 1
            x, heads = backbone.attn_residual(block, x)
            if prune:
                x, rest_ids, dropped = self._prune(x, backbone.cls_attention(block.attn, heads), rest_ids, no_patch,
                                                   keep)
                depth.scatter_(1, dropped, index + 1)
            counts.append((attn_tokens, x.shape[1]))
            x = backbone.mlp_residual(block, x)
        token_counts = torch.tensor(counts, dtype=torch.long, device=x.device).expand(batch, -1, -1).clone()
        return MethodOutput(backbone.head(self.vit, x), token_counts, depth[:, :patches],
                            final_tokens=self.vit.norm(x))

    def _prune(self, x: Tensor, cls_attn: Tensor, rest_ids: Tensor, no_patch: Tensor,
               keep: int) -> tuple[Tensor, Tensor, Tensor]:
        """Keep CLS and ``keep`` tokens (plus the fused token); return the tokens, the ids of the non-CLS ones
        (``no_patch`` for the fused token) and the dropped ids."""
        attn_rest, rest = cls_attn[:, 1:], x[:, 1:]
        kept, dropped = tokens.topk_patches(self.token_scores(attn_rest), keep)
        parts = [x[:, :1], tokens.gather_tokens(rest, kept)]
        kept_ids = rest_ids.gather(1, kept)
        if self.fuse:
            parts.append(tokens.fuse_tokens(tokens.gather_tokens(rest, dropped), attn_rest.gather(1, dropped)))
            kept_ids = torch.cat([kept_ids, no_patch], dim=1)  # the fused token stands for no patch
        return torch.cat(parts, dim=1), kept_ids, rest_ids.gather(1, dropped)


class EViT(AttentionPruning):
    """EViT; see the module docstring."""

    def __init__(self, vit: nn.Module, keep_rate: float, locations: Sequence[int], fuse: bool) -> None:
        """Defaults and ranges live in :func:`build_evit`.

        Args:
            keep_rate: fraction in (0, 1] of the current non-CLS tokens kept at each location (rounded up).
            locations: strictly increasing block indices in [0, depth - 1]; pruning runs inside these blocks,
                between attention and MLP.
            fuse: sum the dropped tokens into one extra token weighted by their CLS attention (``false``:
                plain top-k pruning, i.e. ``topk`` with ``schedule=evit``).
        """
        super().__init__(vit, fuse=fuse)
        self.keep_rate = float(keep_rate)
        self.locations = params.check_locations(locations, self.depth)

    def keep_plan(self, num_tokens: int) -> list[Optional[int]]:
        return evit_plan(num_tokens, self.depth, self.keep_rate, self.locations, self.fuse)


def evit_plan(num_tokens: int, depth: int, keep_rate: float, locations: Sequence[int],
              fuse: bool) -> list[Optional[int]]:
    """EViT's counts: at each location keep ``ceil(keep_rate * (N - 1))`` of the current non-CLS tokens."""
    plan: list[Optional[int]] = [None] * depth
    current = num_tokens
    for location in locations:
        keep = tokens.kept_patch_count(current - 1, keep_rate, mode="ceil")
        if keep < current - 1:
            plan[location] = keep
            current = 1 + keep + int(fuse)
    return plan


KEEP_RATE_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # default trade-off grid of keep_rate (also topk, random)


@register_method("evit", family="pruning", inference_knob="keep_rate", tradeoff_values=KEEP_RATE_GRID,
                 stronger={"keep_rate": 0.5})
def build_evit(vit: nn.Module, keep_rate: KeepRate = 0.7, locations: Locations = (3, 6, 9),
               fuse: bool = True) -> EViT:
    """EViT: keep the tokens with the highest CLS attention inside blocks 3/6/9, fuse the rest into one."""
    return EViT(vit, keep_rate=keep_rate, locations=locations, fuse=fuse)


# ------------------------------------------------------------------------------- the official checkpoint layout
def _is_official_evit(content) -> bool:
    """EViT's ``main.py`` saves its argparse options, which carry ``base_keep_rate`` and ``fuse_token``."""
    args = content.get("args")
    return hasattr(args, "base_keep_rate") and hasattr(args, "fuse_token")


def _check_official_structure(method: EViT, content) -> Optional[str]:
    """Fusion and the pruning blocks are the trained structure; the keep rate is the inference knob."""
    args = content["args"]
    if bool(args.fuse_token) != method.fuse:
        return (f"it was trained with args.fuse_token={bool(args.fuse_token)}, but method.params.fuse="
                f"{str(method.fuse).lower()}; valid: method.params.fuse={str(bool(args.fuse_token)).lower()}")
    saved = getattr(args, "drop_loc", None)  # a string such as "(3, 6, 9)" in the official options
    try:
        trained = None if saved is None else tuple(ast.literal_eval(str(saved)))
    except (ValueError, SyntaxError, TypeError):
        trained = None
    if trained is not None and trained != tuple(method.locations):
        return (f"it was trained with args.drop_loc={saved!r}, but method.params.locations="
                f"{list(method.locations)}; valid: method.params.locations={list(trained)}")
    return None


def _official_settings(content) -> dict:
    """Keep rate, fusion and (when saved) the pruning blocks of EViT's saved args."""
    args = content["args"]
    found = {"keep_rate": float(args.base_keep_rate), "fuse": bool(args.fuse_token)}
    try:
        found["locations"] = list(ast.literal_eval(str(args.drop_loc)))
    except (AttributeError, ValueError, SyntaxError, TypeError):
        pass
    return found


official.register_layout(official.OfficialLayout(
    method="evit", code="youweiliang/evit evit.py", detect=_is_official_evit, to_ours=lambda key: f"vit.{key}",
    to_official=lambda key: key[len("vit."):] if key.startswith("vit.") else f"(none: {key} is ours only)",
    check=_check_official_structure, settings=_official_settings))
