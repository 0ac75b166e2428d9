"""Entry point: ``python -m experiments.regenerate [--stage S ...] [--dry-run] [--results DIR]`` (``make results``):
rebuild the committed records from a clean checkout, stage by stage, resumably.

The stages are ``experiments/regeneration.yaml`` (embedded benchmark defaults with 5 seeds for the headline
methods, the dense fine-tuned control, stronger settings, trade-off curves from one checkpoint per seed, the A-ViT
ablations, moving digits, DeiT-T/S/B FLOPs, the CPU throughput table). Each stage expands into jobs: one call of
``experiments/run.py``, ``tradeoff.py`` or ``measure.py`` with Hydra overrides; a ``calibrate`` job runs
``experiments/calibrate.py`` (threshold ToMe's thresholds for the job's ``r``, on its starting weights) and then
``run.py`` (or the stage's ``evaluate``: ``measure.py``) on the calibrated checkpoint, which stays in the job's
folder (records name it and its sha256). The expansion is ``experiments/regeneration_jobs.py``'s: the methods come
from the registry (``all``, ``with_knob``), so a new method joins every stage without an edit here.

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
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from tqdm import tqdm

from experiments.regeneration_jobs import LOGS, ROOT, SPEC, Job, expand, load_spec


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
