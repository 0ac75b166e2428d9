"""Cost measurement: config validation, the throughput protocol, ``costs.measure_costs`` and the measure.py CLI.

Timing values are not asserted (the machine is shared); the protocol is: what runs where, in which order,
with which switches, and what the records hold.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

import methods
from conftest import CONF, compose_config, make_tiny_vit
from experiments import plan, records
from experiments.cost import costs, measure_record, throughput, timing_pool
from experiments.train.engine import EvalResult
from experiments.config import ConfigError
from hydra.errors import ConfigCompositionException
from methods.models import create_backbone

ROOT = Path(__file__).resolve().parents[1]
ENTRY_KEYS = {"device", "device_name", "batch_size", "dtype", "img_per_s", "dense_img_per_s", "speedup_vs_dense",
              "flops_ratio", "efficiency", "peak_mem_mb", "threads", "compile", "fused_attn", "torch", "timm",
              "repeats", "warmup"}
FAST = ["measure.images=6", "measure.batch_sizes=[1,3]", "measure.warmup=1", "measure.repeats=2",
        "measure.min_time_s=0", "progress=false", "eval.map_images=2"]


def make_cfg(tmp_path: Path, *overrides: str):
    return compose_config(f"paths.results_dir={tmp_path / 'results'}", f"paths.run_dir={tmp_path / 'run'}",
                          "device=cpu", *overrides)


def fast_settings(**changes) -> throughput.Settings:
    base = dict(batch_sizes=[2], dtypes=["fp32"], warmup=1, repeats=3, min_time_s=0.0)
    return throughput.Settings(**{**base, **changes})


def tiny_method(name: str = "dense", **params) -> methods.TokenReducer:
    torch.manual_seed(0)
    return methods.create_method(name, create_backbone("deit_digits_patch4_32", 10), **params).eval()


def no_records(tmp_path: Path) -> bool:
    return not list((tmp_path / "results").rglob("*.json"))


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("override,key,valid", [
    ("measure.batch_sizes=[1,0]", "measure.batch_sizes", "in [1, "),
    ("measure.batch_sizes=[-4]", "measure.batch_sizes", "in [1, "),
    ("measure.batch_sizes=[]", "measure.batch_sizes", "positive integers"),
    ("measure.dtypes=[fp32,fp64]", "measure.dtypes", "fp32, bf16, fp16"),
    ("measure.dtypes=[half]", "measure.dtypes", "fp32, bf16, fp16"),
    ("measure.images=0", "measure.images", "in [1, "),
    ("measure.images=-3", "measure.images", "in [1, "),
    ("measure.repeats=0", "measure.repeats", "in [1, "),
    ("measure.warmup=-1", "measure.warmup", "in [0, "),
    ("measure.min_time_s=-1", "measure.min_time_s", "in [0, "),
    ("measure.min_time_s=inf", "measure.min_time_s", "finite"),
])
def test_bad_measure_config_names_key_and_choices(tmp_path, override, key, valid):
    cfg = make_cfg(tmp_path, override)
    with pytest.raises(ConfigError) as error:
        plan.validate(cfg)
    assert key in str(error.value) and valid in str(error.value)
    with pytest.raises(ConfigError):
        measure_record.measure_run(cfg)
    assert no_records(tmp_path)


@pytest.mark.parametrize("override, key", [("measure.fused_attn=maybe", "measure.fused_attn"),
                                           ("measure.batch_sizes=8", "measure.batch_sizes"),
                                           ("measure.images=many", "measure.images")])
def test_mistyped_measure_settings_are_refused_at_composition(tmp_path, override, key):
    with pytest.raises(ConfigCompositionException) as error:
        make_cfg(tmp_path, override)
    assert f"full_key: {key}" in str(error.value.__cause__)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_an_error_not_a_cpu_fallback(tmp_path):
    cfg = make_cfg(tmp_path)
    with open_dict(cfg):
        cfg.device = "cuda"
    with pytest.raises(ConfigError, match="device=cuda"):
        measure_record.measure_run(cfg)
    assert no_records(tmp_path)


def test_defaults_per_device(tmp_path):
    settings = plan.validate(make_cfg(tmp_path)).config.measure
    cpu = costs.settings_for(settings, torch.device("cpu"))
    assert list(cpu.batch_sizes) == [1, 32] and list(cpu.dtypes) == ["fp32"]
    gpu = costs.settings_for(settings, torch.device("cuda"))
    assert list(gpu.batch_sizes) == [1, 64, 256] and list(gpu.dtypes) == ["fp32", "bf16"]
    assert cpu.warmup >= 10 and cpu.repeats >= 5
    chosen = plan.validate(make_cfg(tmp_path, "measure.batch_sizes=[8]", "measure.dtypes=[bf16]")).config.measure
    single = costs.settings_for(chosen, torch.device("cpu"))
    assert list(single.batch_sizes) == [8] and list(single.dtypes) == ["bf16"]


# ------------------------------------------------------------------------------------------ timing protocol
class Probe(torch.nn.Module):
    """Wraps a method; logs every call with the autograd/inference state, the input's device and size, and
    which pool images it got (the test pools hold constant images, image i filled with the value i)."""

    def __init__(self, inner, name, log):
        super().__init__()
        self.inner, self.name, self.log = inner, name, log

    @property
    def vit(self):
        return self.inner.vit

    def forward(self, images):
        self.log.append((self.name, torch.is_inference_mode_enabled(), torch.is_grad_enabled(), self.training,
                         images.device.type, images.shape[0], tuple(b.attn.fused_attn for b in self.vit.blocks),
                         images[:, 0, 0, 0].long().tolist()))
        return self.inner(images)


def constant_pool(count: int) -> torch.Tensor:
    return torch.arange(float(count))[:, None, None, None].expand(count, 3, 32, 32).clone()


@pytest.fixture
def timm_log(monkeypatch):
    """Logs the calls of the timm reference (``vit(images)``) that ``throughput.measure`` times."""
    log: list = []

    class ProbedTimm(throughput.TimmForward):
        def forward(self, images):
            log.append(("timm", torch.is_inference_mode_enabled(), torch.is_grad_enabled(), self.training,
                        images.device.type, images.shape[0], None, images[:, 0, 0, 0].long().tolist()))
            return super().forward(images)

    monkeypatch.setattr(throughput, "TimmForward", ProbedTimm)
    return log


def test_protocol_times_the_pool_and_interleaves_timm_dense_and_method(timm_log):
    log = timm_log
    method = tiny_method("dense")
    probe_m, probe_d = Probe(method, "method", log), Probe(methods.create_method("dense", method.vit), "dense", log)
    probe_m.train()
    entries = throughput.measure(probe_m, probe_d, torch.device("cpu"), fast_settings(repeats=4, warmup=3), 0.5,
                                 images=constant_pool(5))
    assert probe_m.training  # restored
    assert all(inf and not grad and not training and dev == "cpu" and size == 2
               for _, inf, grad, training, dev, size, _, _ in log)
    names = [entry[0] for entry in log]
    # warm-up: 3 forwards, then one calibration pass over the 5 batches, per model in turn
    assert names[:24] == ["method"] * 8 + ["timm"] * 8 + ["dense"] * 8
    timed = [entry for entry in log[24:]]
    runs = [timed[i][0] for i in range(0, len(timed), 5)]  # iters = one pass = 5 forwards per run
    assert runs == ["method", "timm", "dense", "dense", "timm", "method"] * 2
    for name in ("method", "timm", "dense"):
        seen = [image for entry in timed if entry[0] == name for image in entry[-1]]
        assert sorted(seen) == sorted(list(range(5)) * 2 * 4)  # each pool image twice per pass, 4 repeats
    (entry,) = entries
    assert ENTRY_KEYS <= set(entry)
    assert entry["dense_reference"] == "timm" and entry["timed_images"] == "val[0:5]"
    assert entry["timed_pool_size"] == 5 and entry["iters_per_repeat"] == 5
    paired = sorted(m / d for m, d in zip(entry["img_per_s_runs"], entry["dense_img_per_s_runs"]))
    assert entry["speedup_vs_dense"] == pytest.approx((paired[1] + paired[2]) / 2)  # median of 4 paired ratios
    assert entry["speedup_of_medians"] == pytest.approx(entry["img_per_s"] / entry["dense_img_per_s"])
    assert entry["efficiency"] == pytest.approx(entry["speedup_vs_dense"] * 0.5)
    assert entry["dense_wrapper_vs_timm"] > 0 and entry["dense_wrapper_img_per_s"] > 0
    assert entry["repeats"] == 4 and entry["warmup"] == 8 and len(entry["img_per_s_runs"]) == 4
    assert entry["device"] == "cpu" and entry["dtype"] == "fp32" and entry["batch_size"] == 2
    assert entry["peak_mem_mb"] > 0 and entry["threads"] == torch.get_num_threads() and entry["inputs"] == "images"


@pytest.mark.parametrize("pool, batch, batches, each", [(64, 1, 64, 1), (64, 32, 2, 1), (64, 256, 1, 4),
                                                         (64, 48, 4, 3), (5, 2, 5, 2)])
def test_pool_batches_time_every_pool_image_equally_often(pool, batch, batches, each):
    out = timing_pool.pool_batches(batch, torch.device("cpu"), constant_pool(pool)[:, :, :2, :2])
    assert len(out) == batches and all(b.shape[0] == batch for b in out)
    seen = torch.cat([b[:, 0, 0, 0] for b in out]).long()
    assert torch.equal(torch.bincount(seen, minlength=pool), torch.full((pool,), each))
    assert seen[:batch].tolist() == list(range(min(batch, pool))) * (batch // pool) + list(range(batch % pool)) \
        if batch >= pool else seen[:batch].tolist() == list(range(batch))


def test_noise_pool_is_seeded_and_named():
    first = timing_pool.pool_batches(4, torch.device("cpu"), None, (3, 4, 4), pool_size=8)
    again = timing_pool.pool_batches(4, torch.device("cpu"), None, (3, 4, 4), pool_size=8)
    assert len(first) == 2 and all(torch.equal(a, b) for a, b in zip(first, again))
    assert timing_pool.pool_label(None, 8) == "noise[0:8] (seed 0)"


def test_protocol_switches_are_applied_and_restored():
    log: list = []
    method = tiny_method("dense")
    before = [b.attn.fused_attn for b in method.vit.blocks]
    threads = torch.get_num_threads()
    entries = throughput.measure(Probe(method, "method", log), None, torch.device("cpu"),
                                 fast_settings(fused_attn=not before[0], threads=1, batch_sizes=[1, 3]), 1.0)
    assert {entry[-2] for entry in log} == {tuple([not before[0]] * len(before))}
    assert [b.attn.fused_attn for b in method.vit.blocks] == before and torch.get_num_threads() == threads
    assert [e["batch_size"] for e in entries] == [1, 3] and {e["fused_attn"] for e in entries} == {not before[0]}
    assert all(e["threads"] == 1 and not e["dense_measured"] for e in entries)
    assert {e["inputs"] for e in entries} == {"random"}


def test_min_time_calibrates_iterations():
    assert throughput.iters_for(0.01, 0.05) == 5 and throughput.iters_for(1.0, 0.05) == 1
    assert throughput.iters_for(0.01, 0.0) == 1
    assert throughput.iters_for(0.01, 0.05, multiple=4) == 8 and throughput.iters_for(1.0, 0.05, multiple=3) == 3


def test_bf16_autocast_on_cpu_runs():
    (entry,) = throughput.measure(tiny_method("dense"), None, torch.device("cpu"),
                                  fast_settings(dtypes=["bf16"], batch_sizes=[2]), 1.0)
    assert entry["dtype"] == "bf16" and entry["amp"] == "autocast" and entry["img_per_s"] > 0
    # the method is the dense wrapper itself: its speedup over timm is the harness check
    assert entry["dense_wrapper_vs_timm"] == entry["speedup_vs_dense"] and entry["dense_reference"] == "timm"


@pytest.mark.parametrize("name", ["adavit", "dense"])
def test_compile_works_for_ragged_and_fixed_methods_and_is_not_timed(name):
    """``measure.compile=true``: compilation happens in the warm-up and is reported, not timed (aot_eager
    traces with dynamo like inductor but generates no C++, so this stays seconds on CPU)."""
    from test_adavit import mixed_images, mixed_model

    # two blocks for dense: compile time grows with the blocks traced, and what is checked does not depend on them
    method = mixed_model() if name == "adavit" else methods.create_method("dense", make_tiny_vit(depth=2))
    images = mixed_images(4) if name == "adavit" else torch.randn(4, 3, 32, 32)
    settings = fast_settings(batch_sizes=[1, 2], compile=True, compile_backend="aot_eager", repeats=2)
    entries = throughput.measure(method, None, torch.device("cpu"), settings, 0.5, images=images)
    assert [e["batch_size"] for e in entries] == [1, 2]
    for entry in entries:
        assert entry["compile"] and entry["compile_backend"] == "aot_eager"
        assert entry["compile_s"] > 0 and entry["img_per_s"] > 0
        assert len(entry["img_per_s_runs"]) == 2


# -------------------------------------------------------------------------------------------- measure_costs
def measured(method, result, cfg, images=None):
    return costs.measure_costs(method, result, plan.validate(cfg).config.measure, torch.device("cpu"), images)


def test_measure_costs_uses_the_same_backbone_for_dense(tmp_path, monkeypatch):
    seen = {}

    def fake(method, dense, device, settings, ratio, images=None, input_shape=None, pool_size=64):
        seen.update(dense=dense, ratio=ratio, images=images, settings=settings)
        return []

    monkeypatch.setattr(throughput, "measure", fake)
    method = tiny_method("topk") if "topk" in methods.list_methods() else tiny_method("dense")
    counts = method(torch.randn(2, 3, 32, 32)).token_counts
    result = EvalResult({"top1": 0.0}, counts, torch.zeros(2, 64, dtype=torch.long))
    cfg = make_cfg(tmp_path, *FAST, "measure.timing_images=3")
    dataset = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    need = costs.images_needed(plan.validate(cfg).config.measure, torch.device("cpu"))
    images, _ = costs.load_images(dataset, need, 0, 0)
    entries = measured(method, result, cfg, images)
    if isinstance(method, methods.dense.Dense):
        assert seen["dense"] is None
    else:
        assert seen["dense"].vit is method.vit  # same weights, no copy
    assert seen["ratio"] == pytest.approx(entries["flops"]["flops_ratio"])
    assert seen["images"].shape == (3, 3, 32, 32)  # the timing pool: the first measure.timing_images images
    assert entries["flops"]["images"] == 2


def test_efficiency_divides_by_the_flops_of_exactly_the_timed_images(tmp_path, monkeypatch):
    """An adaptive method's FLOPs differ per image: the ratio handed to the timing is the pool's, not the
    evaluation's, computed here by hand from the method's own counts on the pool images."""
    from test_adavit import mixed_images, mixed_model

    from experiments.cost import flops

    seen = {}

    def fake(method, dense, device, settings, ratio, images=None, input_shape=None, pool_size=64):
        seen.update(ratio=ratio, images=images)
        return [{"batch_size": 1, "dtype": "fp32", "img_per_s": 1.0, "speedup_vs_dense": 1.0}]

    monkeypatch.setattr(throughput, "measure", fake)
    method, images = mixed_model(), mixed_images(6)
    with torch.no_grad():
        counts = method(images).token_counts
    result = EvalResult({"top1": 0.0}, counts, torch.zeros(6, 16, dtype=torch.long))
    entries = measured(method, result, make_cfg(tmp_path, *FAST, "measure.timing_images=2"), images)
    with torch.no_grad():
        pool_macs = flops.per_image_macs(method, method(images[:2]).token_counts)
    by_hand = pool_macs.mean().item() / flops.dense_macs(method)
    assert torch.equal(seen["images"], images[:2])
    assert seen["ratio"] == pytest.approx(by_hand, rel=1e-12)
    assert abs(by_hand - entries["flops"]["flops_ratio"]) > 1e-3  # the evaluation's ratio would be wrong here
    assert entries["throughput"][0]["timed_gflops"] == pytest.approx(pool_macs.mean().item() / 1e9)


def test_measure_costs_switches(tmp_path):
    method = tiny_method("dense")
    result = EvalResult({"top1": 0.0}, method.full_counts(2, torch.device("cpu")), torch.zeros(2, 64))
    off = make_cfg(tmp_path, "measure.throughput=false", "measure.flops=false")
    assert measured(method, result, off) == {"flops": None, "throughput": None}
    check = make_cfg(tmp_path, "measure.throughput=false", "measure.fvcore_images=1")
    entries = measured(method, result, check, torch.randn(2, 3, 32, 32))
    assert entries["flops"]["fvcore_check"]["rel_diff"] == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------------------- the measure CLI
@pytest.mark.parametrize("name", methods.list_methods())
def test_measure_run_writes_a_measure_record(tmp_path, name):
    throughput_on = name in ("dense", "evit")
    # a method without its own config file yet runs with its factory defaults
    choose = f"method={name}" if (CONF / "method" / f"{name}.yaml").exists() else f"method.name={name}"
    cfg = make_cfg(tmp_path, choose, *FAST, f"measure.throughput={str(throughput_on).lower()}")
    record = measure_record.measure_run(cfg)
    saved = records.load_record(Path(record["path"]))
    assert saved["kind"] == "measure" and saved["method"] == name and saved["train"]["init"] == "random"
    assert saved["metrics"]["num_images"] == 6 and saved["metrics"]["top1"] is None
    for key in ("model", "data", "seed", "config", "provenance", "tokens", "params", "method_params"):
        assert key in saved
    flops = saved["flops"]
    assert flops["images"] == 6 and flops["gflops_min"] <= flops["gflops"] <= flops["gflops_max"]
    assert flops["convention"] == records.FLOP_CONVENTION and flops["dense_gflops"] > 0
    assert len(saved["tokens"]["attn_mean"]) == 12
    if throughput_on:
        assert [e["batch_size"] for e in saved["throughput"]] == [1, 3]
        assert all(ENTRY_KEYS <= set(e) for e in saved["throughput"])
    else:
        assert saved["throughput"] is None
    line = measure_record.summary_line(record)
    assert {"gflops", "gflops_std", "params_m", "tokens_attn_mean", "throughput"} <= set(line)
    json.dumps(line)


def test_measure_run_without_record(tmp_path):
    record = measure_record.measure_run(make_cfg(tmp_path, *FAST, "measure.record=false", "measure.throughput=false"))
    assert "path" not in record and no_records(tmp_path)


@pytest.mark.slow
def test_cli_prints_one_json_line_and_rejects_bad_input(tmp_path):
    common = [f"paths.results_dir={tmp_path / 'results'}", f"hydra.run.dir={tmp_path / 'run'}", "device=cpu",
              *FAST]
    script = str(ROOT / "experiments" / "measure.py")
    ok = subprocess.run([sys.executable, script, "method=dense", "+model.depth=2", *common], capture_output=True,
                        text=True, cwd=tmp_path, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    lines = [line for line in ok.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["method"] == "dense" and summary["gflops"] > 0 and len(summary["throughput"]) == 2
    assert Path(summary["record"]).is_file()
    bad = subprocess.run([sys.executable, script, "method=dense", *common, "measure.dtypes=[fp64]",
                          f"paths.results_dir={tmp_path / 'bad'}"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert bad.returncode != 0 and "measure.dtypes" in bad.stderr + bad.stdout
    assert "fp32, bf16, fp16" in bad.stderr + bad.stdout and not (tmp_path / "bad").exists()
