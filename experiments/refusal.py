"""What a refused command leaves behind: nothing. Owns the clean-up of Hydra's run folder after a refusal.

Hydra creates ``outputs/<date>/<time>_.../`` (its ``.hydra/`` config copy and the job log) before our code runs, so
a command refused at startup (a bad key, path, checkpoint or data folder: a ``ValueError`` from validation)
would leave a folder that looks like a run. :func:`leave_nothing_on_refusal` wraps an entry point: on such an
error it removes the run folder, but only while it holds nothing beyond Hydra's own files (so a failure after
work began keeps its logs and checkpoints), then the empty date folders above it up to ``outputs/``, and
re-raises. The error itself still reaches the terminal.
"""
from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

HYDRA_FILES = {".hydra"}  # Hydra's own entries in a run folder, besides the job's *.log files


def _run_dir() -> Optional[Path]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return Path(HydraConfig.get().runtime.output_dir)


def only_hydra_files(folder: Path) -> bool:
    """True when ``folder`` holds nothing but Hydra's config copy and log files."""
    return all(entry.name in HYDRA_FILES or (entry.is_file() and entry.suffix == ".log")
               for entry in folder.iterdir())


def remove_refused_run_dir(folder: Path) -> bool:
    """Remove ``folder`` if it holds only Hydra's files, then its empty parents up to the ``outputs`` folder
    (Hydra's default root, whichever folder named ``outputs`` is above it). Returns whether it was removed."""
    if not folder.is_dir() or not only_hydra_files(folder):
        return False
    logging.shutdown()  # the job log is open in this process
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    while parent.name != "outputs" and parent != parent.parent and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
    if parent.name == "outputs" and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
    return True


def leave_nothing_on_refusal(entry: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for a Hydra task function (below ``@hydra.main``); see the module docstring."""

    @functools.wraps(entry)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return entry(*args, **kwargs)
        except ValueError:
            folder = _run_dir()
            if folder is not None:
                remove_refused_run_dir(folder)
            raise

    return wrapped
