"""Run identity: the digests behind resume folders, baseline cache entries, trade-off curves and records.

A key hashes exactly what makes a result different, and nothing else: the resume key leaves out paths, the
launcher, cosmetic keys and the evaluation and measurement settings (fixing a measurement setting after a crash
resumes the training instead of starting over).

A record's identity (what decides "the same run" in the report) lives in the torch-free records package,
``experiments/records/identity.py``, which ``analysis/`` reads too; :func:`result_identity` is re-exported here.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments.records.identity import NOT_RESULT_KEYS, content_digest, result_identity  # noqa: F401

# Keys that do not change what a run trains: a rerun that differs only in these resumes the same state.
NOT_TRAINING_KEYS = ("paths", "hydra", "progress", "num_workers", "launcher", "eval", "measure")


def short_name(cfg: DictConfig) -> str:
    return str(cfg.model.get("short_name") or cfg.model.name)


def run_key(cfg: DictConfig) -> str:
    """Identity of a run for resuming: re-running the same command (after a kill, or a SLURM requeue) finds the
    same resume folder."""
    content = OmegaConf.to_container(cfg, resolve=False)
    for key in NOT_TRAINING_KEYS:
        content.pop(key, None)
    return f"{cfg.method.name}_{short_name(cfg)}_s{cfg.seed}_{content_digest(content)}"


def baseline_key(cfg: DictConfig, architecture: dict[str, tuple], world_size: int = 1) -> str:
    """Hash of everything that determines the dense baseline's weights, the parameter shapes included (a changed
    model definition never reuses a stale cache). A DDP-trained baseline (batch size per task) is another one."""
    parts = {
        # unset architecture keys and the native size (data.img_size counts) left out: keys stay as they were
        "model": {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                  if k not in ("checkpoint", "img_size") and v is not None},
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "recipe": OmegaConf.to_container(cfg.baseline, resolve=True),
        "seed": cfg.seed,
        "architecture": sorted((name, list(shape)) for name, shape in architecture.items()),
    }
    if world_size > 1:
        parts["world_size"] = world_size
    return f"{cfg.model.name}_{cfg.data.name}_s{cfg.seed}_{content_digest(parts, 12)}"


def curve_id(method: str, cfg: DictConfig, params: dict[str, Any], knob: str, weights: str) -> str:
    """The identity of one trade-off curve: everything but the knob value."""
    key = {"method": method, "model": cfg.model.name, "data": cfg.data.name, "seed": cfg.seed,
           "params": {k: v for k, v in params.items() if k != knob}, "weights": weights}
    return content_digest(key)

