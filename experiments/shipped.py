"""Shipped dense baselines: the embedded baselines of the committed seeds, in the repository, so that every machine
fine-tunes and evaluates methods from identical starting weights.

``paths.baselines_dir`` (default ``results/baselines``) holds one ``<key>.safetensors`` per baseline (the dense
model's state dict, keys as the suite's own checkpoints) and ``manifest.json``::

    {"format": 1, "baselines": {"<key>": {"file", "sha256", "seed", "model", "data", "recipe", "torch",
                                          "commit", "dirty", "shipped"}}}

``<key>`` is the baseline cache key (``experiments.identity.baseline_key``: model, data, recipe, seed and parameter
shapes), so a run finds its shipped baseline exactly when it would have trained the same one. A listed baseline
whose file is missing, or whose sha256 differs from the manifest, is refused naming both hashes and the command
that recreates it: a changed byte would silently make two machines compare methods from different weights.

``make baselines`` (``python -m experiments.ship_baselines -m seed=0,1,2,3,4``) trains the listed seeds' baselines
where the cache lacks them and ships them here, replacing earlier entries of the same key.
"""
from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from experiments.records.store import atomic_write_json
from methods.models import CheckpointError

MANIFEST = "manifest.json"
FORMAT = 1
RETRAIN = "make baselines"  # the documented command that retrains and ships them


class ShippedBaseline(BaseModel):
    """One manifest entry: the file, its hash and what made it."""

    model_config = ConfigDict(extra="forbid")

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    seed: int
    model: str
    data: str
    recipe: dict[str, Any]
    torch: str
    commit: Optional[str]  # the tree that shipped it (the recipe and key say what trained it)
    dirty: Optional[bool]
    shipped: str  # ISO time


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int = FORMAT
    baselines: dict[str, ShippedBaseline] = {}


def read_manifest(folder: Path) -> Manifest:
    """The manifest in ``folder`` (empty when there is none); a corrupt one is refused naming the file."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return Manifest()
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except (ValueError, OSError) as error:  # pydantic's ValidationError is a ValueError
        raise CheckpointError(f"paths.baselines_dir: cannot read {path}: {str(error).splitlines()[0]}; "
                              f"recreate it with `{RETRAIN}`") from error


def verified(folder: Optional[str | Path], key: str) -> Optional[Path]:
    """The shipped baseline for ``key``, its hash checked against the manifest; None when none is listed (or
    ``folder`` is None: shipping off). Raises :class:`CheckpointError` naming the file and both hashes on a
    mismatch, or the file when it is missing."""
    if folder is None:
        return None
    entry = read_manifest(Path(folder)).baselines.get(key)
    if entry is None:
        return None
    from experiments.train.checkpoints import file_sha256  # torch-side helper, imported when a baseline is listed

    path = Path(folder) / entry.file
    if not path.is_file():
        raise CheckpointError(f"paths.baselines_dir: {path} is listed in {Path(folder) / MANIFEST} (sha256 "
                              f"{entry.sha256}) but missing; restore it from git or recreate it with `{RETRAIN}`")
    actual = file_sha256(path)
    if actual != entry.sha256:
        raise CheckpointError(f"paths.baselines_dir: {path} has sha256 {actual}, but the manifest says "
                              f"{entry.sha256}; the shipped baseline was changed: restore it from git or "
                              f"recreate it with `{RETRAIN}`")
    return path


def ship(folder: Path, key: str, state: dict, entry: dict[str, Any]) -> Path:
    """Write ``state`` as ``<key>.safetensors`` in ``folder`` and list it in the manifest (atomically, replacing
    an entry of the same key). ``entry``: the manifest fields besides file and sha256."""
    from safetensors.torch import save_file

    from experiments.train.checkpoints import file_sha256

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.safetensors"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({name: value.detach().cpu().contiguous() for name, value in state.items()}, str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    with open(folder / f".{MANIFEST}.lock", "a") as lock:  # several seeds may ship at once (make -j, a sweep)
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = read_manifest(folder)
        manifest.baselines[key] = ShippedBaseline(file=path.name, sha256=file_sha256(path), **entry)
        manifest.baselines = dict(sorted(manifest.baselines.items()))
        atomic_write_json(folder / MANIFEST, manifest.model_dump())
    return path
