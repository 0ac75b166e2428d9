"""Shared fixtures: tiny timm ViTs that run in milliseconds on CPU, Hydra configs composed for a test's own
folder, and which tests run serially when the suite runs on several xdist workers."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import methods  # noqa: F401  (registers methods and the embedded model)
from experiments.config_store import register_configs

register_configs()  # as the entry points do: the tests compose configs with Hydra's compose API

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "experiments" / "conf"

# Test files that cannot share the machine with other tests; `make test` runs them after the parallel pass.
SERIAL_FILES = {
    "test_slurm.py": "starts a real single-node SLURM whose daemons take the machine's CPUs as the node's",
    "test_new_method.py": "writes a throwaway method into methods/ and experiments/conf/, seen by every other test",
}

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one torch thread each, and the same for the runs they start as subprocesses.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in SERIAL_FILES or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.serial)


def run_paths(folder: Path, prefix: str = "") -> list[str]:
    """Overrides that put every folder a run writes (results, cache, state, run) under ``folder``."""
    return [f"paths.{key}_dir={folder}/{prefix}{key}" for key in ("results", "cache", "state", "run")]


def compose_config(*overrides: str, hydra: bool = False):
    """The run config of ``experiments/conf`` with ``overrides``, as the entry points compose it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def run_config(folder: Path, *overrides: str, hydra: bool = False):
    """A run that writes only under ``folder``, without progress bars or throughput timing, then ``overrides``.
    The model is the embedded DeiT on the upsampled digits (``model=deit_digits``: nothing to render, and the
    small sizes the mechanics tests use fit it) unless ``overrides`` choose one."""
    model = [] if any(o.startswith(("model=", "+model=")) for o in overrides) else ["model=deit_digits"]
    return compose_config(*run_paths(folder), "progress=false", "measure.throughput=false", *model, *overrides,
                          hydra=hydra)


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


def write_png_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, size: int = 40,
                     splits=("train", "val")) -> None:
    """An ImageNet-style ``root/{train,val}/<class>/<i>.png`` tree of random images (``splits``: which)."""
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def build_for(cfg, num_classes=None):
    """The method a run of ``cfg`` builds: the validated plan, built with the weights it names."""
    from experiments import build, plan

    return build.build_method(plan.validate(cfg, num_classes))
