"""Backbone creation and weight loading: timm ``create_model`` plus local ``.pth``/``.safetensors`` checkpoints.

Also registers the embedded model ``deit_digits_patch4_32`` with timm's registry: a 12-block DeiT sized for
the bundled digits data (32 px images, 4 px patches, an 8x8 token grid plus CLS). Twelve blocks keep A-ViT's
depth-based settings (target depth 8 of 12) meaningful; the width keeps a CPU epoch to seconds.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
import timm
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

EMBEDDED_MODEL = "deit_digits_patch4_32"

default_cfgs = generate_default_cfgs({
    f"{EMBEDDED_MODEL}.untrained": {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": None, "crop_pct": 1.0,
        "interpolation": "bilinear", "fixed_input_size": True, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj", "classifier": "head",
    },
})


@register_model
def deit_digits_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Embedded DeiT for the digits data: 32 px, patch 4, width 64, 12 blocks, 2 heads."""
    if pretrained:
        raise ValueError(f"{EMBEDDED_MODEL} has no pretrained weights; the suite trains and caches its baseline")
    model_args = dict(img_size=32, patch_size=4, embed_dim=64, depth=12, num_heads=2, num_classes=10)
    model = build_model_with_cfg(VisionTransformer, EMBEDDED_MODEL, pretrained, **dict(model_args, **kwargs))
    with torch.no_grad():
        grid = list(model.patch_embed.grid_size)
        model.pos_embed[0, 1:] = build_sincos2d_pos_embed(grid, dim=model.embed_dim)
        model.pos_embed[0, 0] = 0.0
    return model


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.pth``/``.pt`` (plain state dict, DeiT's ``{'model': ...}`` or a suite checkpoint) or
    ``.safetensors`` file into a dict. Raises :class:`CheckpointError` on a missing or corrupt file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint: file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return {"model": load_file(str(path))}
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and safetensors raise many types for a damaged file
        raise CheckpointError(f"model.checkpoint: cannot read {path}: {type(error).__name__}: {error}") from error
    if not isinstance(content, dict):
        raise CheckpointError(f"model.checkpoint: {path} holds a {type(content).__name__}, not a state dict")
    for key in ("model", "state_dict", "model_ema"):
        if key in content and isinstance(content[key], dict):
            return content if key == "model" else {**content, "model": content[key]}
    return {"model": content}


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load all-or-nothing: any missing, unexpected or misshapen key raises, naming them, before any copy."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    misshapen = sorted(
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or misshapen:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "") or "none"

        raise CheckpointError(
            f"{source} does not match the model: missing keys: {show(missing)}; unexpected keys: "
            f"{show(unexpected)}; shape mismatches: {show(misshapen)}"
        )
    module.load_state_dict(state_dict, strict=True)


def create_backbone(
    name: str,
    num_classes: int,
    img_size: Optional[int] = None,
    pretrained: bool = False,
    drop_path_rate: float = 0.0,
    **kwargs,
) -> VisionTransformer:
    """``timm.create_model`` with the suite's checks: unknown names list the suite's models, and the image
    size must be a multiple of the patch size."""
    if name not in timm.list_models():
        raise ValueError(f"model.name: unknown timm model {name!r}; e.g. deit_tiny_patch16_224, {EMBEDDED_MODEL}")
    extra = {"img_size": img_size} if img_size else {}
    model = timm.create_model(
        name, pretrained=pretrained, num_classes=num_classes, drop_path_rate=drop_path_rate, **extra, **kwargs
    )
    return model


def check_img_size(img_size: int, patch_size: int) -> None:
    if img_size <= 0 or img_size % patch_size:
        raise ValueError(f"data.img_size={img_size} is not a positive multiple of the patch size {patch_size}")
