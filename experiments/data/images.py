"""Image datasets and loaders: the embedded digits default and ImageNet-style folders, and the pieces the video
data modules share (``DataBundle``, the folder rules). Video data: ``moving_digits`` in
``experiments/data/moving_digits.py``, ``videofolder`` in ``experiments/data/videofolder.py``; ``experiments/data/registry.py``
maps a data config to its builder.

- ``digits``: scikit-learn's bundled ``load_digits`` (1,797 8x8 grey images, no download), split into
  train/val with a fixed seed (stratified), upsampled to ``img_size`` so the embedded model sees an 8x8 token
  grid, replicated to 3 channels and normalised to [-1, 1]. Training adds random translations.
- ``imagefolder``: ``root/<train_split>/<class>/*.jpg`` and ``root/<val_split>/...`` read with timm's dataset,
  transforms (DeiT-style RandAugment, random erasing, mixup-free) and loader with worker processes. The folders
  are scanned and checked once, at startup (``count_imagefolder_classes``), and the datasets read exactly that file list;
  see the rules above :func:`scan_imagefolder`.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import ImageDataset
from timm.data.readers.reader import Reader
from timm.data.readers.reader_image_folder import ReaderImageFolder
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from experiments.config import DataError  # noqa: F401  (re-exported: experiments.data.images.DataError)

DIGITS_CLASSES = 10  # build_digits: the ten digits


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


# --------------------------------------------------------------------------------------------- imagefolder
# One scan of ``root/<split>/<class>/<image>`` decides what a run reads: ``count_imagefolder_classes`` (run by
# ``plan.validate`` at startup, before anything is built or written) scans and checks both splits, and
# ``build_imagefolder`` hands that exact file list to timm's dataset, so the images a run trains and evaluates
# on are the images the check counted. The rules, each refused with a ``DataError`` naming the key and path:
#
# - ``data.train_split`` / ``data.val_split`` are non-empty and name two different folders under ``data.root``
#   (after resolving symlinks and spellings such as ``./val``), neither inside the other, and no image file
#   is reached from both splits (e.g. a class folder symlinked into both);
# - each split holds class folders, and each class folder holds its images directly: timm labels an image by
#   its leaf folder, so a sub-folder with images would become a class of its own, a symlink loop would
#   multiply the images and invent classes, and an image lying directly in the split folder gets class '';
# - every file in a class folder is one timm's folder reader reads (the extensions come from
#   ``timm.data.get_img_extensions``, so they follow timm), except hidden files such as ``.DS_Store``: a file
#   timm ignores would silently vanish from the run (a class stored as ``.bmp`` becomes no class at all);
# - every image opens with PIL (``Image.open``: reads the header, identifies the format and checks the size
#   against PIL's decompression-bomb limit, without decoding the pixels). This catches empty files, text or
#   other non-image files with an image name, files cut inside their header, dangling links and unreadable
#   files. It does NOT catch pixel data that is corrupt or cut after the header; for those the datasets
#   (:class:`CheckedImageDataset`) raise naming the file when they read it, where timm's ``ImageDataset``
#   would log a warning and silently return the next image with its label instead;
# - both splits have the same class folders (the error names the classes only in one of them), and
#   ``data.num_classes``, when set, equals their number.


def _timm_extensions() -> tuple[str, ...]:
    """The extensions timm's folder reader reads, lower-case (it compares ``ext.lower()``)."""
    from timm.data.readers.img_extensions import get_img_extensions

    return tuple(sorted({e.lower() for e in get_img_extensions(as_set=True)}))


def _examples(items: list, limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _inside(inner: str, outer: str) -> bool:
    """``inner`` is ``outer`` or lies under it (both absolute, symlinks resolved)."""
    return os.path.commonpath([inner, outer]) == outer


@dataclass
class SplitScan:
    """One split as the run reads it: ``samples`` are ``(path, class index)`` in timm's order."""

    key: str  # data.train_split or data.val_split
    name: str
    folder: str
    samples: list[tuple[str, int]]
    class_to_idx: dict[str, int]
    ignored_hidden: int  # hidden files (.DS_Store, ...) in class folders, not read

    @property
    def classes(self) -> list[str]:
        return list(self.class_to_idx)


@dataclass
class FolderScan:
    root: str
    train: SplitScan
    val: SplitScan
    signature: tuple  # the config values the scan was made for

    @property
    def num_classes(self) -> int:
        return len(self.train.class_to_idx)

    def info(self) -> dict[str, Any]:
        return {"root": self.root, "train_dir": self.train.folder, "val_dir": self.val.folder,
                "train_images": len(self.train.samples), "val_images": len(self.val.samples),
                "train_classes": len(self.train.class_to_idx), "val_classes": len(self.val.class_to_idx),
                "extensions": list(_timm_extensions()), "header_checked": True}


@dataclass(frozen=True)
class FolderWords:
    """How the folder rules' messages name the sample files and their reader; the defaults are imagefolder's
    (timm's reader), ``experiments/data/videofolder.py`` passes its own."""

    item: str = "image"  # one sample file
    an_item: str = "an image"
    reader: str = "timm"  # who would mislabel, walk or drop files
    reads: str = "timm's folder reader"
    source: str = "timm.data.get_img_extensions"  # where the valid extensions come from
    example_root: str = "/path/to/imagenet"


IMAGE_WORDS = FolderWords()


def _root_of(data, words: FolderWords = IMAGE_WORDS) -> Path:
    if data.root is None or not str(data.root).strip():
        raise DataError(f"data.root is not set (data.root={data.root!r}); pass data.root={words.example_root} "
                        "(with train/ and val/ folders)")
    root = Path(str(data.root)).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist or is not a folder; valid: a folder holding the "
                        f"data.train_split and data.val_split folders")
    return root


def _split_folder(root: Path, key: str, split: Any, words: FolderWords = IMAGE_WORDS) -> Path:
    if not isinstance(split, str) or not split.strip():
        raise DataError(f"data.{key}={split!r} is empty: it would read the whole data.root={root} recursively, "
                        "the other split included; valid: the name of a folder under data.root, e.g. "
                        f"data.{key}={'train' if key == 'train_split' else 'val'}")
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"data.root={root}, data.{key}={split!r}: split folder {split!r} not found "
                        f"(expected {folder}/<class>/<{words.item}>)")
    return folder


def _check_distinct(root: Path, train: Path, val: Path, train_split: str, val_split: str) -> None:
    real_train, real_val = os.path.realpath(train), os.path.realpath(val)
    keys = f"data.train_split={train_split!r} and data.val_split={val_split!r}"
    if real_train == real_val:
        raise DataError(f"{keys} are the same folder ({real_train}): the run would train on its validation "
                        f"images; valid: two different folders under data.root={root}, e.g. train and val")
    for inner, outer, inner_key, outer_key in ((real_val, real_train, "val_split", "train_split"),
                                               (real_train, real_val, "train_split", "val_split")):
        if _inside(inner, outer):
            raise DataError(f"{keys}: the data.{inner_key} folder {inner} lies inside the data.{outer_key} folder "
                            f"{outer}, so it would be read as part of it; valid: two separate folders under "
                            f"data.root={root}, neither inside the other")


def _scan_split(root: Path, key: str, split: str, folder: Path, extensions: tuple[str, ...],
                words: FolderWords = IMAGE_WORDS) -> SplitScan:
    w = words
    where = f"data.root={root}, data.{key}={split!r}"
    valid_ext = ", ".join(extensions)
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    class_dirs = [e for e in entries if e.is_dir()]
    stray = [e.path for e in entries if not e.is_dir() and os.path.splitext(e.name)[1].lower() in extensions]
    if stray:
        raise DataError(f"{where}: {len(stray)} {w.item}(s) lie directly in the split folder {folder}, outside any "
                        f"class folder: {_examples(stray)}; {w.reader} would label them with the class ''; valid: "
                        f"{folder}/<class>/<{w.item}>")
    if not class_dirs:
        raise DataError(f"{where}: {folder} has no class folders (expected {folder}/<class>/<{w.item}>)")
    split_real = os.path.realpath(folder)
    labels: dict[str, list[str]] = {}
    hidden = 0
    for entry in class_dirs:
        class_dir = entry.path
        real = os.path.realpath(class_dir)
        if _inside(split_real, real):
            raise DataError(f"{where}: symlink loop: class folder {class_dir} points to {real}, which contains the "
                            f"split folder itself; {w.reader} would walk it again and again, multiplying the "
                            f"{w.item}s and inventing classes; valid: class folders that hold only {w.item} files")
        files, ignored = [], []
        for item in sorted(os.scandir(class_dir), key=lambda e: e.name):
            if item.is_dir():
                target = os.path.realpath(item.path)
                if _inside(real, target):
                    raise DataError(f"{where}: symlink loop: {item.path} points to {target}, which contains its "
                                    f"own class folder {entry.name!r}; {w.reader} would walk it again and again, "
                                    f"multiplying the {w.item}s and inventing classes; remove the link")
                raise DataError(f"{where}: {item.path} is a folder inside class folder {entry.name!r}; {w.reader} "
                                f"labels {w.an_item} by its innermost folder, so its {w.item}s would form a class "
                                f"{item.name!r} of their own; valid: {w.item}s directly in {folder}/<class>/ "
                                f"(move them up or remove the folder)")
            suffix = os.path.splitext(item.name)[1].lower()
            if suffix in extensions:
                files.append(item.path)
            elif item.name.startswith("."):
                hidden += 1
            else:
                ignored.append(item.path)
        if not files:
            kinds = sorted({os.path.splitext(p)[1].lower() or "(no extension)" for p in ignored})
            held = f"; it holds {len(ignored)} file(s) {w.reader} ignores ({', '.join(kinds)})" if ignored else ""
            raise DataError(f"{where}: class folder {entry.name!r} ({class_dir}) has no {w.item}s {w.reads} "
                            f"reads{held}; valid extensions: {valid_ext} ({w.source}), "
                            "so the class would silently vanish from the run")
        if ignored:
            kinds = sorted({os.path.splitext(p)[1].lower() or "(no extension)" for p in ignored})
            raise DataError(f"{where}: class folder {entry.name!r} holds {len(ignored)} file(s) that {w.reads} "
                            f"ignores ({', '.join(kinds)}): {_examples(ignored)}; they would silently "
                            f"vanish from the run; valid extensions: {valid_ext} ({w.source}): "
                            "convert or remove them")
        labels[entry.name] = files
    from timm.utils.misc import natural_key

    class_to_idx = {name: i for i, name in enumerate(sorted(labels, key=natural_key))}
    samples = sorted(((path, class_to_idx[name]) for name, paths in labels.items() for path in paths),
                     key=lambda s: natural_key(s[0]))
    return SplitScan(key, split, str(folder), samples, class_to_idx, hidden)


def _check_no_shared_files(root: Path, train: SplitScan, val: SplitScan, words: FolderWords = IMAGE_WORDS) -> None:
    """No sample file is reached twice (a symlink or hard link to another sample, in either split)."""
    seen: dict[tuple[int, int], str] = {}
    for scan in (train, val):
        for path, _ in scan.samples:
            try:
                stat = os.stat(path)
            except OSError:
                continue  # a dangling link or unreadable file: the header check names it
            if (stat.st_dev, stat.st_ino) in seen:
                first = seen[(stat.st_dev, stat.st_ino)]
                both = "both splits" if not first.startswith(scan.folder + os.sep) else f"data.{scan.key} twice"
                raise DataError(f"data.root={root}: the {words.item} {os.path.realpath(path)} is reached from {both}: "
                                f"{first} and {path} (a symlink or hard link); the run would read it twice"
                                + (f" and evaluate on a training {words.item}" if both == "both splits" else "")
                                + f"; valid: every {words.item} file in exactly one split and one class folder")
            seen[(stat.st_dev, stat.st_ino)] = path


def _header_error(path: str) -> Optional[str]:
    from PIL import Image

    try:
        with Image.open(path) as image:  # header only: format and size, no pixel decoding
            image.size
    except Exception as error:  # noqa: BLE001 -- every reason is reported, by name
        return f"{path} ({type(error).__name__}: {error})"
    return None


def _check_headers(root: Path, scans: tuple[SplitScan, ...]) -> None:
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
                        f"(empty, not an image, cut short or unreadable): {_examples(bad, 3)}; timm would silently "
                        "replace each with the next image and its label; valid: image files PIL can open - "
                        "remove or replace these")


def _check_same_classes(root: Path, train: SplitScan, val: SplitScan) -> None:
    if train.class_to_idx == val.class_to_idx:
        return
    only_train = sorted(set(train.class_to_idx) - set(val.class_to_idx))
    only_val = sorted(set(val.class_to_idx) - set(train.class_to_idx))
    raise DataError(f"data.root={root}: train and val class folders differ: only in data.train_split="
                    f"{train.name!r} ({len(only_train)}): {_examples(only_train, 10) or 'none'}; only in "
                    f"data.val_split={val.name!r} ({len(only_val)}): {_examples(only_val, 10) or 'none'}; valid: "
                    "the same class folders in both splits")


def _signature(data) -> tuple:
    return (data.root, data.train_split, data.val_split, data.num_classes, _timm_extensions())


def scan_imagefolder(data) -> FolderScan:
    """Scan and check both splits of the imagefolder config ``data`` (the rules above); raise ``DataError``."""
    root = _root_of(data)
    train_dir = _split_folder(root, "train_split", data.train_split)
    val_dir = _split_folder(root, "val_split", data.val_split)
    _check_distinct(root, train_dir, val_dir, data.train_split, data.val_split)
    extensions = _timm_extensions()
    train = _scan_split(root, "train_split", data.train_split, train_dir, extensions)
    val = _scan_split(root, "val_split", data.val_split, val_dir, extensions)
    _check_same_classes(root, train, val)
    if data.num_classes and int(data.num_classes) != len(train.class_to_idx):
        raise DataError(f"data.num_classes={data.num_classes} but {train_dir} has {len(train.class_to_idx)} class "
                        f"folders; valid: data.num_classes={len(train.class_to_idx)} or null (the folders' count)")
    _check_no_shared_files(root, train, val)
    _check_headers(root, (train, val))
    return FolderScan(str(root), train, val, _signature(data))


# the scan ``count_imagefolder_classes`` made for a data config object, used once by ``build_imagefolder`` for that same
# object (so startup check and run share one file list); dropped when the object goes away
_SCANS: dict[int, tuple[weakref.ref, FolderScan]] = {}


def _remember(data, scan: FolderScan) -> None:
    key = id(data)
    try:
        ref = weakref.ref(data, lambda _ref, key=key: _SCANS.pop(key, None))
    except TypeError:  # not weak-referenceable: nothing to share, the build rescans
        return
    _SCANS[key] = (ref, scan)


def _recall(data) -> Optional[FolderScan]:
    entry = _SCANS.pop(id(data), None)
    if entry is None or entry[0]() is not data or entry[1].signature != _signature(data):
        return None
    return entry[1]


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


def build_imagefolder(cfg) -> DataBundle:
    scan = _recall(cfg) or scan_imagefolder(cfg)
    train_tf, val_tf = _transforms(cfg)
    datasets = []
    for split, transform in ((scan.train, train_tf), (scan.val, val_tf)):
        reader = ListedReader(split.folder, split.samples, split.class_to_idx)
        datasets.append(CheckedImageDataset(reader, transform, f"data.root={scan.root}, data.{split.key}="
                                                               f"{split.name!r}"))
    return DataBundle(datasets[0], datasets[1], scan.num_classes, scan.info())


def count_imagefolder_classes(data) -> int:
    """The startup check of imagefolder data (:func:`scan_imagefolder`, augmentation included): its class count;
    the scan's file list is what :func:`build_imagefolder` then reads for this same config object."""
    scan = scan_imagefolder(data)
    _transforms(data)  # a bad data.auto_augment fails here, not at the first batch
    _remember(data, scan)
    return scan.num_classes


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
