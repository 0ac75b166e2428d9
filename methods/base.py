"""The method interface: ``TokenReducer`` (what every token-reduction method implements) and ``MethodOutput``.

A method wraps a timm DeiT as ``self.vit`` (so its state-dict keys are timm's under ``vit.``, and plain DeiT
weights load into ``method.vit`` strictly) and adds only its own modules. The harness talks to methods through
this class alone and never asks for a method's name:

- ``forward(images)`` returns a :class:`MethodOutput`. In ``train()`` mode methods may mask tokens (so the
  batch stays rectangular and differentiable); in ``eval()`` mode they physically remove them.
- ``loss_terms(out, targets, teacher_out)`` returns the method's extra, already weighted, loss terms by name.
  A method that sets ``needs_teacher = True`` gets the frozen dense teacher's output.
- ``param_groups(weight_decay)`` gives optimizer parameter groups (``lr_scale`` is honoured by timm's
  schedulers), so a method can train its own modules at a different learning rate.
- ``after_optimizer_step()`` runs after every optimizer step of the fine-tune (LTMP clamps its thresholds to
  [0, 1] there, as its official loop does); a no-op by default.
- ``extra_macs(token_counts)`` gives the per-image MACs of the method's own modules (predictors, matching).
- ``alt_token_counts(images, out)`` gives token counts under other FLOP conventions (A-ViT's ``official``). It
  is a hook that measurement calls explicitly, because it may cost another pass: ``forward`` never runs it and
  an output never holds its input batch.
- ``runtime`` (:class:`methods.ragged_attention.Runtime`) says how methods with per-image token counts execute at
  inference (the ragged attention backend); the harness sets it from ``eval.ragged_backend``.
- ``missing_state(state)`` says why the method cannot run on a saved state dict (threshold ToMe without
  calibrated thresholds, or calibrated for another r), so the plan refuses before work; ``calibrate(batches)``
  calibrates a method from data (``experiments/calibrate.py``), ``calibration_error()`` says beforehand why it
  cannot.
- ``record_info()`` gives JSON-able facts about the built method that a results record keeps (A-ViT's prior
  target), so analysis reads them instead of re-deriving them.

Typed outputs: :class:`MethodOutput` has named fields for what the harness shares across methods (logits,
counts, depths, ``final_tokens``). What only the method itself reads back (its loss inputs and diagnostics)
travels in ``state``, a small dataclass each method defines next to its code (``AdaViTState``,
``DynamicViTState``, ``ToMeState``); a method without any leaves it ``None``. Nothing is looked up by string.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn
from timm.optim import param_groups_weight_decay

from . import backbone, ragged_attention
from .params import ParamError


@dataclass
class MethodOutput:
    """What one forward pass of a method returns; nothing is left on module attributes.

    Attributes:
        logits: ``[B, classes]``.
        token_counts: int ``[B, depth, 2]``: per image, the tokens each block's attention (``[..., 0]``) and
            MLP (``[..., 1]``) ran on, CLS and any fused token included. FLOPs are computed from these.
        patch_depth: int ``[B, num_patches]``: per original patch, the number of blocks whose attention still
            saw it (as itself, not merged or fused away). Depth maps, survival curves and kept-token IoU
            (kept at block l means ``patch_depth > l``) are built on it.
        final_tokens: ``[B, K, C]`` the output tokens after the final norm (CLS first), for methods that keep a
            token sequence to the end (DynamicViT's token distillation reads the teacher's and its own);
            ``None`` where there is none (A-ViT's output is the CLS token's halting mix).
        state: the method's own typed record of the pass (its loss inputs, diagnostics), e.g.
            :class:`methods.adavit.AdaViTState`; ``None`` for methods without one. Only the method that made
            it reads it back, so its type is the method's business.
    """

    logits: Tensor
    token_counts: Tensor
    patch_depth: Tensor
    final_tokens: Optional[Tensor] = None
    state: Any = None


class TokenReducer(nn.Module):
    """Base class of all methods: holds the timm ViT as ``self.vit`` and defines the interface above."""

    needs_teacher: ClassVar[bool] = False

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        backbone.check_supported(vit)
        self.vit = vit
        self.runtime = ragged_attention.Runtime()

    # Architecture facts every method needs.
    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def num_patches(self) -> int:
        return self.vit.patch_embed.num_patches

    @property
    def num_tokens(self) -> int:
        """Tokens entering the first block: the patches plus CLS."""
        return self.num_patches + self.vit.num_prefix_tokens

    def forward(self, images: Tensor) -> MethodOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss_terms(
        self, out: MethodOutput, targets: Tensor, teacher_out: Optional[MethodOutput] = None
    ) -> dict[str, Tensor]:
        """Extra loss terms, each already multiplied by its weight; the engine adds the task loss."""
        return {}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups: no weight decay on biases, norms, position embedding and CLS token."""
        skip = {f"vit.{name}" for name in self.vit.no_weight_decay()}
        return param_groups_weight_decay(self, weight_decay, no_weight_decay_list=skip)

    def after_optimizer_step(self) -> None:
        """Called by the training engine after every optimizer step (e.g. to project parameters back into their
        valid range); nothing by default."""

    def extra_macs(self, token_counts: Tensor) -> Tensor:
        """Per-image MACs of the method's own modules, ``[B]``; zero for methods without any."""
        return torch.zeros(token_counts.shape[0], dtype=torch.float64, device=token_counts.device)

    def alt_token_counts(self, images: Tensor, out: MethodOutput) -> dict[str, Tensor]:
        """Counts ``[B, depth, 2]`` of ``out`` under other FLOP conventions, by name; ``images`` is the batch
        ``out`` was computed from (a method may re-run part of it). Empty for methods with one convention.
        Measurement calls it explicitly, outside any timed region."""
        return {}

    def missing_state(self, state: Optional[Mapping[str, Tensor]]) -> Optional[str]:
        """Why the method cannot run on the saved state dict ``state`` of this method (``None``: backbone weights
        only, or none), as one line naming how to make them; ``None`` when it can. For state a method cannot
        initialise itself (calibrated thresholds, and what they were calibrated for); checked before work by the
        plan and the checkpoint loader."""
        return None

    def calibration_error(self) -> Optional[str]:
        """``None`` when :meth:`calibrate` can run on this method as built, else why not (one line)."""
        return f"{type(self).__name__} has no calibration step; valid: tome with method.params.r"

    def calibrate(self, batches: Iterable[Tensor]) -> tuple["TokenReducer", dict[str, Any]]:
        """Calibrate from image batches (no gradients): returns the calibrated method (sharing this backbone) and
        the factory parameters that build it, for its checkpoint. Methods without calibration raise."""
        raise ParamError(self.calibration_error())

    def record_info(self) -> dict[str, Any]:
        """JSON-able facts about the built method that analysis needs (stored as a record's ``method_info``)."""
        return {}

    def full_counts(self, batch: int, device: torch.device) -> Tensor:
        """Token counts of a dense pass: every block runs attention and MLP on all tokens."""
        return torch.full((batch, self.depth, 2), self.num_tokens, dtype=torch.long, device=device)
