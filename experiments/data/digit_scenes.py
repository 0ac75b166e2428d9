"""``data=digit_scenes``: generated image scenes with background, clutter and a ground-truth object mask, from
scikit-learn's bundled digits (no download). An option; ``data=digits`` stays the default.

Each image shows one digit (the label is its class) over a textured background with faint pieces of other digits,
so the object is not simply "the bright part": token reduction has background to skip and ground truth to be
scored against.

- **Digit.** The 8x8 ``load_digits`` image scaled (bilinear) to a side drawn uniformly from
  ``round(scale_min * digit_size)`` to ``round(scale_max * digit_size)`` px (defaults: 20 to 26 px), its centre
  the canvas centre moved by up to ``jitter`` px (default 3) in each direction, kept on the ``img_size`` canvas.
  Ink in [0, 1].
- **Background.** A ``TEXTURE_CELLS`` x ``TEXTURE_CELLS`` uniform random texture scaled (bilinear) to the canvas,
  times ``background``.
- **Clutter.** ``fragments`` pieces of other digits of the same split (a random window half the digit's side, cut
  from a digit of the same size range), at random positions, at ``clutter`` times their ink. A pixel is the
  brightest of background, fragments and digit.
- **Ground truth.** The object mask: the placed digit's pixels whose ink exceeds :data:`MASK_THRESHOLD`. For a
  patch ``p``, a token's object fraction is the share of its ``p x p`` pixels in the mask
  (:func:`token_object_fraction`); it is an object token when that share is at least :data:`OBJECT_SHARE`
  (:func:`object_tokens`). With the defaults (32 px canvas, patch 4), **24.4%** of the tokens are object tokens
  on average (the 3,000 validation renders; 37.8% touch the object, i.e. hold at least one mask pixel).
- **Tensors.** ``[3, H, W]`` (grey replicated) normalised to [-1, 1], as the image digits are.
- **Split and seeds.** The stratified split of ``digits`` (``val_fraction``, ``split_seed``): train and val draw
  their digits and their fragments from disjoint digit sets. Validation image ``i`` shows validation digit
  ``i mod n`` and is rendered from its own generator, seeded by ``(split_seed, i)``: every run and process
  evaluates the same ``val_images`` images, rendered on demand (none is kept). A training read of image ``i`` is
  rendered from ``(torch.initial_seed(), i)``: the train loop re-seeds torch per epoch from the run seed and
  the epoch (``experiments/train/fit.py``; a loader worker is seeded from the same per-epoch generator), so each
  epoch shows new images and a resumed run shows exactly the images the interrupted one would have.

The interface evaluation reads (for any split): ``dataset[i] -> (image, label)`` as every image dataset;
``dataset.scene(i) -> (image, mask)`` as numpy ``[H, W]`` arrays; ``dataset.mask(i)`` the ``[H, W]`` bool mask;
and on the validation split ``dataset.token_objects(patch) -> [N, rows * cols]`` bool (row-major, the ViT's token
order, CLS excluded), kept once computed, so any method's kept tokens and per-token depths can be scored against
the object, and ``dataset.scene_clutter() -> [N]`` each scene's clutter (the validation split): the fragments'
visible ink, i.e. the mean over the canvas of what they add above background and digit (:meth:`Scenes.layers`),
the per-image clutter that per-image compute is correlated with (``compute_per_image`` in a record). Rendering
one image takes about 0.07 ms (numpy, one core), 0.09 ms with the tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from experiments.config import MAX_COUNT, MAX_IMG_SIZE, MAX_SEED, ConfigError, DataConfig, spec
from experiments.data.digits import DIGITS_CLASSES
from experiments.data.loaders import DataBundle
from experiments.data.registry import register_data

TEXTURE_CELLS = 4  # side of the random background texture before it is scaled to the canvas (as moving_digits)
MASK_THRESHOLD = 0.25  # a placed digit's pixel is object when its ink (in [0, 1]) exceeds a quarter: its strokes, not
# the faint fringe that bilinear scaling leaves around them (which touches a third more tokens)
OBJECT_SHARE = 0.5  # a token is an object token when at least half of its pixels are in the mask
FRAGMENT_SIDE = 0.5  # a fragment's side as a fraction of the digit it is cut from
# the first entry of every generator's seed: the two splits never share a stream, whatever the seeds
VAL_STREAM, TRAIN_STREAM = 1, 2


@dataclass
class DigitScenesData(DataConfig):
    """Digit scenes (experiments/data/digit_scenes.py): a bundled digit on textured, cluttered background with
    its object mask; no download."""

    name: str = "digit_scenes"
    val_fraction: float = spec(0.2, gt=0, lt=1)
    split_seed: int = spec(0, ge=0, le=MAX_SEED)  # the split and the validation images
    val_images: int = spec(3000, ge=1, le=MAX_COUNT)  # validation renders (digit i mod n for image i)
    digit_size: int = spec(26, ge=1, le=MAX_IMG_SIZE)  # the largest digit's side in px
    scale_min: float = spec(0.77, gt=0, le=1)  # a digit's side: uniform in [scale_min, scale_max] * digit_size
    scale_max: float = spec(1.0, gt=0, le=1)
    jitter: int = spec(3, ge=0, le=MAX_COUNT)  # px the digit's centre moves from the canvas centre, per axis
    fragments: int = spec(1, ge=0, le=16)  # distractor pieces of other digits
    clutter: float = spec(0.35, ge=0, le=1)  # the fragments' ink relative to a digit's
    background: float = spec(0.25, ge=0, le=1)  # amplitude of the per-image texture (0: flat black)

    def check(self, key: str) -> None:
        super().check(key)
        if self.scale_min > self.scale_max:
            raise ConfigError(f"{key}.scale_min={self.scale_min} is above {key}.scale_max={self.scale_max}; "
                              f"valid: 0 < scale_min <= scale_max <= 1")
        if self.img_size < self.digit_size:
            raise ConfigError(f"{key}.img_size={self.img_size} is smaller than the largest digit, {key}.digit_size="
                              f"{self.digit_size}; valid: {key}.img_size >= {self.digit_size}, or {key}.digit_size"
                              f" <= {self.img_size}")


def digit_sides(cfg) -> tuple[int, int]:
    """The smallest and largest digit side in px of the data config ``cfg`` (typed or a DictConfig)."""
    return max(1, round(cfg.scale_min * cfg.digit_size)), max(1, round(cfg.scale_max * cfg.digit_size))


# ------------------------------------------------------------------------------------------ ground truth
def token_object_fraction(mask: Tensor, patch: int) -> Tensor:
    """``[..., rows, cols]`` float: the share of each ``patch x patch`` token's pixels that are True in ``mask``
    ``[..., H, W]``; ``patch`` must divide ``H`` and ``W``."""
    mask = torch.as_tensor(mask)
    height, width = mask.shape[-2:]
    if patch < 1 or height % patch or width % patch:
        raise ValueError(f"patch={patch} does not tile a {height}x{width} mask; valid: a divisor of both sides")
    cells = mask.reshape(*mask.shape[:-2], height // patch, patch, width // patch, patch)
    return cells.to(torch.float32).mean(dim=(-3, -1))


def object_tokens(mask: Tensor, patch: int) -> Tensor:
    """``[..., rows, cols]`` bool: the object tokens of ``mask``, those with at least :data:`OBJECT_SHARE` of
    their pixels in it."""
    return token_object_fraction(mask, patch) >= OBJECT_SHARE


# ------------------------------------------------------------------------------------------------ render
def resize_weights(source: int, size: int) -> np.ndarray:
    """``[size, source]``: bilinear resizing (align_corners=False) as a matrix; an image is ``A @ x @ A.T``."""
    one_hot = torch.eye(source, dtype=torch.float64)[:, None, :]
    return F.interpolate(one_hot, size=size, mode="linear", align_corners=False)[:, 0].T.numpy()


class Scenes:
    """Renders scenes of a set of 8x8 digits (``[N, 8, 8]`` in [0, 1]) with the layout of a :class:`DigitScenesData`."""

    def __init__(self, digits: np.ndarray, cfg) -> None:
        self.digits = digits.astype(np.float64)
        self.canvas, self.jitter = int(cfg.img_size), int(cfg.jitter)
        self.smallest, self.largest = digit_sides(cfg)
        self.fragments, self.clutter, self.background = int(cfg.fragments), float(cfg.clutter), float(cfg.background)
        self.texture = resize_weights(TEXTURE_CELLS, self.canvas)
        self._weights = {side: resize_weights(digits.shape[-1], side) for side in range(self.smallest, self.largest + 1)}

    def digit(self, index: int, side: int) -> np.ndarray:
        """Digit ``index`` scaled to ``side x side`` px, ink clipped to [0, 1]."""
        weights = self._weights[side]
        return np.clip(weights @ self.digits[index] @ weights.T, 0.0, 1.0)

    def render(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Image ``[H, W]`` float32 in [0, 1] and object mask ``[H, W]`` bool of a scene showing digit ``index``."""
        image, mask, _ = self.layers(index, rng)
        return image, mask

    def layers(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
        """:meth:`render`'s image and mask (the same draws, so the same pixels) and the scene's clutter: the
        fragments' visible ink, the mean over the canvas of what they add to the image above background and
        digit (``image - max(background, digit)``, in [0, 1]; 0 without fragments or where the digit covers
        them)."""
        canvas = self.canvas
        cells = rng.random((TEXTURE_CELLS, TEXTURE_CELLS))
        image = (self.texture @ cells @ self.texture.T) * self.background
        plain = image.copy()  # the scene without fragments
        for _ in range(self.fragments):
            source, side = int(rng.integers(len(self.digits))), int(rng.integers(self.smallest, self.largest + 1))
            piece = max(1, round(side * FRAGMENT_SIDE))
            cut_y, cut_x = rng.integers(0, side - piece + 1, 2)
            at_y, at_x = rng.integers(0, canvas - piece + 1, 2)
            fragment = self.digit(source, side)[cut_y:cut_y + piece, cut_x:cut_x + piece] * self.clutter
            window = image[at_y:at_y + piece, at_x:at_x + piece]
            np.maximum(window, fragment, out=window)
        side = int(rng.integers(self.smallest, self.largest + 1))
        top, left = np.clip((canvas - side) // 2 + rng.integers(-self.jitter, self.jitter + 1, 2), 0, canvas - side)
        ink = self.digit(index, side)
        for layer in (image, plain):
            window = layer[top:top + side, left:left + side]
            np.maximum(window, ink, out=window)
        mask = np.zeros((canvas, canvas), dtype=bool)
        mask[top:top + side, left:left + side] = ink > MASK_THRESHOLD
        return image.astype(np.float32), mask, float((image - plain).mean())


def to_image(pixels: np.ndarray) -> Tensor:
    """``[H, W]`` in [0, 1] -> ``[3, H, W]`` in [-1, 1] (the image digits' normalisation)."""
    return torch.from_numpy((pixels - 0.5) / 0.5).unsqueeze(0).expand(3, -1, -1).contiguous()


class DigitScenesDataset(Dataset):
    """``length`` scenes; scene ``i`` shows digit ``i mod len(labels)`` of ``scenes``. With ``fixed_seed`` scene
    ``i`` is always the same (seeded by ``(fixed_seed, i)``), else each read renders it from
    ``(torch.initial_seed(), i)``: new in every epoch of a run, the same on resume (see the module docstring)."""

    def __init__(self, scenes: Scenes, labels: Tensor, length: int, fixed_seed: Optional[int]) -> None:
        self.scenes, self.labels, self.length, self.fixed_seed = scenes, labels, int(length), fixed_seed
        self._objects: dict[int, Tensor] = {}  # token_objects per patch
        self._clutter: Optional[Tensor] = None  # scene_clutter

    def __len__(self) -> int:
        return self.length

    def label(self, index: int) -> int:
        return int(self.labels[index % len(self.labels)])

    def generator(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(f"scene {index} out of range: the split holds {self.length}")
        if self.fixed_seed is not None:
            return np.random.default_rng([VAL_STREAM, int(self.fixed_seed), index])
        return np.random.default_rng([TRAIN_STREAM, int(torch.initial_seed()), index])

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Scene ``index``: image ``[H, W]`` in [0, 1] and its object mask ``[H, W]`` bool."""
        return self.scenes.render(index % len(self.labels), self.generator(index))

    def mask(self, index: int) -> Tensor:
        """The object mask ``[H, W]`` bool of scene ``index`` (a training scene: of the image this read renders)."""
        return torch.from_numpy(self.scene(index)[1])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return to_image(self.scene(index)[0]), self.label(index)

    def token_objects(self, patch: int) -> Tensor:
        """``[N, rows * cols]`` bool: the object tokens (:func:`object_tokens`) of every scene of a fixed split,
        row-major; computed scene by scene, kept per patch."""
        if self.fixed_seed is None:
            raise ValueError("object tokens are fixed for fixed scenes (the validation split) only")
        if patch not in self._objects:
            self._objects[patch] = torch.stack([object_tokens(self.mask(i), patch).flatten()
                                                for i in range(self.length)])
        return self._objects[patch]


    def scene_clutter(self) -> Tensor:
        """``[N]`` float64: every scene's clutter (:meth:`Scenes.layers`: the fragments' visible ink, mean over
        the canvas) of a fixed split, computed scene by scene, kept."""
        if self.fixed_seed is None:
            raise ValueError("scene clutter is fixed for fixed scenes (the validation split) only")
        if self._clutter is None:
            self._clutter = torch.tensor([self.scenes.layers(i % len(self.labels), self.generator(i))[2]
                                          for i in range(self.length)], dtype=torch.float64)
        return self._clutter


def digit_arrays() -> tuple[np.ndarray, Tensor]:
    """All 1,797 bundled digits as ``[N, 8, 8]`` float in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images / 16.0, torch.as_tensor(digits.target, dtype=torch.long)


def split_indices(labels: Tensor, val_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The stratified train and val indices of ``digits`` (the same split for the same keys), sorted."""
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(np.arange(len(labels)), test_size=val_fraction, random_state=split_seed,
                                  stratify=labels.numpy())
    return np.sort(train), np.sort(val)


@register_data("digit_scenes", config=DigitScenesData, num_classes=DIGITS_CLASSES)
def build_digit_scenes(cfg, scan=None) -> DataBundle:
    """Train and val :class:`DigitScenesDataset` (generated data: no startup scan). A training epoch is one scene
    per training digit."""
    images, labels = digit_arrays()
    train_idx, val_idx = split_indices(labels, cfg.val_fraction, cfg.split_seed)
    train = DigitScenesDataset(Scenes(images[train_idx], cfg), labels[train_idx], len(train_idx), None)
    val = DigitScenesDataset(Scenes(images[val_idx], cfg), labels[val_idx], int(cfg.val_images), cfg.split_seed)
    info = {"train_images": len(train), "val_images": len(val), "val_digits": len(val_idx),
            "val_indices": val_idx.tolist()}
    return DataBundle(train, val, DIGITS_CLASSES, info)
