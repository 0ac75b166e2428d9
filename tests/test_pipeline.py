"""The pipeline end to end at a tiny budget, checkpoints through model.checkpoint, and bad inputs.

Every bad input must fail before a results record exists.
"""
import json

import pytest
import torch

import methods
from conftest import build_for, run_config, write_png_folder
from experiments import pipeline
from experiments.config import DataError
from experiments.train.checkpoints import file_sha256
from methods.models import CheckpointError, create_backbone

make_cfg = run_config  # test_video and test_video_data import it from here


TINY = ["baseline.epochs=1", "train.epochs=1", "+model.depth=2"]


def records_in(tmp_path):
    folder = tmp_path / "results" / "runs"
    return sorted(folder.glob("*.json")) if folder.exists() else []


@pytest.mark.slow
def test_end_to_end_tiny_run_writes_one_complete_record(tmp_path):
    cfg = make_cfg(tmp_path, *TINY, "experiment.train=true")
    record = pipeline.run(cfg)
    [path] = records_in(tmp_path)
    saved = json.loads(path.read_text())
    assert saved["method"] == "dense" and saved["data"] == "digits" and saved["seed"] == 0
    assert 0 <= saved["metrics"]["top1"] <= 100 and saved["metrics"]["num_images"] == 360
    assert saved["params"] == sum(p.numel() for p in methods.create_method(
        "dense", create_backbone("deit_digits_patch4_32", num_classes=10, depth=2)).parameters())
    assert saved["tokens"]["attn_mean"] == [65.0, 65.0]
    assert saved["data_read"] == {"classes": 10, "train_images": 1437, "val_images": 360}  # 1797 digits, 20% val
    assert saved["flops"]["flops_ratio"] == pytest.approx(1.0)
    assert torch.__version__.startswith(saved["provenance"]["packages"]["torch"])
    assert saved["train"]["epochs"] == 1 and saved["train"]["init"].startswith("baseline:")
    assert (tmp_path / "run" / "checkpoints" / "final.pth").exists()
    # weights by content: the baseline it started from, the fine-tuned final.pth it evaluated
    [baseline] = (tmp_path / "cache").glob("*.pth")
    assert saved["weights"] == {"start_sha256": file_sha256(baseline),
                                "evaluated_sha256": file_sha256(tmp_path / "run" / "checkpoints" / "final.pth")}
    assert saved["identity"]["start_weights_sha256"] == file_sha256(baseline)
    assert saved["identity"]["data_files"] is None  # embedded digits: the data config is the whole identity
    # A second run reuses the cached baseline; off the shelf it evaluates what it started from, another identity.
    again = pipeline.run(make_cfg(tmp_path, *TINY))
    assert again["train"]["init"].endswith("(cached)")
    assert again["weights"] == {"start_sha256": file_sha256(baseline), "evaluated_sha256": file_sha256(baseline)}
    assert again["identity"]["key"] != saved["identity"]["key"]
    assert len(records_in(tmp_path)) == 2
    assert record["record_id"] != again["record_id"]


def test_checkpoint_round_trip_through_model_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, "+model.depth=2")
    first = build_for(cfg, 10)
    state = first.vit.state_dict()
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"weights{suffix}"
        if suffix == ".pth":
            torch.save({"model": state}, path)  # DeiT's layout
        else:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        torch.manual_seed(123)
        loaded = build_for(make_cfg(tmp_path, "+model.depth=2", f"model.checkpoint={path}"), 10)
        for key, value in state.items():
            torch.testing.assert_close(loaded.vit.state_dict()[key], value)


def test_mismatched_checkpoint_names_missing_and_unexpected_keys(tmp_path):
    cfg = make_cfg(tmp_path, "+model.depth=2")
    state = build_for(cfg, 10).vit.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["blocks.1.mlp.fc2.bias"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.mlp\.fc2\.bias.*unexpected keys: extra\.weight"):
        build_for(make_cfg(tmp_path, "+model.depth=2", f"model.checkpoint={path}"), 10)


def test_checkpoint_with_other_class_count_is_refused(tmp_path):
    state = build_for(make_cfg(tmp_path, "+model.depth=2"), 10).vit.state_dict()
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"has a 10-class head but data\.name=digits has 7 classes"):
        build_for(make_cfg(tmp_path, "+model.depth=2", f"model.checkpoint={path}"), 7)


@pytest.mark.parametrize("overrides, error, message", [
    (["method.name=nope"], pipeline.ConfigError, r"method\.name='nope' unknown; valid choices: .*dense"),
    (["model.name=deit_nope"], ValueError, r"model\.name: unknown timm model 'deit_nope'"),
    (["data.name=nope"], DataError, r"data\.name='nope' unknown; valid: digit_scenes, digits, imagefolder"),
    (["data=imagefolder", "data.root=/does/not/exist"], DataError, r"data\.root=/does/not/exist does not exist"),
    (["data.img_size=30"], ValueError, r"data\.img_size=30 is not a positive multiple of the patch size 4"),
    (["train.epochs=-1"], pipeline.ConfigError, r"train\.epochs=-1 must be in \[0, \d+\]"),
    (["train.lr=-0.1"], pipeline.ConfigError, r"train\.lr=-0\.1 must be > 0"),
    (["train.opt=adamx"], pipeline.ConfigError, r"train\.opt='adamx' unknown; valid: adamw"),
    (["+method.params.bogus=1"], pipeline.ConfigError, r"method\.params: unknown key\(s\) \['bogus'\]"),
    (["model.checkpoint=/no/such.pth"], CheckpointError, r"model\.checkpoint: file not found"),
])
def test_bad_inputs_fail_clearly_and_write_no_record(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        pipeline.run(make_cfg(tmp_path, *TINY, *overrides))
    assert records_in(tmp_path) == []


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"PK\x03\x04 definitely not a torch file")
    with pytest.raises(CheckpointError, match=r"cannot read .*corrupt\.pth"):
        pipeline.run(make_cfg(tmp_path, *TINY, f"model.checkpoint={path}"))
    assert records_in(tmp_path) == []


def test_unwritable_results_dir_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(pipeline.ConfigError, match=r"paths\.results_dir=.*not writable"):
        pipeline.run(make_cfg(tmp_path, *TINY, f"paths.results_dir={blocker}/sub"))


@pytest.mark.slow
def test_imagefolder_trains_one_step(tmp_path):
    write_png_folder(tmp_path / "data")
    cfg = make_cfg(tmp_path, "data=imagefolder", f"data.root={tmp_path}/data", "data.img_size=32",
                   "baseline.enabled=false", "experiment.train=true", "train.epochs=1", "train.batch_size=6",
                   "+model.depth=2")
    record = pipeline.run(cfg)
    assert record["metrics"]["num_images"] == 6
    assert record["train"]["history"][0]["task"] > 0
    assert record["data"] == "imagefolder"
    # what the run read is what the startup check counted: 2 classes x 3 images per split
    read = record["data_read"]
    assert (read["classes"], read["train_images"], read["val_images"]) == (2, 6, 6)
    assert (read["train_classes"], read["val_classes"], read["header_checked"]) == (2, 2, True)
    # the folder enters the record's identity by its file list, not its absolute root
    assert len(record["identity"]["data_files"]) == 16 and str(tmp_path) not in json.dumps(record["identity"])


def files_under(folder):
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("overrides", [
    pytest.param(["experiment.train=true", "baseline.enabled=false"], id="trains"),
    pytest.param(["experiment.train=false"], id="dense-baseline-weights"),  # the baseline may have to be trained
])
def test_a_run_reading_training_images_is_refused_without_the_train_folder(tmp_path, overrides):
    write_png_folder(tmp_path / "data", splits=("val",))
    before = files_under(tmp_path)
    with pytest.raises(DataError, match=r"data\.train_split='train': split folder 'train' not found \(expected "
                                        r".*train/<class>/<image>\); the run reads training images"):
        pipeline.run(make_cfg(tmp_path, "data=imagefolder", f"data.root={tmp_path}/data", "data.img_size=32",
                              *overrides))
    assert files_under(tmp_path) == before


def test_an_evaluation_only_run_needs_only_the_val_folder(tmp_path):
    """Off the shelf (experiment.train=false) from a checkpoint, the run reads no training image: ``val/`` alone
    is enough, and the record says what it read."""
    write_png_folder(tmp_path / "data", splits=("val",))
    checkpoint = tmp_path / "weights.pth"
    torch.save({"model": create_backbone("deit_digits_patch4_32", num_classes=2, depth=2).state_dict()}, checkpoint)
    record = pipeline.run(make_cfg(tmp_path, "data=imagefolder", f"data.root={tmp_path}/data", "data.img_size=32",
                                   "experiment.train=false", "+model.depth=2", f"model.checkpoint={checkpoint}"))
    read = record["data_read"]
    assert (read["classes"], read["train_images"], read["val_images"]) == (2, 0, 6) and "train_dir" not in read
    assert record["metrics"]["num_images"] == 6
    assert len(records_in(tmp_path)) == 1


@pytest.mark.parametrize("layout, message", [
    ("empty", r"split folder 'val' not found"),
    ("no_classes", r"has no class folders"),
    ("no_images", r"no images"),
])
def test_bad_imagefolders_are_clear_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    root.mkdir()
    if layout != "empty":
        for split in ("train", "val"):
            (root / split).mkdir()
            if layout == "no_images":
                (root / split / "cls").mkdir()
                (root / split / "cls" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=message):
        pipeline.run(make_cfg(tmp_path, "data=imagefolder", f"data.root={root}", "data.img_size=32",
                              "baseline.enabled=false"))
    assert records_in(tmp_path) == []
