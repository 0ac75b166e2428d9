"""Building models: the timm backbone from the model config and a registered method around it.

``methods.create_method`` is called here and nowhere else in ``experiments`` with a name from a config, so the
harness never branches on method names. ``experiments.plan`` builds the same way on the meta device to check a
config, and the pipeline builds for real from the plan.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

import methods
from methods import ragged_attention
from methods.models import check_img_size, create_backbone, load_state_dict_strict

from experiments.train.checkpoints import load_checkpoint_file
from experiments.config import RunConfig


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def create_vit(config: RunConfig, num_classes: int, pretrained: bool = False) -> nn.Module:
    """The timm model of ``config.model`` at ``config.data.img_size`` with a ``num_classes`` head."""
    model = config.model
    vit = create_backbone(model.name, num_classes=num_classes, img_size=config.data.img_size, pretrained=pretrained,
                          drop_path_rate=model.drop_path_rate, **model.architecture())
    check_img_size(config.data.img_size, vit.patch_embed.patch_size[0])
    return vit


def build_method(plan, init_state: Optional[dict] = None, params: Optional[dict[str, Any]] = None,
                 vit: Optional[nn.Module] = None) -> methods.TokenReducer:
    """The plan's method with its weights: ``model.checkpoint`` (or ``init_state``, a plain timm state dict) loaded
    all-or-nothing, else timm's pretrained weights or random ones. ``params`` replace the plan's method
    parameters (a trade-off point); ``vit`` reuses a built backbone."""
    if vit is None:
        vit = create_vit(plan.config, plan.num_classes, pretrained=plan.weights.kind == "pretrained")
    method = methods.create_method(plan.method_name, vit, **(plan.method_params if params is None else params))
    method.runtime = ragged_attention.Runtime(plan.config.eval.ragged_backend)
    if plan.weights.kind == "checkpoint":
        load_checkpoint_file(method, plan.method_name, str(plan.weights.path))
    elif init_state is not None:
        load_state_dict_strict(method.vit, init_state, "the cached dense baseline")
    return method
