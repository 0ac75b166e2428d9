"""The cached dense baseline: trained once per config with the ``baseline`` recipe, reused by every method.

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

from experiments import identity
from experiments.train import distributed
from experiments.build import build_method
from experiments.train.checkpoints import CHECKPOINT_VERSION, clear_resume_state, save_checkpoint, seed_everything
from experiments.train.fit import fit

log = logging.getLogger(__name__)


def ensure_baseline(plan, data, device: torch.device,
                    dist: distributed.DistEnv = distributed.SINGLE) -> tuple[Path, bool]:
    """Path of the cached dense baseline for ``plan``, training it first if absent. Returns (path, reused)."""
    dense_plan = dataclasses.replace(plan, method_name="dense", method_params={})
    seed_everything(plan.config.seed)
    dense = build_method(dense_plan)
    shapes = {name: tuple(value.shape) for name, value in dense.state_dict().items()}
    path = Path(plan.config.paths.cache_dir) / f"{identity.baseline_key(plan.cfg, shapes, dist.world_size)}.pth"
    with baseline_lock(path, dist):
        if distributed.broadcast_object(path.exists(), dist):
            return path, True
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
    return path, False


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
