"""Run identity: the digests behind resume folders, baseline cache entries, trade-off curves and records.

A key hashes exactly what makes a result different, and nothing else: the resume key leaves out paths, the
launcher, cosmetic keys and the evaluation and measurement settings (fixing a measurement setting after a crash
resumes the training instead of starting over).

A record's identity (:func:`result_identity`) is what decides "the same run" in the report, the curve loader
and a regeneration's skip: the fully resolved configuration that determines the result, with the keys that
cannot change it left out by the explicit list :data:`NOT_RESULT_KEYS`. Method parameters enter with their
defaults filled (a record written before a parameter existed has the same identity as a newer one at its
default), a data folder enters as a digest of its scanned file list (relative names and sizes, never the
absolute root nor the images' bytes), and the starting weights as their sha256 (never a path). The fine-tune
recipe enters only when the run fine-tunes. Two records of one identity from different commits are the same run
measured twice; two of different identities are never merged.
"""
from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

# Keys of a resolved config that cannot change a record's result (dotted; a section name drops the section).
NOT_RESULT_KEYS = ("paths", "hydra", "progress", "num_workers", "threads", "launcher", "eval.batch_size",
                   "eval.map_images", "model.checkpoint", "data.root", "method.tradeoff_values")

# Keys that do not change what a run trains: a rerun that differs only in these resumes the same state.
NOT_TRAINING_KEYS = ("paths", "hydra", "progress", "num_workers", "launcher", "eval", "measure")


def content_digest(content: Any, length: int = 16) -> str:
    """A short, stable hash of JSON-able ``content`` (keys sorted)."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:length]


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


def _drop(content: dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if rest and isinstance(content.get(head), dict):
        _drop(content[head], rest)
    elif not rest:
        content.pop(head, None)


def result_identity(config: dict[str, Any], method: str, params: dict[str, Any], kind: str, trains: bool,
                    start_weights_sha256: Optional[str], data_digest: Optional[str]) -> dict[str, str]:
    """The identity of a record (module docstring): ``key`` (the run: every field), ``setting`` (the same
    without the seed: what a report row averages over seeds) and the digests it was built from. ``config`` is
    the resolved config the record carries, ``params`` the method parameters with the factory's defaults filled."""
    content = copy.deepcopy(config)
    for dotted in NOT_RESULT_KEYS:
        _drop(content, dotted)
    content["method"] = {**content.get("method", {}), "name": method, "params": params}
    content.pop("experiment", None)  # replaced by what it decided:
    content["fine_tuned"] = bool(trains)
    if not trains:
        content.pop("train", None)  # an off-the-shelf result does not depend on the fine-tune recipe
    if start_weights_sha256 is not None:
        content.pop("baseline", None)  # the weights themselves identify where the run started
    content["start_weights_sha256"] = start_weights_sha256
    content["data_files"] = data_digest
    content["kind"] = kind
    seed = content.pop("seed", None)
    setting = content_digest(content)
    content["seed"] = seed
    return {"key": content_digest(content), "setting": setting, "start_weights_sha256": start_weights_sha256,
            "data_files": data_digest}
