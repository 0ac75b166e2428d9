"""Backbone creation and weight loading: timm ``create_model`` plus local ``.pth``/``.safetensors`` checkpoints.

Also registers the embedded model ``deit_digits_patch4_32`` with timm's registry: a 12-block DeiT sized for
the bundled digits data (32 px images, 4 px patches, an 8x8 token grid plus CLS). Twelve blocks keep A-ViT's
depth-based settings (target depth 8 of 12) meaningful; the width keeps a CPU epoch to seconds.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
import timm
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from .params import ModelSettingError

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


# Globals a trusted-format checkpoint may hold besides tensors: DeiT's ``main.py`` saves its argparse options
# under ``args``. Allow-listed for ``weights_only=True`` loading (the safe unpickler stays on; nothing else passes).
CHECKPOINT_SAFE_GLOBALS = [argparse.Namespace]
VALID_FORMATS = ("valid: a torch.save file (.pth/.pt: a state dict, DeiT's {'model': ...} or a suite checkpoint) "
                 "or a .safetensors file")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.pth``/``.pt`` (plain state dict, DeiT's ``{'model': ...}`` -- also as DeiT's ``main.py`` saves it,
    with ``args`` an ``argparse.Namespace`` -- or a suite checkpoint) or ``.safetensors`` file into a dict.

    Raises :class:`CheckpointError` naming the file on a missing, empty or corrupt file, on a state dict whose
    entries are not string keys and tensor values, and on NaN or inf weights."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint: file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"model.checkpoint: cannot read {path}: the file is empty (0 bytes); {VALID_FORMATS}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            content = {"model": load_file(str(path))}
        else:
            with open(path, "rb") as handle:
                head = handle.read(8)
            if not head.startswith((b"PK", b"\x80")):  # torch.save writes a zip archive (a pickle before 1.6)
                raise CheckpointError(f"model.checkpoint: cannot read {path}: not a torch.save file (it starts with "
                                      f"{head!r}: neither a zip archive nor a pickle); {VALID_FORMATS}")
            with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
                content = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as error:  # torch and safetensors raise many types for a damaged file
        raise CheckpointError(f"model.checkpoint: cannot read {path}: {type(error).__name__}: {error}; "
                              f"{VALID_FORMATS}") from error
    if not isinstance(content, dict):
        raise CheckpointError(f"model.checkpoint: {path} holds a {type(content).__name__}, not a state dict")
    # the weights entry: DeiT's / timm's names, SlowFast's ``model_state`` (ATS's trainer); a file whose
    # ``ema_best`` is true (TokenReduction's best_checkpoint.pth) says its EMA copy is the one to evaluate
    order = ("model_ema",) if content.get("ema_best") is True else ()
    for key in (*order, "model", "state_dict", "model_ema", "module", "model_state"):
        if key in content and isinstance(content[key], dict):
            content = content if key == "model" else {**content, "model": content[key]}
            break
    else:
        content = {"model": content}
    check_state_dict(content["model"], f"model.checkpoint={path}", finite=True)
    return content


def _show(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def check_state_dict(state: dict, source: str, finite: bool = False) -> None:
    """Every entry a string key and a tensor value (and, with ``finite``, no NaN or inf in a floating tensor),
    else :class:`CheckpointError` naming the source and the first offending entries."""
    bad_keys = [f"{k!r} ({type(k).__name__})" for k in state if not isinstance(k, str)]
    bad_values = [f"{k!r} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad_keys or bad_values:
        parts = ([f"non-string keys: {_show(bad_keys)}"] if bad_keys else []) + (
            [f"non-tensor values under: {_show(bad_values)}"] if bad_values else [])
        raise CheckpointError(f"{source} is not a state dict of named tensors: {'; '.join(parts)}; valid: a dict "
                              "of parameter names (str) to tensors, e.g. torch.save(model.state_dict(), PATH)")
    if finite:
        nonfinite = [k for k, v in state.items()
                     if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
        if nonfinite:
            raise CheckpointError(f"{source} holds NaN or inf weights in {len(nonfinite)} tensor(s): "
                                  f"{_show(nonfinite)}; valid: finite weights (a checkpoint from before the "
                                  "training diverged)")


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                           show_key: Callable[[str], str] = str) -> None:
    """Load all-or-nothing: any missing, unexpected or misshapen key raises, naming them, before any copy.
    ``show_key`` writes a key in the message (e.g. with its name in an official checkpoint layout)."""
    check_state_dict(state_dict, source)
    own = module.state_dict()
    missing = [show_key(k) for k in sorted(set(own) - set(state_dict))]
    unexpected = [show_key(k) for k in sorted(set(state_dict) - set(own))]
    misshapen = sorted(
        f"{show_key(k)} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
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
        raise ModelSettingError(f"data.img_size={img_size} is not a positive multiple of the patch size {patch_size}")
