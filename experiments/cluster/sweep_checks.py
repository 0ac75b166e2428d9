"""A sweep's cells, composed and checked on the launching side before anything is submitted.

``experiments.cluster.launch`` calls these first: the sweep directory is resolved once and pinned, every cell is composed
as its job will compose it and validated by ``experiments.plan.validate``, and cells that would share an output
directory, ``paths.run_dir`` or resume folder are refused. Problems are raised together as one ``SweepError``.
Nothing here talks to a scheduler.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import filter_overrides
from omegaconf import DictConfig, open_dict, read_write


class SweepError(ValueError):
    """The sweep is refused before submission (invalid cells, clashing output directories, bad launcher
    parameters); nothing was submitted."""


@dataclass
class Cell:
    """One sweep cell as it will run: overrides and the directories it resolves to."""

    num: int
    overrides: list[str]
    label: str
    output_dir: str
    run_dir: str
    results_dir: str
    task_name: str
    resume_dir: Optional[str] = None  # the run plan's resume folder (paths.state_dir/<run key>) when it trains


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def pin_sweep_dir(config: DictConfig) -> Path:
    """Resolve ``hydra.sweep.dir`` once (its ``${now:...}``) and pin it as an absolute override, so a requeued
    job, which composes its config again, lands in the same directory."""
    sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.sweep.dir = str(sweep_dir)
        kept = [o for o in config.hydra.overrides.hydra if not str(o).startswith("hydra.sweep.dir=")]
        config.hydra.overrides.hydra = kept + [f"hydra.sweep.dir={_quote(str(sweep_dir))}"]
    return sweep_dir


def compose_cells(config: DictConfig, hydra_context, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
                  runs_here: bool) -> list[Cell]:
    """Compose and validate every cell; raise ``SweepError`` listing every problem, before any submission.

    ``runs_here`` is false for cluster launchers: checks about this machine (a GPU present) are left to the job.
    """
    cells: list[Cell] = []
    problems: list[str] = []
    saved = HydraConfig.instance().cfg
    swept = _swept_keys(job_overrides)
    try:
        for i, overrides in enumerate(job_overrides):
            num = initial_job_idx + i
            shown = [o for o in filter_overrides(list(overrides)) if _override_key(o) in swept] if swept else []
            label = " ".join(shown or filter_overrides(list(overrides))) or "(no overrides)"
            try:
                cells.append(_compose_cell(config, hydra_context, list(overrides), num, label, runs_here))
            except Exception as error:  # noqa: BLE001 - every cell's problem is reported together
                problems.append(f"job #{num} ({label}): {type(error).__name__}: {error}")
    finally:
        HydraConfig.instance().cfg = saved
    if problems:
        raise SweepError(f"sweep refused before submission ({len(problems)} of {len(job_overrides)} jobs "
                         "invalid; nothing was submitted):\n  " + "\n  ".join(problems))
    check_distinct_outputs(cells)
    return cells


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _swept_keys(job_overrides: Sequence[Sequence[str]]) -> set[str]:
    """Keys whose value differs between cells (the labels show only these)."""
    values: dict[str, set[str]] = {}
    for overrides in job_overrides:
        for override in overrides:
            values.setdefault(_override_key(override), set()).add(override)
    return {key for key, seen in values.items() if len(seen) > 1}


def _compose_cell(config: DictConfig, hydra_context, overrides: list[str], num: int, label: str,
                  runs_here: bool) -> Cell:
    """The cell's config as the job will see it: composed, its output directory set and its task config cut out
    the way Hydra's ``run_job`` does, then validated."""
    from experiments.plan import validate  # noqa: PLC0415 - heavy (torch, timm): only when a sweep is launched

    cfg = hydra_context.config_loader.load_sweep_config(config, overrides)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.job.num = num
        cfg.hydra.job.id = f"job_id_for_{num}"
    HydraConfig.instance().set_config(cfg)
    output_dir = os.path.abspath(os.path.join(str(cfg.hydra.sweep.dir), str(cfg.hydra.sweep.subdir)))
    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = output_dir
    HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.output_dir} now resolves to this cell's directory
    task_cfg = copy.deepcopy(cfg)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
        run_dir = os.path.abspath(str(task_cfg.paths.run_dir))  # resolved while HydraConfig is this cell's
        task_cfg.paths.run_dir = run_dir
        if not runs_here and task_cfg.device == "cuda":
            import torch  # noqa: PLC0415

            if not torch.cuda.is_available():
                task_cfg.device = "auto"  # the jobs run on GPU nodes; this machine need not have one
    plan = validate(task_cfg)
    resume_dir = os.path.abspath(plan.resume_dir) if plan.resume_dir is not None else None
    return Cell(num, overrides, label, output_dir, run_dir, os.path.abspath(str(task_cfg.paths.results_dir)),
                str(cfg.hydra.job.name), resume_dir)


def check_distinct_outputs(cells: Sequence[Cell]) -> None:
    """Refuse cells that share Hydra's output directory, ``paths.run_dir`` or the resume folder (cells whose
    configs differ only in keys the run key leaves out: paths, cosmetic, evaluation and measurement keys)."""
    problems = []
    names = {"output_dir": "Hydra output directory", "run_dir": "paths.run_dir",
             "resume_dir": "resume folder (the same run key: the configs differ only in keys that do not change "
                           "training)"}
    for key, what in names.items():
        seen: dict[str, list[Cell]] = {}
        for cell in cells:
            if getattr(cell, key) is not None:
                seen.setdefault(getattr(cell, key), []).append(cell)
        for path, group in seen.items():
            if len(group) > 1:
                jobs = ", ".join(f"#{c.num} ({c.label})" for c in group)
                problems.append(f"jobs {jobs} resolve to the same {what} {path}")
    if problems:
        raise SweepError("sweep refused before submission (nothing was submitted): " + "; ".join(problems)
                         + ". Make hydra.sweep.subdir and paths.run_dir distinct per job, e.g. include "
                         "${hydra.job.num} or the swept keys.")
