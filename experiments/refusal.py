"""Refusals: what a refused command prints (one line) and what it leaves behind (nothing it did not find).

A refusal is bad input found before work begins: a ``ConfigError``, ``DataError``, ``CheckpointError`` or
``SweepError`` from validation (all ``ValueError``), or Hydra's and OmegaConf's own composition errors (a
mistyped value, an unknown key or config option, an override that does not parse).

- :func:`command` turns a ``@hydra.main`` function into the command-line entry point: a refusal prints one line
  ``error: <what Hydra or the check said>`` on stderr and exits with status 2, with no traceback
  (``HYDRA_FULL_ERROR=1`` shows it, as Hydra does). Any other exception is a crash and keeps its traceback.
- :func:`leave_nothing_on_refusal` wraps the task function: Hydra creates the run folder (its ``.hydra/`` config
  copy and the job log) before our code runs, so on a refusal it removes that folder, but only while it holds
  nothing beyond Hydra's own files (a failure after work began keeps its logs and checkpoints), and only the
  folders this command created: an empty folder that was there before (``hydra.run.dir=DIR/run`` with an empty
  ``DIR``) stays. Which folders the command created is recorded while :func:`command` runs, by a Python audit
  hook on ``os.mkdir`` (Hydra makes them with ``mkdir(parents=True)``; nothing on disk tells afterwards who
  made a folder). Without :func:`command` (a library call, a job started by a cluster launcher) nothing is
  recorded and nothing is removed.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Collection, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from experiments.cluster.sweep_checks import SweepError
from experiments.config import ConfigError, DataError
from methods.models import CheckpointError

HYDRA_FILES = {".hydra"}  # Hydra's own entries in a run folder, besides the job's *.log files
REFUSALS = (ConfigError, DataError, CheckpointError, SweepError, ConfigCompositionException, OverrideParseException)
REFUSAL_STATUS = 2  # argparse's status for bad arguments

_created: set[str] = set()  # folders made by os.mkdir while a command runs (absolute paths)
_session: dict[str, Any] = {"recording": False, "show_traceback": False, "refused": []}  # set by command()
_hook_installed = False


def _note_new_folder(event: str, args: tuple) -> None:
    # the event comes before the call: a folder that exists already is not being created
    if _session["recording"] and event == "os.mkdir" and args[2] in (None, -1):  # -1: no dir_fd
        path = os.path.abspath(os.fsdecode(args[0]))
        if not os.path.exists(path):
            _created.add(path)


def created_folders() -> frozenset[str]:
    """The folders the running command has created so far (empty outside :func:`command`)."""
    return frozenset(_created)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else ""


def _type_name(kind: Any) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")


def _schema_line(error: BaseException, cause: OmegaConfBaseException) -> str:
    """A composition error whose cause is OmegaConf's: the key, the value and what the schema accepts there."""
    schema = cause.object_type if dataclasses.is_dataclass(cause.object_type) else None
    if isinstance(cause, ConfigKeyError) and schema is not None:
        keys = ", ".join(field.name for field in dataclasses.fields(schema))
        return f"{_first_line(str(error))} {_first_line(cause.msg)}; valid keys there: {keys}"
    expected = typing.get_type_hints(schema).get(str(cause.key)) if schema is not None else cause.ref_type
    valid = f"; valid: {_type_name(expected)}" if expected not in (None, Any) else ""
    return f"{cause.full_key}={cause.value}: {_first_line(cause.msg)}{valid}"


def one_line(error: BaseException) -> str:
    """``error: ...``: a refusal's message on one line (key, value, the valid choices where the error has them)."""
    cause = error.__cause__
    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        # the <name>_defaults and base_<name> entries are the schemas register_configs files, not choices to type
        options = [o for o in error.options if not (o.endswith("_defaults") or o.startswith("base_"))]
        text = f"{group}={option} is not a config option of {group}; valid: {', '.join(options)}"
    elif isinstance(error, OverrideParseException):
        text = f"{error.override}: {_first_line(error.message)}; valid: key=value (Hydra's override grammar)"
    elif isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        text = _schema_line(error, cause)
    else:
        text = " ".join(str(error).split())
    return f"error: {text}"


def command(hydra_main: Callable[[], Any]) -> Callable[[], Any]:
    """The command-line entry point around a ``@hydra.main`` function; see the module docstring."""

    @functools.wraps(hydra_main)
    def entry() -> Any:
        global _hook_installed
        before = os.environ.get("HYDRA_FULL_ERROR")
        if not _hook_installed:
            sys.addaudithook(_note_new_folder)  # audit hooks stay for the process; _session switches it
            _hook_installed = True
        _session.update(recording=True, show_traceback=before == "1", refused=[])
        _created.clear()
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its report: we print ours
        try:
            result = hydra_main()
        except REFUSALS as error:
            if _session["show_traceback"]:
                raise
            _session["refused"].append(one_line(error))
        finally:
            _session["recording"] = False
            if before is None:
                os.environ.pop("HYDRA_FULL_ERROR", None)
            else:
                os.environ["HYDRA_FULL_ERROR"] = before
        if _session["refused"]:
            for line in _session["refused"]:
                print(line, file=sys.stderr, flush=True)
            sys.exit(REFUSAL_STATUS)
        return result

    return entry


def _run_dir() -> Optional[Path]:
    if not HydraConfig.initialized():
        return None
    return Path(HydraConfig.get().runtime.output_dir)


def _job_label() -> str:
    """``job #<n> (<overrides>): `` inside a multirun, where several jobs may be refused; else nothing."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return ""
    hydra = HydraConfig.get()
    return f"job #{hydra.job.num} ({' '.join(hydra.overrides.task)}): "


def only_hydra_files(folder: Path) -> bool:
    """True when ``folder`` holds nothing but Hydra's config copy and log files."""
    return all(entry.name in HYDRA_FILES or (entry.is_file() and entry.suffix == ".log")
               for entry in folder.iterdir())


def remove_refused_run_dir(folder: Path, created: Collection[str]) -> bool:
    """Remove ``folder`` if this command created it (it is in ``created``) and it holds only Hydra's files, then
    the empty folders above it that the command created too. Returns whether ``folder`` was removed."""
    folder = Path(os.path.abspath(folder))
    if str(folder) not in created or not folder.is_dir() or not only_hydra_files(folder):
        return False
    logging.shutdown()  # the job log is open in this process
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    while str(parent) in created and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
    return True


def leave_nothing_on_refusal(entry: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for a Hydra task function (below ``@hydra.main``); see the module docstring."""

    @functools.wraps(entry)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return entry(*args, **kwargs)
        except ValueError as error:
            folder = _run_dir()
            if folder is not None:
                remove_refused_run_dir(folder, created_folders())
            if not (_session["recording"] and isinstance(error, REFUSALS) and not _session["show_traceback"]):
                raise
            # under command(): the job ends quietly (Hydra would print its own line about the failed job) and
            # command() prints the refusal once Hydra returns
            _session["refused"].append(one_line(error).replace("error: ", f"error: {_job_label()}", 1))
            return None

    return wrapped
