"""Video folders (``data=videofolder``): ``root/<split>/<class>/<video>`` decoded with PyAV, for cluster users with
real video data (Kinetics/SSv2/UCF-style class folders of .mp4 files).

This module owns the video side of that data option: its config (:class:`VideoFolderData`), the startup check
(:func:`scan_videofolder`, run by ``plan.validate`` before anything is built or written), frame sampling
(:func:`sample_frames`), decoding and the clip transforms (:class:`VideoFolderDataset`), and the bundle
(:func:`build_videofolder`). The folder walk and its structural rules are the shared ones of
``experiments/data/folders.py`` (imagefolder's too), so both options refuse the same layouts with the same words;
the startup scan travels on the run plan to the build, so the run reads exactly the videos (and frame counts) that
the check counted.

Rules, each refused with a ``DataError`` naming the key, the path and what is valid:

- **Layout** (imagefolder's rules): ``data.train_split`` and ``data.val_split`` are two distinct folders under
  ``data.root``, neither inside the other; each holds class folders only, and each class folder holds its videos
  directly (no nested folders, no symlink loops); hidden files (``.DS_Store``) are ignored; any other file whose
  extension is not a video extension (:data:`VIDEO_EXTENSIONS`: .avi, .mkv, .mov, .mp4, .webm, compared
  lower-case) is refused by name instead of silently vanishing; both splits have the same class folders;
  ``data.num_classes``, when set, equals their number; no video file is reached from both splits.
- **Readable videos**: every video opens with PyAV in a video container (an image renamed ``.mp4``, which
  FFmpeg opens with an image demuxer such as ``png_pipe`` as one still frame, is refused), has a video stream
  whose first frame decodes, and a frame count >= 1: the stream's ``frames`` when the container states it
  (> 0), otherwise the number of demuxed packets of the stream. Empty files, random bytes, text named ``.mp4``,
  images, audio-only files and clips whose picture data does not decode are refused at startup, with the count
  and a few names; decoding one frame per file costs about a millisecond each. A frame later in a clip that
  fails to decode (damage past the first frame, or a file changed after the check) raises at read time, naming
  the file.
- **Frames** (:func:`sample_frames`, index ``i`` = the ``i``-th decoded frame, presentation order), with
  ``n`` frames available and ``T = data.num_frames``:

  - ``uniform`` (TSN-style): ``T`` equal segments, segment ``i`` = frames ``[floor(i*n/T), floor((i+1)*n/T))``;
    eval takes each segment's centre ``int((i + 0.5) * n / T)``, train a uniformly random frame of each segment.
  - ``dense``: ``T`` frames ``stride`` apart, a window of ``(T - 1) * stride + 1`` frames; eval starts the window
    at ``(n - window) // 2`` (centred), train at a uniformly random start in ``[0, n - window]``.
  - **Short videos** (``n < T`` for uniform, ``n < window`` for dense): the frames that exist are taken from the
    first one on (every frame for uniform, every ``stride``-th for dense) and the last frame is repeated to fill
    ``T``, for train and eval alike (no randomness: there is nothing to choose from). No index is ever >= ``n``.
- **Decoding**: a clip decodes its video sequentially up to the last sampled frame and keeps the sampled ones (fine
  for short clips). A file that fails to decode, or decodes no frame at all, raises a ``DataError`` naming it;
  never a silent substitute. A stated frame count can exceed what decodes (container metadata): sampled indices
  past the last decoded frame take that last frame, the short-video rule.
- **Spatial transforms**, the same for every frame of a clip, on the ``[T, C, H, W]`` uint8 frames with
  torchvision's ``transforms.v2`` functional ops (bicubic, antialiased, like the imagefolder transforms): train =
  random resized crop to ``data.img_size`` (area fraction in ``data.scale``, aspect ratio 3/4..4/3, torchvision's
  ``RandomResizedCrop`` parameters) then a horizontal flip with probability ``data.hflip``; eval = resize the
  short side to ``int(img_size / crop_pct)`` then centre crop ``img_size`` (timm's eval convention). Then
  ``/255`` and ``(x - data.mean) / data.std`` per channel, and the clip is returned as ``[3, T, H, W]`` float32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from experiments.config import MAX_COUNT, ConfigError, DataError, FolderLayout, VideoData, spec
from experiments.data.folders import FolderScan, FolderWords, SplitScan, examples, scan_folders
from experiments.data.loaders import DataBundle
from experiments.data.registry import register_data

VIDEO_EXTENSIONS = (".avi", ".mkv", ".mov", ".mp4", ".webm")  # lower-case; files are compared lower-cased
SAMPLINGS = ("uniform", "dense")
RATIO_RANGE = (3 / 4, 4 / 3)  # random resized crop aspect ratios (torchvision's and timm's default)
VIDEO_WORDS = FolderWords(item="video", an_item="a video", reader="the videofolder reader",
                          reads="the videofolder reader", source="experiments.data.videofolder.VIDEO_EXTENSIONS",
                          example_root="/path/to/videos")


@dataclass
class VideoFolderData(VideoData, FolderLayout):
    """``root/<split>/<class>/*.mp4`` decoded with PyAV (experiments/data/videofolder.py)."""

    name: str = "videofolder"
    sampling: str = spec("uniform", choices=SAMPLINGS)  # frame sampling (sample_frames)
    stride: int = spec(2, ge=1, le=MAX_COUNT)  # dense sampling: every stride-th frame
    scale: List[float] = spec([0.25, 1.0], gt=0, le=1)  # training random-resized-crop area range
    hflip: float = spec(0.5, ge=0, le=1)

    def check(self, key: str) -> None:
        super().check(key)
        self.check_layout(key)
        if len(self.scale) != 2 or self.scale[0] > self.scale[1]:
            raise ConfigError(f"{key}.scale={self.scale} must be [low, high] with low <= high")


# ------------------------------------------------------------------------------------------------- sampling
def _random_below(high: int, generator: Optional[torch.Generator]) -> int:
    """A uniform integer in ``[0, high)`` drawn from ``generator`` (torch's global one when None)."""
    return int(torch.randint(high, (1,), generator=generator).item())


def _uniform_indices(n: int, num_frames: int, train: bool, generator: Optional[torch.Generator]) -> list[int]:
    if not train:
        return [int((i + 0.5) * n / num_frames) for i in range(num_frames)]
    indices = []
    for i in range(num_frames):
        start, end = (i * n) // num_frames, ((i + 1) * n) // num_frames  # n >= num_frames: end > start
        indices.append(start + _random_below(end - start, generator))
    return indices


def _dense_indices(n: int, num_frames: int, stride: int, train: bool,
                   generator: Optional[torch.Generator]) -> list[int]:
    slack = n - ((num_frames - 1) * stride + 1)  # >= 0: the window fits
    start = _random_below(slack + 1, generator) if train else slack // 2
    return [start + k * stride for k in range(num_frames)]


def sample_frames(num_available: int, num_frames: int, sampling: str, stride: int, train: bool,
                  generator: Optional[torch.Generator] = None) -> list[int]:
    """The ``num_frames`` frame indices (each in ``[0, num_available)``) a clip takes from a video of
    ``num_available`` frames; the formulas are the module docstring's. ``train`` draws from ``generator`` (torch's
    global generator when None); eval is deterministic."""
    if num_available < 1 or num_frames < 1 or stride < 1:
        raise ValueError(f"sample_frames needs num_available >= 1, num_frames >= 1 and stride >= 1 (got "
                         f"{num_available}, {num_frames}, {stride})")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling={sampling!r} unknown; valid: {', '.join(SAMPLINGS)}")
    step = 1 if sampling == "uniform" else stride
    needed = (num_frames - 1) * step + 1
    if num_available < needed:  # short video: what exists from the start, then the last frame repeated
        return [min(k * step, num_available - 1) for k in range(num_frames)]
    if sampling == "uniform":
        return _uniform_indices(num_available, num_frames, train, generator)
    return _dense_indices(num_available, num_frames, stride, train, generator)


# ------------------------------------------------------------------------------------------- startup check
# FFmpeg's single-image demuxers: a PNG or JPEG renamed .mp4 opens as "png_pipe" or "jpeg_pipe" (one still frame)
IMAGE_DEMUXERS = ("image2", "image2pipe")


def count_frames(path: str) -> int:
    """Frames of ``path``'s first video stream: the stated count, else its demuxed packets. The file must be a
    video container (not an image that FFmpeg's image demuxers open as one still frame) and its first frame
    must decode, so a clip that cannot be read is refused at startup, not after training. Raises whatever
    PyAV raises for a file it cannot open or decode, and ``ValueError`` for a file that is not a video."""
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        demuxer = container.format.name
        if demuxer in IMAGE_DEMUXERS or demuxer.endswith("_pipe"):
            raise ValueError(f"an image, not a video (FFmpeg reads it with the {demuxer} demuxer, codec "
                             f"{stream.codec_context.name}: one still frame)")
        if next(container.decode(stream), None) is None:
            raise ValueError("no frame decodes")
        if stream.frames > 0:
            return int(stream.frames)
    with av.open(path) as container:  # the decode above consumed packets: count them on a fresh demux
        # the container does not state it (mkv, webm, some avi): count the stream's packets, which a demux reads
        # without decoding; the flush packet at the end carries no data
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def _frame_count_or_error(path: str) -> tuple[int, Optional[str]]:
    try:
        frames = count_frames(path)
    except Exception as error:  # noqa: BLE001 -- every reason is reported, by name
        return 0, f"{path} ({type(error).__name__}: {error})"
    if frames < 1:
        return 0, f"{path} (no frames)"
    return frames, None


def _count_all_frames(root: Path, scans: Sequence[SplitScan]) -> dict[str, int]:
    """Frame count of every sample; refuses the unreadable ones, naming a few and counting all."""
    paths = [path for scan in scans for path, _ in scan.samples]
    workers = max(1, min(16, 2 * (os.cpu_count() or 1), len(paths) // 64 or 1))
    if workers == 1:
        results = list(map(_frame_count_or_error, paths))
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:  # opening and demuxing is I/O and C code: threads overlap it
            results = list(pool.map(_frame_count_or_error, paths, chunksize=16))
    bad = [error for _, error in results if error]
    if bad:
        raise DataError(f"data.root={root}: {len(bad)} of {len(paths)} video file(s) are not readable videos "
                        f"(empty, corrupt, an image, no video stream, no frames, or a first frame that does not "
                        f"decode): {examples(bad, 3)}; valid: "
                        f"video files PyAV (FFmpeg) opens, with a video stream of at least one frame - remove or "
                        f"replace these")
    return {path: frames for path, (frames, _) in zip(paths, results)}


@dataclass
class VideoFolderScan:
    """The checked video folders: imagefolder's :class:`FolderScan` plus each video's frame count."""

    folders: FolderScan
    frames: dict[str, int]  # path -> frames available (stated or counted)

    @property
    def num_classes(self) -> int:
        return self.folders.num_classes

    def content_digest(self) -> str:
        """The folders' digest (:meth:`FolderScan.content_digest`): frame counts follow from the files."""
        return self.folders.content_digest()


def scan_videofolder(data, needs_train: bool = True) -> VideoFolderScan:
    """The startup check of ``data=videofolder``: scan and check both splits of the videofolder config ``data``
    (the module docstring's rules) and count every video's frames; raise ``DataError`` naming the key and path.
    ``needs_train=False``: the train folder may be absent (the run reads no training video). Its scan is what
    :func:`build_videofolder` reads."""
    folders = scan_folders(data, VIDEO_EXTENSIONS, VIDEO_WORDS, needs_train=needs_train)
    return VideoFolderScan(folders, _count_all_frames(Path(folders.root), folders.splits))


# ------------------------------------------------------------------------------------------------ decoding
def decode_frames(path: str, indices: Sequence[int]) -> Tensor:
    """The frames at ``indices`` of ``path``'s first video stream as ``[len(indices), 3, H, W]`` uint8 RGB,
    decoding sequentially up to the last one; indices past the last decoded frame take that frame. Raises
    whatever PyAV raises, and ``ValueError`` when no frame decodes."""
    import av

    wanted = set(indices)
    last_wanted = max(indices)
    kept: dict[int, Tensor] = {}
    last_index, last_frame = -1, None
    with av.open(path) as container:
        for index, frame in enumerate(container.decode(video=0)):
            last_index, last_frame = index, frame
            if index in wanted:
                kept[index] = torch.from_numpy(frame.to_ndarray(format="rgb24"))
            if index >= last_wanted:
                break
    if last_frame is None:
        raise ValueError("no frame decodes")
    if last_index not in kept:  # the video ended before some sampled index
        kept[last_index] = torch.from_numpy(last_frame.to_ndarray(format="rgb24"))
    frames = [kept[i] if i <= last_index else kept[last_index] for i in indices]  # all i <= last were kept
    return torch.stack(frames).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------ transforms
def train_crop(frames: Tensor, img_size: int, scale: Sequence[float], hflip: float) -> Tensor:
    """Training view of ``[T, C, H, W]`` frames: one random resized crop (area in ``scale``, aspect 3/4..4/3) to
    ``img_size`` and, with probability ``hflip``, one horizontal flip, both shared by all frames."""
    from torchvision.transforms import InterpolationMode, RandomResizedCrop
    from torchvision.transforms.v2 import functional as TF

    # torchvision's own crop-parameter draw (torch's global generator, seeded per loader worker)
    top, left, height, width = RandomResizedCrop.get_params(frames, list(scale), list(RATIO_RANGE))
    frames = TF.resized_crop(frames, top, left, height, width, [img_size, img_size],
                             interpolation=InterpolationMode.BICUBIC, antialias=True)
    if hflip > 0 and torch.rand(1).item() < hflip:
        frames = TF.horizontal_flip(frames)
    return frames


def eval_crop(frames: Tensor, img_size: int, crop_pct: float) -> Tensor:
    """Evaluation view of ``[T, C, H, W]`` frames: short side resized to ``int(img_size / crop_pct)``, then the
    centre ``img_size`` square (timm's eval transform)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    frames = TF.resize(frames, int(img_size / crop_pct), interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(frames, [img_size, img_size])


def normalise_clip(frames: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``[T, 3, H, W]`` uint8 frames -> ``[3, T, H, W]`` float32 clip, ``(x / 255 - mean) / std`` per channel."""
    clip = frames.float().div_(255)
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    return ((clip - mean_t) / std_t).permute(1, 0, 2, 3).contiguous()


# ------------------------------------------------------------------------------------------------- dataset
class VideoFolderDataset(Dataset):
    """``(clip [3, T, H, W] float32 normalised, label)`` for each ``(path, label)`` of ``samples``; ``frames``
    gives each path's frame count from the startup check. ``train`` selects random sampling and crops."""

    def __init__(self, samples: Sequence[tuple[str, int]], frames: dict[str, int], cfg, train: bool,
                 where: str = "", class_to_idx: Optional[dict[str, int]] = None) -> None:
        self.samples = list(samples)
        self.frames = {path: frames[path] for path, _ in self.samples}
        self.train, self.where = bool(train), where
        self.class_to_idx = dict(class_to_idx or {})
        self.num_frames, self.sampling, self.stride = int(cfg.num_frames), str(cfg.sampling), int(cfg.stride)
        self.img_size, self.crop_pct = int(cfg.img_size), float(cfg.crop_pct)
        self.scale, self.hflip = tuple(float(s) for s in cfg.scale), float(cfg.hflip)
        self.mean, self.std = tuple(cfg.mean), tuple(cfg.std)

    def __len__(self) -> int:
        return len(self.samples)

    def frame_indices(self, index: int) -> list[int]:
        """The frames sample ``index`` reads this time (random for training)."""
        path = self.samples[index][0]
        return sample_frames(self.frames[path], self.num_frames, self.sampling, self.stride, self.train)

    def _decode(self, index: int, indices: list[int]) -> Tensor:
        path = self.samples[index][0]
        try:
            return decode_frames(path, indices)
        except Exception as error:  # noqa: BLE001 -- named, never substituted
            raise DataError(f"{self.where}: cannot decode video {path} (sample {index}): {type(error).__name__}: "
                            f"{error}; its picture data is corrupt or cut short, or the file changed since the "
                            "startup check (which demuxes only); valid: a video file PyAV can decode - remove or "
                            "replace it") from error

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        frames = self._decode(index, self.frame_indices(index))
        if self.train:
            frames = train_crop(frames, self.img_size, self.scale, self.hflip)
        else:
            frames = eval_crop(frames, self.img_size, self.crop_pct)
        return normalise_clip(frames, self.mean, self.std), int(self.samples[index][1])


def _bundle_info(scan: VideoFolderScan, cfg) -> dict[str, Any]:
    folders, train = scan.folders, scan.folders.train
    return {"root": folders.root, "train_dir": train.folder if train else None, "val_dir": folders.val.folder,
            "train_videos": len(train.samples) if train else 0, "val_videos": len(folders.val.samples),
            "train_classes": len(train.class_to_idx) if train else 0, "val_classes": len(folders.val.class_to_idx),
            "extensions": list(VIDEO_EXTENSIONS), "frames_checked": True,
            "num_frames": int(cfg.num_frames), "sampling": str(cfg.sampling), "stride": int(cfg.stride),
            "img_size": int(cfg.img_size)}


@register_data("videofolder", config=VideoFolderData, check=scan_videofolder,
               num_classes=lambda data, scan: scan.num_classes)
def build_videofolder(cfg, scan: VideoFolderScan) -> DataBundle:
    """Train and val :class:`VideoFolderDataset` over the checked video folders of ``scan`` (the startup
    check's)."""
    datasets = []
    for split, train in ((scan.folders.train_or_empty(cfg.train_split), True), (scan.folders.val, False)):
        where = f"data.root={scan.folders.root}, data.{split.key}={split.name!r}"
        datasets.append(VideoFolderDataset(split.samples, scan.frames, cfg, train, where, split.class_to_idx))
    return DataBundle(datasets[0], datasets[1], scan.num_classes, _bundle_info(scan, cfg))
