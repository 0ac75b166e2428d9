"""``data=digit_scenes`` (experiments/data/digit_scenes.py): the generator and its ground truth by hand, fixed
validation scenes (across builds and processes), fresh training scenes per epoch that a resume reproduces, the
disjoint split, the defaults' object-token share, bad input refused before anything is written, and a tiny run."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_config
from experiments import pipeline
from experiments.train import engine
from experiments.config import ConfigError
from experiments.data.digit_scenes import (MASK_THRESHOLD, DigitScenesData, Scenes, digit_arrays, object_tokens,
                                           split_indices, token_object_fraction)
from experiments.data.loaders import make_loader
from experiments.data.registry import build_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle():
    return build_data(DigitScenesData(img_size=32))


# ------------------------------------------------------------------------------------------ ground truth
def test_token_object_fraction_and_object_tokens_by_hand():
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, 0:2] = True  # token (0, 0): 2 of 4 pixels
    mask[1, 2] = True  # token (0, 1): 1 of 4
    mask[2:4, 4:6] = True  # token (1, 2): all 4
    mask[3, 0:2] = True  # token (1, 0): 2 of 4
    expected = torch.tensor([[0.5, 0.25, 0.0], [0.5, 0.0, 1.0]])
    torch.testing.assert_close(token_object_fraction(mask, 2), expected, rtol=0, atol=1e-6)
    assert object_tokens(mask, 2).tolist() == [[True, False, False], [True, False, True]]
    assert token_object_fraction(mask, 1).equal(mask.float())  # patch 1: the mask itself
    batch = token_object_fraction(torch.stack([mask, ~mask]), 2)  # leading dims pass through
    torch.testing.assert_close(batch[1], 1 - expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"patch=4 does not tile a 4x6 mask"):
        token_object_fraction(mask, 4)


def test_a_digit_at_a_known_place_and_scale_gives_the_mask_worked_out_by_hand():
    # an 8x8 digit scaled to 4 px: bilinear halving averages each 2x2 block
    digit = np.zeros((8, 8))
    digit[0:2, 0:4] = 1  # blocks (0, 0), (0, 1): ink 1
    digit[0:2, 4] = 1  # block (0, 2): ink 0.5, above the threshold
    digit[2, 0] = 1  # block (1, 0): ink 0.25, not above it
    assert MASK_THRESHOLD == 0.25
    cfg = DigitScenesData(img_size=10, digit_size=4, scale_min=1.0, scale_max=1.0, jitter=0, fragments=0,
                          background=0.0)
    image, mask = Scenes(digit[None], cfg).render(0, np.random.default_rng(0))
    expected = np.zeros((10, 10))  # the 4 px digit centred: top-left corner (3, 3)
    expected[3, 3:6] = [1.0, 1.0, 0.5]
    expected[4, 3] = 0.25
    np.testing.assert_allclose(image, expected, rtol=0, atol=1e-6)
    assert sorted(zip(*np.nonzero(mask))) == [(3, 3), (3, 4), (3, 5)]
    # patch 2 (a 5x5 grid): (3, 3) is 1 of token (1, 1)'s 4 pixels, (3, 4) and (3, 5) 2 of token (1, 2)'s
    fractions = token_object_fraction(torch.from_numpy(mask), 2)
    expected_fractions = torch.zeros(5, 5)
    expected_fractions[1, 1], expected_fractions[1, 2] = 0.25, 0.5
    torch.testing.assert_close(fractions, expected_fractions, rtol=0, atol=1e-6)
    assert object_tokens(torch.from_numpy(mask), 2).nonzero().tolist() == [[1, 2]]


def test_clutter_and_background_stay_below_their_amplitudes_outside_the_digit(bundle):
    val = bundle.val
    for index in range(50):
        image, mask = val.scene(index)
        assert image.shape == mask.shape == (32, 32) and 0 <= image.min() and image.max() <= 1
        # off the mask: background (<= 0.25), fragments (<= 0.35) or the digit's faint fringe (<= threshold)
        assert image[~mask].max() <= max(0.25, 0.35, MASK_THRESHOLD) + 1e-6
        assert mask.any() and image[mask].min() >= MASK_THRESHOLD - 1e-6  # ink above it, stored as float32
    image, label = val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 10
    torch.testing.assert_close(image[0], torch.from_numpy(val.scene(0)[0] * 2 - 1), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------- seeds
def val_digest(count: int) -> str:
    val = build_data(DigitScenesData(img_size=32)).val
    digest = hashlib.sha256()
    for index in range(count):
        image, mask = val.scene(index)
        digest.update(image.tobytes() + mask.tobytes() + bytes([val.label(index)]))
    return digest.hexdigest()


def test_validation_scenes_are_the_same_across_builds_and_processes(bundle):
    again = build_data(DigitScenesData(img_size=32)).val
    for index in (0, 1, 359, 360, 2999):  # 360 shows digit 0 again, in another scene
        assert bundle.val[index][0].equal(again[index][0]) and bundle.val.mask(index).equal(again.mask(index))
    assert not bundle.val[0][0].equal(bundle.val[360][0]) and bundle.val.label(0) == bundle.val.label(360)
    script = "from tests.test_digit_scenes import val_digest; print(val_digest(20))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    other = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert other.returncode == 0, other.stderr[-2000:]
    assert other.stdout.strip() == val_digest(20)


def test_training_scenes_are_new_each_epoch_and_the_same_on_resume(bundle):
    train = bundle.train

    def read(seed: int, index: int = 0):
        torch.manual_seed(seed)  # what fit.py's per-epoch seed_everything does
        return train[index][0], train.mask(index)

    epoch0, epoch1 = read(1000), read(1001)
    assert not epoch0[0].equal(epoch1[0])
    resumed = read(1000)
    assert epoch0[0].equal(resumed[0]) and epoch0[1].equal(resumed[1])
    assert not read(1000, 1)[0].equal(read(1000, 2)[0])


def test_training_scenes_through_a_loader_worker_follow_the_epoch_seed(bundle, one_thread):
    loader = make_loader(bundle.train, 8, True, num_workers=1, seed=0)

    def first_batch(epoch: int):
        loader.generator.manual_seed(epoch)  # as fit.py re-seeds the loader each epoch
        return next(iter(loader))[0]

    assert first_batch(0).equal(first_batch(0))
    assert not first_batch(0).equal(first_batch(1))


def test_train_and_val_draw_on_disjoint_digits(bundle):
    images, labels = digit_arrays()
    train_idx, val_idx = split_indices(labels, 0.2, 0)
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist()) and len(train_idx) + len(val_idx) == 1797
    assert bundle.info["val_indices"] == val_idx.tolist()
    # each split renders digits and fragments from its own digits only
    np.testing.assert_array_equal(bundle.train.scenes.digits, images[train_idx])
    np.testing.assert_array_equal(bundle.val.scenes.digits, images[val_idx])
    assert len(bundle.train) == 1437 and len(bundle.val) == 3000 and bundle.info["val_digits"] == 360
    assert sorted(bundle.train.labels.tolist()) == sorted(labels[train_idx].tolist())


def test_the_defaults_put_20_to_45_percent_of_the_tokens_on_the_object(bundle):
    objects = bundle.val.token_objects(4)[:300]
    assert objects.shape == (300, 64)
    assert 0.20 <= objects.float().mean().item() <= 0.45
    torch.manual_seed(0)
    train = torch.stack([object_tokens(bundle.train.mask(i), 4).flatten() for i in range(300)])
    assert 0.20 <= train.float().mean().item() <= 0.45


def test_token_objects_are_for_the_fixed_split_only(bundle):
    with pytest.raises(ValueError, match="validation split"):
        bundle.train.token_objects(4)


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides, message", [
    (["data.scale_min=0"], r"data\.scale_min=0(\.0)? must be in \(0, 1\]"),
    (["data.scale_max=1.5"], r"data\.scale_max=1\.5 must be in \(0, 1\]"),
    (["data.scale_min=0.9", "data.scale_max=0.8"], r"data\.scale_min=0\.9 is above data\.scale_max=0\.8; "
                                                   r"valid: 0 < scale_min <= scale_max <= 1"),
    (["data.digit_size=40"], r"data\.img_size=32 is smaller than the largest digit, data\.digit_size=40; "
                             r"valid: data\.img_size >= 40"),
    (["data.img_size=30"], r"data\.img_size=30 is not a positive multiple of the patch size 4"),
    (["data.val_images=0"], r"data\.val_images=0 must be in \[1, \d+\]"),
    (["data.clutter=1.5"], r"data\.clutter=1\.5 must be in \[0, 1\]"),
    (["data.clutter=-0.1"], r"data\.clutter=-0\.1 must be in \[0, 1\]"),
])
def test_bad_input_is_refused_naming_key_value_and_range_writing_nothing(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        pipeline.run(run_config(tmp_path / "out", "data=digit_scenes", "+model.depth=2", *overrides))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_a_tiny_run_on_digit_scenes_writes_its_record(tmp_path, one_thread):
    cfg = run_config(tmp_path, "data=digit_scenes", "+model.depth=2", "baseline.epochs=1", "train.epochs=1",
                     "data.val_images=64", "eval.map_images=2", "experiment.train=true")
    pipeline.run(cfg)
    [path] = sorted((tmp_path / "results" / "runs").glob("*.json"))
    record = json.loads(path.read_text())
    assert record["data"] == "digit_scenes" and record["metrics"]["num_images"] == 64
    assert record["data_read"] == {"classes": 10, "train_images": 1437, "val_images": 64, "val_digits": 360}
    assert record["config"]["data"]["clutter"] == pytest.approx(0.35)
    # dense keeps every token through both blocks: full recall, and background compute = the background's share
    objects = record["tokens"]["objects"]
    assert objects["object_recall"] == 1.0
    assert objects["background_compute"] == pytest.approx(objects["background_share"])
    assert objects["object_share"] + objects["background_share"] == pytest.approx(1.0)
    assert 0.2 <= objects["object_share"] <= 0.45
    # the mapped images carry their ground truth: the mask (32 px thumbnails: full resolution) and object tokens
    from analysis import load
    val = build_data(DigitScenesData(img_size=32, val_images=64)).val
    maps = load.depth_maps(record["tokens"])
    assert [m["index"] for m in maps] == [0, 1]
    for entry in maps:
        assert np.array_equal(entry["object_mask"], val.mask(entry["index"]).numpy())
        assert np.array_equal(entry["object_tokens"], val.token_objects(4)[entry["index"]].reshape(8, 8).numpy())
    assert record["method_defaults"] == {}  # dense has no parameters; its default setting is the only one


# ---------------------------------------------------------------------------------- scores against the truth
# two images of four patch tokens, depth 4; object tokens: image 0 tokens 0 and 1, image 1 token 2
OBJECTS = torch.tensor([[True, True, False, False], [False, False, True, False]])


@pytest.mark.parametrize("name, depths, recall, background", [
    # everything kept: recall 1; background compute = its token share, 5/8
    ("all kept", [[4, 4, 4, 4], [4, 4, 4, 4]], 1.0, 20 / 32),
    # a pruner that drops the object after block 1 and keeps the background: recall 0, background 20 of 23 blocks
    ("object dropped", [[1, 1, 4, 4], [4, 4, 1, 4]], 0.0, 20 / 23),
    # one that drops the background after block 1: recall 1, background 5 of 17 blocks
    ("background dropped", [[4, 4, 1, 1], [1, 1, 4, 1]], 1.0, 5 / 17),
    # a merger: token 1 of image 0 merged into token 0 at block 2 (token 0 is the group's representative and
    # stays itself); recall 2/3 (tokens 0 of image 0 and 2 of image 1 reach the end), background 20 of 30 blocks
    ("merged", [[4, 2, 4, 4], [4, 4, 4, 4]], 2 / 3, 20 / 30),
])
def test_object_scores_by_hand(name, depths, recall, background):
    scores = engine.object_scores(torch.tensor(depths), OBJECTS, depth=4)
    assert scores["object_recall"] == pytest.approx(recall)
    assert scores["background_compute"] == pytest.approx(background)
    assert scores["object_share"] == pytest.approx(3 / 8) and scores["background_share"] == pytest.approx(5 / 8)
