"""``data=digits``, the embedded default: scikit-learn's bundled ``load_digits`` (1,797 8x8 grey images, no
download), split into train/val with a fixed seed (stratified), upsampled to ``img_size`` so the embedded model
sees an 8x8 token grid, replicated to 3 channels and normalised to [-1, 1]. Training adds random translations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from experiments.config import MAX_COUNT, MAX_SEED, ConfigError, DataConfig, DataError, spec
from experiments.data.loaders import DataBundle
from experiments.data.registry import register_data

DIGITS_CLASSES = 10  # the ten digits


@dataclass
class DigitsData(DataConfig):
    """scikit-learn's bundled digits (no download), a fixed seeded stratified split, upsampled to img_size."""

    name: str = "digits"
    val_fraction: float = spec(0.2, gt=0, lt=1)
    split_seed: int = spec(0, ge=0, le=MAX_SEED)
    augment_shift: int = spec(2, ge=0, le=MAX_COUNT)  # random translation (pixels) of training images

    def check(self, key: str) -> None:
        super().check(key)
        if self.augment_shift >= self.img_size:
            raise ConfigError(f"{key}.augment_shift={self.augment_shift} must be < {key}.img_size ({self.img_size})")


class DigitsDataset(Dataset):
    """Preprocessed digits tensors; ``shift`` > 0 adds a random translation of up to that many pixels."""

    def __init__(self, images: Tensor, labels: Tensor, shift: int = 0) -> None:
        self.images, self.labels, self.shift = images, labels, shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.shift:
            dy, dx = torch.randint(-self.shift, self.shift + 1, (2,)).tolist()
            image = torch.roll(image, shifts=(dy, dx), dims=(1, 2))  # background is -1 at the borders
        return image, int(self.labels[index])


def digits_tensors(img_size: int) -> tuple[Tensor, Tensor]:
    """All 1,797 digits as normalised ``[N, 3, img_size, img_size]`` floats and int labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) - 0.5) / 0.5
    return images.expand(-1, 3, -1, -1).contiguous(), torch.as_tensor(digits.target, dtype=torch.long)


@register_data("digits", config=DigitsData, num_classes=DIGITS_CLASSES)
def build_digits(cfg, scan=None) -> DataBundle:
    """Train and val :class:`DigitsDataset` (generated data: no startup scan)."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction={cfg.val_fraction} must lie in (0, 1)")
    images, labels = digits_tensors(cfg.img_size)
    indices = torch.arange(len(labels)).numpy()
    train_idx, val_idx = train_test_split(indices, test_size=cfg.val_fraction, random_state=cfg.split_seed,
                                          stratify=labels.numpy())
    train_idx, val_idx = torch.as_tensor(sorted(train_idx)), torch.as_tensor(sorted(val_idx))
    shift = int(cfg.augment_shift)
    train = DigitsDataset(images[train_idx], labels[train_idx], shift=shift)
    val = DigitsDataset(images[val_idx], labels[val_idx])
    info = {"train_images": len(train), "val_images": len(val), "val_indices": val_idx.tolist()}
    return DataBundle(train, val, DIGITS_CLASSES, info)
