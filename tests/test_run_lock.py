"""Two identical commands at once (issue 27): distinct run folders, and one process per resume folder."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.config_store import run_token
from experiments.train.run_lock import RunLock, RunLockedError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["+model.depth=2", "baseline.enabled=false", "measure.throughput=false", "progress=false", "eval.map_images=0"]


def command(tmp_path: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "experiments" / "run.py"), *TINY, f"paths.results_dir={tmp_path}/results",
            f"paths.state_dir={tmp_path}/state", f"paths.cache_dir={tmp_path}/cache", *overrides]


def test_a_held_lock_refuses_a_second_holder_naming_the_lock(tmp_path):
    with RunLock(tmp_path / "state" / "abc") as first:
        with pytest.raises(RunLockedError, match=r"state/abc\.lock is locked by another process"):
            RunLock(tmp_path / "state" / "abc").acquire()
        assert RunLock(tmp_path / "state" / "other").acquire()._handle is not None  # another key is free
    with RunLock(tmp_path / "state" / "abc"):  # released on exit: the same key can be taken again
        pass
    assert first._handle is None
    assert RunLock(None).acquire()._handle is None  # a run that does not train takes no lock


def test_the_run_token_is_fixed_in_a_process_and_differs_between_processes():
    assert run_token() == run_token()
    code = "from experiments.config_store import run_token; print(run_token())"
    tokens = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
              for _ in range(2)}
    assert len(tokens) == 2 and run_token() not in tokens


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "experiments" / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


@pytest.mark.slow
def test_a_training_run_is_refused_while_its_resume_folder_is_locked_and_runs_once_free(tmp_path):
    """The test holds the lock of the run key the command computes: the command is refused (exit 2 or 1, the
    message names the lock), trains nothing and writes no record; once the lock is free the same command runs."""
    from experiments import identity

    overrides = ["method=dense", "experiment.train=true", "train.epochs=1", *TINY]
    key = identity.run_key(compose(*overrides))
    lock_path = tmp_path / "state" / f"{key}.lock"
    lock_path.parent.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = command(tmp_path, "method=dense", "experiment.train=true", "train.epochs=1",
                  f"hydra.run.dir={tmp_path}/run")
    with open(lock_path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = subprocess.run(run, capture_output=True, text=True, env=env, timeout=600)
    assert refused.returncode != 0
    assert f"{lock_path} is locked by another process running the same configuration" in refused.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "run").exists()
    assert not (tmp_path / "state" / key).exists()  # nothing trained into the resume folder
    done = subprocess.run(run, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("*.json")]
    assert record["train"]["epochs"] == 1


@pytest.mark.slow
def test_two_identical_commands_at_once_get_two_run_folders(tmp_path):
    """Started together (Hydra's time stamp has one-second resolution), two off-the-shelf evaluations of one
    config, with the default ``hydra.run.dir``, write two records from two run folders, each with its own log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = command(tmp_path, "method=dense")
    procs = [subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    folders = sorted((tmp_path / "outputs").glob("*/*"))
    assert len(folders) == 2 and all((f / "run.log").is_file() for f in folders)
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("*.json")]
    assert sorted(str(Path(tmp_path, r["provenance"]["run_dir"])) for r in records) == [str(f) for f in folders]
