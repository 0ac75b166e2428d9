"""The folder rules that ``data=imagefolder`` and ``data=videofolder`` share: one scan of
``root/<split>/<class>/<file>`` (:func:`scan_folders`) decides what a run reads. Each option's startup check
(``imagefolder.scan_imagefolder``, ``videofolder.scan_videofolder``) runs it with its own file extensions and
words (:class:`FolderWords`), then checks its files' content (image headers, video frame counts); the scan travels
on the run plan to the builder, so the images a run trains and evaluates on are the ones the check counted.

The rules, each refused with a ``DataError`` naming the key and path:

- ``data.train_split`` / ``data.val_split`` are non-empty and name two different folders under ``data.root``
  (after resolving symlinks and spellings such as ``./val``), neither inside the other, and no sample file
  is reached from both splits (e.g. a class folder symlinked into both);
- each split holds class folders, and each class folder holds its samples directly: the reader labels a file by
  its leaf folder, so a sub-folder with files would become a class of its own, a symlink loop would
  multiply the files and invent classes, and a file lying directly in the split folder gets class '';
- every file in a class folder has an extension the option reads (imagefolder: ``timm.data.get_img_extensions``,
  so they follow timm), except hidden files such as ``.DS_Store``: a file the reader ignores would silently
  vanish from the run (a class stored as ``.bmp`` becomes no class at all);
- both splits have the same class folders (the error names the classes only in one of them), and
  ``data.num_classes``, when set, equals their number.

A run that reads no training image (``needs_train=False``: it does not train and its weights do not come from a
dense baseline it may have to train, e.g. ``experiment.train=false model.checkpoint=...``) may lack the train
split folder: then only the val split is scanned and checked (``FolderScan.train`` is None), so a user with only
ImageNet's val set can evaluate released checkpoints. A train folder that is there is scanned and checked as
always. A run that trains is refused when the train folder is missing, naming it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from experiments.config import DataError


def examples(items: list, limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def inside(inner: str, outer: str) -> bool:
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
    """Both checked splits of a folder option; ``train`` is None when the run reads no training image and the
    train folder is absent (module docstring)."""

    root: str
    train: Optional[SplitScan]
    val: SplitScan

    @property
    def splits(self) -> tuple[SplitScan, ...]:
        """The scanned splits, train first."""
        return tuple(split for split in (self.train, self.val) if split is not None)

    @property
    def num_classes(self) -> int:
        return len(self.val.class_to_idx)  # the same classes as train's when both are there (checked)

    def train_or_empty(self, name: str) -> SplitScan:
        """The train split, or an empty one named ``name`` when its folder is absent (the run reads no training
        sample): the builders' train dataset is then empty."""
        if self.train is not None:
            return self.train
        return SplitScan("train_split", str(name), os.path.join(self.root, str(name)), [],
                         dict(self.val.class_to_idx), 0)

    def content_digest(self) -> str:
        """What a run reads, as a digest for its record identity (``experiments/identity.py``): each split's
        files by name relative to ``root``, size and class, never the absolute root nor the files' bytes. A copy
        of the same tree elsewhere has the same digest; a file added, removed, resized or relabelled changes it."""
        listing = {split.key: [(os.path.relpath(path, self.root), os.stat(path).st_size, label)
                               for path, label in split.samples] for split in self.splits}
        return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]


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


def root_of(data, words: FolderWords = IMAGE_WORDS) -> Path:
    """``data.root`` as an existing folder."""
    if data.root is None or not str(data.root).strip():
        raise DataError(f"data.root is not set (data.root={data.root!r}); pass data.root={words.example_root} "
                        "(with train/ and val/ folders)")
    root = Path(str(data.root)).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist or is not a folder; valid: a folder holding the "
                        f"data.train_split and data.val_split folders")
    return root


def split_folder(root: Path, key: str, split: Any, words: FolderWords = IMAGE_WORDS, why: str = "") -> Path:
    """``data.<key>`` (a split's name) as an existing folder under ``root``; ``why`` ends the missing-folder
    message (what needs it)."""
    if not isinstance(split, str) or not split.strip():
        raise DataError(f"data.{key}={split!r} is empty: it would read the whole data.root={root} recursively, "
                        "the other split included; valid: the name of a folder under data.root, e.g. "
                        f"data.{key}={'train' if key == 'train_split' else 'val'}")
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"data.root={root}, data.{key}={split!r}: split folder {split!r} not found "
                        f"(expected {folder}/<class>/<{words.item}>){why}")
    return folder


def check_distinct(root: Path, train: Path, val: Path, train_split: str, val_split: str) -> None:
    """The two split folders are different, neither inside the other."""
    real_train, real_val = os.path.realpath(train), os.path.realpath(val)
    keys = f"data.train_split={train_split!r} and data.val_split={val_split!r}"
    if real_train == real_val:
        raise DataError(f"{keys} are the same folder ({real_train}): the run would train on its validation "
                        f"images; valid: two different folders under data.root={root}, e.g. train and val")
    for inner, outer, inner_key, outer_key in ((real_val, real_train, "val_split", "train_split"),
                                               (real_train, real_val, "train_split", "val_split")):
        if inside(inner, outer):
            raise DataError(f"{keys}: the data.{inner_key} folder {inner} lies inside the data.{outer_key} folder "
                            f"{outer}, so it would be read as part of it; valid: two separate folders under "
                            f"data.root={root}, neither inside the other")


def scan_split(root: Path, key: str, split: str, folder: Path, extensions: tuple[str, ...],
                words: FolderWords = IMAGE_WORDS) -> SplitScan:
    w = words
    where = f"data.root={root}, data.{key}={split!r}"
    valid_ext = ", ".join(extensions)
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    class_dirs = [e for e in entries if e.is_dir()]
    stray = [e.path for e in entries if not e.is_dir() and os.path.splitext(e.name)[1].lower() in extensions]
    if stray:
        raise DataError(f"{where}: {len(stray)} {w.item}(s) lie directly in the split folder {folder}, outside any "
                        f"class folder: {examples(stray)}; {w.reader} would label them with the class ''; valid: "
                        f"{folder}/<class>/<{w.item}>")
    if not class_dirs:
        raise DataError(f"{where}: {folder} has no class folders (expected {folder}/<class>/<{w.item}>)")
    split_real = os.path.realpath(folder)
    labels: dict[str, list[str]] = {}
    hidden = 0
    for entry in class_dirs:
        class_dir = entry.path
        real = os.path.realpath(class_dir)
        if inside(split_real, real):
            raise DataError(f"{where}: symlink loop: class folder {class_dir} points to {real}, which contains the "
                            f"split folder itself; {w.reader} would walk it again and again, multiplying the "
                            f"{w.item}s and inventing classes; valid: class folders that hold only {w.item} files")
        files, ignored = [], []
        for item in sorted(os.scandir(class_dir), key=lambda e: e.name):
            if item.is_dir():
                target = os.path.realpath(item.path)
                if inside(real, target):
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
                            f"ignores ({', '.join(kinds)}): {examples(ignored)}; they would silently "
                            f"vanish from the run; valid extensions: {valid_ext} ({w.source}): "
                            "convert or remove them")
        labels[entry.name] = files
    from timm.utils.misc import natural_key

    class_to_idx = {name: i for i, name in enumerate(sorted(labels, key=natural_key))}
    samples = sorted(((path, class_to_idx[name]) for name, paths in labels.items() for path in paths),
                     key=lambda s: natural_key(s[0]))
    return SplitScan(key, split, str(folder), samples, class_to_idx, hidden)


def check_no_shared_files(root: Path, scans: tuple[SplitScan, ...], words: FolderWords = IMAGE_WORDS) -> None:
    """No sample file is reached twice (a symlink or hard link to another sample, in either split)."""
    seen: dict[tuple[int, int], str] = {}
    for scan in scans:
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


def check_same_classes(root: Path, train: SplitScan, val: SplitScan) -> None:
    if train.class_to_idx == val.class_to_idx:
        return
    only_train = sorted(set(train.class_to_idx) - set(val.class_to_idx))
    only_val = sorted(set(val.class_to_idx) - set(train.class_to_idx))
    raise DataError(f"data.root={root}: train and val class folders differ: only in data.train_split="
                    f"{train.name!r} ({len(only_train)}): {examples(only_train, 10) or 'none'}; only in "
                    f"data.val_split={val.name!r} ({len(only_val)}): {examples(only_val, 10) or 'none'}; valid: "
                    "the same class folders in both splits")


def check_class_count(data, split: SplitScan) -> None:
    """``data.num_classes``, when set, equals the number of class folders."""
    if data.num_classes and int(data.num_classes) != len(split.class_to_idx):
        raise DataError(f"data.num_classes={data.num_classes} but {split.folder} has {len(split.class_to_idx)} "
                        f"class folders; valid: data.num_classes={len(split.class_to_idx)} or null (the folders' "
                        "count)")


TRAIN_NEEDED = ("; the run reads training images (it trains, or its weights are the dense baseline, which may be "
                "trained); an evaluation-only run (experiment.train=false with model.checkpoint or pretrained "
                "weights) needs only the val split")


def scan_folders(data, extensions: tuple[str, ...], words: FolderWords = IMAGE_WORDS,
                 needs_train: bool = True) -> FolderScan:
    """Scan and check the splits of the folder config ``data`` (the rules above) for files with ``extensions``
    (lower-case); raise ``DataError`` naming the key and path. ``needs_train=False``: the run reads no training
    image, so a missing train folder is allowed (``FolderScan.train`` None). The files' content is the caller's
    to check."""
    root = root_of(data, words)
    if not needs_train and isinstance(data.train_split, str) and data.train_split.strip() \
            and not (root / data.train_split).exists():
        val_dir = split_folder(root, "val_split", data.val_split, words)
        val = scan_split(root, "val_split", data.val_split, val_dir, extensions, words)
        check_class_count(data, val)
        check_no_shared_files(root, (val,), words)
        return FolderScan(str(root), None, val)
    train_dir = split_folder(root, "train_split", data.train_split, words, TRAIN_NEEDED if needs_train else "")
    val_dir = split_folder(root, "val_split", data.val_split, words)
    check_distinct(root, train_dir, val_dir, data.train_split, data.val_split)
    train = scan_split(root, "train_split", data.train_split, train_dir, extensions, words)
    val = scan_split(root, "val_split", data.val_split, val_dir, extensions, words)
    check_same_classes(root, train, val)
    check_class_count(data, train)
    check_no_shared_files(root, (train, val), words)
    return FolderScan(str(root), train, val)
