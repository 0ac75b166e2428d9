"""``experiments/reproduce.py`` end to end on a generated ImageNet-style folder (10 classes of tiny images, the
embedded 32 px model) with checkpoints saved in official layouts: the method comes from the file's layout, the
records carry the file's sha256 and name, and the report's table puts them next to the published numbers. Bad
inputs are refused in one line before any work, with nothing written."""
from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from analysis import published, reproduction
from experiments import reproduce
from test_official_checkpoints import main_py_checkpoint, official_state as dynamicvit_state
from test_official_layouts import official_state, train_py_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def imagenet(root, classes=10, per_class=2, splits=("train", "val")):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")
    return root


@pytest.fixture
def released(tmp_path):
    folder = tmp_path / "released"
    folder.mkdir()
    torch.save(train_py_checkpoint("sit", official_state("sit")), folder / "sit_s_0.7.pth")
    torch.save(main_py_checkpoint("dynamicvit", dynamicvit_state("dynamicvit")), folder / "dyvit.pth")
    return folder


def run_paths(tmp_path):
    return [f"paths.{key}_dir={tmp_path}/{key}" for key in ("results", "cache", "state", "run")] + [
        "progress=false", "measure.throughput=false"]


def files_under(folder):
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_identify_reads_the_method_settings_and_backbone_from_the_file(released):
    sit = reproduce.identify(released / "sit_s_0.7.pth")
    assert (sit.method, sit.model, sit.params) == ("sit", "deit_digits", {"locations": [3, 6, 9], "keep_rate": 0.7})
    dyvit = reproduce.identify(released / "dyvit.pth")
    assert (dyvit.method, dyvit.params) == ("dynamicvit", {"keep_rate": 0.7})


def test_a_plain_deit_file_is_the_dense_method(tmp_path):
    torch.save({"model": {k: v for k, v in official_state("kmedoids").items()}}, tmp_path / "deit.pth")
    assert reproduce.identify(tmp_path / "deit.pth").method == "dense"


def test_smoke_run_writes_records_with_hash_and_name(tmp_path, released, capsys):
    root = imagenet(tmp_path / "imagenet")
    assert reproduce.main(["--checkpoints", str(released), "--imagenet", str(root), *run_paths(tmp_path)]) == 0
    out = capsys.readouterr().out
    print(out)
    written = {}
    for path in (tmp_path / "results").rglob("*.json"):
        record = json.loads(path.read_text())
        written[record["weights"]["checkpoint"]] = record
    assert sorted(written) == ["dyvit.pth", "sit_s_0.7.pth"]
    for name, record in written.items():
        digest = hashlib.sha256((released / name).read_bytes()).hexdigest()
        assert record["weights"]["start_sha256"] == digest
        assert record["data"] == "imagefolder" and record["data_read"]["val_images"] == 20
        assert f"{name}: top-1" in out
    assert written["sit_s_0.7.pth"]["method"] == "sit"
    assert written["dyvit.pth"]["method"] == "dynamicvit"
    assert reproduction.reproduced(tmp_path / "results").empty  # not at 224 px: not an ImageNet reproduction
    rows = reproduction.reproduced(tmp_path / "results", img_size=32)
    assert list(rows["checkpoint"]) == ["dyvit.pth", "sit_s_0.7.pth"]
    assert list(rows["sha256"]) == [written[n]["weights"]["start_sha256"] for n in rows["checkpoint"]]
    table = reproduction.reproduction_table(reproduction.compare(rows, published.load_published()))
    print(table.display.to_markdown(index=False))
    assert list(table.display["Source"]) == ["no published row"] * 2  # deit_digits has none


def test_a_val_only_imagenet_is_enough(tmp_path, capsys):
    """A user with only ImageNet's val set (ROOT/val/<wnid>/*.JPEG, no train/) reproduces: the evaluation-only run
    reads no training image."""
    root = imagenet(tmp_path / "imagenet", splits=("val",))  # 10 classes: the checkpoint's head
    folder = tmp_path / "released"
    folder.mkdir()
    torch.save(train_py_checkpoint("sit", official_state("sit")), folder / "sit_s_0.7.pth")
    assert reproduce.main(["--checkpoints", str(folder), "--imagenet", str(root), *run_paths(tmp_path)]) == 0
    assert "sit_s_0.7.pth: top-1" in capsys.readouterr().out
    [path] = (tmp_path / "results").rglob("*.json")
    record = json.loads(path.read_text())
    assert record["method"] == "sit" and record["weights"]["checkpoint"] == "sit_s_0.7.pth"
    assert record["weights"]["start_sha256"] == hashlib.sha256((folder / "sit_s_0.7.pth").read_bytes()).hexdigest()
    assert (record["data_read"]["train_images"], record["data_read"]["val_images"]) == (0, 20)
    assert not (root / "train").exists()


def test_the_table_puts_reproduced_next_to_published_with_the_difference():
    rows = pd.DataFrame([{"checkpoint": "evit-0.7-fuse.pth", "sha256": "ab" * 32, "method": "evit",
                          "model": "deit_small", "method_params": {"keep_rate": 0.7, "fuse": True,
                                                                   "locations": [3, 6, 9]},
                          "top1": 79.31, "gflops": 3.012, "path": "runs/x.json"}])
    frame = reproduction.compare(rows, published.load_published())
    (row,) = frame.to_dict(orient="records")
    assert (row["published_top1"], row["published_gflops"]) == (79.5, 3.0)
    assert math.isclose(row["top1_diff"], 79.31 - 79.5) and math.isclose(row["gflops_diff"], 0.012)
    table = reproduction.reproduction_table(frame)
    assert "evit-0.7-fuse.pth (abababababab)" in table.display.iloc[0]["Checkpoint"]


def test_a_checkpoint_without_a_published_row_keeps_its_row():
    rows = pd.DataFrame([{"checkpoint": "sit.pth", "sha256": "0" * 64, "method": "sit", "model": "deit_small",
                          "method_params": {"keep_rate": 0.7}, "top1": 70.0, "gflops": 2.0, "path": "a.json"}])
    (row,) = reproduction.compare(rows, published.load_published()).to_dict(orient="records")
    assert math.isnan(row["published_top1"]) and row["source"] == ""


def not_imagefolder(tmp_path):
    (tmp_path / "imagenet" / "images").mkdir(parents=True)
    return tmp_path / "imagenet"


def no_class_folders(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "imagenet" / split).mkdir(parents=True)
    return tmp_path / "imagenet"


@pytest.mark.parametrize("make_root, checkpoints, message", [
    pytest.param(lambda t: t / "missing", None, r"--imagenet=.*missing does not exist", id="no-imagenet"),
    pytest.param(not_imagefolder, None, r"--imagenet=.*imagenet has no val/ folder \(expected .*val/<wnid>/\*\.JPEG\)",
                 id="no-val-folder"),
    pytest.param(lambda t: imagenet(t / "imagenet", splits=("train",)), None, r"has no val/ folder",
                 id="train-only"),
    pytest.param(no_class_folders, None, r"val has no class folders", id="no-classes"),
    pytest.param(lambda t: imagenet(t / "imagenet"), "absent", r"--checkpoints=.*absent does not exist",
                 id="no-checkpoint-folder"),
    pytest.param(lambda t: imagenet(t / "imagenet"), "empty", r"holds no checkpoint file", id="empty-folder"),
    pytest.param(lambda t: imagenet(t / "imagenet"), "truncated", r"cannot read .*cut\.pth", id="truncated"),
    pytest.param(lambda t: imagenet(t / "imagenet"), "wide", r"matches 0 model configs", id="unknown-backbone"),
])
def test_bad_inputs_are_refused_in_one_line_before_any_work(tmp_path, released, capsys, make_root, checkpoints,
                                                            message):
    root = make_root(tmp_path)
    folder = released
    if checkpoints is not None:
        folder = tmp_path / checkpoints
        if checkpoints != "absent":
            folder.mkdir()
        if checkpoints == "truncated":
            data = (released / "sit_s_0.7.pth").read_bytes()
            (folder / "cut.pth").write_bytes(data[: len(data) // 2])
        if checkpoints == "wide":
            torch.save(train_py_checkpoint("sit", official_state("sit", dim=96)), folder / "wide.pth")
    before = files_under(tmp_path)
    status = reproduce.main(["--checkpoints", str(folder), "--imagenet", str(root), *run_paths(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert files_under(tmp_path) == before


DEBUG_LAUNCHER = ["launcher=local", "hydra.launcher._target_=hydra_plugins.adaptive_vit_bench_launcher.DebugLauncher"]


def sweep_paths(tmp_path):
    """``run_paths`` without ``paths.run_dir``: each job writes under its own Hydra output directory."""
    return [f"hydra.sweep.dir={tmp_path}/sweep", *(o for o in run_paths(tmp_path) if not o.startswith("paths.run_"))]


def test_a_launcher_runs_every_file_as_one_job_of_a_sweep(tmp_path, released, capsys):
    """``launcher=...`` (``launcher=slurm`` on a cluster) submits the files as one sweep of run.py's task through
    ``experiments.cluster.launch`` (here submitit's in-process debug executor): a record per file, carrying its
    sha256, and the sweep summary; the dry run prints ``run.py -m`` commands."""
    root = imagenet(tmp_path / "imagenet")
    args = ["--checkpoints", str(released), "--imagenet", str(root), *DEBUG_LAUNCHER, *sweep_paths(tmp_path)]
    assert reproduce.main([*args, "--dry-run"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python ")]
    assert len(printed) == 2 and all(line.startswith("python experiments/run.py -m method=") for line in printed)
    assert not (tmp_path / "sweep").exists()
    assert reproduce.main(args) == 0
    out = capsys.readouterr().out
    written = {json.loads(p.read_text())["weights"]["checkpoint"]: json.loads(p.read_text())
               for p in (tmp_path / "results").rglob("*.json")}
    assert sorted(written) == ["dyvit.pth", "sit_s_0.7.pth"]
    for name, record in written.items():
        assert record["weights"]["start_sha256"] == hashlib.sha256((released / name).read_bytes()).hexdigest()
        assert f"{name}: top-1" in out
    summary = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    assert [job["state"] for job in summary["jobs"]] == ["COMPLETED"] * 2


def test_a_launched_reproduction_refuses_cells_sharing_a_run_folder_before_submitting(tmp_path, released, capsys):
    root = imagenet(tmp_path / "imagenet")
    status = reproduce.main(["--checkpoints", str(released), "--imagenet", str(root), *DEBUG_LAUNCHER,
                             f"hydra.sweep.dir={tmp_path}/sweep", *run_paths(tmp_path)])  # one paths.run_dir for all
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "resolve to the same paths.run_dir" in err and "nothing was submitted" in err
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "results").exists()
