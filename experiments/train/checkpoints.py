"""Checkpoint files and RNG state: atomic saves, resume checkpoints, loading weights into a method, seeding.

Saves go to a temp file and are renamed, so a crash or a full disk mid-save leaves the previous checkpoint
intact. A resume checkpoint that cannot be used is a clear error naming the file and how to start over, never a
silent fresh start.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

import methods
from methods import official, video
from methods.models import CheckpointError, load_state_dict_strict, read_checkpoint

CHECKPOINT_VERSION = 1
RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "rng")


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, I/O error); the message names the file. The previous
    checkpoint at that path, if any, is intact."""


# ------------------------------------------------------------------------------------------------ RNG state
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------- saving
def file_sha256(path) -> str | None:
    """sha256 of a weights file (``None`` without one): records name weights by content, never by path."""
    if path is None or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Temp file + rename. A failed write raises :class:`CheckpointSaveError` naming the file, and leaves no temp
    file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:  # a handle, not the path: torch names the archive's root after a path
            torch.save(payload, handle)  # (the temp name, pid included), so equal payloads gave different bytes
            handle.flush()  # a full disk: OSError, or RuntimeError from torch's zip writer
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, (OSError, RuntimeError)):
            kept = "the previous checkpoint there is intact" if path.exists() else "no earlier checkpoint there"
            message = f"could not save checkpoint {path} ({type(error).__name__}: {error}); {kept}{free_space(path)}"
            code = getattr(error, "errno", None)
            raise (CheckpointSaveError(code, message) if code else CheckpointSaveError(message)) from error
        raise


def free_space(path: Path) -> str:
    """``"; N MB free on that disk"`` for an error message (torch reports a full disk only as a bad zip offset)."""
    try:
        return f"; {shutil.disk_usage(path.parent).free / 1e6:.1f} MB free on that disk"
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------ resuming
def read_resume_checkpoint(path: Path) -> dict[str, Any]:
    """The content of a resume checkpoint (``experiments.train.fit.fit`` writes it)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: RNG states need pickle
    except Exception as error:  # noqa: BLE001 - a damaged zip or pickle raises many types
        raise CheckpointError(f"resume checkpoint {path} is corrupt or unreadable ({type(error).__name__}: "
                              f"{error}). {start_over_hint(path)}") from error
    missing = [key for key in RESUME_KEYS if key not in state] if isinstance(state, dict) else list(RESUME_KEYS)
    if missing:
        raise CheckpointError(f"resume checkpoint {path} is incomplete (missing {missing}). {start_over_hint(path)}")
    return state


def start_over_hint(path: Path) -> str:
    return (f"It holds this run's progress (paths.state_dir); to start the run over, delete it (rm {path}), "
            "or restore an intact copy to resume")


def clear_resume_state(folder: Path) -> None:
    (folder / "last.pth").unlink(missing_ok=True)
    for stale in folder.glob(".last.pth.*.tmp"):  # left by a run killed mid-save (save_checkpoint's temp files)
        stale.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


# ------------------------------------------------------------------------------------------------- loading
def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def load_weights(method: methods.TokenReducer, method_name: str, content: dict[str, Any], source: str) -> None:
    """Load a read checkpoint all-or-nothing: a method's official layout loads whole through
    ``methods.official`` (refused for another method), plain timm/DeiT weights (or VideoMAE's, mapped by
    ``methods.video.videomae_to_timm``) go into ``method.vit``, a suite checkpoint
    of the same method (or of ``dense``) loads whole. Another method's checkpoint is refused: its extra modules
    would be silently dropped. On a meta-device method this is the check alone."""
    state, saved_method = content["model"], content.get("method")
    if saved_method is None:
        state = official.strip_module_prefix(state)
        content = {**content, "model": state}
        layout = official.match(content)
        if layout is not None and method.missing_state(None):
            raise CheckpointError(f"{source}: {method.missing_state(None)}")
        if layout is not None:  # a method's official layout (methods/official.py): mapped onto our keys
            official.load_official(method, method_name, layout, content, source)
            return
    if saved_method is None and video.looks_like_videomae(state):
        try:  # VideoMAE's layout (methods/video.py): mapped onto timm's keys, CLS and a new head kept
            state, _ = video.videomae_to_timm(state, method.vit, source)
        except ValueError as error:
            raise CheckpointError(str(error)) from None
    missing = method.missing_state(state if saved_method == method_name else None)
    if missing:  # e.g. threshold ToMe's calibrated thresholds, which backbone weights do not hold
        raise CheckpointError(f"{source}: {missing}")
    if saved_method is None:
        load_state_dict_strict(method.vit, state, source)
    elif saved_method == method_name:
        load_state_dict_strict(method, state, source)
    elif saved_method == "dense":
        load_state_dict_strict(method.vit, strip_prefix(state, "vit."), source)
    else:
        raise CheckpointError(f"{source} was trained with method {saved_method!r}, not {method_name!r}; use a "
                              f"dense or plain timm checkpoint, or method={saved_method}")


def load_checkpoint_file(method: methods.TokenReducer, method_name: str, path: str) -> None:
    load_weights(method, method_name, read_checkpoint(path), f"model.checkpoint={path}")
