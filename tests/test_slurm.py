"""Sweeps, job arrays, DDP, requeue and failures against a real SLURM (``tests/slurm_cluster.py`` starts a
single-node one in a temp directory for this module and stops exactly its daemons afterwards).

Marker ``slurm``. Skipped when SLURM is not installed (or not root); with ``SLURM_TESTS=require`` (``.ci/run`` sets
it after installing the packages) that is a failure instead, so CI cannot skip them silently. When they run, the
terminal shows ``slurm: started ...`` before and ``slurm: N tests ran against ...`` after them.

All jobs are the tiny config (2 blocks, no baseline, digits, 1 CPU thread each); equality with a single process
is exact, compared with a run in this process.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slurm_cluster
from conftest import compose_config, run_paths
from experiments import pipeline
from experiments.cluster import launch

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "experiments" / "run.py"
TINY = ["model=deit_digits", "+model.depth=2", "baseline.enabled=false", "experiment.train=true",
        "measure.throughput=false", "progress=false", "device=cpu"]
SLURM = ["launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=null",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=null", "hydra.launcher.timeout_min=30"]
RAN: list[str] = []


def say(request, line: str) -> None:
    """A line on the terminal itself (not captured), so CI logs show that these tests ran."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(line, bold=True)
        else:
            print(line, flush=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    reason = slurm_cluster.unavailable()
    if reason:
        if os.environ.get("SLURM_TESTS") == "require":
            pytest.fail(f"SLURM_TESTS=require, but {reason}")
        pytest.skip(reason)
    started = time.time()
    running = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    say(request, f"slurm: started {running.version} on localhost ({running.cpus} CPUs; slurmctld pid "
                 f"{running.started['slurmctld']}, slurmd pid {running.started['slurmd']}) in {running.root}")
    yield running
    running.stop()
    say(request, f"slurm: {len(RAN)} tests ran against a real SLURM ({', '.join(RAN)}) in "
                 f"{time.time() - started:.0f} s; its daemons are stopped")


@pytest.fixture(autouse=True)
def one_thread(cluster, request):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the jobs run with their 1 CPU (SLURM_CPUS_PER_TASK): bit-equal results
    yield
    torch.set_num_threads(before)
    RAN.append(request.node.name.removeprefix("test_").split("_")[0])


def sweep_args(tmp_path: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(RUN), "-m", f"hydra.sweep.dir={tmp_path}/sweep",
            f"paths.results_dir={tmp_path}/results", f"paths.cache_dir={tmp_path}/cache",
            f"paths.state_dir={tmp_path}/state", *overrides]


def multirun(cluster, tmp_path: Path, *overrides: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = cluster.env({**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        return subprocess.run(sweep_args(tmp_path, *overrides), cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"sweep timed out; {diagnose(cluster, tmp_path)}") from error


def diagnose(cluster, tmp_path: Path) -> str:
    logs = sorted((tmp_path / "sweep").glob(".submitit/*/*_log.*"))
    tails = "\n".join(f"== {p}\n{p.read_text(errors='replace')[-1500:]}" for p in logs[-4:])
    return f"squeue: {cluster.squeue()}\n{cluster.log_tail('slurmctld')}\n{tails}"


def summary(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "sweep" / launch.SUMMARY_NAME).read_text())


def reference(tmp_path: Path, *overrides: str) -> dict:
    """The same config run in this process (single process, 1 thread)."""
    return pipeline.run(compose_config(*run_paths(tmp_path, "ref/"), *overrides))


def load(path: str) -> dict:
    return json.loads(Path(path).read_text())


def same_tokens(record: dict, ref: dict) -> None:
    for key in ("attn_mean", "mlp_mean", "depth_histogram", "mean_patch_depth", "maps"):
        assert record["tokens"].get(key) == ref["tokens"].get(key), key


# ------------------------------------------------------------------------------------------------- tests
def test_sweep_of_four_tiny_jobs_is_one_job_array_with_a_record_each(cluster, tmp_path):
    result = multirun(cluster, tmp_path, *SLURM, "hydra.launcher.array_parallelism=2", *TINY, "train.epochs=1",
                      "method=dense,tome", "seed=0,1")
    assert result.returncode == 0, result.stderr[-3000:] + diagnose(cluster, tmp_path)
    jobs = summary(tmp_path)["jobs"]
    assert [j["state"] for j in jobs] == ["COMPLETED"] * 4
    records = [load(j["record"]) for j in jobs]
    assert len({j["record"] for j in jobs}) == 4 and len({j["output_dir"] for j in jobs}) == 4
    assert [(r["method"], r["seed"]) for r in records] == [("dense", 0), ("dense", 1), ("tome", 0), ("tome", 1)]
    for job, record in zip(jobs, records):
        assert record["provenance"]["run_dir"] == job["output_dir"]
    # One sbatch job array, two tasks at a time; SLURM knows each element as <array id>_<index>.
    array_ids = {j["job_id"].split("_")[0] for j in jobs}
    assert len(array_ids) == 1 and [j["job_id"].split("_")[1] for j in jobs] == ["0", "1", "2", "3"]
    [script] = list((tmp_path / "sweep" / ".submitit").glob("*/*_submission.sh"))
    assert "#SBATCH --array=0-3%2" in script.read_text() and "#SBATCH --partition=debug" in script.read_text()
    [array_id] = array_ids
    for index in range(4):
        info = cluster.job(f"{array_id}_{index}")
        assert info["ArrayJobId"] == array_id and info["ArrayTaskId"] == str(index)
        cluster.wait_state(f"{array_id}_{index}", ("COMPLETED",), timeout=30)  # its result came before its exit
    output = result.stdout + result.stderr
    assert "Sweep summary: 4 of 4 jobs completed (slurm launcher)" in output


def test_two_task_gloo_ddp_job_equals_a_single_process_run(cluster, tmp_path):
    result = multirun(cluster, tmp_path, *SLURM, "hydra.launcher.tasks_per_node=2", *TINY, "train.epochs=1",
                      "method=tome", "method.params.r=4", "eval.batch_size=50")
    assert result.returncode == 0, result.stderr[-3000:] + diagnose(cluster, tmp_path)
    [job] = summary(tmp_path)["jobs"]
    assert job["state"] == "COMPLETED"
    task_logs = " ".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))
    assert "distributed: rank 0 of 2" in task_logs and "distributed: rank 1 of 2" in task_logs
    assert "backend gloo" in task_logs
    info = cluster.job(job["job_id"])
    assert info["NumTasks"] == "2"
    record = load(job["record"])
    assert record["metrics"]["num_images"] == 360
    # The same weights evaluated by one process on the same data: identical metrics and token statistics.
    final = Path(job["output_dir"]) / "checkpoints" / "final.pth"
    single = reference(tmp_path, *TINY, "experiment.train=false", "method=tome", "method.params.r=4",
                       "eval.batch_size=50", f"model.checkpoint={final}")
    assert record["metrics"] == single["metrics"]
    same_tokens(record, single)


def test_preempted_and_requeued_job_resumes_to_an_uninterrupted_runs_metrics(cluster, tmp_path):
    """Two interruptions of one job: submitit's checkpoint signal (USR2, as before a time limit or on preemption:
    mid-epoch checkpoint, the job requeues itself), then ``scontrol requeue`` (killed; resumes from the last
    epoch's checkpoint). Both restarts are started at once (``StartTime=now``)."""
    overrides = [*TINY, "train.epochs=8"]
    env = cluster.env({**os.environ, "OMP_NUM_THREADS": "1"})
    launcher = subprocess.Popen(sweep_args(tmp_path, *SLURM, *overrides), cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = wait_for_log(tmp_path, launcher, lambda text: "epoch 0:" in text)
        [job_id] = [line.split()[0] for line in cluster.squeue()]
        cluster.run("scancel", "--signal=USR2", job_id)  # to the job's tasks, as SLURM does before the time limit
        cluster.wait_state(job_id, ("PENDING",), timeout=120)  # submitit requeued it after checkpointing
        cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        wait_for_log(tmp_path, launcher, lambda text: "resumed from" in text  # and an epoch done since
                     and len(re.findall(r"epoch \d+: ", text.split("resumed from")[-1])) >= 1)
        cluster.requeue(job_id)  # scontrol requeue, then StartTime=now
        out, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode == 0, err[-3000:] + diagnose(cluster, tmp_path)
    text = log_text(tmp_path)
    resumes = re.findall(r"resumed from \S+ at epoch (\d+), step (\d+)", text)
    assert len(resumes) == 2, text[-3000:]
    (_, first_step), (second_epoch, second_step) = resumes
    assert int(first_step) > 0  # the signal: mid-epoch checkpoint
    assert int(second_step) == 0 and 0 < int(second_epoch) < 8  # the kill: last epoch's checkpoint
    assert "checkpointed epoch" in text
    assert int(cluster.job(job_id)["Restarts"]) == 2
    [job] = summary(tmp_path)["jobs"]
    record = load(job["record"])
    ref = reference(tmp_path, *overrides)
    assert record["metrics"] == ref["metrics"]
    assert record["train"]["history"] == ref["train"]["history"]
    same_tokens(record, ref)


def log_text(tmp_path: Path) -> str:
    logs = list((tmp_path / "sweep").glob("*/run.log"))
    return logs[0].read_text() if logs else ""


def wait_for_log(tmp_path: Path, launcher, ready, timeout: float = 240) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if launcher.poll() is not None:
            raise AssertionError(f"the sweep ended early: {launcher.stderr.read()[-3000:]}")
        text = log_text(tmp_path)
        if ready(text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting on the job log: {log_text(tmp_path)[-2000:]}")


def test_crashed_and_cancelled_jobs_are_reported_and_the_rest_completes(cluster, tmp_path):
    """Cell #1 diverges (NonFiniteLossError inside the run); cell #2 is killed by the scheduler (scancel) and
    leaves no result; cell #0 completes."""
    env = cluster.env({**os.environ, "OMP_NUM_THREADS": "1"})
    launcher = subprocess.Popen(sweep_args(tmp_path, *SLURM, *TINY, "train.epochs=1", "train.lr=1e-3,1e30,2e-3"),
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        cancelled = None
        while time.time() < deadline and cancelled is None and launcher.poll() is None:
            for line in cluster.squeue():
                job_id, state = line.split()
                if job_id.endswith("_2") and state == "RUNNING":
                    cluster.run("scancel", job_id)
                    cancelled = job_id
            time.sleep(0.2)
        assert cancelled, "cell #2 never ran"
        out, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode != 0
    ok, crashed, killed = summary(tmp_path)["jobs"]
    assert ok["state"] == "COMPLETED" and Path(ok["record"]).exists()
    assert crashed["state"] == "FAILED" and crashed["record"] is None
    assert "NonFiniteLossError" in crashed["error"]
    assert any("NonFiniteLossError" in Path(p).read_text() for p in crashed["logs"])
    assert killed["state"] == "CANCELLED" and killed["record"] is None and killed["job_id"] == cancelled
    assert killed["logs"] and Path(killed["logs"][0]).exists()
    output = out + err
    assert "Sweep summary: 1 of 3 jobs completed" in output
    assert re.search(r"#1 FAILED .*NonFiniteLossError.*log: \S+_log\.out", output)
    assert re.search(r"#2 CANCELLED .*log: \S+_log\.(err|out)", output)
    assert "job #1 (train.lr=1e+30) FAILED: NonFiniteLossError" in err


def test_unknown_partition_is_refused_naming_the_job_and_sbatchs_message(cluster, tmp_path):
    result = multirun(cluster, tmp_path, *SLURM, "hydra.launcher.partition=nope", *TINY, "train.epochs=1",
                      "seed=0,1")
    assert result.returncode != 0
    assert "slurm refused job 'run' (2 cells: #0 (seed=0); #1 (seed=1))" in result.stderr
    assert "invalid partition specified: nope" in result.stderr
    assert cluster.squeue() == []


def test_reproduce_with_launcher_slurm_is_one_job_array_with_a_record_per_checkpoint(cluster, tmp_path):
    """``reproduce.py ... launcher=slurm``: the released files (official layouts) are evaluated as one SLURM job
    array, on an ImageNet-style folder holding only ``val/``; each record carries its file's sha256."""
    import hashlib

    from test_official_checkpoints import main_py_checkpoint, official_state as dynamicvit_state
    from test_official_layouts import official_state, train_py_checkpoint
    from test_reproduce import imagenet

    released = tmp_path / "released"
    released.mkdir()
    torch.save(train_py_checkpoint("sit", official_state("sit")), released / "sit.pth")
    torch.save(main_py_checkpoint("dynamicvit", dynamicvit_state("dynamicvit")), released / "dyvit.pth")
    root = imagenet(tmp_path / "imagenet", splits=("val",))
    command = [sys.executable, str(ROOT / "experiments" / "reproduce.py"), "--checkpoints", str(released),
               "--imagenet", str(root), *SLURM, "device=cpu", "progress=false", "measure.throughput=false",
               *sweep_args(tmp_path)[3:]]
    env = cluster.env({**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"reproduce timed out; {diagnose(cluster, tmp_path)}") from error
    assert result.returncode == 0, result.stderr[-3000:] + diagnose(cluster, tmp_path)
    jobs = summary(tmp_path)["jobs"]
    assert [j["state"] for j in jobs] == ["COMPLETED"] * 2
    assert len({j["job_id"].split("_")[0] for j in jobs}) == 1  # one job array
    records = {load(j["record"])["weights"]["checkpoint"]: load(j["record"]) for j in jobs}
    assert sorted(records) == ["dyvit.pth", "sit.pth"]
    for name, record in records.items():
        assert record["weights"]["start_sha256"] == hashlib.sha256((released / name).read_bytes()).hexdigest()
        assert record["data_read"]["train_images"] == 0 and f"{name}: top-1" in result.stdout
