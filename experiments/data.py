"""Datasets and loaders: the embedded digits default and ImageNet-style folders.

- ``digits``: scikit-learn's bundled ``load_digits`` (1,797 8x8 grey images, no download), split into
  train/val with a fixed seed (stratified), upsampled to ``img_size`` so the embedded model sees an 8x8 token
  grid, replicated to 3 channels and normalised to [-1, 1]. Training adds random translations.
- ``imagefolder``: ``root/<train_split>/<class>/*.jpg`` and ``root/<val_split>/...`` read with timm's dataset,
  transforms (DeiT-style RandAugment, random erasing, mixup-free) and loader with worker processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .config import DataError  # noqa: F401  (re-exported: experiments.data.DataError)

DIGITS_CLASSES = 10  # build_digits: the ten digits

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    info: dict[str, Any]


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


def build_digits(cfg) -> DataBundle:
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


def _check_split(root: Path, split: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"data.root={root}: split folder {split!r} not found (expected {folder}/<class>/<image>)")
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"data.root={root}: {folder} has no class folders")
    if not any(f.suffix.lower() in IMAGE_EXTENSIONS for c in classes for f in c.rglob("*") if f.is_file()):
        raise DataError(f"data.root={root}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return folder


def build_imagefolder(cfg) -> DataBundle:
    from timm.data import ImageDataset, create_transform

    if not cfg.root:
        raise DataError("data.root is not set; pass data.root=/path/to/imagenet (with train/ and val/ folders)")
    root = Path(str(cfg.root)).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist or is not a folder")
    train_dir, val_dir = _check_split(root, cfg.train_split), _check_split(root, cfg.val_split)
    train_tf = create_transform(cfg.img_size, is_training=True, auto_augment=cfg.auto_augment or None,
                                re_prob=cfg.reprob, interpolation="bicubic", mean=tuple(cfg.mean), std=tuple(cfg.std))
    val_tf = create_transform(cfg.img_size, is_training=False, crop_pct=cfg.crop_pct, interpolation="bicubic",
                              mean=tuple(cfg.mean), std=tuple(cfg.std))
    train = ImageDataset(str(train_dir), transform=train_tf)
    val = ImageDataset(str(val_dir), transform=val_tf)
    train_classes = train.reader.class_to_idx if hasattr(train.reader, "class_to_idx") else None
    val_classes = val.reader.class_to_idx if hasattr(val.reader, "class_to_idx") else None
    if train_classes is not None and val_classes is not None and train_classes != val_classes:
        raise DataError(f"data.root={root}: train and val class folders differ")
    num_classes = len(train_classes) if train_classes else int(cfg.num_classes)
    if cfg.num_classes and int(cfg.num_classes) != num_classes:
        raise DataError(f"data.num_classes={cfg.num_classes} but {train_dir} has {num_classes} class folders")
    return DataBundle(train, val, num_classes, {"train_images": len(train), "val_images": len(val), "root": str(root)})


BUILDERS = {"digits": build_digits, "imagefolder": build_imagefolder}


def build_data(data) -> DataBundle:
    """Datasets for the data config ``data`` (``experiments.config.DigitsData`` or ``ImageFolderData``)."""
    if data.name not in BUILDERS:
        raise DataError(f"data.name={data.name!r} unknown; valid: {', '.join(BUILDERS)}")
    return BUILDERS[data.name](data)


def count_classes(data) -> int:
    """The class count the run's head will have, without loading any image."""
    if data.name == "digits":
        return DIGITS_CLASSES
    if not data.root:
        raise DataError("data.root is not set; pass data.root=/path/to/imagenet (with train/ and val/ folders)")
    root = Path(data.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist or is not a folder")
    train_dir = _check_split(root, data.train_split)
    _check_split(root, data.val_split)
    found = sum(1 for p in train_dir.iterdir() if p.is_dir())
    if data.num_classes and data.num_classes != found:
        raise DataError(f"data.num_classes={data.num_classes} but {train_dir} has {found} class folders")
    return found


def make_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int, seed: int,
                distributed: Optional[tuple[int, int]] = None) -> DataLoader:
    """Seeded loader; ``distributed=(rank, world_size)`` shards it with a ``DistributedSampler``."""
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if distributed is not None:
        rank, world = distributed
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed,
                                     drop_last=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=num_workers, generator=generator, drop_last=False,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
