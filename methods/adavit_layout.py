"""A-ViT's official checkpoint layout (``methods.official``), registered for the ``adavit`` method.

Official checkpoints load through ``model.checkpoint``. The official model
(``timm/models/act_vision_transformer.py``, ``act_mode=4``) adds no parameter to timm's DeiT: its state dict
has timm's DeiT keys (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.norm1 / attn.qkv /
attn.proj / norm2 / mlp.fc1 / mlp.fc2``, ``norm``, ``head``), which map to ``vit.`` + key. ``main_act.py``
saves ``{'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler', 'args'}`` and evaluates
``checkpoint['model']``; the gate constants are not weights: its ``--finetune`` reads them from the file name
(``tiny-10-30.pth``: scale 10, centre 30). A file with A-ViT's saved ``args`` (an ``act_mode``) is recognised,
refused for another method, and refused when its ``args.gate_scale`` / ``args.gate_center`` differ from
``gate_scale`` / ``gate_center`` or when ``halting=head`` (the official code reads channel 0). A file holding
the ``model`` entry alone cannot be told from a DeiT checkpoint: it loads into ``vit`` like one, with the gate
constants as configured. ``methods.adavit.GATE_DEFAULTS`` equal the released files' constants for DeiT-T and DeiT-S.
Released (README "Pretrained Weights", archive ``a-vit-weights.tar.gz``, Google Drive
``1Fk_PzkEVs21Fv2ofCkmRL-CQRiGmPmxV``; ImageNet-1k top-1 and FLOPs as the README states):

- A-ViT-T, ``a-vit-weights/tiny-10-30.pth``: 71.4 %, 0.8 GFLOPs. Here: ``model=deit_tiny`` (gates 10 / 30).
- A-ViT-S, ``a-vit-weights/small-10-75.pth``: 78.8 %, 3.6 GFLOPs. Here: ``model=deit_small`` (gates 10 / 75).
- ``visualization-tiny.pth`` (the README's ``--demo`` example): no accuracy stated.

Evaluate one: ``python experiments/run.py method=adavit model=deit_tiny model.checkpoint=tiny-10-30.pth
data=imagefolder data.root=/datasets/imagenet experiment.train=false``. The mapping was checked against the
official code (key names, shapes, wrappers), not against a released file: none can be downloaded here.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from . import official


def _is_official_adavit(content) -> bool:
    """A-ViT's ``main_act.py`` saves its argparse options, which carry ``act_mode`` (no other method's do)."""
    return hasattr(content.get("args"), "act_mode")


def _check_official_gates(method: nn.Module, content) -> Optional[str]:
    """Why ``method`` (an ``AdaViT``) cannot take this file's weights, or None: halting heads, other gates."""
    if method.halting_heads is not None:
        return ("the official A-ViT reads the halting score from channel 0 and has no halting heads, but "
                "method.params.halting=head; valid: method.params.halting=channel0")
    args = content["args"]
    trained = {"gate_scale": getattr(args, "gate_scale", None), "gate_center": getattr(args, "gate_center", None)}
    wrong = {name: value for name, value in trained.items()
             if value is not None and abs(float(value) - getattr(method, name)) > 1e-9}
    if not wrong:
        return None
    saved = ", ".join(f"args.{name}={float(value):g}" for name, value in wrong.items())
    ours = ", ".join(f"method.params.{name}={getattr(method, name):g}" for name in wrong)
    valid = " ".join(f"method.params.{name}={float(value):g}" for name, value in wrong.items())
    return f"it was trained with {saved} (its saved args), but {ours}; valid: {valid}"


official.register_layout(official.OfficialLayout(
    method="adavit", code="NVlabs/A-ViT timm/models/act_vision_transformer.py",
    detect=_is_official_adavit, to_ours=lambda key: f"vit.{key}",
    to_official=lambda key: key[len("vit."):] if key.startswith("vit.") else f"(none: {key} is ours only)",
    check=_check_official_gates,
    settings=lambda content: {name: float(getattr(content["args"], name)) for name in ("gate_scale", "gate_center")
                              if getattr(content["args"], name, None) is not None}))
