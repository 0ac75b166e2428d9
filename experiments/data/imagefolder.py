"""``data=imagefolder``: ``root/<train_split>/<class>/*.jpg`` and ``root/<val_split>/...`` read with timm's dataset
and transforms (DeiT-style RandAugment, random erasing, mixup-free).

The startup check (:func:`scan_imagefolder`, run by ``plan.validate`` before anything is built or written) applies
the shared folder rules (``experiments/data/folders.py``) with timm's image extensions, then opens every image's
header with PIL (``Image.open``: reads the header, identifies the format and checks the size against PIL's
decompression-bomb limit, without decoding the pixels). This catches empty files, text or other non-image files
with an image name, files cut inside their header, dangling links and unreadable files. It does NOT catch pixel
data that is corrupt or cut after the header; for those the datasets (:class:`CheckedImageDataset`) raise naming
the file when they read it, where timm's ``ImageDataset`` would log a warning and silently return the next image
with its label instead. :func:`build_imagefolder` hands the scanned file list (carried on the run plan) to timm's
dataset. A run that reads no training image may lack the train folder (``experiments/data/folders.py``); its
bundle's train dataset is then empty.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from PIL import Image, ImageOps
from timm.data import ImageDataset
from timm.data.readers.reader import Reader
from timm.data.readers.reader_image_folder import ReaderImageFolder

from experiments.config import DataConfig, DataError, FolderLayout, spec
from experiments.data.folders import FolderScan, SplitScan, examples, scan_folders
from experiments.data.loaders import DataBundle
from experiments.data.registry import register_data


@dataclass
class ImageFolderData(DataConfig, FolderLayout):
    """``root/<train_split>/<class>/*`` and ``root/<val_split>/<class>/*`` with timm's transforms."""

    name: str = "imagefolder"
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    reprob: float = spec(0.25, ge=0, le=1)

    def check(self, key: str) -> None:
        super().check(key)
        self.check_layout(key)


def timm_extensions() -> tuple[str, ...]:
    """The extensions timm's folder reader reads, lower-case (it compares ``ext.lower()``)."""
    from timm.data.readers.img_extensions import get_img_extensions

    return tuple(sorted({e.lower() for e in get_img_extensions(as_set=True)}))


def _header_error(path: str) -> Optional[str]:
    """Why ``path``'s header does not open with PIL, or None."""
    try:
        with Image.open(path) as image:  # header only: format and size, no pixel decoding
            image.size
    except Exception as error:  # noqa: BLE001 -- every reason is reported, by name
        return f"{path} ({type(error).__name__}: {error})"
    return None


def _check_headers(root: str, scans: tuple[SplitScan, ...]) -> None:
    """Every sample's header opens with PIL; the bad ones are refused together, a few by name."""
    paths = [path for scan in scans for path, _ in scan.samples]
    workers = max(1, min(16, 2 * (os.cpu_count() or 1), len(paths) // 256 or 1))
    if workers == 1:
        bad = [e for e in map(_header_error, paths) if e]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:  # the opens are I/O: threads overlap them
            bad = [e for e in pool.map(_header_error, paths, chunksize=64) if e]
    if bad:
        raise DataError(f"data.root={root}: {len(bad)} of {len(paths)} image file(s) are not readable images "
                        f"(empty, not an image, cut short or unreadable): {examples(bad, 3)}; timm would silently "
                        "replace each with the next image and its label; valid: image files PIL can open - "
                        "remove or replace these")


def scan_imagefolder(data, needs_train: bool = True) -> FolderScan:
    """Scan and check the splits of the imagefolder config ``data`` (the folder rules, then every image's
    header); raise ``DataError``. ``needs_train=False``: the train folder may be absent (the run reads no
    training image)."""
    scan = scan_folders(data, timm_extensions(), needs_train=needs_train)
    _check_headers(scan.root, scan.splits)
    return scan


def check_imagefolder(data, needs_train: bool = True) -> FolderScan:
    """The startup check of imagefolder data: :func:`scan_imagefolder`, and the augmentation (a bad
    ``data.auto_augment`` fails here, not at the first batch). Its scan is what :func:`build_imagefolder` reads."""
    scan = scan_imagefolder(data, needs_train)
    _transforms(data)
    return scan


# ---------------------------------------------------------------------------------------- timm's dataset
class ListedReader(ReaderImageFolder):
    """timm's folder reader over a given ``(path, class index)`` list instead of its own walk."""

    def __init__(self, root: str, samples: list[tuple[str, int]], class_to_idx: dict[str, int]) -> None:
        Reader.__init__(self)
        self.root, self.samples, self.class_to_idx = root, list(samples), dict(class_to_idx)


class CheckedImageDataset(ImageDataset):
    """timm's ``ImageDataset`` (its reader, RGB conversion and transforms) that raises a ``DataError`` naming the
    file when an image cannot be read or decoded, where timm's would warn and return the next image and its
    label in its place (duplicating one sample, dropping another, with nothing in the record)."""

    def __init__(self, reader: ListedReader, transform=None, where: str = "") -> None:
        super().__init__(reader.root, reader=reader, transform=transform)
        self.where = where

    def __getitem__(self, index: int):
        path = self.reader.samples[index][0]
        try:
            handle, target = self.reader[index]  # timm's reader: an open file and the class index
            try:
                image = Image.open(handle)
                image = image.convert(self.input_img_mode) if self.input_img_mode else image
                image.load()  # decode here, inside the check
            finally:
                handle.close()
        except Exception as error:  # noqa: BLE001 -- named, never substituted
            raise DataError(f"{self.where}: cannot read image {path} (sample {index}): {type(error).__name__}: "
                            f"{error}; its pixel data is corrupt or cut short, or the file changed since the "
                            "startup check (which reads headers only); valid: an image file PIL can decode - "
                            "remove or replace it") from error
        if self.transform is not None:
            image = self.transform(image)
        if target is None:
            target = -1
        elif self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


# ------------------------------------------------------------------------------------ augmentation fixes
def posterize_bits(image, bits_to_keep, **_):
    """timm's RandAugment/AutoAugment posterize with every ``bits_to_keep`` handled: >= 8 keeps the image,
    1..7 is Pillow's posterize, <= 0 keeps no bit, so every channel value becomes 0 (what the TF/UDA reference
    ``(x >> 8) << 8`` computes and what Pillow did before it refused ``bits=0``)."""
    bits = int(bits_to_keep)
    if bits >= 8:
        return image
    if bits >= 1:
        return ImageOps.posterize(image, bits)
    return image.point([0] * 256 * len(image.getbands()))


def fix_posterize(transform) -> int:
    """Give every timm posterize op inside ``transform`` (Compose, RandAugment, AutoAugment, AugMix) the
    :func:`posterize_bits` function; returns how many ops it changed.

    timm 1.0.31's ``inc1`` RandAugment (the ``rand-m9-mstd0.5-inc1`` default) maps magnitude 10, which a
    magnitude noise of 0.5 around 9 reaches for about 2% of the draws, to 0 bits kept, and the ``v0``/``Posterize``
    policies map low magnitudes to 0 bits; recent Pillow (13 here) refuses ``ImageOps.posterize(img, 0)`` with "bits
    must be between or equal to 1 and 8", which killed ImageNet runs in their first epoch. Replacing the op's
    function (not timm's module-level table) keeps the fix to the transforms this module builds."""
    from timm.data import auto_augment

    changed = 0
    children = list(getattr(transform, "transforms", None) or [])  # torchvision Compose
    ops = getattr(transform, "ops", None)
    if isinstance(ops, (list, tuple)):  # RandAugment, AugMixAugment
        children += list(ops)
    policy = getattr(transform, "policy", None)
    if isinstance(policy, (list, tuple)):  # AutoAugment: a list of sub-policies (lists of ops)
        children += [op for sub in policy for op in (sub if isinstance(sub, (list, tuple)) else [sub])]
    for child in children:
        if isinstance(child, auto_augment.AugmentOp):
            if child.aug_fn is auto_augment.posterize:
                child.aug_fn = posterize_bits
                changed += 1
        elif child is not transform:
            changed += fix_posterize(child)
    return changed


def _transforms(cfg):
    from timm.data import create_transform

    try:
        train_tf = create_transform(cfg.img_size, is_training=True, auto_augment=cfg.auto_augment or None,
                                    re_prob=cfg.reprob, interpolation="bicubic", mean=tuple(cfg.mean),
                                    std=tuple(cfg.std))
    except (AssertionError, ValueError, KeyError) as error:
        raise DataError(f"data.auto_augment={cfg.auto_augment!r} is not a timm augmentation ({error}); valid: a "
                        "timm policy string such as rand-m9-mstd0.5-inc1, augmix-m5, original, v0, or null") from None
    fix_posterize(train_tf)
    val_tf = create_transform(cfg.img_size, is_training=False, crop_pct=cfg.crop_pct, interpolation="bicubic",
                              mean=tuple(cfg.mean), std=tuple(cfg.std))
    return train_tf, val_tf


def _bundle_info(scan: FolderScan) -> dict[str, Any]:
    train = scan.train
    return {"root": scan.root, "train_dir": train.folder if train else None, "val_dir": scan.val.folder,
            "train_images": len(train.samples) if train else 0, "val_images": len(scan.val.samples),
            "train_classes": len(train.class_to_idx) if train else 0, "val_classes": len(scan.val.class_to_idx),
            "extensions": list(timm_extensions()), "header_checked": True}



@register_data("imagefolder", config=ImageFolderData, check=check_imagefolder,
               num_classes=lambda data, scan: scan.num_classes)
def build_imagefolder(cfg, scan: FolderScan) -> DataBundle:
    """Train and val :class:`CheckedImageDataset` over the files of ``scan`` (the startup check's); the train
    dataset is empty when the train folder is absent."""
    train_tf, val_tf = _transforms(cfg)
    datasets = []
    for split, transform in ((scan.train_or_empty(cfg.train_split), train_tf), (scan.val, val_tf)):
        reader = ListedReader(split.folder, split.samples, split.class_to_idx)
        datasets.append(CheckedImageDataset(reader, transform, f"data.root={scan.root}, data.{split.key}="
                                                               f"{split.name!r}"))
    return DataBundle(datasets[0], datasets[1], scan.num_classes, _bundle_info(scan))
