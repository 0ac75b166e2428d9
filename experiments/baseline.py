"""The dense baseline every method starts from: shipped in the repository (``experiments/shipped.py``), or trained
once per config with the ``baseline`` recipe and cached, then reused by every method.

The cache entry is keyed by everything that determines its weights (``identity.baseline_key``). Jobs running at
once (a sweep's cells share baselines) take turns on a lock file beside the entry: the first trains it, the
others then reuse it. In DDP, rank 0 holds the lock and decides; all ranks train.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
from pathlib import Path

import torch

from experiments import identity, shipped
from experiments.train import distributed
from experiments.build import build_method
from experiments.train.checkpoints import CHECKPOINT_VERSION, clear_resume_state, save_checkpoint, seed_everything
from experiments.train.fit import fit

log = logging.getLogger(__name__)


def baseline_key(plan, world_size: int = 1) -> str:
    """The cache (and shipping) key of ``plan``'s dense baseline; builds the dense model on the meta device."""
    dense_plan = dataclasses.replace(plan, method_name="dense", method_params={})
    with torch.device("meta"):
        dense = build_method(dense_plan)
    shapes = {name: tuple(value.shape) for name, value in dense.state_dict().items()}
    return identity.baseline_key(plan.cfg, shapes, world_size)


def ensure_baseline(plan, data, device: torch.device,
                    dist: distributed.DistEnv = distributed.SINGLE) -> tuple[Path, str]:
    """Path of the dense baseline for ``plan``: the shipped one when the manifest lists its key (hash-checked),
    else the cached one, training it first if absent. Returns (path, how: shipped, cached or trained now)."""
    key = baseline_key(plan, dist.world_size)
    if dist.world_size == 1:
        shipped_path = shipped.verified(plan.config.paths.baselines_dir, key)
        if shipped_path is not None:
            return shipped_path, "shipped"
    path = Path(plan.config.paths.cache_dir) / f"{key}.pth"
    with baseline_lock(path, dist):
        if distributed.broadcast_object(path.exists(), dist):
            return path, "cached"
        seed_everything(plan.config.seed)
        dense = build_method(dataclasses.replace(plan, method_name="dense", method_params={}))
        recipe = plan.config.baseline
        log.info("training the dense baseline (%d epochs); it is cached at %s", recipe.epochs, path)
        dense = dense.to(device)
        work_dir = path.parent / f".{path.stem}.work"
        summary = fit(dense, data, recipe, plan.config, device, work_dir, "dense", dist=dist)
        if dist.is_main:
            save_checkpoint(path, {"version": CHECKPOINT_VERSION, "method": "dense", "model": dense.state_dict(),
                                   "train": summary})
            clear_resume_state(work_dir)
        distributed.barrier(dist)
    return path, "trained now"


@contextlib.contextmanager
def baseline_lock(path: Path, dist: distributed.DistEnv = distributed.SINGLE):
    """Exclusive ``flock`` on ``.<name>.lock`` beside ``path`` (rank 0 only), held while the block runs."""
    if not dist.is_main:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.stem}.lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another job training the same dense baseline (%s)", path.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
