"""ImageNet-style folders that are not what they seem (issue 18): each is refused at startup, naming the key and
the path, before any data is loaded and with nothing written; or, for what a header check cannot see, the
dataset raises naming the file instead of silently substituting another image.

Every folder is generated in ``tmp_path`` with tiny PNG/JPEG files; ``assert_refused_at_startup`` (from
``test_schema``) runs ``pipeline.run`` with data loading booby-trapped and compares the files before and after.
"""
import io
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import write_png_folder
from experiments import plan
from experiments.config import DataError
from experiments.data.imagefolder import fix_posterize, posterize_bits
from experiments.data.loaders import make_loader
from experiments.data.registry import build_data
from test_schema import assert_refused_at_startup, make_cfg, no_data  # noqa: F401  (no_data: a fixture)

BASE = ["data=imagefolder", "data.img_size=32", "+model.depth=2", "baseline.enabled=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


def folder(tmp_path, **kwargs) -> Path:
    root = tmp_path / "inputs"
    write_png_folder(root, per_class=kwargs.pop("per_class", 2), size=kwargs.pop("size", 16), **kwargs)
    return root


def overrides(root, *extra):
    return [*BASE, f"data.root={root}", *extra]


def refused(tmp_path, root, message, *extra):
    assert_refused_at_startup(tmp_path, overrides(root, *extra), DataError, message)


def noise(size=16, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def checked_plan(tmp_path, root, *extra):
    """The run plan after the startup check (``plan.validate``) passed: its data config and folder scan."""
    return plan.validate(make_cfg(tmp_path, *overrides(root, *extra)))


def checked_bundle(tmp_path, root, *extra):
    """The datasets a run builds from the plan's startup scan."""
    run = checked_plan(tmp_path, root, *extra)
    return build_data(run.config.data, run.data_scan)


# ------------------------------------------------------------------------- 1. training on validation images
def test_train_split_equal_to_val_split_is_refused(tmp_path, no_data):
    root = folder(tmp_path)
    refused(tmp_path, root, r"data\.train_split='val' and data\.val_split='val' are the same folder .*inputs/val.*"
                            r"train on its validation images", "data.train_split=val")


@pytest.mark.parametrize("spelling", ["./val", "val/", "train/../val"])
def test_val_folder_under_another_spelling_is_refused(tmp_path, no_data, spelling):
    root = folder(tmp_path)
    refused(tmp_path, root, rf"data\.train_split='{spelling}' and data\.val_split='val' are the same folder",
            f"data.train_split={spelling}")


def test_val_folder_through_a_symlink_is_refused(tmp_path, no_data):
    root = folder(tmp_path)
    os.symlink(root / "val", root / "train_link")
    refused(tmp_path, root, r"data\.train_split='train_link' and data\.val_split='val' are the same folder "
                            r"\(.*inputs/val\)", "data.train_split=train_link")


def test_val_folder_inside_the_train_folder_is_refused(tmp_path, no_data):
    """``train_split=.`` reads the whole root, validation included (timm labels by leaf folder: same classes)."""
    root = folder(tmp_path)
    refused(tmp_path, root, r"data\.val_split folder .*inputs/val lies inside the data\.train_split folder "
                            r".*inputs\b", "data.train_split=.")


@pytest.mark.parametrize("key", ["train_split", "val_split"])
def test_empty_split_is_refused(tmp_path, no_data, key):
    root = folder(tmp_path)
    refused(tmp_path, root, rf"data\.{key}='' is empty: it would read the whole data\.root=.*inputs recursively",
            f"data.{key}=")


@pytest.mark.parametrize("link", [os.symlink, os.link], ids=["symlink", "hardlink"])
def test_an_image_reached_from_both_splits_is_refused(tmp_path, no_data, link):
    root = folder(tmp_path)
    shared = root / "val" / "cat" / "0.png"
    shared.unlink()
    link(root / "train" / "cat" / "0.png", shared)
    refused(tmp_path, root, r"is reached from both splits: .*train/cat/0\.png and .*val/cat/0\.png")


# ------------------------------------------------------------------------------ 2. images that vanish
def test_a_class_stored_in_an_extension_timm_ignores_is_refused_by_name(tmp_path, no_data):
    """timm's folder reader reads .png/.jpg/.jpeg only: a .bmp class would vanish (a 1-class model at 100%)."""
    root = folder(tmp_path)
    for split in ("train", "val"):
        for png in (root / split / "dog").glob("*.png"):
            noise().save(png.with_suffix(".bmp"))
            png.unlink()
    refused(tmp_path, root, r"data\.train_split='train': class folder 'dog' .*has no images timm's folder reader "
                            r"reads; it holds 2 file\(s\) timm ignores \(\.bmp\); valid extensions: \.jpeg, \.jpg, "
                            r"\.png")


def test_an_ignored_file_next_to_readable_images_is_refused_by_name(tmp_path, no_data):
    root = folder(tmp_path)
    noise().save(root / "val" / "cat" / "extra.bmp")
    refused(tmp_path, root, r"data\.val_split='val': class folder 'cat' holds 1 file\(s\) that timm's folder reader "
                            r"ignores \(\.bmp\): .*val/cat/extra\.bmp")


def test_readable_extensions_are_timms_own(tmp_path, no_data):
    """Taken from ``timm.data.get_img_extensions`` at check time, not from a list of our own."""
    from timm.data import get_img_extensions, set_img_extensions

    root = folder(tmp_path)
    for path in (root / "train" / "cat").glob("*.png"):
        noise().save(path.with_suffix(".jpeg"), format="JPEG")
        path.unlink()
    saved = get_img_extensions()
    set_img_extensions([e for e in saved if e != ".jpeg"])
    try:
        refused(tmp_path, root, r"class folder 'cat' .*has no images timm's folder reader reads; it holds 2 "
                                r"file\(s\) timm ignores \(\.jpeg\); valid extensions: \.jpg, \.png")
    finally:
        set_img_extensions(saved)


@pytest.mark.parametrize("damage", ["empty", "text", "cut_header"])
def test_a_file_that_is_not_an_image_is_refused_at_startup_by_name(tmp_path, no_data, damage):
    root = folder(tmp_path)
    bad = root / "val" / "dog" / "1.jpg"
    (root / "val" / "dog" / "1.png").unlink()
    good = io.BytesIO()
    noise().save(good, format="JPEG")
    bad.write_bytes({"empty": b"", "text": b"this is a text file, not a jpeg\n",
                     "cut_header": good.getvalue()[:12]}[damage])
    refused(tmp_path, root, r"data\.root=.*inputs: 1 of 8 image file\(s\) are not readable images "
                            r".*val/dog/1\.jpg \((UnidentifiedImageError|OSError): .*timm would silently replace each "
                            r"with the next image")


def test_corrupt_pixel_data_raises_naming_the_file_instead_of_substituting(tmp_path):
    """A JPEG cut after its header passes the (header-only) startup check; reading it must raise a DataError
    naming it, where timm's ImageDataset logs a warning and returns the next image and its label."""
    root = folder(tmp_path)
    encoded = io.BytesIO()
    noise(64, seed=3).save(encoded, format="JPEG", quality=95)
    cut = root / "train" / "dog" / "0.jpg"
    (root / "train" / "dog" / "0.png").unlink()
    cut.write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    bundle = checked_bundle(tmp_path, root)
    index = [i for i, (path, _) in enumerate(bundle.train.reader.samples) if path.endswith("dog/0.jpg")]
    assert len(index) == 1
    with pytest.raises(DataError, match=r"data\.train_split='train': cannot read image .*train/dog/0\.jpg"):
        bundle.train[index[0]]
    loader = make_loader(bundle.train, 4, train=False, num_workers=0, seed=0)
    with pytest.raises(DataError, match=r"cannot read image .*train/dog/0\.jpg"):
        list(loader)


def test_a_symlink_loop_in_a_class_folder_is_refused_naming_the_link(tmp_path, no_data):
    root = folder(tmp_path)
    os.symlink(root / "train" / "cat", root / "train" / "cat" / "again")
    refused(tmp_path, root, r"data\.train_split='train': symlink loop: .*train/cat/again points to .*train/cat, "
                            r"which contains its own class folder 'cat'")


def test_a_class_folder_that_links_back_to_its_split_is_refused(tmp_path, no_data):
    root = folder(tmp_path)
    os.symlink(root / "val", root / "val" / "loop")
    refused(tmp_path, root, r"data\.val_split='val': symlink loop: class folder .*val/loop points to .*inputs/val")


def test_a_folder_inside_a_class_folder_is_refused_not_made_a_class(tmp_path, no_data):
    """timm labels by the innermost folder: ``cat/extra/*.png`` would become a class 'extra'."""
    root = folder(tmp_path)
    (root / "train" / "cat" / "extra").mkdir()
    noise().save(root / "train" / "cat" / "extra" / "5.png")
    refused(tmp_path, root, r"data\.train_split='train': .*train/cat/extra is a folder inside class folder 'cat'; "
                            r".*a class 'extra' of their own")


def test_an_image_outside_any_class_folder_is_refused(tmp_path, no_data):
    root = folder(tmp_path)
    noise().save(root / "train" / "stray.png")
    refused(tmp_path, root, r"data\.train_split='train': 1 image\(s\) lie directly in the split folder .*train/"
                            r"stray\.png")


def test_the_run_reads_exactly_the_files_the_check_counted(tmp_path):
    """One scan: the datasets get the checked list (a file added after the check is not read), and the bundle's
    info says how many images and classes each split has."""
    root = folder(tmp_path, classes=("cat", "dog", "emu"), per_class=3)
    run = checked_plan(tmp_path, root)
    noise().save(root / "train" / "cat" / "late.png")  # appears after the startup check
    bundle = build_data(run.config.data, run.data_scan)  # the scan the plan carries
    assert len(bundle.train) == 9 and len(bundle.val) == 9
    assert all(not path.endswith("late.png") for path, _ in bundle.train.reader.samples)
    assert bundle.info["train_images"] == 9 and bundle.info["val_images"] == 9
    assert bundle.info["train_classes"] == bundle.info["val_classes"] == bundle.num_classes == 3
    assert bundle.train.reader.class_to_idx == {"cat": 0, "dog": 1, "emu": 2}
    image, label = bundle.val[len(bundle.val) - 1]
    assert image.shape == (3, 32, 32) and label == 2


def test_uppercase_imagenet_extensions_are_read_and_counted(tmp_path):
    """ImageNet's files are ``*.JPEG``: timm compares lower-cased extensions, and so does the check."""
    root = folder(tmp_path)
    for path in root.rglob("*.png"):
        noise().save(path.with_suffix(".JPEG"), format="JPEG")
        path.unlink()
    bundle = checked_bundle(tmp_path, root)
    assert bundle.info["train_images"] == 4 and bundle.info["train_classes"] == 2
    assert all(path.endswith(".JPEG") for path, _ in bundle.val.reader.samples)


def test_differing_class_folders_are_named(tmp_path, no_data):
    root = folder(tmp_path)
    (root / "train" / "bird").mkdir()
    noise().save(root / "train" / "bird" / "0.png")
    (root / "val" / "fish").mkdir()
    noise().save(root / "val" / "fish" / "0.png")
    refused(tmp_path, root, r"train and val class folders differ: only in data\.train_split='train' \(1\): bird; "
                            r"only in data\.val_split='val' \(1\): fish")


def test_an_empty_class_folder_is_refused_by_name(tmp_path, no_data):
    """timm would drop it from its classes while the head counts it."""
    root = folder(tmp_path)
    (root / "train" / "owl").mkdir()
    (root / "val" / "owl").mkdir()
    refused(tmp_path, root, r"class folder 'owl' .*has no images timm's folder reader reads")


# --------------------------------------------------------------------- 3. the default augmentation's posterize
def run_transform(tmp_path):
    """The training transform a run of the default ``data=imagefolder`` builds (``rand-m9-mstd0.5-inc1``)."""
    root = folder(tmp_path)
    run = checked_plan(tmp_path, root)
    assert run.config.data.auto_augment == "rand-m9-mstd0.5-inc1"
    return build_data(run.config.data, run.data_scan).train.transform


def rand_augment_of(transform):
    from timm.data.auto_augment import RandAugment

    [augment] = [t for t in transform.transforms if isinstance(t, RandAugment)]
    return augment


def test_default_randaugment_at_magnitude_10_posterizes_to_zero_bits(tmp_path):
    """timm's inc1 posterize keeps 0 bits at magnitude 10, which Pillow 13 refuses ("bits must be between or
    equal to 1 and 8"); the run's RandAugment must give the 0-bit result: every channel value 0."""
    augment = rand_augment_of(run_transform(tmp_path))
    [op] = [op for op in augment.ops if op.name == "PosterizeIncreasing"]
    assert op.level_fn(10, op.hparams) == (0,)  # the 0-bit level
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    for seed in range(3):
        out = op(noise(24, seed))
        assert out.mode == "RGB" and out.size == (24, 24)
        assert not np.asarray(out).any()
    augment.ops, augment.num_layers = [op], 2  # and through RandAugment itself
    assert not np.asarray(augment(noise(24))).any()


def test_every_default_randaugment_op_runs_at_magnitude_10(tmp_path):
    transform = run_transform(tmp_path)
    augment = rand_augment_of(transform)
    for op in augment.ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    random.seed(0)
    np.random.seed(0)
    for seed in range(4):
        image = noise(40, seed)
        for op in augment.ops:
            image = op(image)
        assert transform(noise(40, seed)).shape == (3, 32, 32)


def test_posterize_bits_keeps_pillows_results_for_1_to_8_bits():
    image = noise(20, 5)
    assert not np.asarray(posterize_bits(image, 0)).any()
    assert not np.asarray(posterize_bits(image, -1)).any()
    for bits in range(1, 8):
        assert np.array_equal(np.asarray(posterize_bits(image, bits)),
                              np.asarray(ImageOps.posterize(image, bits)))
    assert posterize_bits(image, 8) is image


def test_auto_augment_policies_with_zero_bit_levels_are_fixed():
    """The ``v0`` AutoAugment policy's Posterize maps low magnitudes to 0 bits too."""
    from timm.data.auto_augment import auto_augment_transform, posterize

    policy = auto_augment_transform("v0", {"translate_const": 100})
    assert fix_posterize(policy) > 0
    ops = [op for sub in policy.policy for op in sub]
    assert all(op.aug_fn is not posterize for op in ops)
    [op] = [op for op in ops if op.name == "Posterize"][:1]
    op.prob, op.magnitude = 1.0, 0
    assert not np.asarray(op(noise(16))).any()


# ---------------------------------------------------------------------- 4. errors a user can act on
def test_an_unknown_augmentation_is_refused_at_startup_naming_the_key(tmp_path, no_data):
    root = folder(tmp_path)
    refused(tmp_path, root, r"data\.auto_augment='nope' is not a timm augmentation .*valid: a timm policy string",
            "data.auto_augment=nope")


# A blank data.root is refused by the config's path rule (tests/test_late_settings.py).
