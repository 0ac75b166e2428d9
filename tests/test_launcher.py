"""Sweep launching, DDP and preemption without SLURM: submitit's local and debug executors run the job code that
SLURM jobs run (``experiments/cluster/launch.py``, ``distributed.py``, ``preemption.py`` and the pipeline's resume).

- every shipped sweep config expands to cells that pass ``plan.validate``, and names only registered methods;
- ``launch`` submits what hydra-submitit-launcher's own ``launch`` submits (executor, parameters, sweep
  directory and its mode, job arguments) for the same sweep;
- bad sweeps are refused before anything is submitted: an invalid value in one cell, two cells sharing an output
  directory, launcher parameters sbatch rejects (a fake ``sbatch``);
- a local sweep whose one job crashes still finishes the others, and the summary names the failure and its log;
- a 2-task gloo DDP job (local executor) gives exactly the single-process evaluation of its weights;
- the checkpoint signal mid-epoch: a deterministic in-process check of the mid-epoch checkpoint and resume, and a
  real USR2 to a local-executor job, which requeues itself and ends with an uninterrupted run's metrics.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, RunMode

import methods
from conftest import CONF, compose_config, run_paths
from experiments import pipeline
from experiments.train import distributed, engine
from experiments.cluster import launch
from experiments.train import preemption
from experiments.cluster import sweep_checks
from experiments.plan import validate
from methods.models import create_backbone

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "experiments" / "run.py"
TINY = ["model=deit_digits", "+model.depth=2", "baseline.enabled=false", "experiment.train=true",
        "measure.throughput=false", "progress=false"]
DEBUG = "hydra.launcher._target_=hydra_plugins.adaptive_vit_bench_launcher.DebugLauncher"


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread here and in the jobs (``OMP_NUM_THREADS``): results are compared bit for bit across
    processes, and several multi-threaded processes on a small machine slow each other down tenfold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def job_env(extra: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {})}


def paths(tmp_path: Path) -> list[str]:
    return [f"hydra.sweep.dir={tmp_path}/sweep", f"paths.results_dir={tmp_path}/results",
            f"paths.cache_dir={tmp_path}/cache", f"paths.state_dir={tmp_path}/state"]


def multirun(tmp_path: Path, *overrides: str, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, str(RUN), "-m", *paths(tmp_path), *overrides]
    return subprocess.run(command, cwd=tmp_path, env=env or job_env(), capture_output=True, text=True,
                          timeout=timeout)


def summary(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "sweep" / launch.SUMMARY_NAME).read_text())


def compose_cfg(tmp_path: Path, *overrides: str):
    return compose_config(*run_paths(tmp_path, "ref/"), *overrides)


def same_results(record: dict, reference: dict) -> None:
    """Equal metrics, token statistics and training history (exact)."""
    assert record["metrics"] == reference["metrics"]
    for key in ("attn_mean", "mlp_mean", "depth_histogram", "mean_patch_depth"):
        assert record["tokens"][key] == reference["tokens"][key], key
    assert [m.get("patch_depth") for m in record["tokens"].get("maps", [])] == \
        [m.get("patch_depth") for m in reference["tokens"].get("maps", [])]
    assert record["train"]["history"] == reference["train"]["history"]


# --------------------------------------------------------------------------------------------- sweep configs
def sweep_cells(name: str) -> list[list[str]]:
    """The cells Hydra's basic sweeper makes of sweep ``name`` (its config loader expands ``glob(...)``)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+sweep={name}"], return_hydra_config=True)
        loader = GlobalHydra.instance().config_loader()
        params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(params)
    return [list(cell) for batch in BasicSweeper.split_arguments(parsed, None) for cell in batch]


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")))
def test_sweep_configs_expand_to_valid_cells(tmp_path, name):
    cells = sweep_cells(name)
    assert len(cells) >= 3 and any(c.startswith("seed=") for c in cells[0])
    registered = methods.list_methods()
    distinct = {tuple(c for c in cell if not c.startswith("seed=")) for cell in cells}  # seeds never invalidate
    for cell in sorted(distinct):
        method = dict(c.split("=", 1) for c in cell).get("method")
        assert method in registered, f"sweep {name}: method={method} is not a registered method ({registered})"
        validate(compose_cfg(tmp_path, "model=deit_small", "data.img_size=224", *cell))  # 196 patches


@pytest.mark.parametrize("name, left_out", [("methods", set()), ("video", {"heuristic"})])
def test_every_method_sweeps_list_the_registry(name, left_out):
    """The sweeps that say "every method" expand to every registered method (a new one too, without an edit)
    but those they name as left out."""
    assert {dict(c.split("=", 1) for c in cell)["method"] for cell in sweep_cells(name)} == \
        set(methods.list_methods()) - left_out


# ----------------------------------------------------------------------------------- refused before sbatch
def test_invalid_cell_is_refused_before_anything_is_submitted(tmp_path):
    result = multirun(tmp_path, "launcher=slurm", *TINY, "train.epochs=1", "train.lr=1e-3,-1")
    assert result.returncode != 0
    assert "sweep refused before submission" in result.stderr
    assert "job #1 (train.lr=-1)" in result.stderr and "train.lr" in result.stderr
    assert "job #0" not in result.stderr  # only the invalid cell is named
    assert not (tmp_path / "sweep" / ".submitit").exists()


def test_cells_sharing_an_output_directory_are_refused(tmp_path):
    result = multirun(tmp_path, "launcher=slurm", *TINY, "train.epochs=1", "seed=0,1", "hydra.sweep.subdir=same")
    assert result.returncode != 0
    assert "resolve to the same Hydra output directory" in result.stderr
    assert "#0 (seed=0)" in result.stderr and "#1 (seed=1)" in result.stderr
    assert not (tmp_path / "sweep" / ".submitit").exists()


def test_shared_run_dir_and_resume_folder_are_refused():
    cells = [sweep_checks.Cell(0, [], "seed=0", "/o/0", "/r", "/res", "run", "/state/a"),
             sweep_checks.Cell(1, [], "seed=1", "/o/1", "/r", "/res", "run", "/state/b"),
             sweep_checks.Cell(2, [], "progress=false", "/o/2", "/r2", "/res", "run", "/state/b")]
    with pytest.raises(launch.SweepError) as error:  # the same class as sweep_checks.SweepError
        sweep_checks.check_distinct_outputs(cells)
    message = str(error.value)
    assert "jobs #0 (seed=0), #1 (seed=1) resolve to the same paths.run_dir /r" in message
    assert "#1 (seed=1), #2 (progress=false) resolve to the same resume folder" in message


def test_sbatch_rejection_names_the_job_and_carries_sbatchs_message(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\n"
                                 "echo 'sbatch: error: Batch job submission failed: Invalid partition name "
                                 "specified' >&2\nexit 1\n")
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in fake.iterdir():
        tool.chmod(0o755)
    env = job_env({"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"})
    result = multirun(tmp_path, "launcher=slurm", *TINY, "train.epochs=1", "seed=0,1", "hydra.launcher.partition=nope",
                      env=env)
    assert result.returncode != 0
    assert "SubmissionError: slurm refused job 'run' (2 cells: #0 (seed=0); #1 (seed=1))" in result.stderr
    assert "invalid partition specified: nope" in result.stderr


# ------------------------------------------------------------------------------------ the plugin's launch
class RecordingExecutor:
    """Stands in for ``submitit.AutoExecutor``: records what a launcher asks of it; its jobs have finished."""

    def __init__(self, calls: list, **init):
        self.calls = calls
        calls.append(("executor", init))

    def update_parameters(self, **params):
        self.calls.append(("parameters", params))

    def map_array(self, fn, *iterables):
        args = list(zip(*iterables))
        self.calls.append(("map_array", [arg[:4] for arg in args]))  # the fifth, Singleton state, is live objects
        return [FinishedJob(overrides, num) for overrides, _, num, *_ in args]


class FinishedJob:
    def __init__(self, overrides: list[str], num: int):
        self.job_id, self.state = f"42_{num}", "COMPLETED"
        self.ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
        self.ret.return_value = num

    def exception(self):
        return None

    def results(self):
        return [self.ret]


def launch_with_recorder(tmp_path: Path, target: str, monkeypatch) -> tuple[list, list]:
    """A two-cell sweep through ``target`` (a launcher class) as Hydra sets it up: what it asked the executor,
    and the results it returned."""
    import submitit

    task = [*TINY, "train.epochs=1", f"paths.results_dir={tmp_path}/results", f"paths.cache_dir={tmp_path}/cache",
            f"paths.state_dir={tmp_path}/state"]
    calls: list = []
    monkeypatch.setattr(submitit, "AutoExecutor", lambda **init: RecordingExecutor(calls, **init))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # launch exports the checkout into it
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        config = hydra.compose_config("config", [*task, "launcher=slurm", f"hydra.launcher._target_={target}",
                                                 f"hydra.sweep.dir={tmp_path}/sweep", "+hydra.sweep.mode=750"],
                                      run_mode=RunMode.MULTIRUN)
        HydraConfig.instance().set_config(config)
        context = HydraContext(config_loader=hydra.config_loader, callbacks=Callbacks(config))
        launcher = Plugins.instance().instantiate_launcher(hydra_context=context, task_function=lambda cfg: None,
                                                          config=config)
        returns = launcher.launch([[*task, "seed=0"], [*task, "seed=1"]], initial_job_idx=3)
    assert stat.S_IMODE((tmp_path / "sweep").stat().st_mode) == 0o750
    return calls, [(ret.overrides, ret.return_value) for ret in returns]


def test_launch_submits_what_the_plugins_launch_submits(tmp_path, monkeypatch):
    """``_SweepLauncher.launch`` is a fork of ``BaseSubmititLauncher.launch``: for the same sweep both build the
    same executor, pass it the same parameters, prepare the sweep directory alike and submit the same jobs."""
    plugin = launch_with_recorder(tmp_path / "plugin", "hydra_plugins.hydra_submitit_launcher.submitit_launcher."
                                  "SlurmLauncher", monkeypatch)
    ours = launch_with_recorder(tmp_path / "ours", "hydra_plugins.adaptive_vit_bench_launcher.SlurmLauncher",
                                monkeypatch)
    relocated = json.loads(json.dumps(plugin).replace(str(tmp_path / "plugin"), str(tmp_path / "ours")))
    assert json.loads(json.dumps(ours)) == relocated
    calls, returns = ours
    assert [name for name, _ in calls] == ["executor", "parameters", "map_array"]
    assert calls[0][1]["slurm_max_num_timeout"] == 3 and calls[1][1]["slurm_array_parallelism"] == 64
    assert [num for _, _, num, _ in calls[2][1]] == [3, 4] and [value for _, value in returns] == [3, 4]
    assert [job["state"] for job in summary(tmp_path / "ours")["jobs"]] == ["COMPLETED"] * 2


# --------------------------------------------------------------------------------------- local executor
@pytest.mark.slow
def test_local_sweep_reports_the_crashed_job_and_completes_the_rest(tmp_path):
    # lr=1e30 passes validation (> 0) and blows the loss up at the second step: NonFiniteLossError in the job.
    result = multirun(tmp_path, "launcher=local", *TINY, "train.epochs=1", "train.lr=1e-3,1e30")
    assert result.returncode != 0, result.stderr[-3000:]
    jobs = {job["overrides"]: job for job in summary(tmp_path)["jobs"]}
    ok, crashed = jobs["train.lr=0.001"], jobs["train.lr=1e+30"]
    assert ok["state"] == "COMPLETED" and Path(ok["record"]).exists()
    assert json.loads(Path(ok["record"]).read_text())["config"]["train"]["lr"] == 1e-3
    assert crashed["state"] == "FAILED" and crashed["record"] is None
    assert "NonFiniteLossError" in crashed["error"]
    assert crashed["logs"] and all(Path(p).exists() for p in crashed["logs"])
    assert any("NonFiniteLossError" in Path(p).read_text() for p in crashed["logs"])
    output = result.stdout + result.stderr
    assert "Sweep summary: 1 of 2 jobs completed" in output and "#1 FAILED" in output
    assert "job #1 (train.lr=1e+30) FAILED: NonFiniteLossError" in result.stderr  # the command's error


@pytest.mark.slow
def test_local_two_task_ddp_equals_the_single_process_evaluation(tmp_path):
    result = multirun(tmp_path, "launcher=local", "hydra.launcher.tasks_per_node=2", "device=cpu", *TINY,
                      "train.epochs=1", "method=tome", "method.params.r=4", "eval.batch_size=50")
    assert result.returncode == 0, result.stderr[-3000:]
    [job] = summary(tmp_path)["jobs"]
    record = json.loads(Path(job["record"]).read_text())
    task_logs = " ".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").glob("*/*_1_log.*"))
    assert "distributed: rank 1 of 2" in task_logs and "backend gloo" in task_logs
    assert record["metrics"]["num_images"] == 360  # 8 batches of 50 over 2 ranks, none padded or repeated
    final = Path(job["output_dir"]) / "checkpoints" / "final.pth"
    single = pipeline.run(compose_cfg(tmp_path, *TINY, "experiment.train=false", "method=tome", "method.params.r=4",
                                      "eval.batch_size=50", f"model.checkpoint={final}", "device=cpu"))
    assert record["metrics"] == single["metrics"]
    for key in ("attn_mean", "mlp_mean", "depth_histogram", "mean_patch_depth", "maps"):
        assert record["tokens"][key] == single["tokens"][key], key


# ------------------------------------------------------------------------------------------ preemption
class Interrupted(Exception):
    pass


def test_mid_epoch_checkpoint_resumes_exactly(tmp_path, monkeypatch):
    """The signal path without signals: a deferral that fires at step 5 of epoch 1, then a fresh run resumes."""
    overrides = [*TINY, "train.epochs=2", "train.batch_size=128"]

    class FiresOnce(preemption.Deferral):
        def __init__(self):
            super().__init__()
            self.steps = 0

        def requested(self, env=distributed.SINGLE):
            self.steps += 1
            return self.steps == 12 + 5  # 12 steps per epoch (1437 images / 128)

        def hand_over(self, env=distributed.SINGLE):
            raise Interrupted

    import contextlib

    monkeypatch.setattr(preemption, "deferred", contextlib.contextmanager(lambda: (yield FiresOnce())))
    cfg = compose_cfg(tmp_path, *overrides)
    with pytest.raises(Interrupted):
        pipeline.run(cfg)
    [last] = list((tmp_path / "ref" / "state").glob("*/last.pth"))
    saved = torch.load(last, weights_only=False)
    assert (saved["epoch"], saved["step"]) == (1, 5) and len(saved["history"]) == 1
    monkeypatch.setattr(preemption, "deferred", contextlib.contextmanager(lambda: (yield preemption.Deferral())))
    resumed = pipeline.run(cfg)
    assert not last.exists()  # finished: the resume state is cleared
    reference = pipeline.run(compose_cfg(tmp_path / "fresh", *overrides))
    same_results(resumed, reference)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_checkpoint_signal_requeues_a_local_job_which_resumes_to_the_same_result(tmp_path):
    overrides = [*TINY, "train.epochs=3"]
    command = [sys.executable, str(RUN), "-m", *paths(tmp_path), "launcher=local", *overrides]
    launcher = subprocess.Popen(command, cwd=tmp_path, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        log = None
        deadline = time.time() + 300
        while time.time() < deadline and launcher.poll() is None:
            logs = list((tmp_path / "sweep").glob("*/run.log"))
            if logs and "epoch 0:" in logs[0].read_text():
                log = logs[0]
                break
            time.sleep(0.1)
        assert log is not None, "training never started"
        [folder] = [p for p in (tmp_path / "sweep" / ".submitit").iterdir() if p.name.isdigit()]  # = controller pid
        tasks = _children(int(folder.name))
        assert tasks, "no task process under the local controller"
        for pid in tasks:
            os.kill(pid, signal.SIGUSR2)  # what the controller sends before the time limit
        out, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, err[-3000:]
    text = log.read_text()
    assert "checkpointed epoch" in text and "resumed from" in text
    [job] = summary(tmp_path)["jobs"]
    record = json.loads(Path(job["record"]).read_text())
    reference = pipeline.run(compose_cfg(tmp_path, *overrides))
    same_results(record, reference)


# ------------------------------------------------------------------------------------- sharding helpers
def test_batch_shards_cover_every_image_once_in_single_process_batches(monkeypatch):
    for n, batch, world in [(360, 50, 2), (360, 256, 3), (7, 4, 4), (1, 8, 2)]:
        shards = [list(distributed.BatchShardSampler(n, batch, r, world)) for r in range(world)]
        monkeypatch.setattr(distributed, "gather_objects", lambda obj, env, shards=shards: shards)
        merged = distributed.merge_batches(shards[0], distributed.DistEnv(0, world))
        assert merged == [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]


class Capture:
    """A ``merge`` that keeps one rank's per-batch parts."""

    def __call__(self, parts):
        self.parts = parts
        return parts


def test_evaluate_merge_gives_identical_metrics(monkeypatch):
    """Evaluating shard by shard and merging in batch order reproduces the one-process result exactly."""
    torch.manual_seed(0)
    vit = create_backbone("deit_digits_patch4_32", num_classes=10, depth=2)
    model = methods.create_method("tome", vit, r=5).eval()
    dataset = torch.utils.data.TensorDataset(torch.randn(37, 3, 32, 32), torch.randint(0, 10, (37,)))
    cpu = torch.device("cpu")
    single = engine.evaluate(model, torch.utils.data.DataLoader(dataset, batch_size=8), cpu, keep_images=10,
                             progress=False)
    world, per_rank = 3, []
    for rank in range(world):  # 5 batches: ranks get 2, 2 and 1 (the short last batch)
        capture = Capture()
        engine.evaluate(model, distributed.eval_loader(dataset, 8, 0, distributed.DistEnv(rank, world)), cpu,
                        keep_images=10, progress=False, merge=capture)
        per_rank.append(capture.parts)
    monkeypatch.setattr(distributed, "gather_objects", lambda obj, env: per_rank)
    env = distributed.DistEnv(0, world)
    merged = engine.evaluate(model, [], cpu, keep_images=10, progress=False,
                             merge=lambda parts: distributed.merge_batches(parts, env))
    assert merged.metrics == single.metrics
    assert torch.equal(merged.token_counts, single.token_counts)
    assert torch.equal(merged.patch_depth, single.patch_depth)
    assert torch.equal(merged.map_images, single.map_images)
