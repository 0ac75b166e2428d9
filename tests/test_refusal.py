"""A refused command prints one line and leaves nothing it created (issues 18 and 27): ``error: ...`` on stderr,
exit status 2, no traceback unless ``HYDRA_FULL_ERROR=1``; no ``outputs/<date>/<time>/`` folder behind, and no
folder that was there before removed. A failure after work began keeps its run folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.config_store import register_configs
from experiments.refusal import REFUSAL_STATUS, REFUSALS, one_line, remove_refused_run_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "experiments" / "conf"


def command(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **env}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=300)


def assert_one_line_refusal(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == REFUSAL_STATUS, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert all(word in lines[0] for word in words), lines[0]


@pytest.mark.parametrize("script,overrides,words", [
    ("run.py", ["threads=0"], ["threads=0", "[1, 1024]"]),
    ("run.py", ["model.checkpoint="], ["model.checkpoint"]),
    ("run.py", ["seed=abc"], ["seed=abc", "valid: int"]),  # refused by OmegaConf while Hydra composes
    ("measure.py", ["measure.images=0"], ["measure.images=0"]),
    ("tradeoff.py", ["method=dense"], ["method=dense", "valid methods"]),  # dense has no knob to sweep
])
def test_a_refusal_is_one_line_exit_2_and_leaves_no_run_folder(tmp_path, script, overrides, words):
    result = command(tmp_path, str(ROOT / "experiments" / script), *overrides)
    assert_one_line_refusal(result, *words)
    assert list(tmp_path.iterdir()) == [], "a refused command left files behind"


def test_a_refused_sweep_names_each_job_and_leaves_no_job_folder(tmp_path):
    result = command(tmp_path, str(ROOT / "experiments" / "run.py"), "-m", "seed=0,-1", "threads=0",
                     f"hydra.sweep.dir={tmp_path}/sweep")
    assert result.returncode == REFUSAL_STATUS and "Traceback" not in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
        "error: job #0 (seed=0 threads=0): threads=0 must be in [1, 1024]",
        "error: job #1 (seed=-1 threads=0): seed=-1 must be in [0, 4294967295]"]
    assert [path.name for path in (tmp_path / "sweep").iterdir()] == ["multirun.yaml"]  # Hydra's sweep record


def test_the_console_script_entry_finds_its_configs_and_refuses_in_one_line(tmp_path):
    """What ``avb-run`` runs once installed: ``experiments.run:main`` called from an imported module, whose
    configs Hydra finds as the package ``experiments.conf``."""
    code = "import sys; from experiments.run import main; sys.argv = ['avb-run', 'threads=0']; sys.exit(main())"
    assert_one_line_refusal(command(tmp_path, "-c", code), "threads=0")
    assert list(tmp_path.iterdir()) == []


def test_hydra_full_error_still_shows_the_traceback(tmp_path):
    result = command(tmp_path, str(ROOT / "experiments" / "run.py"), "threads=0", HYDRA_FULL_ERROR="1")
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert "ConfigError: threads=0" in result.stderr and list(tmp_path.iterdir()) == []


def test_a_folder_that_was_there_before_is_kept(tmp_path):
    """``hydra.run.dir=DIR/run`` with an empty ``DIR``: the refusal removes ``run``, not ``DIR``. Run as a module
    (``python -m experiments.run``), which needs no path patch."""
    (tmp_path / "empty").mkdir()
    result = command(ROOT, "-m", "experiments.run", f"hydra.run.dir={tmp_path}/empty/run", "seed=-1")
    assert_one_line_refusal(result, "seed=-1")
    assert (tmp_path / "empty").is_dir() and list((tmp_path / "empty").iterdir()) == []


def compose_error(override: str) -> BaseException:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(REFUSALS) as raised:
            compose("config", overrides=[override])
    return raised.value


@pytest.mark.parametrize("override,line", [
    ("seed=abc", "error: seed=abc: Value 'abc' of type 'str' could not be converted to Integer; valid: int"),
    ("progress=loud", "error: progress=loud: Value 'loud' is not a valid bool (type str); valid: bool"),
    ("seed=[", "error: seed=[: no viable alternative at input '['; valid: key=value (Hydra's override grammar)"),
])
def test_composition_errors_become_one_line_naming_key_value_and_type(override, line):
    assert one_line(compose_error(override)) == line


def test_an_unknown_option_or_key_lists_the_valid_ones():
    option = one_line(compose_error("method=adavitt"))
    assert option.startswith("error: method=adavitt is not a config option of method; valid: adavit, ")
    assert "dense" in option and "_defaults" not in option and "\n" not in option
    key = one_line(compose_error("trian.epochs=3"))
    assert "'trian'" in key and "valid keys there: " in key and "train" in key.split("valid keys there: ")[1]


def test_only_hydra_files_in_folders_the_command_created_are_removed(tmp_path):
    date = tmp_path / "outputs" / "2026-12-03"
    refused = date / "12-00-00_dense"
    (refused / ".hydra").mkdir(parents=True)
    (refused / "run.log").write_text("log")
    created = {str(tmp_path / "outputs"), str(date), str(refused)}
    assert not remove_refused_run_dir(refused, created - {str(refused)})  # there before: kept
    assert remove_refused_run_dir(refused, created)
    assert not (tmp_path / "outputs").exists()  # the empty folders it created went too
    (refused / ".hydra").mkdir(parents=True)
    (date / "other").mkdir()  # another run's folder keeps the date folder
    assert remove_refused_run_dir(refused, created) and (date / "other").is_dir()
    worked = date / "worked"
    (worked / ".hydra").mkdir(parents=True)
    (worked / "checkpoints").mkdir()  # work began: the folder stays
    assert not remove_refused_run_dir(worked, created | {str(worked)}) and worked.is_dir()
