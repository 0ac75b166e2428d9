"""Moving digits: the embedded video data, generated from scikit-learn's bundled digits (no download).

Each clip shows one digit (``num_digits=2``: two) drifting over a static background for ``num_frames`` frames
on an ``img_size`` square canvas; the label is the digit's class (with two digits: ``(a + b) mod 10``). Only the
digit moves, so most of every clip is the same from frame to frame: the temporal redundancy that token
reduction can remove is real and measurable: :meth:`MovingDigitsDataset.token_regions` marks the tokens whose
pixels change from frame to frame (the moving region), the report compares the compute they get with their
share of the tokens.

- **Digit.** The 8x8 ``load_digits`` image scaled to ``round(img_size * digit_scale)`` px (bilinear; 18 px on the
  embedded 24 px canvas), intensities in [0, 1].
- **Motion.** Start position uniform over the canvas; velocity of uniform direction and speed in
  ``[min_speed, max_speed]`` px per frame; position ``p0 + v t`` reflected at the edges (``bounce``) or clamped,
  rounded to whole pixels.
- **Background.** Per clip, a 4x4 uniform random texture scaled (bilinear) to the canvas, times ``background``;
  the same in every frame. A digit pixel is ``max(background, digit)``.
- **Tensors.** ``[3, T, H, W]`` (grey replicated), normalised to [-1, 1] as the image digits are.
- **Split and seeds.** The same stratified split as ``digits`` (``val_fraction``, ``split_seed``). Validation
  clip ``i`` is rendered from its own generator, seeded from ``split_seed`` and ``i``, so every run evaluates the
  same clips;
  training clips get a fresh motion and background each time they are read (torch's global generator, which
  the run seeds), as image training gets random shifts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from experiments.config import MAX_COUNT, MAX_SEED, ConfigError, VideoData, spec
from experiments.data.digits import DIGITS_CLASSES
from experiments.data.loaders import DataBundle
from experiments.data.registry import register_data

TEXTURE_CELLS = 4  # side of the random background texture before it is scaled to the canvas
# a pixel "moves" when it changes by more than a quarter of the intensity range between frames: the faint
# bilinear fringe of a drifting digit does not make a whole tubelet "moving" (on the embedded 24 px canvas,
# 85% of the tokens change at all, 65% by more than this)
MOTION_THRESHOLD = 0.25


@dataclass
class MovingDigitsData(VideoData):
    """Moving digits (experiments/data/moving_digits.py): bundled digits drifting over a static background, no download."""

    name: str = "moving_digits"
    val_fraction: float = spec(0.2, gt=0, lt=1)
    split_seed: int = spec(0, ge=0, le=MAX_SEED)  # the split and the validation clips' motion
    digit_scale: float = spec(0.75, gt=0, le=1)  # a digit's side as a fraction of the img_size canvas
    num_digits: int = spec(1, choices=(1, 2))  # 2: a second digit moves too, the label is (a + b) mod 10
    min_speed: float = spec(0.5, ge=0, le=MAX_COUNT)  # px per frame; 0 allows static clips
    max_speed: float = spec(1.5, ge=0, le=MAX_COUNT)
    bounce: bool = True  # reflect at the canvas edges (false: clamp, the digit stops at the edge)
    background: float = spec(0.15, ge=0, le=1)  # amplitude of the static per-clip texture (0: flat black)

    def check(self, key: str) -> None:
        super().check(key)
        if self.digit_side < 4:
            raise ConfigError(f"{key}.digit_scale={self.digit_scale} draws digits of {self.digit_side} px on the "
                              f"{key}.img_size={self.img_size} canvas; valid: at least 4 px, a scale >= "
                              f"{4 / self.img_size:.3g}")
        if self.min_speed > self.max_speed:
            raise ConfigError(f"{key}.min_speed={self.min_speed} must be <= {key}.max_speed ({self.max_speed})")

    @property
    def digit_side(self) -> int:
        """A digit's side in px: ``round(img_size * digit_scale)``, at least 1."""
        return max(1, round(self.img_size * self.digit_scale))



def digit_images(size: int) -> tuple[np.ndarray, Tensor]:
    """All 1,797 bundled digits as ``[N, size, size]`` float32 in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return images[:, 0].numpy(), torch.as_tensor(digits.target, dtype=torch.long)


def trajectory(start, velocity, frames: int, room: int, bounce: bool) -> np.ndarray:
    """Whole-pixel top-left corners ``[frames, 2]`` of ``start + velocity * t`` kept in ``[0, room]``: reflected
    at the edges with ``bounce`` (a triangle wave of period ``2 room``), else clamped; rounded half to even."""
    path = np.asarray(start, dtype=np.float64)[None] + np.asarray(velocity, dtype=np.float64)[None] * \
        np.arange(frames, dtype=np.float64)[:, None]
    if room == 0:
        return np.zeros((frames, 2), dtype=np.int64)
    if bounce:
        folded = np.mod(path, 2 * room)
        path = np.where(folded > room, 2 * room - folded, folded)
    return np.rint(np.clip(path, 0, room)).astype(np.int64)


class Motion:
    """Draws a clip's motion and background from a torch generator (``None``: torch's global one, which the run
    seeds). One ``torch.rand`` call per clip; the rest is numpy, since a clip is a few thousand pixels and
    per-op overhead, not arithmetic, is what rendering costs."""

    def __init__(self, canvas: int, digit_size: int, min_speed: float, max_speed: float,
                 background: float) -> None:
        self.canvas, self.digit_size = canvas, digit_size
        self.min_speed, self.max_speed, self.background = min_speed, max_speed, background
        # bilinear upsampling (align_corners=False) of the texture cells is separable: texture = A cells A^T,
        # with A the weights F.interpolate gives a one-hot cell
        one_hot = torch.eye(TEXTURE_CELLS, dtype=torch.float64)[:, None, :]
        self.upsample = F.interpolate(one_hot, size=canvas, mode="linear", align_corners=False)[:, 0].T.numpy()

    def draw(self, generator: Optional[torch.Generator], digits: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Per digit ``(start, velocity)`` (start uniform over the room, direction uniform, speed uniform in
        ``[min_speed, max_speed]``), and the ``canvas x canvas`` background."""
        u = torch.rand(4 * digits + TEXTURE_CELLS ** 2, generator=generator, dtype=torch.float64).numpy()
        room = self.canvas - self.digit_size
        motions = []
        for d in range(digits):
            start, angle, speed = u[4 * d:4 * d + 2] * room, u[4 * d + 2] * 2 * math.pi, u[4 * d + 3]
            speed = self.min_speed + speed * (self.max_speed - self.min_speed)
            motions.append((start, speed * np.array([math.sin(angle), math.cos(angle)])))
        cells = u[4 * digits:].reshape(TEXTURE_CELLS, TEXTURE_CELLS)
        return motions, (self.upsample @ cells @ self.upsample.T) * self.background


def render(digits: Sequence[np.ndarray], paths: Sequence[np.ndarray],
           texture: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``[T, H, W]`` in [0, 1] and the digits' footprint ``[T, H, W]`` (bool: a digit pixel > 0 there)."""
    frames_count = len(paths[0])
    frames = np.repeat(texture[None].astype(np.float32), frames_count, axis=0)
    footprint = np.zeros(frames.shape, dtype=bool)
    offsets = np.arange(digits[0].shape[-1])
    time = np.arange(frames_count)[:, None, None]
    for digit, path in zip(digits, paths):  # all frames at once: [T, side, side] index windows
        rows = (path[:, 0, None] + offsets)[:, :, None]
        cols = (path[:, 1, None] + offsets)[:, None, :]
        frames[time, rows, cols] = np.maximum(frames[time, rows, cols], digit)
        footprint[time, rows, cols] |= digit > 0
    return frames, footprint


def to_clip(frames: np.ndarray) -> Tensor:
    """``[T, H, W]`` in [0, 1] -> ``[3, T, H, W]`` in [-1, 1] (the image digits' normalisation; the grey channel
    is shared by the three, the loader's batching copies it)."""
    return torch.from_numpy((frames - 0.5) / 0.5).unsqueeze(0).expand(3, -1, -1, -1)


class MovingDigitsDataset(Dataset):
    """Clips of the digits ``images[i]`` (``[N, s, s]`` numpy); with ``fixed_seed`` clip ``i`` is always the same
    (:meth:`fixed_clip`), else each read draws a new motion and background."""

    def __init__(self, images: Tensor, labels: Tensor, partners: Optional[Tensor], num_frames: int,
                 motion: Motion, bounce: bool, fixed_seed: Optional[int]) -> None:
        self.images, self.labels, self.partners = images, labels, partners
        self.num_frames, self.motion, self.bounce = num_frames, motion, bounce
        self.fixed_seed = fixed_seed
        self._regions: dict[tuple, Tensor] = {}  # token_regions per (grid, tubelet)

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, index: int) -> int:
        if self.partners is None:
            return int(self.labels[index])
        return int(self.labels[index] + self.labels[self.partners[index]]) % DIGITS_CLASSES

    def _render(self, index: int, generator: Optional[torch.Generator]) -> tuple[np.ndarray, np.ndarray]:
        room = self.motion.canvas - self.motion.digit_size
        shown = [self.images[index]] + ([self.images[self.partners[index]]] if self.partners is not None else [])
        motions, texture = self.motion.draw(generator, len(shown))
        paths = [trajectory(start, velocity, self.num_frames, room, self.bounce) for start, velocity in motions]
        return render(shown, paths, texture)

    def fixed_clip(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Clip ``index`` of a fixed split: rendered from its own generator (seed ``fixed_seed * 100003 +
        index``), so it is the same whenever and wherever it is read, and nothing is kept in memory (a 224 px
        canvas of 16 frames would not fit for long)."""
        generator = torch.Generator().manual_seed(int(self.fixed_seed) * 100003 + index)
        return self._render(index, generator)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        frames, _ = self.fixed_clip(index) if self.fixed_seed is not None else self._render(index, None)
        return to_clip(frames), self.label(index)

    def footprints(self) -> Tensor:
        """``[N, T, H, W]`` bool: where a digit pixel is, per frame, in every clip of a fixed split."""
        if self.fixed_seed is None:
            raise ValueError("the moving region is defined for fixed clips (the validation split) only")
        return torch.from_numpy(np.stack([self.fixed_clip(i)[1] for i in range(len(self))]))

    def token_regions(self, grid: Sequence[int], tubelet: Sequence[int]) -> Tensor:
        """``[N, tokens]`` bool, True for the moving region's tokens: those whose space-time cube (``tubelet``
        ``(t, p, p)`` on ``grid`` ``(T/t, H/p, W/p)``, token order time-row-column) holds a pixel that changes
        by more than :data:`MOTION_THRESHOLD` between frames (:func:`changed_pixels`). The rest is static: background, or digit ink that stayed put. Fixed
        (validation) clips only."""
        if self.fixed_seed is None:
            raise ValueError("the moving region is defined for fixed clips (the validation split) only")
        key = (tuple(int(g) for g in grid), tuple(int(t) for t in tubelet))
        if key not in self._regions:  # the clips are fixed: a trade-off sweep's points share one pass
            # clip by clip: a 224 px, 16-frame split's masks would take ~0.3 GB at once
            self._regions[key] = torch.cat([
                tokens_touched(torch.from_numpy(changed_pixels(self.fixed_clip(i)[0]))[None], grid, tubelet)
                for i in range(len(self))])
        return self._regions[key]


def changed_pixels(frames: np.ndarray, threshold: float = MOTION_THRESHOLD) -> np.ndarray:
    """``[T, H, W]`` bool: pixels of frame ``f`` that differ from frame ``f - 1`` (frame 0: from frame 1) by more
    than ``threshold`` (intensities in [0, 1]), i.e. where something visibly moved; a static clip has none."""
    if len(frames) < 2:
        return np.zeros(frames.shape, dtype=bool)
    step = np.abs(frames[1:] - frames[:-1]) > threshold
    return np.concatenate([step[:1], step])


def tokens_touched(footprints: Tensor, grid: Sequence[int], tubelet: Sequence[int]) -> Tensor:
    """``[N, tokens]``: whether each tubelet token's cube holds a True pixel of ``footprints`` ``[N, T, H, W]``."""
    t, p, q = (int(s) for s in tubelet)
    n, frames, height, width = footprints.shape
    if tuple(grid) != (frames // t, height // p, width // q):
        raise ValueError(f"grid {tuple(grid)} does not tile clips of {frames}x{height}x{width} with tubelet "
                         f"{(t, p, q)}")
    cubes = footprints.view(n, frames // t, t, height // p, p, width // q, q)
    return cubes.any(dim=6).any(dim=4).any(dim=2).flatten(1)


@register_data("moving_digits", config=MovingDigitsData, num_classes=DIGITS_CLASSES)
def build_moving_digits(cfg, scan=None) -> DataBundle:
    """Train and val :class:`MovingDigitsDataset` (generated data: no startup scan)."""
    from sklearn.model_selection import train_test_split

    side = max(1, round(cfg.img_size * cfg.digit_scale))  # MovingDigitsData.digit_side
    images, labels = digit_images(side)
    indices = torch.arange(len(labels)).numpy()
    train_idx, val_idx = train_test_split(indices, test_size=cfg.val_fraction, random_state=cfg.split_seed,
                                          stratify=labels.numpy())
    train_idx, val_idx = torch.as_tensor(sorted(train_idx)), torch.as_tensor(sorted(val_idx))
    motion = Motion(cfg.img_size, side, cfg.min_speed, cfg.max_speed, cfg.background)
    splits = []
    for index, fixed in ((train_idx, None), (val_idx, cfg.split_seed)):
        # the second digit of a pair: the next one in the split (a fixed pairing, so labels are fixed)
        partners = torch.roll(torch.arange(len(index)), -1) if cfg.num_digits == 2 else None
        splits.append(MovingDigitsDataset(images[index.numpy()], labels[index], partners, int(cfg.num_frames), motion,
                                          bool(cfg.bounce), fixed))
    info = {"train_images": len(splits[0]), "val_images": len(splits[1]), "num_frames": int(cfg.num_frames),
            "val_indices": val_idx.tolist()}
    return DataBundle(splits[0], splits[1], DIGITS_CLASSES, info)
