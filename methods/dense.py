"""``dense``: the unreduced DeiT baseline. Every block runs on every token; it defines the 100% cost."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import backbone
from .base import MethodOutput, TokenReducer
from .registry import register_method


class Dense(TokenReducer):
    """The timm forward, expressed through the shared backbone pieces (equal to ``vit(images)``)."""

    def forward(self, images: Tensor) -> MethodOutput:
        x = backbone.embed(self.vit, images)
        for block in self.vit.blocks:
            x, _ = backbone.attn_residual(block, x)
            x = backbone.mlp_residual(block, x)
        batch = images.shape[0]
        patch_depth = torch.full((batch, self.num_patches), self.depth, dtype=torch.long, device=x.device)
        return MethodOutput(backbone.head(self.vit, x), self.full_counts(batch, x.device), patch_depth,
                            final_tokens=self.vit.norm(x))  # normed, as DynamicViT's token distillation reads them


@register_method("dense", family="none")
def build_dense(vit: nn.Module) -> Dense:
    """The unreduced DeiT: every block on every token, the 100% cost every ratio refers to."""
    return Dense(vit)
