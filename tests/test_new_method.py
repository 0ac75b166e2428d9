"""A new method is exactly three new files: ``methods/<name>.py``, ``experiments/conf/method/<name>.yaml`` and its
test. This test writes the first two for a throwaway method (it keeps the first ``keep`` patches of every image)
into the tree, then runs ``run.py``, ``measure.py`` and ``tradeoff.py`` on it with no other file edited, and
removes them again."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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


@register_method("{name}", family="pruning", inference_knob="keep", tradeoff_values=(16, 48))
def build(vit, keep: int = 32) -> KeepFirst:
    """Keep the first ``keep`` patches (a test of the three-file contract)."""
    return KeepFirst(vit, keep)
'''
CONFIG = """defaults:
  - {name}_defaults
  - _self_
"""


def run_script(script: str, tmp_path: Path, *overrides: str) -> list[dict]:
    """Run an entry point on the tiny embedded setup; returns the records it wrote."""
    results = tmp_path / f"results_{script}"
    command = [sys.executable, str(ROOT / "experiments" / f"{script}.py"), *overrides, "+model.depth=2",
               "baseline.enabled=false", "measure.throughput=false", "progress=false", "train.epochs=1",
               f"paths.results_dir={results}", f"paths.state_dir={tmp_path}/state",
               f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/hydra_{script}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]


@pytest.mark.slow
def test_a_method_is_three_files(tmp_path):
    name = f"zz_throwaway_{uuid.uuid4().hex[:6]}"
    method_file = ROOT / "methods" / f"{name}.py"
    config_file = ROOT / "experiments" / "conf" / "method" / f"{name}.yaml"
    try:
        method_file.write_text(METHOD.format(name=name))
        config_file.write_text(CONFIG.format(name=name))
        [run] = run_script("run", tmp_path, f"method={name}", "method.params.keep=20")
        assert run["method"] == name and run["method_params"] == {"keep": 20}
        assert run["tokens"]["attn_mean"] == [21.0, 21.0] and run["train"]["epochs"] == 0  # finetune=False
        [measured] = run_script("measure", tmp_path, f"method={name}")
        assert measured["kind"] == "measure" and measured["tokens"]["attn_mean"] == [33.0, 33.0]  # keep=32
        curve = run_script("tradeoff", tmp_path, f"method={name}")  # the registered grid
        assert sorted(r["tradeoff"]["value"] for r in curve) == [16, 48]
        assert sorted(r["tokens"]["attn_mean"][0] for r in curve) == [17.0, 49.0]
    finally:
        method_file.unlink(missing_ok=True)
        config_file.unlink(missing_ok=True)
