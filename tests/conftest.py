"""Shared fixtures: tiny timm ViTs that run in milliseconds on CPU, and the markers' defaults."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import methods  # noqa: F401  (registers methods and the embedded model)
from experiments.config_store import register_configs

register_configs()  # as the entry points do: the tests compose configs with Hydra's compose API


def make_tiny_vit(depth: int = 4, embed_dim: int = 32, num_heads: int = 2, img_size: int = 32,
                  patch_size: int = 8, num_classes: int = 10, seed: int = 0, **kwargs) -> VisionTransformer:
    """A DeiT-shaped ViT small enough for unit tests (16 patches + CLS by default)."""
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                            num_heads=num_heads, num_classes=num_classes, **kwargs)
    return vit.eval()


@pytest.fixture
def one_thread():
    """torch on one thread for the test: on two shared cores, oversubscribed intra-op threads make tiny models
    30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_vit():
    return make_tiny_vit()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32)


def assert_batch_invariant(method, images) -> None:
    """Each image's logits, token counts and patch depths are the same alone as inside the batch."""
    with torch.no_grad():
        full = method(images)
        for i in range(len(images)):
            single = method(images[i:i + 1])
            torch.testing.assert_close(single.logits[0], full.logits[i], atol=1e-5, rtol=1e-5)
            assert torch.equal(single.token_counts[0], full.token_counts[i])
            assert torch.equal(single.patch_depth[0], full.patch_depth[i])


def assert_own_modules_at_full_lr(method, scale: float, own_count: int) -> tuple[list[dict], set[int]]:
    """``method.param_groups`` holds every parameter once; the method's own modules (``method.reducers``,
    ``own_count`` tensors) sit at lr_scale 1 and the backbone at ``scale``, never mixed in one group. Returns the
    groups and the ids of the own parameters for further checks."""
    own = {id(p) for p in method.reducers.parameters()}
    groups = method.param_groups(weight_decay=0.05)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in method.parameters())  # each parameter exactly once
    assert len(own) == own_count
    for group in groups:
        mine = {id(p) in own for p in group["params"]}
        assert len(mine) == 1 and group["lr_scale"] == (1.0 if mine.pop() else scale)
    return groups, own


@pytest.fixture(scope="module")
def deit_small():
    """DeiT-S at 224 px with random weights (token counts and FLOPs do not depend on the weights)."""
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


def write_png_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, size: int = 40) -> None:
    """An ImageNet-style ``root/{train,val}/<class>/<i>.png`` tree of random images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def build_for(cfg, num_classes=None):
    """The method a run of ``cfg`` builds: the validated plan, built with the weights it names."""
    from experiments import build, plan

    return build.build_method(plan.validate(cfg, num_classes))
