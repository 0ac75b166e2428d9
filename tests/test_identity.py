"""Record identity (issue 27): what makes two records "the same run", and what never does."""
from __future__ import annotations

import copy
import json
import shutil
import warnings

import pytest

from conftest import write_png_folder
from analysis import aggregation, load
from experiments import identity
from experiments.records import upgrade
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


def test_the_seed_and_its_starting_weights_change_the_run_but_not_the_setting():
    other = key(changed("seed", 1), start="c" * 64)  # each seed fine-tunes its own baseline
    assert other["key"] != key()["key"] and other["setting"] == key()["setting"]
    assert key(changed("train.epochs", 2))["setting"] != key()["setting"]


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


# --- the report: which records are one run ------------------------------------------------------------------
def run_record(record_id: str, seed: int = 0, end: str = "2026-12-01T00:00:00+00:00", params=None, **config):
    """A minimal legacy ``run`` record (no identity: the report derives one) with config sections ``config``."""
    base = {"method": {"name": "evit"}, "model": {"name": "deit_digits_patch4_32", "short_name": "deit_digits"},
            "data": {"name": "imagefolder", "root": "/data/a"}, "train": {"epochs": 4}, "seed": seed}
    for section, values in config.items():
        base[section] = {**base.get(section, {}), **values}
    return {"schema_version": 1, "record_id": record_id, "kind": "run", "method": "evit",
            "method_params": params if params is not None else dict(PARAMS), "model": "deit_digits",
            "data": "imagefolder", "seed": seed, "metrics": {"top1": 90.0}, "config": base,
            "train": {"epochs": base["train"]["epochs"]}, "provenance": {"end_time": end}}


def load_frame(tmp_path, records):
    runs = tmp_path / "results" / "runs"
    runs.mkdir(parents=True)
    for record in records:
        (runs / f"{record['record_id']}.json").write_text(json.dumps(record))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load.load_records(tmp_path / "results")


@pytest.mark.parametrize("other", [
    {"data": {"root": "/data/b"}},  # two image folders, same model, method and seed
    {"train": {"epochs": 2}},  # two recipes
    {"train": {"epochs": 0}},  # off the shelf next to fine-tuned
])
def test_records_of_different_runs_are_never_merged(tmp_path, other):
    frame = load_frame(tmp_path, [run_record("a"), run_record("b", end="2026-12-02T00:00:00+00:00", **other)])
    assert sorted(frame["record_id"]) == ["a", "b"] and not frame.attrs["superseded"]
    agg = aggregation.aggregate(frame)
    assert len(agg) == 2 and list(agg["n_seeds"]) == [1, 1]  # two rows, never one averaged over both
    assert agg["setting"].nunique() == 2  # and the rows say which is which


def test_the_same_run_from_two_commits_keeps_the_newest_and_says_so(tmp_path):
    frame = load_frame(tmp_path, [run_record("old"), run_record("new", end="2026-12-02T00:00:00+00:00")])
    assert list(frame["record_id"]) == ["new"]
    assert frame.attrs["superseded"] == [{"path": "runs/old.json", "record_id": "old", "by": "runs/new.json"}]
    assert "left out: 1: runs/old.json (by runs/new.json)" in load.summary(frame, tmp_path / "results")


def test_two_curves_of_different_weights_are_both_kept(tmp_path):
    points = []
    for curve, sha in (("c1", "1" * 64), ("c2", "2" * 64)):
        point = run_record(f"{curve}_p", params={**PARAMS, "keep_rate": 0.5})
        point.update(kind="tradeoff", tradeoff={"knob": "keep_rate", "value": 0.5, "curve": curve,
                                                "weights_sha256": sha})
        points.append(point)
    frame = load_frame(tmp_path, points)
    assert sorted(frame["curve"]) == ["c1", "c2"] and not frame.attrs["superseded"]


def test_an_older_record_without_a_new_parameter_joins_the_newer_row_once_upgraded(tmp_path):
    """EViT before ``fuse`` existed: the upgrade fills it from the registry, so both seeds share one row."""
    import methods

    old = run_record("old", seed=0, params={"keep_rate": 0.7, "locations": [3, 6, 9]})
    new = run_record("new", seed=1, params=methods.resolved_params("evit", {"keep_rate": 0.7}))
    before = aggregation.aggregate(load_frame(tmp_path / "before", [old, new]))
    assert len(before) == 2  # raw parameters differ: two settings
    results = tmp_path / "after" / "results"
    load_frame(tmp_path / "after", [old, new])
    changes = upgrade.plan_upgrades(results, methods.resolved_params, lambda m: methods.method_spec(m).family)
    for path, record in changes:
        path.write_text(json.dumps(record))
    upgraded = json.loads((results / "runs" / "old.json").read_text())
    assert upgraded["method_params"] == {"keep_rate": 0.7, "locations": [3, 6, 9], "fuse": True}
    assert upgraded["method_info"]["family"] == "pruning" and upgraded["identity"]["legacy"] is True
    assert upgraded["method_defaults"] == {"keep_rate": 0.7, "locations": [3, 6, 9], "fuse": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        after = aggregation.aggregate(load.load_records(results))
    assert len(after) == 1 and after["n_seeds"].iloc[0] == 2
    assert upgrade.plan_upgrades(results, methods.resolved_params, lambda m: methods.method_spec(m).family) == []


def test_a_record_whose_identity_predates_a_parameter_gets_todays_identity_once_upgraded():
    """ToMe before ``threshold`` existed: the upgrade fills it and recomputes the stored identity from the record's
    config, so the regeneration command finds the record instead of running it again."""
    import methods
    from experiments.records.identity import result_identity

    config = {"model": {"name": "m"}, "data": {"name": "d"}, "seed": 3, "train": {"epochs": 4}}
    old_params = {"r": 4, "prop_attn": True}
    today = methods.resolved_params("tome", {"r": 4})
    assert today != old_params  # the registry has a parameter the record lacks
    own = result_identity(config, "tome", old_params, "run", True, "a" * 64, None)
    record = {"method": "tome", "method_params": old_params, "kind": "run", "config": config, "train": {"epochs": 4},
              "identity": own}
    new = upgrade.upgraded(record, methods.resolved_params, lambda m: methods.method_spec(m).family)
    expected = result_identity(config, "tome", today, "run", True, "a" * 64, None)
    assert new["identity"]["key"] == expected["key"] != own["key"]
    assert new["identity"]["setting"] == expected["setting"] and record["identity"] == own  # caller's copy kept


def test_the_upgrade_refuses_before_writing_anything(tmp_path):
    import methods

    results = tmp_path / "results"
    load_frame(tmp_path, [run_record("a", params={"keep_rate": 0.7}), run_record("b")])
    (results / "runs" / "zz.json").write_text(json.dumps({**run_record("zz"), "method": "no_such_method"}))
    before = {p.name: p.read_bytes() for p in (results / "runs").iterdir()}
    with pytest.raises(ValueError, match=r"zz\.json: cannot upgrade .*no_such_method.*nothing was written"):
        upgrade.plan_upgrades(results, methods.resolved_params, lambda m: methods.method_spec(m).family)
    assert {p.name: p.read_bytes() for p in (results / "runs").iterdir()} == before
    with pytest.raises(ValueError, match=r"no such results folder"):
        upgrade.plan_upgrades(tmp_path / "missing", methods.resolved_params, lambda m: m)
