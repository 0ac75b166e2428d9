"""Record identity (issue 27): what makes two records "the same run", and what never does."""
from __future__ import annotations

import copy
import shutil

import pytest

from conftest import write_png_folder
from experiments import identity
from experiments.data.imagefolder import ImageFolderData, check_imagefolder

CONFIG = {  # the shape of a resolved config as records carry it (the sections identity reads)
    "method": {"name": "evit", "finetune": None, "params": {"keep_rate": 0.7}, "tradeoff_values": None},
    "model": {"name": "deit_digits_patch4_32", "short_name": "deit_digits", "checkpoint": None, "depth": None},
    "data": {"name": "imagefolder", "root": "/abs/one", "img_size": 32},
    "seed": 0, "device": "auto", "num_workers": 0, "threads": 1, "progress": True,
    "experiment": {"train": None},
    "train": {"epochs": 4, "lr": 5e-4}, "baseline": {"epochs": 15},
    "eval": {"batch_size": 256, "map_images": 8, "ragged_backend": "auto"},
    "paths": {"results_dir": "results", "run_dir": "/abs/outputs/x"}, "measure": {"flops": True},
}
PARAMS = {"keep_rate": 0.7, "locations": [3, 6, 9], "fuse": True}  # defaults filled


def key(config=CONFIG, params=PARAMS, trains=True, start="a" * 64, data="d1", kind="run"):
    return identity.result_identity(config, "evit", params, kind, trains, start, data)


def changed(path: str, value):
    config = copy.deepcopy(CONFIG)
    *heads, last = path.split(".")
    node = config
    for head in heads:
        node = node[head]
    node[last] = value
    return config


@pytest.mark.parametrize("path, value", [
    ("paths.results_dir", "elsewhere"), ("paths.run_dir", "/other/machine/run"), ("threads", 2),
    ("progress", False), ("num_workers", 8), ("eval.batch_size", 7), ("eval.map_images", 0),
    ("data.root", "/abs/a/copy/of/the/same/tree"), ("model.checkpoint", "/some/path/final.pth"),
    ("method.params", {}),  # the record's resolved params are what count, not the raw overrides
])
def test_keys_that_cannot_change_a_result_leave_the_identity_unchanged(path, value):
    assert key(changed(path, value)) == key()


@pytest.mark.parametrize("kwargs", [
    {"data": "d2"},  # another image folder (its file list differs)
    {"start": "b" * 64},  # other starting weights
    {"trains": False},  # off the shelf instead of fine-tuned
    {"params": {**PARAMS, "keep_rate": 0.5}},
    {"kind": "tradeoff"},
    {"config": changed("train.epochs", 2)},  # another recipe
    {"config": changed("model.depth", 6)},
    {"config": changed("eval.ragged_backend", "flex")},
])
def test_what_changes_a_result_changes_the_identity(kwargs):
    assert key(**kwargs)["key"] != key()["key"]


def test_the_recipe_counts_only_when_the_run_fine_tunes():
    assert key(changed("train.epochs", 2), trains=False) == key(trains=False)
    assert key(changed("train.epochs", 2), trains=True)["key"] != key(trains=True)["key"]


def test_the_baseline_recipe_counts_only_without_a_starting_weights_hash():
    assert key(changed("baseline.epochs", 30)) == key()  # the weights' hash says where the run started
    assert key(changed("baseline.epochs", 30), start=None)["key"] != key(start=None)["key"]


def test_the_seed_changes_the_run_but_not_the_setting():
    other = key(changed("seed", 1))
    assert other["key"] != key()["key"] and other["setting"] == key()["setting"]


def test_a_folder_digest_follows_the_files_not_where_they_lie(tmp_path):
    write_png_folder(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    def digest(root):
        return check_imagefolder(ImageFolderData(root=str(root), img_size=32)).content_digest()

    first = digest(tmp_path / "one")
    assert first == digest(tmp_path / "two")  # same names, sizes and classes elsewhere: the same data
    victim = tmp_path / "two" / "val" / "dog" / "0.png"
    victim.write_bytes(victim.read_bytes() + b"\0")  # one byte longer
    assert digest(tmp_path / "two") != first
    assert str(tmp_path) not in first and len(first) == 16
