"""Moving digits (experiments/data/moving_digits.py): determinism, motion by hand, static clips, the moving region's
tokens, and the startup refusals of video settings."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from experiments.data import moving_digits as video_data
from experiments.config import ConfigError
from experiments.data.moving_digits import MovingDigitsData
from test_pipeline import make_cfg


def moving_cfg(**overrides):
    cfg = OmegaConf.structured(MovingDigitsData(img_size=32, num_frames=8))
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def test_the_split_is_deterministic_and_validation_clips_are_fixed():
    first, second = video_data.build_moving_digits(moving_cfg()), video_data.build_moving_digits(moving_cfg())
    assert len(first.train) == 1437 and len(first.val) == 360  # the digits split: 1797 clips, 20% validation
    assert all(torch.equal(first.val[i][0], second.val[i][0]) for i in (0, 7, 359))
    assert torch.equal(first.val[3][0], first.val[3][0])  # a validation clip is the same at every read
    clip, label = first.val[5]
    assert clip.shape == (3, 8, 32, 32) and clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1 and torch.equal(clip[0], clip[1])  # grey, as the image digits
    assert label == int(first.val.labels[5])
    other = video_data.build_moving_digits(moving_cfg(split_seed=1))
    assert not torch.equal(other.val[0][0], first.val[0][0])


def test_training_clips_follow_torch_s_seed():
    bundle = video_data.build_moving_digits(moving_cfg())
    torch.manual_seed(7)
    first = bundle.train[0][0]
    torch.manual_seed(7)
    assert torch.equal(bundle.train[0][0], first)
    assert not torch.equal(bundle.train[0][0], first)  # the next read draws a new motion


def test_a_static_clip_has_identical_frames():
    bundle = video_data.build_moving_digits(moving_cfg(min_speed=0.0, max_speed=0.0))
    clip = bundle.val[0][0]
    assert all(torch.equal(clip[:, t], clip[:, 0]) for t in range(8))
    moving = video_data.build_moving_digits(moving_cfg()).val[0][0]
    assert not torch.equal(moving[:, 7], moving[:, 0])


def test_the_background_is_static_and_only_the_digit_moves():
    bundle = video_data.build_moving_digits(moving_cfg())
    frames = torch.stack([bundle.val[i][0][0] for i in range(40)])  # [N, T, H, W]
    changed = (frames != frames[:, :1]).any(dim=1)  # pixels that differ from frame 0 somewhere in the clip
    footprint = bundle.val.footprints()[:40].any(dim=1)
    assert changed.any()
    assert not (changed & ~footprint).any()  # every change lies where a digit passes


@pytest.mark.parametrize("start, velocity, bounce, rows", [
    # 0 1.5 3 4.5 6 7.5 9 10.5, folded at 8 (9 -> 7, 10.5 -> 5.5), rounded half to even
    ((0.0, 2.0), (1.5, 0.0), True, [0, 2, 3, 4, 6, 8, 7, 6]),
    ((0.0, 2.0), (1.5, 0.0), False, [0, 2, 3, 4, 6, 8, 8, 8]),  # clamped at 8
    ((5.0, 2.0), (-2.0, 0.0), True, [5, 3, 1, 1, 3, 5, 7, 7]),  # 5 3 1 -1 -3 -5 -7 -9: reflected at 0 and 8
])
def test_trajectory_by_hand(start, velocity, bounce, rows):
    path = video_data.trajectory(torch.tensor(start), torch.tensor(velocity), 8, 8, bounce)
    assert path[:, 0].tolist() == rows and path[:, 1].tolist() == [2] * 8


def test_two_digits_label_their_sum_mod_ten():
    bundle = video_data.build_moving_digits(moving_cfg(num_digits=2))
    labels, partners = bundle.val.labels, bundle.val.partners
    assert [bundle.val[i][1] for i in range(5)] == [int(labels[i] + labels[partners[i]]) % 10 for i in range(5)]


def test_moving_region_tokens_by_hand():
    footprint = torch.zeros(1, 4, 32, 32, dtype=torch.bool)
    footprint[0, 0, 9, 30] = True   # frame 0 (slot 0), row 9 (row 1), column 30 (column 3): token 0*16 + 4 + 3
    footprint[0, 3, 31, 0] = True   # frame 3 (slot 1), row 31 (row 3), column 0: token 16 + 12 + 0
    moving = video_data.tokens_touched(footprint, (2, 4, 4), (2, 8, 8))
    assert moving.shape == (1, 32) and moving[0].nonzero().flatten().tolist() == [7, 28]
    with pytest.raises(ValueError, match="does not tile"):
        video_data.tokens_touched(footprint, (4, 4, 4), (2, 8, 8))
    dataset = video_data.build_moving_digits(moving_cfg()).val
    regions = dataset.token_regions((4, 4, 4), (2, 8, 8))
    assert regions.shape == (360, 64) and regions.any(dim=1).all() and not regions.all()


@pytest.mark.parametrize("overrides, message", [
    (["data=moving_digits"], r"data=moving_digits is video data, but the model is an image model"),
    (["model=vit_video_digits", "data=digits"], r"model.name=vit_video_digits is a video model \(8 frames per clip\), but "
                                 r"data=digits gives images"),
    (["model=vit_video_digits", "data=moving_digits", "data.num_frames=6"],
     r"data.num_frames=6 but the model takes clips of model.num_frames=8"),
    (["model=vit_video_digits", "data=moving_digits", "model.num_frames=7"], r"model.num_frames=7 .* tubelet depth 2"),
    (["model=vit_video_digits", "data=moving_digits", "data.digit_scale=1.5"], r"data.digit_scale=1.5 must be in \(0, 1\]"),
    (["model=vit_video_digits", "data=moving_digits", "data.digit_scale=0.1"], r"digits of 2 px on the data.img_size=24"),
    (["model=vit_video_digits", "data=moving_digits", "data.min_speed=3"], r"data.min_speed=3(\.0)? must be <= data.max_speed \(1.5\)"),
    (["model=vit_video_digits", "data=moving_digits", "data.num_digits=3"], r"data.num_digits=3 unknown; valid: 1, 2"),
    (["model=vit_video_digits", "data=moving_digits", "method=heuristic"], r"3-D, 4 x 3 x 3"),
])
def test_bad_video_settings_are_refused_at_startup(tmp_path, overrides, message):
    from experiments import plan

    with pytest.raises((ConfigError, ValueError), match=message):
        plan.validate(make_cfg(tmp_path, *overrides))
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_a_video_run_records_space_time_maps_and_the_moving_region(tmp_path):
    import json

    from experiments import pipeline
    from test_pipeline import records_in

    cfg = make_cfg(tmp_path, "model=vit_video_digits", "data=moving_digits", "method=topk", "baseline.epochs=1",
                   "train.epochs=1", "model.depth=4", "method.params.locations=[1,2]", "eval.map_images=2")
    pipeline.run(cfg)
    [path] = records_in(tmp_path)
    record = json.loads(path.read_text())
    tokens = record["tokens"]
    assert record["model"] == "vit_video_digits" and record["data"] == "moving_digits"
    assert tokens["grid"] == [4, 3, 3] and len(tokens["mean_patch_depth"]) == 36
    assert tokens["attn_mean"] == [37.0, 37.0, 26.0, 18.0]  # int(36 * 0.7) = 25, int(36 * 0.49) = 17, + CLS
    assert record["data_read"]["num_frames"] == 8
    from analysis import load

    depth = load.unpack_array(tokens["maps"][0]["patch_depth"])
    thumb = load.unpack_array(tokens["maps"][0]["thumbnail"])
    assert depth.shape == (4, 3, 3) and thumb.shape == (24, 4 * 24, 1)  # a filmstrip of the 4 time slots
    motion = tokens["motion"]
    assert 0 < motion["token_share"] < 1 and 0 < motion["depth_share"] < 1
    # the shares are of the run's own patch depths: recompute the moving share from the dataset's regions
    assert motion["mean_depth_moving"] >= 1 and motion["mean_depth_static"] >= 1
    assert record["flops"]["flops_ratio"] < 1


def test_changed_pixels_by_hand_and_a_static_clip_has_no_moving_region():
    frames = np.zeros((3, 2, 2), dtype=np.float32)
    frames[1, 0, 1] = 1.0  # appears in frame 1, gone again in frame 2
    changed = video_data.changed_pixels(frames)
    # frame 0 compares with frame 1, frame f with frame f - 1
    assert changed[:, 0, 1].tolist() == [True, True, True] and not changed[:, 1].any() and not changed[:, 0, 0].any()
    static = video_data.build_moving_digits(moving_cfg(min_speed=0.0, max_speed=0.0)).val
    assert not static.token_regions((4, 4, 4), (2, 8, 8)).any()
