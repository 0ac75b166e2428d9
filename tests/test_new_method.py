"""A new method is exactly three new files: ``methods/<name>.py``, ``experiments/conf/method/<name>.yaml`` and its
test. In a temporary copy of the committed tree (never the real one: the suite runs in parallel), this test
writes the first two for a throwaway method (it keeps the first ``keep`` patches of every image), then, with no
other file edited:

- runs ``run.py``, ``measure.py`` and ``tradeoff.py`` on it (its records carry its registered family);
- plans the benchmark table (its default and registered stronger setting) and expands the ``methods`` sweep
  (Hydra's ``glob``), which both include it;
- runs the registry-driven tests there (bench rows, families, the registry and README tables, the sweeps, the
  library-use test), which must pass with it present. The copy is a git checkout whose index holds the
  committed files only, so the throwaway module is untracked, as a new method is before its commit: the README
  tests document committed methods (``tests/test_registry.py``, ``committed_methods``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the registry-driven tests that must pass with the throwaway method present (the sweep tests of
# test_launcher.py alone: the rest of that file runs launchers, not the registry)
REGISTRY_TESTS = ["tests/test_bench.py", "tests/test_families.py", "tests/test_registry.py",
                  "tests/test_library_use.py", "tests/test_launcher.py::test_every_method_sweeps_list_the_registry",
                  "tests/test_launcher.py::test_sweep_configs_expand_to_valid_cells[methods]",
                  "tests/test_launcher.py::test_sweep_configs_expand_to_valid_cells[video]"]

METHOD = '''"""``{name}``: a throwaway test method; keeps the first ``keep`` patch tokens of every image."""
import torch

from . import backbone
from .base import MethodOutput, TokenReducer
from .registry import register_method


class KeepFirst(TokenReducer):
    def __init__(self, vit, keep):
        super().__init__(vit)
        if not 1 <= keep <= self.num_patches:
            raise ValueError(f"method.params.keep={{keep}} is outside the valid range [1, {{self.num_patches}}]")
        self.keep = keep

    def forward(self, images):
        x = backbone.embed(self.vit, images)[:, : self.keep + 1]
        for block in self.vit.blocks:
            x, _ = backbone.attn_residual(block, x)
            x = backbone.mlp_residual(block, x)
        batch = images.shape[0]
        counts = torch.full((batch, self.depth, 2), self.keep + 1, dtype=torch.long, device=x.device)
        depth = torch.zeros(batch, self.num_patches, dtype=torch.long, device=x.device)
        depth[:, : self.keep] = self.depth
        return MethodOutput(backbone.head(self.vit, x), counts, depth)


@register_method("{name}", family="pruning", inference_knob="keep", tradeoff_values=(16, 48), stronger={{"keep": 16}})
def build(vit, keep: int = 32) -> KeepFirst:
    """Keep the first ``keep`` patches (a test of the three-file contract)."""
    return KeepFirst(vit, keep)
'''
CONFIG = """defaults:
  - {name}_defaults
  - _self_
"""


def copy_tree(dest: Path) -> Path:
    """The committed files of the repository (``git ls-files``; the results records left out, no test here
    reads them) copied to ``dest``, made a git checkout with them committed."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True,
                           timeout=60).stdout.split("\0")
    for name in files:
        if name and not name.startswith("results/") and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-q", "-m", "copy"]):
        subprocess.run(command, cwd=dest, check=True, capture_output=True, timeout=120)
    return dest


def environment(tree: Path) -> dict:
    """The copy's code first on the path (ahead of any installed checkout), one thread."""
    return {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


def run_script(script: str, tree: Path, tmp_path: Path, *overrides: str) -> list[dict]:
    """Run an entry point of the copy on the tiny embedded setup; returns the records it wrote."""
    results = tmp_path / f"results_{script}"
    command = [sys.executable, "-m", f"experiments.{script}", *overrides, "+model.depth=2",
               "baseline.enabled=false", "measure.throughput=false", "progress=false", "train.epochs=1",
               f"paths.results_dir={results}", f"paths.state_dir={tmp_path}/state",
               f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/hydra_{script}"]
    done = subprocess.run(command, cwd=tmp_path, env=environment(tree), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]


def python(tree: Path, code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=environment(tree), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_a_method_is_three_files(tmp_path):
    name = f"zz_throwaway_{uuid.uuid4().hex[:6]}"
    tree = copy_tree(tmp_path / "tree")
    (tree / "methods" / f"{name}.py").write_text(METHOD.format(name=name))
    (tree / "experiments" / "conf" / "method" / f"{name}.yaml").write_text(CONFIG.format(name=name))
    status = subprocess.run(["git", "status", "--porcelain"], cwd=tree, capture_output=True, text=True,
                            check=True).stdout.split("\n")
    assert sorted(line for line in status if line) == [f"?? experiments/conf/method/{name}.yaml",
                                                      f"?? methods/{name}.py"]  # the only change: two new files

    [run] = run_script("run", tree, tmp_path, f"method={name}", "method.params.keep=20")
    assert run["method"] == name and run["method_params"] == {"keep": 20}
    assert run["method_info"] == {"family": "pruning"}  # from the registration, for the report
    assert run["tokens"]["attn_mean"] == [21.0, 21.0] and run["train"]["epochs"] == 0  # finetune=False
    [measured] = run_script("measure", tree, tmp_path, f"method={name}")
    assert measured["kind"] == "measure" and measured["tokens"]["attn_mean"] == [33.0, 33.0]  # keep=32
    curve = run_script("tradeoff", tree, tmp_path, f"method={name}")  # the registered grid
    assert sorted(r["tradeoff"]["value"] for r in curve) == [16, 48]
    assert sorted(r["tokens"]["attn_mean"][0] for r in curve) == [17.0, 49.0]

    planned = python(tree, "from experiments import bench; bench.main(['cpu', '--dry-run'])").splitlines()
    mine = [line for line in planned if f"method={name} " in line]
    assert len(mine) == 2 and "method.params.keep=16" in mine[1]  # the default, then the registered stronger
    swept = python(tree, "import sys; sys.path.insert(0, 'tests'); import test_launcher; "
                         "from experiments.config_store import register_configs; register_configs(); "
                         "print(sorted({c for cell in test_launcher.sweep_cells('methods') for c in cell}))")
    assert f"method={name}" in swept

    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *REGISTRY_TESTS],
                          cwd=tree, env=environment(tree), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert name in python(tree, "import methods; print(methods.list_methods())")
