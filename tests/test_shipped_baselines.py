"""Shipped dense baselines (experiments/shipped.py): the manifest's hashes guard the files, runs start from them,
and the committed ones are the default config's baselines."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments import shipped
from experiments.baseline import baseline_key
from experiments.plan import validate
from experiments.train.checkpoints import file_sha256
from methods.models import CheckpointError
from tests.conftest import compose_config, run_config, run_paths

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "results" / "baselines"
ENTRY = {"seed": 0, "model": "m", "data": "d", "recipe": {"epochs": 1}, "torch": torch.__version__,
         "commit": None, "dirty": None, "shipped": "2026-12-07T00:00:00+00:00"}


def flip_one_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[-5] ^= 1
    path.write_bytes(bytes(content))


def test_ship_then_verify_then_a_changed_byte_is_refused_naming_both_hashes(tmp_path):
    state = {"vit.weight": torch.arange(6.0).reshape(2, 3)}
    path = shipped.ship(tmp_path, "key_a", state, ENTRY)
    listed = shipped.read_manifest(tmp_path).baselines["key_a"]
    assert listed.sha256 == file_sha256(path) and listed.file == "key_a.safetensors"
    assert shipped.verified(tmp_path, "key_a") == path
    assert shipped.verified(tmp_path, "other_key") is None  # not listed: the cache decides
    assert shipped.verified(None, "key_a") is None  # shipping off
    flip_one_byte(path)
    with pytest.raises(CheckpointError) as error:
        shipped.verified(tmp_path, "key_a")
    assert listed.sha256 in str(error.value) and file_sha256(path) in str(error.value)
    assert "make baselines" in str(error.value)


def test_a_listed_file_that_is_missing_or_a_corrupt_manifest_is_refused(tmp_path):
    path = shipped.ship(tmp_path, "key_a", {"w": torch.ones(2)}, ENTRY)
    path.unlink()
    with pytest.raises(CheckpointError, match="listed .* but missing"):
        shipped.verified(tmp_path, "key_a")
    (tmp_path / shipped.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read .*manifest.json"):
        shipped.verified(tmp_path, "key_a")


def test_shipping_again_replaces_the_entry_and_keeps_the_others(tmp_path):
    shipped.ship(tmp_path, "key_a", {"w": torch.ones(2)}, ENTRY)
    shipped.ship(tmp_path, "key_b", {"w": torch.zeros(2)}, ENTRY)
    first = shipped.read_manifest(tmp_path).baselines["key_a"].sha256
    shipped.ship(tmp_path, "key_a", {"w": torch.full((2,), 3.0)}, ENTRY)
    manifest = shipped.read_manifest(tmp_path)
    assert sorted(manifest.baselines) == ["key_a", "key_b"] and manifest.baselines["key_a"].sha256 != first
    assert not list(tmp_path.glob(".*.tmp"))


def tiny_scene_run(folder: Path, *overrides: str):
    return run_config(folder, "model=deit_scenes", "method=dense", "baseline.epochs=1", "data.val_images=16",
                      f"paths.baselines_dir={folder}/shipped", *overrides)


def test_a_run_starts_from_its_shipped_baseline_and_records_its_hash(tmp_path):
    from experiments import pipeline

    cfg = tiny_scene_run(tmp_path)
    plan = validate(cfg)
    key = baseline_key(plan)
    from experiments.build import build_method

    torch.manual_seed(3)
    state = build_method(plan).state_dict()  # any dense weights of the right shapes
    path = shipped.ship(tmp_path / "shipped", key, state, ENTRY)
    record = pipeline.run(cfg)
    assert record["train"]["init"].endswith("(shipped)")
    assert record["weights"]["start_sha256"] == file_sha256(path)
    assert not (tmp_path / "cache").exists()  # nothing trained, nothing cached


def test_a_changed_shipped_baseline_is_refused_at_validation(tmp_path):
    cfg = tiny_scene_run(tmp_path)
    plan = validate(cfg)
    from experiments.build import build_method

    path = shipped.ship(tmp_path / "shipped", baseline_key(plan), build_method(plan).state_dict(), ENTRY)
    flip_one_byte(path)
    with pytest.raises(CheckpointError, match="has sha256 [0-9a-f]{64}, but the manifest says [0-9a-f]{64}"):
        validate(cfg)


def test_the_committed_baselines_are_intact_and_are_the_default_configs_seeds(tmp_path):
    manifest = shipped.read_manifest(COMMITTED)
    if not manifest.baselines:
        pytest.skip("no shipped baselines committed yet")
    for key in manifest.baselines:
        assert shipped.verified(COMMITTED, key) is not None
    seeds = sorted(entry.seed for entry in manifest.baselines.values())
    keys = {baseline_key(validate(compose_config(*run_paths(tmp_path), f"seed={seed}"))) for seed in seeds}
    assert keys == set(manifest.baselines), "the default config no longer matches the shipped baselines: " \
                                            "re-ship them (make baselines) or restore the config"
    assert json.loads((COMMITTED / shipped.MANIFEST).read_text())["format"] == shipped.FORMAT
