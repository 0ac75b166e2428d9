"""A new dataset is exactly one module in ``experiments/data/`` and one ``experiments/conf/data/<name>.yaml``. This
test writes both for a throwaway dataset (flat grey images, one grey level per class, ``classes`` classes) into a
temporary copy of the tree (never the real one: tests run in parallel) and runs ``run.py`` there with no other
file edited; and it holds every registered dataset to the registry's contract."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from experiments.config import DataConfig, DataError
from experiments.data.registry import build_data, data_spec, list_data

ROOT = Path(__file__).resolve().parents[1]
NAME = "zz_grey"

DATASET = '''"""``{name}``: a throwaway test dataset; flat grey images, one grey level per class."""
from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from experiments.config import DataConfig, spec
from experiments.data.loaders import DataBundle
from experiments.data.registry import register_data


@dataclass
class GreyData(DataConfig):
    name: str = "{name}"
    classes: int = spec(3, ge=2, le=10)
    per_class: int = spec(4, ge=1, le=100)


def grey(data, per_class):
    labels = torch.arange(data.classes).repeat_interleave(per_class)
    level = labels.float() / (data.classes - 1) * 2 - 1
    images = level.view(-1, 1, 1, 1).expand(-1, 3, data.img_size, data.img_size).contiguous()
    return TensorDataset(images, labels)


@register_data("{name}", config=GreyData, num_classes=lambda data, scan: data.classes)
def build(data, scan=None):
    return DataBundle(grey(data, data.per_class), grey(data, 2), data.classes, {{"val_images": 2 * data.classes}})
'''
CONFIG = """defaults:
  - base_{name}
"""


def tree_copy(tmp_path: Path) -> Path:
    """The tracked files of the packages and entry points (as they are in the working tree) under ``tmp_path``."""
    listed = subprocess.run(["git", "ls-files", "experiments", "methods"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    copy = tmp_path / "tree"
    for name in listed.stdout.splitlines():
        source = ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    return copy


def run_in(copy: Path, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``experiments/run.py`` of the copy on the tiny embedded model, importing the copy's packages."""
    command = [sys.executable, str(copy / "experiments" / "run.py"), *overrides, "+model.depth=2",
               "baseline.enabled=false", "measure.throughput=false", "progress=false", "train.epochs=1",
               "eval.map_images=2", f"paths.results_dir={tmp_path}/results", f"paths.state_dir={tmp_path}/state",
               f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/hydra"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1", "PYTHONPATH": str(copy)}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_dataset_is_one_module_and_one_yaml(tmp_path):
    copy = tree_copy(tmp_path)
    (copy / "experiments" / "data" / f"{NAME}.py").write_text(DATASET.format(name=NAME))
    (copy / "experiments" / "conf" / "data" / f"{NAME}.yaml").write_text(CONFIG.format(name=NAME))
    assert not (ROOT / "experiments" / "data" / f"{NAME}.py").exists()  # the real tree is untouched

    refused = run_in(copy, tmp_path, f"data={NAME}", "data.classes=1")  # its own range, from its own config
    assert refused.returncode != 0 and "data.classes=1 must be in [2, 10]" in refused.stderr, refused.stderr[-3000:]
    assert not (tmp_path / "results").exists()

    done = run_in(copy, tmp_path, f"data={NAME}", "data.classes=4", "method=dense")
    assert done.returncode == 0, done.stderr[-3000:]
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "results" / "runs").glob("*.json")]
    assert record["data"] == NAME and record["config"]["data"]["classes"] == 4
    assert record["data_read"] == {"classes": 4, "val_images": 8}


# ------------------------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", list_data())
def test_every_registered_dataset_has_its_config_and_yaml(name):
    spec = data_spec(name)
    assert issubclass(spec.config, DataConfig) and spec.config.name == name
    assert (ROOT / "experiments" / "conf" / "data" / f"{name}.yaml").read_text().count(f"base_{name}") == 1
    assert {"name", "img_size"} <= {item.name for item in fields(spec.config)}


def test_the_registry_refuses_an_unknown_name_naming_the_choices():
    class Nope:
        name = "nope"

    with pytest.raises(DataError, match=r"data\.name='nope' unknown; valid: digit_scenes, digits, imagefolder, "
                                        r"moving_digits, videofolder"):
        build_data(Nope())
