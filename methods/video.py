"""Video backbones: timm ``VisionTransformer``s over space-time tubelet tokens, and VideoMAE weight loading.

A video ViT here is a plain timm ``VisionTransformer`` whose ``embed_layer`` is :class:`TubeletEmbed`, so every
token-reduction method of the suite runs on it unchanged: the blocks, the CLS token and the head are timm's.

- **Tokens.** :class:`TubeletEmbed` is a ``Conv3d`` with kernel = stride = ``(tubelet_size, patch, patch)``
  (VideoMAE's tubelet embedding): a clip ``[B, C, T, H, W]`` becomes ``T/t * H/p * W/p`` tokens in
  (time, row, column) order, so token ``i`` sits at ``(i // (h*w), (i // w) % h, i % w)`` of ``grid_size``
  ``(T/t, H/p, W/p)``. Attention is joint over space and time (VideoMAE's), one CLS token in front.
- **Position embedding.** ``pos_init="sincos3d"`` (default, ``model.pos_init``): a fixed-formula initialisation of timm's learned
  ``pos_embed`` -- a quarter of the channels (rounded down to even) encode time and the rest split evenly
  between rows and columns, each as MAE's 1-D sin-cos of the coordinate; the CLS slot is 0. It is trained
  with the rest (a learned embedding with a sin-cos start). ``pos_init="videomae"`` writes VideoMAE's table
  instead (the transformer's 1-D sinusoid over the flat token index, ``get_sinusoid_encoding_table``), which is
  what VideoMAE's fine-tuned models use, frozen; load VideoMAE weights into a model built with it.
- **Models** (timm's registry, so ``timm.create_model`` and ``model=`` configs find them):
  ``vit_video_digits`` (embedded: 8 frames of 24 px, tubelet 2x8x8, so a 4x3x3 grid, 36 tokens + CLS; width
  64, 12 blocks, 2 heads, like the image model; a 24 px canvas keeps its baseline under 5 CPU minutes) and ``vit_video_small_patch16_224`` (ViT-S width 384, 6
  heads, 16 frames of 224 px, tubelet 2x16x16: 8x14x14 = 1568 tokens + CLS). ``num_frames`` and ``img_size``
  are arguments; frames not divisible by the tubelet depth, or a size not divisible by the patch, are refused
  naming the keys.
- **VideoMAE checkpoints** (:func:`videomae_to_timm`, used by ``model.checkpoint`` when the file's keys are
  VideoMAE's): fine-tuned models (``blocks.*``, ``fc_norm``/``norm``, ``head``) and pre-trained encoders
  (``encoder.*``; the decoder, ``mask_token`` and ``encoder_to_decoder`` are dropped) map as follows:
  ``attn.q_bias`` / ``attn.v_bias`` become timm's ``attn.qkv.bias`` (zeros for the keys, as VideoMAE's
  attention uses), ``gamma_1``/``gamma_2`` become ``ls1.gamma``/``ls2.gamma``, ``fc_norm`` (VideoMAE's norm of
  the mean-pooled tokens) becomes the final ``norm`` (this model pools the CLS token: a deviation, the closest
  fit), and a learned ``pos_embed`` ``[1, N, C]`` fills the patch slots. VideoMAE has no CLS token, so
  ``cls_token`` keeps this model's initialisation; so do ``pos_embed`` (when the file has none: VideoMAE's is
  fixed, not saved) and the head when its shape differs. Every other tensor must match in shape, or the load
  is refused naming the keys.
"""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import Sequence

import torch
from torch import Tensor, nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from .params import ModelSettingError

log = logging.getLogger(__name__)

POS_INITS = ("sincos3d", "videomae")
VIDEO_DIGITS = "vit_video_digits"
VIDEO_SMALL = "vit_video_small_patch16_224"


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)


class TubeletEmbed(nn.Module):
    """``[B, C, T, H, W] -> [B, (T/t)(H/p)(W/p), D]`` by a ``Conv3d`` with kernel = stride = ``(t, p, p)``.

    Takes timm's ``embed_layer`` arguments plus ``num_frames`` and ``tubelet_size``. ``img_size`` and
    ``patch_size`` stay 2-D, as on timm's ``PatchEmbed`` (checks that read them keep working);
    ``grid_size`` is 3-D ``(T/t, H/p, W/p)`` and ``input_size`` is ``(C, T, H, W)``."""

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768, bias: bool = True,
                 num_frames: int = 16, tubelet_size: int = 2, dynamic_img_pad: bool = False, **_unused) -> None:
        super().__init__()
        self.img_size, self.patch_size = _pair(img_size), _pair(patch_size)
        self.num_frames, self.tubelet_size = int(num_frames), int(tubelet_size)
        if self.tubelet_size < 1 or self.num_frames < 1 or self.num_frames % self.tubelet_size:
            raise ModelSettingError(f"model.num_frames={self.num_frames} (data.num_frames follows it) is not a "
                                    f"positive multiple of the tubelet depth {self.tubelet_size}; valid: "
                                    f"{', '.join(str(self.tubelet_size * k) for k in range(1, 5))}, ...")
        for size, patch in zip(self.img_size, self.patch_size):
            if size < 1 or size % patch:
                raise ModelSettingError(f"data.img_size={size} is not a positive multiple of the patch size {patch}")
        self.grid_size = (self.num_frames // self.tubelet_size, self.img_size[0] // self.patch_size[0],
                          self.img_size[1] // self.patch_size[1])
        self.num_patches = math.prod(self.grid_size)
        self.input_size = (int(in_chans), self.num_frames, *self.img_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(self.tubelet_size, *self.patch_size),
                              stride=(self.tubelet_size, *self.patch_size), bias=bias)

    def forward(self, clips: Tensor) -> Tensor:
        if clips.ndim != 5 or tuple(clips.shape[1:]) != self.input_size:
            raise ValueError(f"a video ViT takes clips [B, {', '.join(map(str, self.input_size))}] "
                             f"(batch, channels, frames, height, width), got {list(clips.shape)}")
        return self.proj(clips).flatten(2).transpose(1, 2)

    def feat_ratio(self, as_scalar: bool = True):
        return max(self.patch_size) if as_scalar else self.patch_size


# ------------------------------------------------------------------------------------ position embeddings
def _sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """MAE's 1-D sin-cos of ``positions`` ``[N]`` into ``dim`` (even) channels: sines then cosines."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos3d_pos_embed(grid: Sequence[int], dim: int) -> Tensor:
    """``[T*H*W, dim]`` for a ``(T, H, W)`` grid in token order: time gets ``dim // 4`` channels (even), rows
    and columns split the rest (even each); channels left over by rounding are 0."""
    t_dim = (dim // 4) // 2 * 2
    s_dim = ((dim - t_dim) // 2) // 2 * 2
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    parts = [_sincos_1d(t.flatten(), t_dim), _sincos_1d(h.flatten(), s_dim), _sincos_1d(w.flatten(), s_dim)]
    table = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(table, (0, dim - table.shape[1])).float()


def videomae_pos_embed(tokens: int, dim: int) -> Tensor:
    """VideoMAE's fixed table ``[tokens, dim]``: angle ``i / 10000^(2 floor(j/2) / dim)``, sine on even channels
    ``j`` and cosine on odd ones (the transformer's sinusoid over the flat token index)."""
    position = torch.arange(tokens, dtype=torch.float64)[:, None]
    channel = torch.arange(dim)
    angles = position / 10000 ** (2 * (channel // 2) / dim).double()[None]
    return torch.where(channel % 2 == 0, angles.sin(), angles.cos()).float()


# ---------------------------------------------------------------------------------------------- the models
default_cfgs = generate_default_cfgs({
    f"{VIDEO_DIGITS}.untrained": {
        "url": "", "num_classes": 10, "input_size": (3, 24, 24), "pool_size": None, "crop_pct": 1.0,
        "interpolation": "bilinear", "fixed_input_size": True, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj", "classifier": "head",
    },
    f"{VIDEO_SMALL}.untrained": {
        "url": "", "num_classes": 400, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225), "first_conv": "patch_embed.proj", "classifier": "head",
    },
})


def _video_vit(variant: str, pretrained: bool, num_frames: int, tubelet_size: int, pos_init: str,
               **kwargs) -> VisionTransformer:
    if pretrained:
        raise ValueError(f"model.pretrained=true: {variant} has no hub weights; pass VideoMAE weights as "
                         "model.checkpoint=/path/to/file.pth (see methods/video.py)")
    if pos_init not in POS_INITS:
        raise ModelSettingError(f"model.pos_init={pos_init!r} unknown; valid: {', '.join(POS_INITS)}")
    embed_layer = partial(TubeletEmbed, num_frames=num_frames, tubelet_size=tubelet_size)
    model = build_model_with_cfg(VisionTransformer, variant, pretrained, embed_layer=embed_layer, **kwargs)
    embed = model.patch_embed
    with torch.no_grad():
        table = (sincos3d_pos_embed(embed.grid_size, model.embed_dim) if pos_init == "sincos3d"
                 else videomae_pos_embed(embed.num_patches, model.embed_dim))
        model.pos_embed[0, 1:] = table
        model.pos_embed[0, 0] = 0.0
    return model


@register_model
def vit_video_digits(pretrained: bool = False, num_frames: int = 8, tubelet_size: int = 2,
                     pos_init: str = "sincos3d", **kwargs) -> VisionTransformer:
    """Embedded video ViT for moving digits: 8 frames of 24 px, tubelet 2x8x8 (4x3x3 tokens), width 64."""
    args = dict(img_size=24, patch_size=8, embed_dim=64, depth=12, num_heads=2, num_classes=10)
    return _video_vit(VIDEO_DIGITS, pretrained, num_frames, tubelet_size, pos_init, **dict(args, **kwargs))


@register_model
def vit_video_small_patch16_224(pretrained: bool = False, num_frames: int = 16, tubelet_size: int = 2,
                                pos_init: str = "sincos3d", **kwargs) -> VisionTransformer:
    """ViT-S over 16 frames of 224 px, tubelet 2x16x16: 8x14x14 = 1568 tokens (VideoMAE ViT-S's layout)."""
    args = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=400)
    return _video_vit(VIDEO_SMALL, pretrained, num_frames, tubelet_size, pos_init, **dict(args, **kwargs))


# ------------------------------------------------------------------------------------- VideoMAE checkpoints
_OWN_FALLBACK = ("cls_token", "pos_embed", "head.weight", "head.bias")
_DROPPED_PREFIXES = ("decoder.", "encoder_to_decoder.", "mask_token")


def looks_like_videomae(state: dict[str, Tensor]) -> bool:
    """VideoMAE's keys: separate ``q_bias``/``v_bias`` (its attention) or an ``encoder.`` prefix (pre-training)."""
    return any(k.endswith("attn.q_bias") for k in state) or any(k.startswith("encoder.blocks.") for k in state)


def videomae_to_timm(state: dict[str, Tensor], vit: nn.Module, source: str) -> tuple[dict[str, Tensor], list[str]]:
    """VideoMAE weights as this timm model's state dict (mapping in the module docstring), and the keys that
    kept the model's own values. Raises ``ValueError`` naming the keys whose shapes differ."""
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    state = {k: v for k, v in state.items() if not k.startswith(_DROPPED_PREFIXES)}
    own = vit.state_dict()
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("attn.q_bias"):
            stem = key[: -len("q_bias")]
            v_bias = state[stem + "v_bias"]
            mapped[stem + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias])
        elif key.endswith("attn.v_bias"):
            continue
        elif ".gamma_" in key:
            mapped[key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")] = value
        elif key.startswith("fc_norm."):
            mapped["norm." + key[len("fc_norm."):]] = value
        elif key == "pos_embed":
            if value.shape[1] == own["pos_embed"].shape[1] - 1:  # no CLS slot in VideoMAE's
                value = torch.cat([own["pos_embed"][:, :1], value], dim=1)
            mapped[key] = value
        else:
            mapped[key] = value
    kept = []
    for key in _OWN_FALLBACK:
        if key in own and (key not in mapped or tuple(mapped[key].shape) != tuple(own[key].shape)):
            mapped[key] = own[key]
            kept.append(key)
    unexpected = sorted(set(mapped) - set(own))
    misshapen = sorted(f"{k} {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in set(mapped) & set(own) if tuple(mapped[k].shape) != tuple(own[k].shape))
    missing = sorted(set(own) - set(mapped))
    if unexpected or misshapen or missing:
        raise ValueError(f"{source}: VideoMAE weights do not fit this model: shape mismatches: "
                         f"{', '.join(misshapen[:6]) or 'none'}; keys without a timm counterpart: "
                         f"{', '.join(unexpected[:6]) or 'none'}; model keys the file lacks: "
                         f"{', '.join(missing[:6]) or 'none'}; valid: a VideoMAE ViT of the same width, depth, "
                         "tubelet and patch size (e.g. ViT-S/16 tubelet 2 for model=vit_video_small)")
    if kept:
        log.info("%s: kept this model's own %s (VideoMAE has no CLS token, a fixed position table, or a head "
                 "of another size)", source, ", ".join(kept))
    return mapped, kept
