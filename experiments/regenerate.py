"""Entry point: ``python -m experiments.regenerate [--stage S ...] [--dry-run] [--results DIR]`` (``make results``):
rebuild the committed records from a clean checkout, stage by stage, resumably.

The stages are ``experiments/regeneration.yaml`` (embedded benchmark defaults with 5 seeds for the headline
methods, the dense fine-tuned control, stronger settings, trade-off curves from one checkpoint per seed, the A-ViT
ablations, moving digits, DeiT-T/S/B FLOPs, the CPU throughput table). Each stage expands into jobs: one call of
``experiments/run.py``, ``tradeoff.py`` or ``measure.py`` with Hydra overrides; a ``calibrate`` job runs
``experiments/calibrate.py`` (threshold ToMe's thresholds for the job's ``r``, on its starting weights) and then
``run.py`` (or the stage's ``evaluate``: ``measure.py``) on the calibrated checkpoint, which stays in the job's
folder (records name it and its sha256). The
methods come from the registry (``all``, ``with_knob``), so a new method joins every stage without an edit here.

**Resume.** Before a job runs, the identities of the records it would write are computed from its config alone
(``records.identity.result_identity``: the config, the method parameters with defaults filled, the starting
weights' sha256 -- the shipped baseline's from its manifest --, the data files): a job whose every record is
already in ``--results`` is skipped. A job whose starting weights are not known yet (a baseline that is neither
shipped nor cached) runs; a ``calibrate`` job calibrates first when its checkpoint is missing, then skips the
evaluation if the calibrated weights' record is already there (calibration is deterministic, and so are the
checkpoint's bytes). An interrupted fine-tune resumes from its own state (``paths.state_dir``), so running the
command again after an interruption recomputes nothing that finished and little that did not.

Each job runs in its own process, in the run folder ``outputs/regenerate/<stage>/<number>/``; its output goes to
``outputs/regenerate/<stage>/<number>.log``; each stage's wall time is printed and appended to ``times.jsonl``.
"""
from __future__ import annotations

import argparse
import fnmatch
import itertools
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from omegaconf import OmegaConf
from tqdm import tqdm

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


# --------------------------------------------------------------------------------------------------- identity
def planned_identities(job: Job) -> Optional[set[str]]:
    """The identity keys of the records ``job`` writes, from its config alone; None when they depend on weights
    that do not exist yet (a baseline neither shipped nor cached)."""
    from experiments import shipped
    from experiments.baseline import baseline_key
    from experiments.curve import point_config, validate_sweep
    from experiments.plan import validate
    from experiments.records.identity import result_identity
    from experiments.train.checkpoints import file_sha256
    import methods

    if job.entry == "calibrate":  # the evaluation's identity needs the calibrated weights' hash
        validate(compose(job.run_overrides()))  # the method's config: refused before anything runs
        if not job.calibrated().is_file():
            return None
        cfg = compose(job.evaluation_overrides())
    else:
        cfg = compose(job.overrides)
    if job.evaluates == "measure":
        plan = validate(cfg, cfg.measure.num_classes, train=False)
    elif job.entry == "tradeoff":
        plan, knob, values, target = validate_sweep(cfg)
    else:
        plan = validate(cfg)
    if plan.weights.kind == "checkpoint":
        start = file_sha256(plan.weights.path)
    elif plan.weights.kind == "baseline" and job.evaluates != "measure":
        key = baseline_key(plan)
        found = shipped.verified(plan.config.paths.baselines_dir, key) or \
            Path(plan.config.paths.cache_dir) / f"{key}.pth"
        start = file_sha256(found)
        if start is None:
            return None
    else:
        start = None
    if job.entry == "tradeoff":
        keys = set()
        for value in values:
            point = OmegaConf.to_container(point_config(cfg, plan, knob, value), resolve=True)
            params = methods.resolved_params(plan.method_name, {**plan.method_params, **target, knob: value})
            keys.add(result_identity(point, plan.method_name, params, "tradeoff", plan.trains, start,
                                     plan.data_files)["key"])
        return keys
    kind, trains = ("measure", False) if job.evaluates == "measure" else ("run", plan.trains)
    return {result_identity(OmegaConf.to_container(cfg, resolve=True), plan.method_name, plan.recorded_params,
                            kind, trains, start, plan.data_files)["key"]}


def compose(overrides: list[str]):
    """The task config a job's entry point composes (``paths.run_dir``: where its run folders go; paths never
    enter an identity)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from experiments.config_store import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "experiments" / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*overrides, f"paths.run_dir={LOGS}"])


def existing_identities(results: Path) -> set[str]:
    """The identity keys of the records under ``results`` (unreadable files are skipped: the report names them)."""
    from experiments.records.identity import identity_of
    from experiments.records.store import find_record_files, load_record

    keys = set()
    for path in find_record_files(results):
        try:
            record = load_record(path)
        except (ValueError, OSError):
            continue
        if isinstance(record, dict) and "method" in record:
            keys.add(identity_of(record)["key"])
    return keys


# ------------------------------------------------------------------------------------------------------ main
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], prog="python -m experiments.regenerate")
    parser.add_argument("--stage", action="append", help="a stage of experiments/regeneration.yaml (repeatable); "
                                                         "default: all")
    parser.add_argument("--spec", type=Path, default=SPEC, help="the stages file")
    parser.add_argument("--results", type=Path, default=Path("results"), help="where records go (and are found)")
    parser.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    parser.add_argument("--shard", default="0/1", help="I/N: run every N-th job from the I-th (0-based), so N "
                                                       "processes or machines share the work; default 0/1")
    parser.add_argument("--extra", action="append", default=[],
                        help="a Hydra override for every job that cannot change a result (threads=1, "
                             "num_workers=0, launcher=...: experiments.records.identity.NOT_RESULT_KEYS); repeatable")
    args = parser.parse_args(argv)
    try:
        shard, shards = (int(part) for part in args.shard.split("/"))
        if not 0 <= shard < shards:
            raise ValueError
    except ValueError:
        print(f"error: --shard={args.shard!r}; valid: I/N with 0 <= I < N, e.g. 0/2", file=sys.stderr)
        return 2
    from experiments.records.identity import NOT_RESULT_KEYS

    for override in args.extra:  # the skip test compares identities: an extra that entered one would lie
        key = override.split("=", 1)[0].lstrip("+~")
        if "=" not in override or not any(key == k or key.startswith(f"{k}.") for k in NOT_RESULT_KEYS):
            print(f"error: --extra {override!r}: only keys that cannot change a result; valid: "
                  f"{', '.join(NOT_RESULT_KEYS)}", file=sys.stderr)
            return 2
    try:
        spec = load_spec(args.spec)
        jobs = expand(spec, args.stage)[shard::shards]
    except (ValueError, OSError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    done = existing_identities(args.results)
    todo, skipped = [], 0
    for job in tqdm(jobs, desc="planning", disable=not sys.stderr.isatty()):
        try:  # every job is checked before any runs: a bad stage costs nothing
            job.planned = planned_identities(job)
        except ValueError as error:  # ConfigError, CheckpointError, Hydra's composition errors
            print(f"error: {job.name} (python -m experiments.{job.entry} {' '.join(job.overrides)}): {error}",
                  file=sys.stderr)
            return 2
        if job.planned is not None and job.planned <= done:
            skipped += 1
        else:
            todo.append(job)
    print(f"{len(jobs)} jobs: {skipped} already have their records, {len(todo)} to run", flush=True)
    if args.dry_run:
        for job in todo:
            print(f"{job.name}: python -m experiments.{job.entry} {' '.join(job.overrides)}")
        return 0
    times: dict[str, float] = {}
    failed, late_skips = [], 0
    for job in tqdm(todo, desc="jobs", disable=not sys.stderr.isatty()):
        log_file = LOGS / f"{job.name}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log_file, "w") as handle:
            for step, command in enumerate(job.commands(args.results, LOGS, args.extra)):
                if step and job.entry == "calibrate" and (planned_identities(job) or {None}) <= done:
                    late_skips += 1  # calibrated again to the same weights: its evaluation is already recorded
                    print(f"{job.name}: the calibrated weights' evaluation is already recorded", file=handle)
                    break
                status = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=Path.cwd()).returncode
                if status != 0:
                    break
        times[job.stage] = times.get(job.stage, 0.0) + time.perf_counter() - start
        print(f"{job.name} {'ok' if status == 0 else f'FAILED ({status}), see {log_file}'}: "
              f"{' '.join(job.overrides)}", flush=True)
        if status != 0:
            failed.append(job.name)
    with open(LOGS / "times.jsonl", "a") as handle:
        handle.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages_s": times,
                                 "ran": len(todo) - late_skips, "skipped": skipped + late_skips,
                                 "failed": failed}) + "\n")
    for stage, seconds in times.items():
        print(f"stage {stage}: {seconds / 60:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
