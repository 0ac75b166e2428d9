"""The regeneration's jobs: ``experiments/regeneration.yaml`` read, checked and expanded into :class:`Job` s, one
per entry-point call (``experiments/regenerate.py`` runs them).

A stage's methods come from the registry (``all``, ``headline``, ``with_knob`` or a list, less ``exclude``), its
setting from each method's registration (``default``, ``stronger``; ``bench_model`` picks a per-backbone pair),
its seeds from the file's lists; ``sweep`` expands a sweep config's parameters instead, and ``grid`` adds a
Cartesian product over override keys. Jobs are numbered within their stage, so a job's folder does not depend on
which other stages run.
"""
from __future__ import annotations

import fnmatch
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "regeneration.yaml"
SWEEPS = ROOT / "experiments" / "conf" / "sweep"
ENTRIES = ("run", "tradeoff", "measure", "calibrate")
EVALUATIONS = ("run", "measure")  # a calibrate job's second step
LOGS = Path("outputs") / "regenerate"


@dataclass
class Job:
    stage: str
    entry: str
    overrides: list[str]
    name: str = ""
    evaluate: str = "run"  # a calibrate job's second step: run.py, or measure.py (cost alone)
    planned: Optional[set[str]] = field(default=None, repr=False)  # identity keys; None: unknown until it runs

    def commands(self, results: Path, log_dir: Path, extra: Iterable[str] = ()) -> list[list[str]]:
        """The processes the job runs, in order: one entry point; for ``calibrate``, the calibration and then the
        evaluation of what it wrote (``run.py``)."""
        folder = log_dir / self.name
        if self.entry != "calibrate":
            return [[sys.executable, "-m", f"experiments.{self.entry}", *self.overrides, *extra, "progress=false",
                     f"paths.results_dir={results}", f"hydra.run.dir={folder}"]]
        return [[sys.executable, "-m", "experiments.calibrate", *self.overrides, *extra, "progress=false",
                 f"calibration.out={self.calibrated(log_dir)}", f"hydra.run.dir={folder / 'calibrate'}"],
                [sys.executable, "-m", f"experiments.{self.evaluate}", *self.evaluation_overrides(log_dir), *extra,
                 "progress=false", f"paths.results_dir={results}", f"hydra.run.dir={folder}"]]

    @property
    def evaluates(self) -> str:
        """The entry point that writes the job's records: its own, or a ``calibrate`` job's second step."""
        return self.evaluate if self.entry == "calibrate" else self.entry

    def calibrated(self, log_dir: Path = LOGS) -> Path:
        """Where a ``calibrate`` job's calibration writes its checkpoint (the weights and the thresholds)."""
        return log_dir / self.name / "calibrated.pth"

    def evaluation_overrides(self, log_dir: Path = LOGS) -> list[str]:
        """A ``calibrate`` job's evaluation: its overrides (``method.params.r``: the calibration's target) on the
        calibrated checkpoint."""
        return [*self.run_overrides(), "method.params.threshold=calibrated",
                f"model.checkpoint={self.calibrated(log_dir)}"]

    def run_overrides(self) -> list[str]:
        """The overrides a run config takes (a ``calibrate`` job's ``calibration.*`` keys are the calibration's)."""
        return [o for o in self.overrides if not o.lstrip("+~").startswith("calibration.")]


# ------------------------------------------------------------------------------------------------ expansion
def load_spec(path: Path = SPEC) -> dict[str, Any]:
    spec = yaml.safe_load(path.read_text())
    for name, stage in spec["stages"].items():
        if stage.get("entry") not in ENTRIES:
            raise ValueError(f"{path}: stages.{name}.entry={stage.get('entry')!r}; valid: {', '.join(ENTRIES)}")
        if stage.get("evaluate", "run") not in EVALUATIONS or ("evaluate" in stage and stage["entry"] != "calibrate"):
            raise ValueError(f"{path}: stages.{name}.evaluate={stage.get('evaluate')!r}; valid: "
                             f"{', '.join(EVALUATIONS)}, and only with entry: calibrate")
    return spec


def _methods(spec: dict[str, Any], selector: Any, exclude: Any) -> list[str]:
    import methods

    names = methods.list_methods()
    exclude = spec["headline_methods"] if exclude == "headline" else exclude
    if selector == "headline":
        selector = spec["headline_methods"]
    if selector == "all":
        chosen = names
    elif selector == "with_knob":
        chosen = sorted(methods.methods_with_knob())
    else:
        unknown = sorted(set(selector) - set(names))
        if unknown:
            raise ValueError(f"methods {unknown} are not registered; valid: {', '.join(names)}")
        chosen = list(selector)
    return [name for name in chosen if name not in set(exclude)]


def _seeds(spec: dict[str, Any], selector: Any, method: Optional[str]) -> list[int]:
    if selector == "headline":
        return spec["seeds"]["headline" if method in spec["headline_methods"] else "other"]
    if isinstance(selector, str):
        return spec["seeds"][selector]
    return list(selector)


def _setting(method: str, setting: str, bench_model: Optional[str]) -> Optional[dict]:
    """The method parameters of ``setting`` (None: the method has no such setting)."""
    import methods

    if setting == "default":
        return methods.bench_settings(method, bench_model)[0] if bench_model else {}
    pair = methods.bench_settings(method, bench_model)
    return pair[1] if len(pair) > 1 else None


def _param_overrides(params: dict[str, Any]) -> list[str]:
    return [f"method.params.{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}"
            for key, value in sorted(params.items())]


def _sweep_params(name: str) -> dict[str, list[str]]:
    """A sweep config's ``hydra.sweeper.params`` as value lists (comma lists; ``glob`` over the methods)."""
    import methods

    content = yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())
    params = {}
    for key, value in content["hydra"]["sweeper"]["params"].items():
        text = str(value)
        if text.startswith("glob("):
            pattern, _, rest = text[len("glob("):-1].partition(",")
            excluded = rest.partition("=")[2].strip("[]").split(",") if rest else []
            params[key] = [m for m in methods.list_methods() if fnmatch.fnmatch(m, pattern)
                           and not any(fnmatch.fnmatch(m, e.strip()) for e in excluded if e.strip())]
        else:
            params[key] = [part.strip() for part in text.split(",")]
    return params


def expand(spec: dict[str, Any], stages: Optional[Iterable[str]] = None) -> list[Job]:
    """Every job of the chosen stages (all by default), in the file's order."""
    chosen = list(stages) if stages else list(spec["stages"])
    unknown = [name for name in chosen if name not in spec["stages"]]
    if unknown:
        raise ValueError(f"--stage {unknown[0]!r} unknown; valid: {', '.join(spec['stages'])}")
    jobs = []
    for stage_name in chosen:
        stage = spec["stages"][stage_name]
        base = list(stage.get("overrides", []))
        grid = stage.get("grid", {})
        grid_rows = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
        for row in grid_rows:
            row_overrides = [f"{key}={value}" for key, value in row.items()]
            bench_model = row.get("model", stage.get("bench_model"))
            if "sweep" in stage:
                for sweep in stage["sweep"]:
                    params = _sweep_params(sweep)
                    params.pop("seed", None)
                    keys = list(params)
                    for values in itertools.product(*params.values()):
                        method = dict(zip(keys, values)).get("method")
                        for seed in _seeds(spec, stage["seeds"], method):
                            overrides = [f"{k}={v}" for k, v in zip(keys, values)] + base + row_overrides
                            jobs.append(Job(stage_name, stage["entry"], overrides + [f"seed={seed}"]))
                continue
            for method in _methods(spec, stage["methods"], stage.get("exclude", [])):
                params = _setting(method, stage.get("setting", "default"), bench_model)
                if params is None:
                    continue
                for seed in _seeds(spec, stage["seeds"], method):
                    jobs.append(Job(stage_name, stage["entry"], [f"method={method}", *_param_overrides(params),
                                                                 *base, *row_overrides, f"seed={seed}"],
                                    evaluate=stage.get("evaluate", "run")))
    for stage_name in chosen:  # numbered within the stage: a job's folder does not depend on the other stages
        for number, job in enumerate(job for job in jobs if job.stage == stage_name):
            job.name = f"{job.stage}/{number:04d}"
    return jobs
