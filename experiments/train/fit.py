"""Training with exact resume: the optimizer and schedule of a recipe, the epoch loop, checkpoints and requeue.

``fit`` checkpoints after every epoch and resumes from a checkpoint if present. With several tasks it trains in
DDP (``recipe.batch_size`` per task) and only rank 0 writes. Inside a submitit job the checkpoint signal is
handled at the next step boundary: a mid-epoch checkpoint (step and running sums of the epoch, every rank's RNG
state), then submitit requeues the job; the requeued run skips the epoch's finished batches and continues exactly
where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from methods.models import CheckpointError, load_state_dict_strict

from experiments.train import distributed, engine, preemption
from experiments.train.checkpoints import (CHECKPOINT_VERSION, get_rng_state, read_resume_checkpoint, save_checkpoint, seed_everything,
                          set_rng_state)
from experiments.config import Recipe, RunConfig
from experiments.data.loaders import make_loader

log = logging.getLogger(__name__)


def make_optimizer(method: torch.nn.Module, recipe: Recipe, steps_per_epoch: int):
    groups = engine.unwrap(method).param_groups(recipe.weight_decay)
    optimizer = create_optimizer_v2(groups, opt=recipe.opt, lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=max(recipe.epochs, 1), warmup_epochs=recipe.warmup_epochs,
        min_lr=recipe.min_lr, warmup_lr=recipe.warmup_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    return optimizer, scheduler


def amp_dtype_for(config: RunConfig, device: torch.device) -> Optional[torch.dtype]:
    if not config.train.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def fit(method, data, recipe: Recipe, config: RunConfig, device: torch.device, checkpoint_dir: Optional[Path],
        method_name: str, teacher=None, dist: distributed.DistEnv = distributed.SINGLE) -> dict[str, Any]:
    """Train ``method`` for ``recipe.epochs``; see the module docstring."""
    loader = make_loader(data.train, recipe.batch_size, True, config.num_workers, config.seed,
                         distributed=(dist.rank, dist.world_size) if dist.enabled else None)
    optimizer, scheduler = make_optimizer(method, recipe, len(loader))
    amp_dtype = amp_dtype_for(config, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    settings = engine.TrainSettings(clip_grad=recipe.clip_grad, label_smoothing=recipe.label_smoothing,
                                    nan_policy=config.train.nan_policy, amp_dtype=amp_dtype,
                                    progress=config.progress)
    history: list[dict[str, Any]] = []
    start_epoch, partial = 0, None
    last = checkpoint_dir / "last.pth" if checkpoint_dir else None
    if last is not None and last.exists():
        state = read_resume_checkpoint(last)
        load_state_dict_strict(method, state["model"], f"resume checkpoint {last}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"], state["history"]
        rng = rank_rng_state(state["rng"], dist)
        if rng is not None:
            set_rng_state(rng)
        if state.get("step"):  # stopped mid-epoch by the checkpoint signal
            if rng is None:
                raise CheckpointError(f"resume checkpoint {last}: saved mid-epoch by {len(state['rng'])} tasks, "
                                      f"resumed by {dist.world_size}; resume with the same number of tasks")
            partial = state
        log.info("resumed from %s at epoch %d, step %d", last, start_epoch, state.get("step", 0))
    model = distributed.wrap(method, dist, device)

    def save(epoch: int, epoch_state: Optional[engine.EpochState]) -> None:
        rng = distributed.gather_objects(get_rng_state(), dist)  # a collective: every rank calls save
        if last is None or not dist.is_main:
            return
        save_checkpoint(last, {
            "version": CHECKPOINT_VERSION, "method": method_name, "model": method.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch if epoch_state is not None else epoch + 1,
            "step": epoch_state.step if epoch_state is not None else 0,
            "epoch_state": dataclasses.asdict(epoch_state) if epoch_state is not None else None,
            "history": history, "rng": rng, "world_size": dist.world_size,
        })

    started = time.time()
    with preemption.deferred() as signal:
        for epoch in range(start_epoch, recipe.epochs):
            # Re-seed per epoch so a resumed run shuffles and augments exactly like an uninterrupted one.
            seed_everything((config.seed * 1000 + epoch) * dist.world_size + dist.rank)
            loader.generator.manual_seed(config.seed * 1000 + epoch)
            if dist.enabled:
                loader.sampler.set_epoch(epoch)
            batches, epoch_state = loader, None
            if partial is not None:
                epoch_state = engine.EpochState(**partial["epoch_state"])
                rng = rank_rng_state(partial["rng"], dist)
                batches = ResumedEpoch(loader, epoch_state.step, lambda rng=rng: set_rng_state(rng))
                partial = None

            def on_step(epoch_state: engine.EpochState, epoch: int = epoch) -> None:
                if signal.requested(dist):
                    save(epoch, epoch_state)
                    log.warning("checkpointed epoch %d at step %d on the checkpoint signal", epoch, epoch_state.step)
                    signal.hand_over(dist)

            metrics = engine.train_one_epoch(model, batches, optimizer, scheduler, epoch, device, settings,
                                             teacher=teacher, scaler=scaler, on_step=on_step, state=epoch_state)
            metrics = distributed.mean_metrics(metrics, dist)
            history.append({"epoch": epoch, **metrics})
            log.info("epoch %d: %s", epoch, json.dumps({k: round(v, 5) for k, v in metrics.items()}))
            save(epoch, None)
    return {"epochs": recipe.epochs, "history": history, "wall_time_s": time.time() - started}


class ResumedEpoch:
    """``loader`` for the rest of a partly done epoch: draws (and drops) its first ``steps`` batches, so data order
    and augmentation randomness match the interrupted epoch, then restores the RNG state saved at that step.
    ``len()`` stays the full epoch's (the scheduler counts updates from it)."""

    def __init__(self, loader, steps: int, restore) -> None:
        self.loader, self.steps, self.restore = loader, steps, restore

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        for _ in range(self.steps):
            next(batches)
        self.restore()
        return batches


def rank_rng_state(saved, dist: distributed.DistEnv) -> Optional[dict[str, Any]]:
    """This rank's RNG state from a checkpoint's ``rng`` (one dict, or a list with one per rank); ``None`` when
    it was saved by another number of tasks."""
    if isinstance(saved, dict):
        return saved if dist.world_size == 1 else None
    return saved[dist.rank] if len(saved) == dist.world_size else None
