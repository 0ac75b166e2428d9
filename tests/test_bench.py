"""``experiments/bench.py``: the tables it plans (every registered method at the settings its registration
declares, the right conditions) and its refusals (bad flags, no GPU for the GPU table, a missing checkpoint)
before anything runs."""
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


def params_of(row):
    return {part.split("=", 1)[0].removeprefix("method.params."): part.split("=", 1)[1]
            for part in row if part.startswith("method.params.")}


def test_every_method_but_the_dense_reference_declares_a_stronger_setting():
    for name in methods.list_methods():
        spec = methods.method_spec(name)
        assert (spec.stronger is None) == (spec.family == "none"), name
        assert methods.bench_settings(name) == ([{}] if spec.stronger is None else [{}, spec.stronger])


def test_gpu_table_covers_every_method_at_its_registered_settings_on_deit_s_and_b(capsys):
    rows = [row for row in planned(capsys, "gpu") if "measure.compile=true" not in row]
    assert rows == planned(capsys, "gpu", "--no-compile")
    for model in ("deit_small", "deit_base"):
        mine = [row for row in rows if f"model={model}" in row]
        got = {name: [params_of(row) for row in mine if method_of(row) == name] for name in methods.list_methods()}
        expected = {name: [{key: str(value).lower() if isinstance(value, bool) else str(value)
                            for key, value in params.items()} for params in methods.bench_settings(name, model)]
                    for name in methods.list_methods()}
        assert got == expected
        assert all("measure.batch_sizes=[1,64,256]" in row and "measure.dtypes=[fp32,bf16]" in row
                   and "device=cuda" in row for row in mine)
        # the dense reference alone times the wrapper against timm: the table's harness check; it comes first
        assert [methods.method_spec(method_of(row)).family for row in mine
                if "measure.wrapper_check=false" not in row] == ["none"]
        assert methods.method_spec(method_of(mine[0])).family == "none"
    # A-ViT on random weights: the gate constants its registration declares per backbone, not its defaults
    assert {"gate_scale": "10", "gate_center": "7.0"} in [params_of(row) for row in rows if "model=deit_base" in row]


def test_embedded_table_declared_constants_and_the_checkpoint_method(capsys, tmp_path):
    """ToMe's r on the 65-token model comes from its registration; the checkpoint's own method (read from the
    file) runs on it at its default and stronger setting instead of any backbone constants."""
    rows = planned(capsys, "embedded")
    assert [params_of(row) for row in rows if method_of(row) == "tome"] == [{"r": "4"}, {"r": "5"}]
    checkpoint = tmp_path / "final.pth"
    torch.save({"method": "tome", "model": {}}, checkpoint)
    rows = planned(capsys, "embedded", "--checkpoint", str(checkpoint))
    mine = [row for row in rows if method_of(row) == "tome"]
    assert [params_of(row) for row in mine] == [{}, {"r": "16"}]
    assert all(f"model.checkpoint={checkpoint}" in row for row in mine)
    assert not any("model.checkpoint" in part for row in rows if method_of(row) != "tome" for part in row)


def test_compiled_measurements_of_the_gpu_and_cpu_tables(capsys):
    """GPU: every method at its default compiled on DeiT-S, bf16, batch 64 and 256 (the eager pairs are the
    table's own rows); CPU: every row times eager and compiled side by side."""
    compiled = [row for row in planned(capsys, "gpu") if "measure.compile=true" in row]
    assert sorted(method_of(row) for row in compiled) == sorted(methods.list_methods())
    assert all(params_of(row) == {key: str(value) for key, value in methods.bench_settings(
        method_of(row), "deit_small")[0].items()} for row in compiled)
    assert all("model=deit_small" in row and "measure.dtypes=[bf16]" in row and
               "measure.batch_sizes=[64,256]" in row for row in compiled)
    cpu = planned(capsys, "cpu", "--defaults-only")
    assert all("measure.compile=both" in row for row in cpu)
    assert not any("measure.compile" in part for row in planned(capsys, "cpu", "--no-compile") for part in row)


def test_cpu_table_threads_and_defaults_only(capsys):
    rows = planned(capsys, "cpu", "--threads", "1,2", "--defaults-only", "measure.warmup=1")
    assert len(rows) == 2 * len(methods.list_methods())
    assert {part for row in rows for part in row if part.startswith("measure.threads=")} == \
        {"measure.threads=1", "measure.threads=2"}
    assert all(row[-1] == "measure.warmup=1" for row in rows)


@pytest.mark.parametrize("argv, flag", [(["cpu", "--threads", "one"], "--threads"),
                                        (["cpu", "--threads", "0"], "--threads"),
                                        (["cpu", "--threads", "1,-2"], "--threads"),
                                        (["cpu", "--batch-sizes", "[1,x]"], "--batch-sizes"),
                                        (["cpu", "--batch-sizes", "0"], "--batch-sizes"),
                                        (["cpu", "--no-such-flag"], "--no-such-flag"),
                                        (["cpu", "warmup"], "key=value")])
def test_bad_flags_are_refused_naming_the_flag(capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*argv, "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


@pytest.mark.parametrize("content, message", [({"model": {}}, "names no method"),
                                              ({"model": {}, "method": "nope"}, "'nope' is not registered")])
def test_a_checkpoint_without_a_registered_method_is_refused(capsys, tmp_path, content, message):
    checkpoint = tmp_path / "plain.pth"
    torch.save(content, checkpoint)
    assert bench.main(["embedded", "--checkpoint", str(checkpoint), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


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
