"""A refused command leaves no ``outputs/<date>/<time>/`` folder behind (issue 18); a failure after work began
keeps its run folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.refusal import remove_refused_run_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,overrides", [
    ("run.py", ["seed=-1"]),
    ("run.py", ["model.checkpoint="]),
    ("measure.py", ["measure.images=0"]),
    ("tradeoff.py", ["method=dense"]),  # dense has no knob to sweep
])
def test_a_refused_command_leaves_no_run_folder(tmp_path, script, overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *overrides], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Error" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == [], "a refused command left files behind"


def test_only_hydra_files_are_removed(tmp_path):
    refused = tmp_path / "outputs" / "2026-12-03" / "12-00-00_dense"
    (refused / ".hydra").mkdir(parents=True)
    (refused / "run.log").write_text("log")
    (tmp_path / "outputs" / "2026-12-03" / "other").mkdir()  # another run's folder keeps the date folder
    assert remove_refused_run_dir(refused)
    assert not refused.exists() and (tmp_path / "outputs" / "2026-12-03" / "other").is_dir()
    worked = tmp_path / "outputs" / "2026-12-03" / "other"
    (worked / ".hydra").mkdir()
    (worked / "checkpoints").mkdir()  # work began: the folder stays
    assert not remove_refused_run_dir(worked) and worked.is_dir()
