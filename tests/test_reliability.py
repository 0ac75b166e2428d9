"""Faults a run must survive with nothing lost: NaN loss, kill -9, a full disk while saving a checkpoint or a
record, corrupt checkpoints, concurrent record writers, and non-zero exit codes for every failure.

Each scenario runs the real pipeline at a tiny budget (2 blocks, 16 px digits, a few steps per epoch); the
ones that start ``experiments/run.py`` as a subprocess are marked ``slow``.
"""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import build_for, compose_config, run_paths
from experiments import identity, pipeline, plan, records
from experiments.train import checkpoints, engine
from experiments.train import fit as training
from experiments.data.registry import build_data
from methods.dynamicvit import DynamicViT
from methods.models import CheckpointError, load_state_dict_strict

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "experiments" / "run.py"

# Two blocks, 16 px images (4x4 patches + CLS), 179 training images (3 steps of 64), random init, fine-tuning on.
TINY = ["model=deit_digits", "+model.depth=2", "data.img_size=16", "data.val_fraction=0.9",
        "baseline.enabled=false", "experiment.train=true", "train.epochs=2", "eval.map_images=0",
        "measure.throughput=false", "progress=false"]
STEPS_PER_EPOCH = 3
DYNAMICVIT = ["method=dynamicvit", "method.params.locations=[1]"]  # the unstable one; needs a teacher


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared cores: oversubscribed intra-op threads make tiny models 30x slower."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def make_cfg(folder, *overrides):
    return compose_config(*run_paths(folder), *TINY, *overrides)


def records_in(folder: Path) -> list[Path]:
    runs = folder / "results" / "runs"
    return sorted(runs.glob("*.json")) if runs.exists() else []


def resume_file(cfg) -> Path:
    return Path(cfg.paths.state_dir) / identity.run_key(cfg) / "last.pth"


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def same_training(a: dict, b: dict) -> None:
    """Two records trained and evaluated identically (wall times aside)."""
    assert a["metrics"] == b["metrics"]
    assert a["train"]["history"] == b["train"]["history"]
    assert a["tokens"]["attn_mean"] == b["tokens"]["attn_mean"]


# ------------------------------------------------------------------------------------------------- NaN loss
def nan_at(monkeypatch, call: int) -> None:
    """DynamicViT's loss terms turn NaN at training call ``call`` (0-based; epoch = call // STEPS_PER_EPOCH)."""
    original = DynamicViT.loss_terms
    calls = {"n": 0}

    def loss_terms(self, out, targets, teacher_out=None):
        terms = original(self, out, targets, teacher_out)
        calls["n"] += 1
        if calls["n"] - 1 == call:
            terms["ratio"] = terms["ratio"] * float("nan")
        return terms

    monkeypatch.setattr(DynamicViT, "loss_terms", loss_terms)


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, *DYNAMICVIT)
    nan_at(monkeypatch, STEPS_PER_EPOCH + 1)  # epoch 1, step 1
    with pytest.raises(engine.NonFiniteLossError, match=r"non-finite loss at epoch 1 step 1 \(.*ratio=nan"):
        pipeline.run(cfg)
    assert records_in(tmp_path) == []
    last = resume_file(cfg)
    state = checkpoints.read_resume_checkpoint(last)  # the last good checkpoint: epoch 0 done, loads whole
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert temp_files(tmp_path) == []
    assert not (tmp_path / "run" / "checkpoints" / "final.pth").exists()


def test_nan_policy_skip_step_finishes_and_counts_the_skipped_step(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, *DYNAMICVIT, "train.nan_policy=skip_step")
    nan_at(monkeypatch, STEPS_PER_EPOCH + 1)
    record = pipeline.run(cfg)
    assert [h["skipped_steps"] for h in record["train"]["history"]] == [0, 1]
    assert all(v == v for v in record["metrics"].values())  # no NaN metric
    assert len(records_in(tmp_path)) == 1 and not resume_file(cfg).exists()


# ------------------------------------------------------------------------------------- crash and resume
def test_crash_mid_training_resumes_to_the_same_result(tmp_path, monkeypatch, caplog):
    """In process: a run dies in its second epoch; the same config again resumes from that epoch's start and ends
    with exactly the record of an uninterrupted run (fit re-seeds every epoch; DynamicViT adds predictors, their
    optimizer state and a teacher)."""
    overrides = DYNAMICVIT
    reference = pipeline.run(make_cfg(tmp_path / "uninterrupted", *overrides))

    original = engine.train_one_epoch

    def dies_in_epoch_1(*args, **kwargs):
        if args[4] == 1:
            raise KeyboardInterrupt("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", dies_in_epoch_1)
    cfg = make_cfg(tmp_path / "crashed", *overrides)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg)
    assert records_in(tmp_path / "crashed") == [] and checkpoints.read_resume_checkpoint(resume_file(cfg))["epoch"] == 1
    monkeypatch.setattr(engine, "train_one_epoch", original)
    stale = resume_file(cfg).with_name(".last.pth.99999.tmp")
    stale.write_bytes(b"PK\x03\x04 a save cut short by a kill")
    with caplog.at_level("INFO", logger="experiments.train.fit"):
        resumed = pipeline.run(cfg)
    assert "resumed from" in caplog.text and "at epoch 1" in caplog.text
    same_training(resumed, reference)
    assert not resume_file(cfg).parent.exists(), "the resume folder, stale temp files included, is cleared"


def cli(folder: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(RUN), *run_paths(folder), *TINY, f"hydra.run.dir={folder}/hydra", *overrides]


def cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def load_only_record(folder: Path) -> dict:
    [path] = records_in(folder)
    return json.loads(path.read_text())


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    """A real ``kill -9`` after the first epoch's checkpoint: no record; the same command again resumes and ends
    with the metrics and training history of an uninterrupted run."""
    overrides = ["data.img_size=32", "data.val_fraction=0.5", "train.epochs=4"]  # ~1 s epochs: time to kill
    killed = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    process = subprocess.Popen(cli(killed, *overrides), cwd=tmp_path, env=cli_env(), stdout=log,
                               stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    found: list[Path] = []
    while not found:
        assert process.poll() is None, f"the run ended before the kill:\n{(tmp_path / 'killed.log').read_text()}"
        assert time.time() < deadline, "no checkpoint appeared"
        found = list((killed / "state").glob("*/last.pth"))
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    log.close()
    assert records_in(killed) == [], "a killed run left a results record"
    assert 1 <= checkpoints.read_resume_checkpoint(found[0])["epoch"] < 4

    again = subprocess.run(cli(killed, *overrides), cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from" in again.stdout + again.stderr
    assert not found[0].parent.exists(), "the resume folder is cleared once the record is written"

    clean = tmp_path / "uninterrupted"
    reference = subprocess.run(cli(clean, *overrides), cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    resumed, uninterrupted = load_only_record(killed), load_only_record(clean)
    same_training(resumed, uninterrupted)
    assert len(resumed["train"]["history"]) == 4


# -------------------------------------------------------------------------------------------- full disk
def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_second_checkpoint(monkeypatch, where: str) -> None:
    """Make the second save of ``last.pth`` (epoch 1's) hit a full disk in ``torch.save``, ``os.fsync`` or
    ``os.replace``; the first save goes through."""
    seen = {"n": 0}

    def second(is_last_pth):
        if is_last_pth:
            seen["n"] += 1
        return is_last_pth and seen["n"] == 2

    if where == "torch.save":
        original = torch.save

        def save(obj, f, *args, **kwargs):  # f: the temp file's handle (save_checkpoint writes through one)
            if second(".last.pth." in str(getattr(f, "name", f))):
                f.write(b"PK\x03\x04 half a checkpoint")  # the disk filled up mid-write
                enospc()
            return original(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    elif where == "os.fsync":
        original_fsync = os.fsync

        def fsync(fd):
            if second(".last.pth." in os.readlink(f"/proc/self/fd/{fd}")):
                enospc()
            return original_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    else:
        original_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if second(str(dst).endswith("last.pth")):
                enospc()
            return original_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("where", ["torch.save", "os.fsync", "os.replace"])
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    cfg = make_cfg(tmp_path)
    fail_second_checkpoint(monkeypatch, where)
    last = resume_file(cfg)
    with pytest.raises(checkpoints.CheckpointSaveError) as caught:
        pipeline.run(cfg)
    message = str(caught.value)
    assert f"could not save checkpoint {last}" in message and "No space left on device" in message
    assert "the previous checkpoint there is intact" in message and caught.value.errno == errno.ENOSPC
    assert checkpoints.read_resume_checkpoint(last)["epoch"] == 1  # epoch 0's checkpoint, whole
    assert temp_files(tmp_path) == [] and records_in(tmp_path) == []
    if where == "torch.save":  # space freed: the same command resumes from epoch 1 and finishes
        monkeypatch.undo()
        record = pipeline.run(cfg)
        assert [h["epoch"] for h in record["train"]["history"]] == [0, 1] and len(records_in(tmp_path)) == 1


def test_disk_full_while_writing_the_record_leaves_no_record_and_the_rerun_finishes(tmp_path, monkeypatch, caplog):
    cfg = make_cfg(tmp_path)
    original_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(".json"):
            enospc()
        return original_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(records.RecordWriteError, match=r"could not write .*/results/runs/.*\.json .*No space left"):
        pipeline.run(cfg)
    runs = tmp_path / "results" / "runs"
    assert list(runs.iterdir()) == []  # neither a record nor a temp file
    assert checkpoints.read_resume_checkpoint(resume_file(cfg))["epoch"] == 2  # training is not lost
    monkeypatch.undo()
    with caplog.at_level("INFO", logger="experiments.train.fit"):
        record = pipeline.run(cfg)
    assert "resumed from" in caplog.text and len(record["train"]["history"]) == 2
    assert len(records_in(tmp_path)) == 1 and not resume_file(cfg).exists()


def mounted_tmpfs(folder: Path, size: int) -> bool:
    folder.mkdir(parents=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def test_real_full_disk_while_checkpointing(tmp_path):
    """A real ENOSPC (a small tmpfs, where root may mount one): torch reports it as a bad zip offset; the error
    still names the file and the free space, the previous checkpoint loads and no temp file is left."""
    folder = tmp_path / "small_disk"
    payload = {"model": {"w": torch.zeros(40_000)}, "epoch": 1}  # 160 kB; the disk holds one and a half
    if not mounted_tmpfs(folder, 240_000):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        last = folder / "last.pth"
        checkpoints.save_checkpoint(last, payload)
        with pytest.raises(checkpoints.CheckpointSaveError, match=rf"could not save checkpoint {last} .*MB free"):
            checkpoints.save_checkpoint(last, {"model": {"w": torch.ones(40_000)}, "epoch": 2})
        assert torch.load(last)["epoch"] == 1
        assert [p.name for p in folder.iterdir()] == ["last.pth"]
    finally:
        subprocess.run(["umount", str(folder)], check=False)


# --------------------------------------------------------------------------------------- corrupt checkpoints
@pytest.fixture
def crashed_run(tmp_path, monkeypatch):
    """A run that died after epoch 0: its config and its resume checkpoint."""
    cfg = make_cfg(tmp_path)
    original = engine.train_one_epoch

    def dies_in_epoch_1(*args, **kwargs):
        if args[4] == 1:
            raise KeyboardInterrupt("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", dies_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg)
    monkeypatch.setattr(engine, "train_one_epoch", original)
    return cfg, resume_file(cfg)


def refuse_data(monkeypatch):
    def refuse(cfg):
        raise AssertionError("data loading started with a corrupt resume checkpoint")

    monkeypatch.setattr(pipeline, "build_data", refuse)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "incomplete", "misshapen"])
def test_corrupt_resume_checkpoint_is_a_clear_error_naming_the_file(crashed_run, monkeypatch, damage):
    """Never silently ignored, never half-loaded: the error names the file and how to start over, before any data
    is loaded, and the file is left as it was."""
    cfg, last = crashed_run
    if damage == "garbage":
        last.write_bytes(b"\x00garbage")
    elif damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    else:
        state = torch.load(last, weights_only=False)
        if damage == "incomplete":
            del state["optimizer"]
        else:
            state["model"]["vit.head.weight"] = torch.zeros(3, 64)
        torch.save(state, last)
    damaged = last.read_bytes()
    refuse_data(monkeypatch)
    expected = {"garbage": "is corrupt or unreadable", "truncated": "is corrupt or unreadable",
                "incomplete": r"is incomplete \(missing \['optimizer'\]\)",
                "misshapen": r"does not match the model: .*vit\.head\.weight \(3, 64\) vs model \(10, 64\)"}[damage]
    with pytest.raises(CheckpointError, match=rf"resume checkpoint {last} {expected}.*to start the run over, "
                                              rf"delete it \(rm {last}\)"):
        pipeline.run(cfg)
    assert last.read_bytes() == damaged and records_in(Path(cfg.paths.results_dir).parent) == []


def test_following_the_hint_starts_the_run_over(crashed_run):
    cfg, last = crashed_run
    last.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="rm "):
        pipeline.run(cfg)
    last.unlink()
    record = pipeline.run(cfg)
    assert len(record["train"]["history"]) == 2


def test_corrupt_baseline_work_checkpoint_is_a_clear_error(tmp_path):
    """``fit`` reads every resume checkpoint through the same check (the cached baseline's work folder too)."""
    work = tmp_path / ".baseline.work"
    work.mkdir()
    (work / "last.pth").write_bytes(b"PK\x03\x04")
    cfg = make_cfg(tmp_path, "baseline.enabled=true", "baseline.epochs=1")
    checked = plan.validate(cfg)
    data = build_data(checked.config.data, checked.data_scan)
    method = build_for(cfg, data.num_classes)
    with pytest.raises(CheckpointError, match=rf"resume checkpoint {work}/last\.pth is corrupt.*rm {work}/last\.pth"):
        training.fit(method, data, checked.config.baseline, checked.config, torch.device("cpu"), work, "dense")


def test_a_mismatching_state_dict_changes_no_weight(tmp_path):
    """All-or-nothing: a state dict with one bad tensor among good ones is refused before any copy."""
    cfg = make_cfg(tmp_path)
    method = build_for(cfg, 10)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    torch.manual_seed(99)
    other = build_for(cfg, 10).state_dict()  # different values, same shapes...
    other["vit.blocks.1.mlp.fc2.weight"] = torch.zeros(1, 1)  # ...but one of them wrong
    with pytest.raises(CheckpointError, match=r"vit\.blocks\.1\.mlp\.fc2\.weight \(1, 1\) vs model"):
        load_state_dict_strict(method, other, "test state")
    for key, value in method.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a refused load"


# ----------------------------------------------------------------------------------- concurrent records
WRITER = """
import json, sys
sys.path.insert(0, sys.argv[4])
from experiments import records
folder, index, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
blob = "x" * 200_000  # big enough that a partial file would be seen
ids = []
for i in range(count):
    record = {"schema_version": 1, "record_id": records.new_record_id("dense", "m", index), "kind": "run",
              "method": "dense", "model": "m", "data": "digits", "seed": index, "metrics": {"top1": float(i)},
              "config": {}, "provenance": {}, "blob": blob}
    records.write_record(folder, record)
    records.write_record(folder, dict(record, record_id="shared", writer=index))  # everyone rewrites one name
    ids.append(record["record_id"])
print(json.dumps(ids))
"""

READER = """
import json, sys
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from experiments import records
runs, stop = Path(sys.argv[1]) / "runs", Path(sys.argv[2])
reads, errors = 0, []
while True:
    finished = stop.exists()  # one more full pass after the writers end
    for path in sorted(runs.glob("*.json")) if runs.exists() else []:
        try:
            record = records.load_record(path)
            assert len(record["blob"]) == 200_000, "short blob"
            reads += 1
        except Exception as error:
            errors.append(f"{path.name}: {type(error).__name__}: {error}")
    if finished:
        break
print(json.dumps({"reads": reads, "errors": errors[:10]}))
"""


def test_concurrent_writers_and_a_polling_reader(tmp_path):
    """Four writer processes (unique names, plus one name they all overwrite) and a reader polling the folder
    the whole time: the reader never sees a partial or invalid record, names never collide, nothing temporary
    is left."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(tmp_path), str(stop), str(REPO)],
                              stdout=subprocess.PIPE, text=True, env=env)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(i), "25", str(REPO)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for i in range(4)]
    ids = []
    for writer in writers:
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
        ids += json.loads(out)
    stop.touch()
    out, _ = reader.communicate(timeout=120)
    assert reader.returncode == 0
    seen = json.loads(out)
    assert seen["errors"] == [] and seen["reads"] > 0
    assert len(set(ids)) == len(ids) == 100
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == sorted([f"{i}.json" for i in ids] + ["shared.json"])  # no temp file left
    for name in names:
        records.load_record(tmp_path / "runs" / name)


# ------------------------------------------------------------------------------------------- exit codes
@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["train.epochs=abc"], r"error: train\.epochs=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["method=evit", "method.params.keep_rate=0", "model.depth=12"], r"method\.params\.keep_rate=0 must be in \(0, 1\]"),
    (["model.checkpoint=/no/such.pth"], r"model\.checkpoint: file not found"),
    (["train.lr=1e30"], r"NonFiniteLossError: non-finite loss at epoch 0 step"),
], ids=["type-error", "method-range", "missing-checkpoint", "nan-loss"])
def test_failures_exit_non_zero_from_the_command_line(tmp_path, overrides, message):
    done = subprocess.run(cli(tmp_path, *overrides), cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert re.search(message, output), output
    assert records_in(tmp_path) == []
