"""``experiments/bench.py``: the tables it plans (every method, two settings, the right conditions) and its
refusals (no GPU for the GPU table, a missing checkpoint) before anything runs."""
from __future__ import annotations

import pytest
import torch

import methods
from experiments import bench


def planned(capsys, *argv):
    assert bench.main([*argv, "--dry-run"]) == 0
    return [line.split() for line in capsys.readouterr().out.splitlines()]


def method_of(row):
    return next(part.split("=", 1)[1] for part in row if part.startswith("method="))


def test_gpu_table_covers_every_method_at_two_settings_on_deit_s_and_b(capsys):
    rows = planned(capsys, "gpu")
    for model in ("deit_small", "deit_base"):
        mine = [row for row in rows if f"model={model}" in row]
        counts = {name: sum(method_of(row) == name for row in mine) for name in methods.list_methods()}
        assert counts == {name: 1 if name == "dense" else 2 for name in methods.list_methods()}
        assert all("measure.batch_sizes=[1,64,256]" in row and "measure.dtypes=[fp32,bf16]" in row
                   and "device=cuda" in row for row in mine)
        # the dense row alone times the wrapper against timm: the table's harness check
        assert [method_of(row) for row in mine if "measure.wrapper_check=false" not in row] == ["dense"]
    assert len(rows) == 2 * (2 * len(methods.list_methods()) - 1)


def test_cpu_table_threads_and_defaults_only(capsys):
    rows = planned(capsys, "cpu", "--threads", "1,2", "--defaults-only", "measure.warmup=1")
    assert len(rows) == 2 * len(methods.list_methods())
    assert {part for row in rows for part in row if part.startswith("measure.threads=")} == \
        {"measure.threads=1", "measure.threads=2"}
    assert all(row[-1] == "measure.warmup=1" for row in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_table_fails_fast_without_a_gpu(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["gpu"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not any(tmp_path.rglob("*"))


@pytest.mark.parametrize("argv, message", [(["embedded"], "--checkpoint is required"),
                                           (["embedded", "--checkpoint", "/no/such.pth"], "is not a file")])
def test_embedded_table_needs_a_real_checkpoint(capsys, argv, message):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err
