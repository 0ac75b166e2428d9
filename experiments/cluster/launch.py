"""Sweep launchers: hydra-submitit-launcher, plus what happens before submission and after the jobs end.

``launcher=slurm`` and ``launcher=local`` (``experiments/conf/launcher/``) select hydra-submitit-launcher's
``submitit_slurm`` / ``submitit_local`` configs with these classes as ``_target_`` (through
``hydra_plugins/adaptive_vit_bench_launcher``: Hydra instantiates launchers from ``hydra_plugins`` only). The job
side is the plugin's: each job runs ``experiments/run.py``'s task in its own Hydra output directory, and
``checkpoint()`` resubmits it on submitit's signal (``experiments/train/preemption.py`` has the training side of that);
a run that raises also gets its traceback into the job's logs. Added on the launching side:

Before anything is submitted (``experiments/cluster/sweep_checks.py``)
  - every sweep cell is composed and checked with ``experiments.plan.validate`` (checks about this machine's
    hardware are left to SLURM jobs); all failing cells are reported together (``SweepError``), nothing is
    submitted;
  - two cells resolving to the same Hydra output directory, ``paths.run_dir`` or resume folder are refused: they
    would share, and resume from, each other's checkpoints;
  - the sweep directory is resolved once and pinned (an absolute ``hydra.sweep.dir`` override), so a requeued job,
    which composes its config again, lands in the same directory;
  - this checkout goes first on the jobs' ``PYTHONPATH`` (they run the code that launched them).
Submission
  - one ``sbatch`` job array (``array_parallelism`` at a time); if sbatch refuses it (unknown partition, bad
    resources) a ``SubmissionError`` names the job and its cells and carries sbatch's message.
After
  - every job is waited for; one failure does not stop the others;
  - the summary (log lines and ``<sweep dir>/sweep_summary.json``) gives each job's state, its results record and,
    for failures, the error and the log files; the command then exits with the first failure's error.

``launch_cells`` launches a given list of cells (not a product of swept values) the same way, through the
launcher its overrides choose: ``experiments/reproduce.py ... launcher=slurm`` submits one cell per checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf

from experiments.cluster.sweep_checks import Cell, SweepError, compose_cells, pin_sweep_dir

log = logging.getLogger(__name__)

SUMMARY_NAME = "sweep_summary.json"


class SubmissionError(RuntimeError):
    """The scheduler refused the jobs (sbatch's message included)."""


class SweepJobError(RuntimeError):
    """A job of the sweep failed; the message names it, its state and its logs."""


@dataclass
class JobSummary:
    num: int
    overrides: str
    job_id: Optional[str]
    state: str  # COMPLETED, FAILED (the run raised), or the scheduler's state (CANCELLED, TIMEOUT, ...)
    scheduler_state: Optional[str]
    output_dir: str
    record: Optional[str] = None
    logs: list[str] = field(default_factory=list)
    error: Optional[str] = None


# -------------------------------------------------------------------------------------------------- after
def find_record(cell: Cell, since: float) -> Optional[str]:
    """The results record this cell's run wrote (matched on ``provenance.run_dir``), newest first."""
    folder = Path(cell.results_dir) / "runs"
    if not folder.is_dir():
        return None
    candidates = sorted((p for p in folder.glob("*.json") if p.stat().st_mtime >= since - 2),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        run_dir = (record.get("provenance") or {}).get("run_dir")
        if run_dir and os.path.abspath(run_dir) == cell.run_dir:
            return str(path)
    return None


_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt|Killed)\b.*")


def _first_line(error: BaseException) -> str:
    """The exception line of a job's error (the last ``XxxError: ...`` of a remote traceback), else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return line
    return f"{type(error).__name__}: {lines[0] if lines else repr(error)}"


def _job_logs(job, cell: Cell) -> list[str]:
    """Rank 0's logs, the most telling first: submitit's stderr if it has anything, its stdout, Hydra's job log."""
    paths = job._sub_jobs[0].paths if getattr(job, "_sub_jobs", None) else job.paths
    stderr, stdout = str(paths.stderr), str(paths.stdout)
    logs = [stderr, stdout] if os.path.exists(stderr) and os.path.getsize(stderr) else [stdout, stderr]
    logs.append(os.path.join(cell.output_dir, f"{cell.task_name}.log"))
    return [p for p in logs if os.path.exists(p)] or logs[:2]


TERMINAL_FAILURES = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                     "DEADLINE", "INTERRUPTED"}


@contextlib.contextmanager
def _job_environ(job):
    """A debug job runs in this process when waited for; it needs the environment it was created with."""
    environ = getattr(job, "environ", None)
    if environ is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.update(environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def collect(job, cell: Cell, since: float) -> tuple[JobReturn, JobSummary]:
    """Wait for ``job``; its rank-0 ``JobReturn`` (a failed one when the job died without a result) and summary."""
    error: Optional[BaseException] = None
    ret: Optional[JobReturn] = None
    try:
        with _job_environ(job):
            error = job.exception()  # waits (runs a debug job); None when every task returned
    except Exception as caught:  # noqa: BLE001 - the scheduler lost the job, etc.
        error = caught
    if error is None:
        try:
            ret = job.results()[0]
        except Exception as caught:  # noqa: BLE001
            error = caught
    try:
        scheduler_state = str(job.state)
    except Exception:  # noqa: BLE001
        scheduler_state = None
    summary = JobSummary(cell.num, cell.label, str(getattr(job, "job_id", None)), "COMPLETED", scheduler_state,
                         cell.output_dir)
    if ret is not None and ret.status == JobStatus.COMPLETED:
        summary.record = find_record(cell, since)
        return ret, summary
    if ret is not None:  # the run raised inside the job: Hydra caught it
        cause = ret._return_value
        summary.state = "FAILED"
        summary.error = f"{type(cause).__name__}: {cause}".splitlines()[0]
    else:
        ret = JobReturn(overrides=cell.overrides, status=JobStatus.FAILED, working_dir=cell.output_dir,
                        task_name=cell.task_name)
        cause = error
        words = (scheduler_state or "").upper().split()
        summary.state = words[0] if words and words[0] in TERMINAL_FAILURES else "FAILED"
        summary.error = _first_line(error) if error is not None else "no result"
    summary.logs = _job_logs(job, cell)
    wrapped = SweepJobError(f"job #{cell.num} ({cell.label}) {summary.state}: {summary.error}; "
                            f"log: {summary.logs[0]}")
    wrapped.__cause__ = cause if isinstance(cause, BaseException) else None
    ret.return_value = wrapped
    ret.status = JobStatus.FAILED
    return ret, summary


def write_summary(sweep_dir: Path, launcher: str, summaries: Sequence[JobSummary]) -> Path:
    ok = sum(s.state == "COMPLETED" for s in summaries)
    log.info("Sweep summary: %d of %d jobs completed (%s launcher), %s", ok, len(summaries), launcher, sweep_dir)
    for s in summaries:
        line = f"  #{s.num} {s.state:<10} job {s.job_id}  {s.overrides}"
        if s.state == "COMPLETED":
            log.info("%s  record: %s", line, s.record)
        else:
            log.error("%s  error: %s  log: %s", line, s.error, " ".join(s.logs))
    path = sweep_dir / SUMMARY_NAME
    jobs = {s.num: asdict(s) for s in summaries}
    if path.exists():  # an earlier batch of this sweep (hydra.sweeper.max_batch_size)
        try:
            earlier = json.loads(path.read_text()).get("jobs", [])
        except (OSError, json.JSONDecodeError):
            earlier = []
        jobs = {**{job["num"]: job for job in earlier}, **jobs}
    ordered = [jobs[num] for num in sorted(jobs)]
    payload = {"sweep_dir": str(sweep_dir), "launcher": launcher,
               "completed": sum(job["state"] == "COMPLETED" for job in ordered), "total": len(ordered),
               "jobs": ordered}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    log.info("Sweep summary written to %s", path)
    return path


# ------------------------------------------------------------------------------------------------ launchers
def _export_checkout() -> None:
    """Jobs inherit this environment: put this checkout first on their ``PYTHONPATH``, so they unpickle the
    launcher (``hydra_plugins.adaptive_vit_bench_launcher``) and run this checkout's code whatever the install."""
    root = str(Path(__file__).resolve().parents[2])
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *entries])


class _SweepLauncher(BaseSubmititLauncher):
    """``BaseSubmititLauncher`` with the checks, error messages and summary described in the module docstring.

    The job side (``__call__``, ``checkpoint``) is the plugin's. ``launch`` is a fork of the plugin's
    ``BaseSubmititLauncher.launch`` (hydra-submitit-launcher 1.2.0), which has no hook between building the
    executor, submitting and waiting. Kept as the plugin does it, and compared with it by
    ``tests/test_launcher.py::test_launch_submits_what_the_plugins_launch_submits``:
      - the executor: ``AutoExecutor(cluster, folder=submitit_folder, <cluster>_max_num_timeout=...)``, then every
        other parameter, prefixed with ``<cluster>_`` unless it is one of ``BaseQueueConf``'s;
      - the sweep directory: created, and ``chmod``-ed to ``hydra.sweep.mode`` (octal) when that key is set;
      - one ``map_array`` of ``(overrides, "hydra.sweep.dir", num, "job_id_for_<num>", Singleton state)``;
      - the list of rank-0 ``JobReturn``s, in cell order.
    Different from it:
      - before the executor: ``pin_sweep_dir`` and ``compose_cells`` (``experiments/cluster/sweep_checks.py``), then the
        checkout is put on the jobs' ``PYTHONPATH``;
      - an executor that refuses the parameters raises ``SweepError``, a refused ``map_array``
        ``SubmissionError``;
      - each cell is logged by its label (the swept keys) rather than by all its overrides;
      - instead of ``[j.results()[0] for j in jobs]``, which raises at the first failed job and leaves the others
        unwaited, ``collect`` waits for every job and turns a failure into a failed ``JobReturn`` carrying a
        ``SweepJobError``; then ``write_summary``.
    """

    _RUNS_HERE = True

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """Job side: the plugin's (Hydra's ``run_job`` in this job's directory), plus the run's exception in the
        job's logs (``run_job`` keeps it in the result only)."""
        ret = super().__call__(*args, **kwargs)
        if ret.status == JobStatus.FAILED and isinstance(ret._return_value, BaseException):
            error = ret._return_value
            log.error("the run failed: %s: %s", type(error).__name__, error,
                      exc_info=(type(error), error, error.__traceback__))
        return ret

    def _executor(self):
        """The plugin's executor and parameter mapping; parameters submitit refuses raise ``SweepError``."""
        import submitit  # noqa: PLC0415 - as the plugin: keeps plugin discovery fast

        params = dict(self.params)
        init_params: dict[str, Any] = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init_params[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        try:
            executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        except (ValueError, TypeError) as error:
            raise SweepError(f"invalid hydra.launcher parameters for {self._EXECUTOR} (nothing was submitted): "
                             f"{error}") from error
        return executor

    def _make_sweep_dir(self, sweep_dir: Path) -> None:
        """As the plugin: create it, with ``hydra.sweep.mode`` (octal) when set."""
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))

    def _submit(self, executor, cells: Sequence[Cell]) -> list:
        """One ``map_array`` with the plugin's job arguments; a refusal raises ``SubmissionError``."""
        job_params = [(cell.overrides, "hydra.sweep.dir", cell.num, f"job_id_for_{cell.num}", Singleton.get_state())
                      for cell in cells]
        try:
            jobs = executor.map_array(self, *zip(*job_params))
        except Exception as error:  # noqa: BLE001 - sbatch's refusal, a missing sbatch, ...
            name = self.params.get("name", "run")
            listed = "; ".join(f"#{c.num} ({c.label})" for c in cells)
            message = str(error).strip() or repr(error)
            raise SubmissionError(f"{self._EXECUTOR} refused job '{name}' ({len(cells)} cells: {listed}): "
                                  f"{message}") from error
        log.info("Submitted %d jobs: %s", len(jobs), ", ".join(str(j.job_id) for j in jobs))
        return jobs

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        sweep_dir = pin_sweep_dir(self.config)
        cells = compose_cells(self.config, self.hydra_context, job_overrides, initial_job_idx, self._RUNS_HERE)
        executor = self._executor()
        _export_checkout()
        log.info("Submitit '%s' sweep output dir: %s", self._EXECUTOR, sweep_dir)
        self._make_sweep_dir(sweep_dir)
        for cell in cells:
            log.info("\t#%d : %s", cell.num, cell.label)
        started = time.time()
        jobs = self._submit(executor, cells)
        collected = [collect(job, cell, started) for job, cell in zip(jobs, cells)]
        write_summary(sweep_dir, self._EXECUTOR, [summary for _, summary in collected])
        return [ret for ret, _ in collected]


class SlurmLauncher(_SweepLauncher):
    """``launcher=slurm``: one job array on SLURM; checks about this machine's hardware are left to the jobs."""

    _EXECUTOR = "slurm"
    _RUNS_HERE = False


class LocalLauncher(_SweepLauncher):
    """``launcher=local``: submitit's local executor (a process group per job, all at once, on this machine)."""

    _EXECUTOR = "local"


class DebugLauncher(_SweepLauncher):
    """submitit's debug executor: jobs run one after another inside the launching process (tests, debugging)."""

    _EXECUTOR = "debug"


# ------------------------------------------------------------------------------------ cells without a sweeper
def launch_cells(config_dir: Path, overrides: Sequence[str], cells: Sequence[Sequence[str]], task_function,
                 config_name: str = "config") -> list[JobReturn]:
    """Launch ``cells`` (each a list of task overrides, not a product of swept values) as one sweep of
    ``task_function`` through the launcher that ``overrides`` choose (``launcher=slurm``: one job array, with the
    checks, submission and summary above), as ``run.py -m`` does with the cells its sweeper makes; blocks until
    every job ends and returns their ``JobReturn``s in cell order. ``overrides`` compose the sweep's config (the
    launcher, ``hydra.*``); ``task_function`` runs in each job on its task config and must be importable by name
    (the jobs unpickle it)."""
    from hydra import initialize_config_dir  # noqa: PLC0415
    from hydra._internal.callbacks import Callbacks  # noqa: PLC0415
    from hydra.core.global_hydra import GlobalHydra  # noqa: PLC0415
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415
    from hydra.core.plugins import Plugins  # noqa: PLC0415
    from hydra.types import HydraContext, RunMode  # noqa: PLC0415

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        config = hydra.compose_config(config_name, list(overrides), run_mode=RunMode.MULTIRUN)
        HydraConfig.instance().set_config(config)
        context = HydraContext(config_loader=hydra.config_loader, callbacks=Callbacks(config))
        launcher = Plugins.instance().instantiate_launcher(hydra_context=context, task_function=task_function,
                                                          config=config)
        return list(launcher.launch([list(cell) for cell in cells], initial_job_idx=0))
