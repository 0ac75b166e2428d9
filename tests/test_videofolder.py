"""``data=videofolder`` (experiments/data/videofolder.py): frame sampling by value, decoded clips, the startup check and
its refusals, and the composed config end to end.

Every video is written in ``tmp_path`` at test time with PyAV (MPEG-4 part 2 at the finest quantiser, yuv420p):
frame ``i`` is a uniform grey of level ``16 * i``, so a decoded frame tells which frame it was (within 1 grey
level of codec error here; the tests allow 4 of the 16 between neighbours).
"""
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from experiments import plan
from experiments.config import DataError
from experiments.data.registry import build_data
from experiments.data.videofolder import (VIDEO_EXTENSIONS, VideoFolderDataset, build_videofolder, sample_frames,
                                          scan_videofolder)
from test_schema import assert_refused_at_startup, make_cfg, no_data  # noqa: F401  (no_data: a fixture)

GREY_STEP = 16  # frame i is grey level 16 * i (16 frames stay below 256)
TOLERANCE = 4 / 255  # codec error allowed on a decoded grey level, as a [0, 1] value


pytestmark = pytest.mark.usefixtures("one_thread")


def write_video(path: Path, num_frames: int = 16, width: int = 48, height: int = 40, pattern=None) -> Path:
    """An mp4 whose frame ``i`` is grey ``16 * i`` (or ``pattern(i)``, an ``[H, W, 3]`` uint8 array)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8, options={"qscale:v": "1"})  # finest quantiser
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            pixels = pattern(i) if pattern else np.full((height, width, 3), GREY_STEP * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    return path


def video_tree(tmp_path, classes=("cat", "dog"), per_class=1, num_frames=16, splits=("train", "val")) -> Path:
    root = tmp_path / "videos"
    for split in splits:
        for name in classes:
            for k in range(per_class):
                write_video(root / split / name / f"{k}.mp4", num_frames=num_frames)
    return root


@dataclass
class Cfg:
    """The ``VideoFolderData`` keys, without Hydra (weak-referenceable, as the typed config is)."""

    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    num_classes: object = None
    num_frames: int = 8
    sampling: str = "uniform"
    stride: int = 2
    img_size: int = 32
    crop_pct: float = 0.875
    scale: list = field(default_factory=lambda: [0.25, 1.0])
    hflip: float = 0.5
    mean: list = field(default_factory=lambda: [0.1, 0.2, 0.3])
    std: list = field(default_factory=lambda: [0.5, 0.25, 0.2])
    name: str = "videofolder"


def refused_with(data, message):
    with pytest.raises(DataError) as raised:
        scan_videofolder(data)
    assert re.search(message, str(raised.value), re.DOTALL), f"{message!r} not in {str(raised.value)!r}"


def frame_numbers(clip: torch.Tensor, cfg: Cfg) -> list[int]:
    """Which frame each time step of a normalised ``[3, T, H, W]`` clip shows (its grey level / 16)."""
    mean = torch.tensor(cfg.mean).view(3, 1, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1, 1)
    grey = (clip * std + mean).mean(dim=(0, 2, 3)) * 255 / GREY_STEP
    assert torch.allclose(grey, grey.round(), atol=TOLERANCE * 255 / GREY_STEP), grey
    return grey.round().int().tolist()


# ----------------------------------------------------------------------------------------- sample_frames
def test_uniform_eval_takes_each_segments_centre():
    assert sample_frames(16, 4, "uniform", 2, train=False) == [2, 6, 10, 14]  # int((i + 0.5) * 16 / 4)
    assert sample_frames(10, 4, "uniform", 2, train=False) == [1, 3, 6, 8]  # int((i + 0.5) * 2.5)
    assert sample_frames(8, 8, "uniform", 2, train=False) == list(range(8))


def test_uniform_train_draws_one_frame_inside_each_segment():
    generator = torch.Generator().manual_seed(0)
    seen = [set() for _ in range(4)]
    for _ in range(300):
        indices = sample_frames(10, 4, "uniform", 2, train=True, generator=generator)
        for i, index in enumerate(indices):
            seen[i].add(index)
    # segments [floor(i*10/4), floor((i+1)*10/4)): [0, 2), [2, 5), [5, 7), [7, 10), each frame of each drawn
    assert seen == [{0, 1}, {2, 3, 4}, {5, 6}, {7, 8, 9}]


def test_train_sampling_is_reproducible_from_its_generator():
    first = [sample_frames(100, 8, mode, 3, True, torch.Generator().manual_seed(7)) for mode in ("uniform", "dense")]
    again = [sample_frames(100, 8, mode, 3, True, torch.Generator().manual_seed(7)) for mode in ("uniform", "dense")]
    assert first == again


def test_dense_eval_takes_the_centred_window():
    # window (4 - 1) * 2 + 1 = 7 of 16 frames: slack 9, start 9 // 2 = 4
    assert sample_frames(16, 4, "dense", 2, train=False) == [4, 6, 8, 10]
    assert sample_frames(7, 4, "dense", 2, train=False) == [0, 2, 4, 6]  # exactly fits
    assert sample_frames(20, 3, "dense", 1, train=False) == [8, 9, 10]


def test_dense_train_draws_every_start_that_fits():
    generator = torch.Generator().manual_seed(1)
    starts = set()
    for _ in range(400):
        indices = sample_frames(16, 4, "dense", 2, train=True, generator=generator)
        assert indices == [indices[0] + 2 * k for k in range(4)]
        starts.add(indices[0])
    assert starts == set(range(10))  # 0 .. 16 - 7


@pytest.mark.parametrize("train", [False, True])
def test_short_videos_repeat_their_last_frame(train):
    generator = torch.Generator().manual_seed(0)
    assert sample_frames(3, 5, "uniform", 2, train, generator) == [0, 1, 2, 2, 2]
    assert sample_frames(5, 4, "dense", 2, train, generator) == [0, 2, 4, 4]  # a window of 7 does not fit
    assert sample_frames(6, 4, "dense", 2, train, generator) == [0, 2, 4, 5]
    assert sample_frames(1, 4, "dense", 3, train, generator) == [0, 0, 0, 0]


def test_no_index_is_ever_out_of_range():
    generator = torch.Generator().manual_seed(2)
    for n in range(1, 30):
        for frames in (1, 4, 8, 16):
            for mode in ("uniform", "dense"):
                for train in (False, True):
                    indices = sample_frames(n, frames, mode, 3, train, generator)
                    assert len(indices) == frames and all(0 <= i < n for i in indices)
                    assert indices == sorted(indices)


def test_bad_sampling_arguments_are_refused():
    with pytest.raises(ValueError, match="sampling='random' unknown; valid: uniform, dense"):
        sample_frames(10, 4, "random", 2, False)
    with pytest.raises(ValueError, match="num_available >= 1"):
        sample_frames(0, 4, "uniform", 2, False)


# --------------------------------------------------------------------------------------------- the dataset
def test_eval_clip_shape_normalisation_and_frame_order(tmp_path):
    cfg = Cfg(root=str(video_tree(tmp_path)))
    bundle = build_data(cfg)
    clip, label = bundle.val[1]
    assert clip.shape == (3, 8, 32, 32) and clip.dtype == torch.float32 and label == 1
    assert frame_numbers(clip, cfg) == [1, 3, 5, 7, 9, 11, 13, 15]  # int((i + 0.5) * 16 / 8)
    # normalisation per channel: frame 1 is grey 16/255 before (x - mean) / std
    expected = (torch.tensor([16 / 255] * 3) - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    torch.testing.assert_close(clip[:, 0].mean(dim=(1, 2)), expected, atol=TOLERANCE / 0.2, rtol=0)


def test_eval_reads_are_deterministic(tmp_path):
    cfg = Cfg(root=str(video_tree(tmp_path)))
    val = build_data(cfg).val
    torch.manual_seed(0)
    first = val[0][0]
    torch.manual_seed(1)
    assert torch.equal(first, val[0][0])


def test_dense_eval_and_train_clips_by_value(tmp_path):
    cfg = Cfg(root=str(video_tree(tmp_path)), sampling="dense", stride=2, num_frames=4)
    bundle = build_data(cfg)
    assert frame_numbers(bundle.val[0][0], cfg) == [4, 6, 8, 10]  # window 7 of 16, centred
    torch.manual_seed(3)
    for _ in range(3):
        clip, _ = bundle.train[0]
        assert clip.shape == (3, 4, 32, 32)
        numbers = frame_numbers(clip, cfg)
        assert numbers == [numbers[0] + 2 * k for k in range(4)] and 0 <= numbers[0] <= 9


def test_a_short_video_repeats_its_last_frame_in_the_clip(tmp_path):
    root = tmp_path / "videos"
    for split in ("train", "val"):
        write_video(root / split / "cat" / "short.mp4", num_frames=5)
    cfg = Cfg(root=str(root))
    bundle = build_data(cfg)
    assert frame_numbers(bundle.val[0][0], cfg) == [0, 1, 2, 3, 4, 4, 4, 4]


def half_and_half(width=48, height=40):
    """Frames dark on the left half, bright on the right: the flip shows in the columns."""
    def pattern(_i):
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[:, width // 2:] = 240
        return pixels
    return pattern


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_train_crops_one_view_for_all_frames_and_flips_with_hflip(tmp_path, hflip):
    root = tmp_path / "videos"
    for split in ("train", "val"):
        write_video(root / split / "cat" / "0.mp4", num_frames=8, pattern=half_and_half())
    cfg = Cfg(root=str(root), hflip=hflip, scale=[0.9, 1.0], mean=[0.0] * 3, std=[1.0] * 3)
    torch.manual_seed(0)
    clip, _ = build_data(cfg).train[0]
    assert clip.shape == (3, 8, 32, 32)
    for t in range(1, 8):  # the same crop (and flip) on every frame
        torch.testing.assert_close(clip[:, t], clip[:, 0], atol=3 / 255, rtol=0)
    left, right = clip[:, 0, :, :4].mean(), clip[:, 0, :, -4:].mean()
    assert (left > right) if hflip else (left < right)


def test_a_video_that_fails_to_decode_raises_naming_it(tmp_path):
    """The startup check decodes one frame per file; a file broken after it is named at read time, never replaced."""
    cfg = Cfg(root=str(video_tree(tmp_path)))
    bundle = build_data(cfg)
    broken = Path(bundle.val.samples[0][0])
    broken.write_bytes(os.urandom(2048))
    with pytest.raises(DataError, match=rf"data\.val_split='val': cannot decode video {re.escape(str(broken))}"):
        bundle.val[0]


# ---------------------------------------------------------------------------------------- startup check
def test_a_good_tree_is_counted_and_built_from_the_same_scan(tmp_path):
    root = video_tree(tmp_path, classes=("cat", "dog", "emu"), per_class=2)
    for path in (root / "train" / "emu").iterdir():  # upper-case extensions count too
        path.rename(path.with_suffix(".MP4"))
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0")  # hidden: ignored
    cfg = Cfg(root=str(root))
    scan = scan_videofolder(cfg)  # the startup check
    assert scan.num_classes == 3
    write_video(root / "train" / "cat" / "late.mp4", num_frames=4)  # after the check: not read
    bundle = build_videofolder(cfg, scan)
    assert isinstance(bundle.train, VideoFolderDataset) and bundle.num_classes == 3
    assert len(bundle.train) == len(bundle.val) == 6
    assert all(not path.endswith("late.mp4") for path, _ in bundle.train.samples)
    assert bundle.train.class_to_idx == {"cat": 0, "dog": 1, "emu": 2}
    assert set(bundle.train.frames.values()) == {16}
    info = bundle.info
    assert info["train_videos"] == info["val_videos"] == 6 and info["train_classes"] == 3
    assert info["extensions"] == list(VIDEO_EXTENSIONS) and info["sampling"] == "uniform"
    assert info["num_frames"] == 8 and info["root"] == str(root)


def test_a_corrupt_file_is_refused_naming_it(tmp_path):
    root = video_tree(tmp_path)
    (root / "train" / "cat" / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    refused_with(Cfg(root=str(root)), rf"data\.root={re.escape(str(root))}: 1 of 5 video file\(s\) are not "
                                      r"readable videos .*train/cat/noise\.mp4")


def test_an_empty_file_is_refused_naming_it(tmp_path):
    root = video_tree(tmp_path)
    (root / "val" / "dog" / "empty.mkv").write_bytes(b"")
    refused_with(Cfg(root=str(root)), rf"data\.root={re.escape(str(root))}: 1 of 5 video file\(s\) are not "
                                      r"readable videos .*val/dog/empty\.mkv")


def test_an_audio_only_file_is_refused_for_having_no_video_stream(tmp_path):
    root = video_tree(tmp_path)
    sound = root / "train" / "cat" / "sound.mkv"
    with av.open(str(sound), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    refused_with(Cfg(root=str(root)), r"not readable videos .*train/cat/sound\.mkv \(ValueError: no video stream\)")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_an_image_renamed_mp4_is_refused_at_startup_naming_it(tmp_path, fmt):
    """FFmpeg opens a PNG or JPEG named .mp4 with its image demuxer as a one-frame clip: not a video."""
    root = video_tree(tmp_path)
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(root / "train" / "cat" / "still.mp4", format=fmt)
    refused_with(Cfg(root=str(root)), r"1 of 5 video file\(s\) are not readable videos .*train/cat/still\.mp4 "
                                      r"\(ValueError: an image, not a video \(FFmpeg reads it with the \w+_pipe")


def test_a_clip_whose_frames_do_not_decode_is_refused_at_startup_naming_it(tmp_path):
    """A valid container (frame count stated) whose picture data is zeroed: a demux passes, the decode of its
    first frame fails, so the scan refuses it before any training instead of the loader failing later."""
    root = video_tree(tmp_path)
    clip = root / "val" / "dog" / "0.mp4"
    data = bytearray(clip.read_bytes())
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4:at], "big")
    data[at + 4:at - 4 + size] = bytes(size - 8)  # keep the box, zero its payload (the coded frames)
    clip.write_bytes(bytes(data))
    with av.open(str(clip)) as container:
        assert container.streams.video[0].frames == 16  # the header still states every frame
    refused_with(Cfg(root=str(root)), r"1 of 4 video file\(s\) are not readable videos .*val/dog/0\.mp4 "
                                      r"\(InvalidDataError")


def test_a_container_without_a_stated_frame_count_is_counted_by_demuxing(tmp_path):
    """Matroska does not state the count (stream.frames == 0): the check counts the packets instead."""
    root = tmp_path / "videos"
    for split in ("train", "val"):
        write_video(root / split / "cat" / "0.mkv", num_frames=11)
    with av.open(str(root / "val" / "cat" / "0.mkv")) as container:
        assert container.streams.video[0].frames == 0
    cfg = Cfg(root=str(root))
    scan = scan_videofolder(cfg)
    assert set(scan.frames.values()) == {11}
    clip, _ = build_videofolder(cfg, scan).val[0]
    assert frame_numbers(clip, cfg) == [0, 2, 3, 4, 6, 7, 8, 10]  # int((i + 0.5) * 11 / 8)


def test_a_text_file_in_a_class_folder_is_refused_by_name(tmp_path):
    root = video_tree(tmp_path)
    (root / "train" / "dog" / "labels.txt").write_text("dog\n")
    refused_with(Cfg(root=str(root)), r"data\.train_split='train': class folder 'dog' holds 1 file\(s\) that the "
                                      r"videofolder reader ignores \(\.txt\): .*train/dog/labels\.txt.*valid "
                                      r"extensions: \.avi, \.mkv, \.mov, \.mp4, \.webm")


def test_differing_class_folders_are_named(tmp_path):
    root = video_tree(tmp_path)
    write_video(root / "val" / "fish" / "0.mp4", num_frames=4)
    refused_with(Cfg(root=str(root)), r"train and val class folders differ: only in data\.train_split='train' "
                                      r"\(0\): none; only in data\.val_split='val' \(1\): fish")


def test_train_split_equal_to_val_split_is_refused(tmp_path):
    root = video_tree(tmp_path)
    refused_with(Cfg(root=str(root), val_split="./train"),
                 r"data\.train_split='train' and data\.val_split='\./train' are the same folder")


def test_a_missing_root_is_refused(tmp_path):
    refused_with(Cfg(root=str(tmp_path / "nowhere")), rf"data\.root={re.escape(str(tmp_path))}/nowhere does not "
                                                      r"exist or is not a folder")
    refused_with(Cfg(root=None), r"data\.root is not set .*pass data\.root=/path/to/videos")


def test_a_num_classes_that_is_not_the_folders_count_is_refused(tmp_path):
    root = video_tree(tmp_path)
    refused_with(Cfg(root=str(root), num_classes=5), r"data\.num_classes=5 but .*train has 2 class folders; valid: "
                                                     r"data\.num_classes=2 or null")


def test_a_nested_folder_is_refused_not_made_a_class(tmp_path):
    root = video_tree(tmp_path)
    write_video(root / "train" / "cat" / "more" / "1.mp4", num_frames=4)
    refused_with(Cfg(root=str(root)), r"train/cat/more is a folder inside class folder 'cat'")


# ------------------------------------------------------------------------------------- composed config
VIDEO_RUN = ["data=videofolder", "model=vit_video_digits", "baseline.enabled=false"]


def test_the_composed_config_validates_with_classes_from_the_folders(tmp_path):
    root = video_tree(tmp_path, classes=("a", "b", "c"))
    run = plan.validate(make_cfg(tmp_path, *VIDEO_RUN, f"data.root={root}"))
    assert run.num_classes == 3
    data = run.config.data
    assert data.num_frames == 8 and data.img_size == 24  # the model's
    bundle = build_data(data, run.data_scan)  # the startup scan, carried on the plan
    clip, label = bundle.val[2]
    assert clip.shape == (3, 8, 24, 24) and label == 2


def test_a_bad_tree_is_refused_at_startup_writing_nothing(tmp_path, no_data):
    root = video_tree(tmp_path)
    (root / "val" / "cat" / "broken.webm").write_bytes(b"not a video at all")
    assert_refused_at_startup(tmp_path, [*VIDEO_RUN, f"data.root={root}"], DataError,
                              r"not readable videos .*val/cat/broken\.webm")
