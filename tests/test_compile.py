"""``torch.compile`` of every registered method (``experiments/cost/compiled.py``): the compiled eval forward equals
the eager one, the ragged methods stop recompiling once their packed lengths are dynamic, a model that cannot
compile is an error naming it (never a silent eager run), and bad compile settings are refused by name.

The equality tests use the ``aot_eager`` backend (dynamo's tracing and AOT autograd's graphs, without inductor's
code generation, so seconds per method on CPU); the recompilation bound uses ``eager`` (recompiling is dynamo's
business alone, whatever the backend)."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import compose_config
from experiments import plan
from experiments.config import ConfigError
from experiments.cost import compiled, throughput
from methods import create_method, list_methods
from methods.dense import Dense
from test_ats import peaked_vit
from test_host_syncs import RAGGED
from test_method_contract import build


@pytest.fixture(autouse=True)
def fresh_dynamo(one_thread):
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def images(batch: int, scale: float, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.slow
@pytest.mark.parametrize("name", list_methods())
def test_compiled_eval_forward_equals_eager(name):
    method = build(name)
    model = compiled.compile_model(method, "aot_eager")
    x = images(4, 2.0)
    with torch.inference_mode(), compiled.strict(name, "aot_eager"):
        eager, out = method(x), model(x)
    torch.testing.assert_close(out.logits, eager.logits, rtol=0, atol=1e-4)
    assert torch.equal(out.token_counts, eager.token_counts)
    if eager.patch_depth is not None:
        assert torch.equal(out.patch_depth, eager.patch_depth)


# The ragged methods on models where their per-image counts differ between images and batches.
VARYING = {"adavit": lambda: build("adavit"),
           "ats": lambda: create_method("ats", peaked_vit(), locations=[1, 2, 3]).eval(),
           "ltmp": lambda: create_method("ltmp", peaked_vit(), merge_threshold=0.5, prune_threshold=0.05).eval()}


def test_every_ragged_method_is_checked():
    assert set(VARYING) == RAGGED


@pytest.mark.parametrize("name", sorted(RAGGED))
def test_ragged_methods_stop_recompiling_across_batches_with_different_counts(name):
    """The first batch compiles every piece between two host syncs, static and then dynamic in the packed length
    as it changes from block to block; later batches, whose images keep other counts, reuse them."""
    method = VARYING[name]()
    model = compiled.compile_model(method, "eager")
    batches = [images(4, scale, seed) for seed, scale in enumerate((2.0, 1.0, 3.0, 0.5, 2.5, 1.5))]
    frames, lengths = [], set()
    with torch.inference_mode(), compiled.strict(name, "eager"):
        for x in batches:
            before = compiled.CompileCount.now()
            out = model(x)
            frames.append(compiled.CompileCount.now().since(before).frames)
            lengths.add(tuple(out.token_counts.sum(dim=0).flatten().tolist()))
            assert torch.equal(out.token_counts, method(x).token_counts)
    assert len(lengths) >= 4  # the batches do differ in their packed lengths
    assert frames[0] > 0
    assert sum(frames[2:]) <= 2, frames  # after two batches: at most a stray specialisation (a length of 1)


class Restless(Dense):
    """A model dynamo recompiles at every call (it guards on a string that changes): the recompile limit."""

    calls = 0

    def forward(self, images):
        self.calls += 1
        self.tag = f"call {self.calls}"
        out = super().forward(images)
        return out if self.tag.endswith(" 1") else out


@pytest.mark.slow  # 3 s alone; minutes on a loaded machine (dynamo recompiles three times)
def test_a_model_that_cannot_stay_compiled_is_an_error_naming_it():
    from conftest import make_tiny_vit

    method = Restless(make_tiny_vit(depth=1))
    settings = throughput.Settings(batch_sizes=[1], dtypes=["fp32"], warmup=1, repeats=1, min_time_s=0.0,
                                   compile=True, compile_backend="eager")
    with pytest.raises(compiled.CompileError, match=r"method Restless cannot run under torch.compile\(backend="
                                                     r"'eager'\).*recompile"), \
            torch._dynamo.config.patch(recompile_limit=2):
        throughput.measure(method, None, torch.device("cpu"), settings, 1.0, images=images(3, 1.0))


def test_compile_both_times_eager_and_compiled_in_one_measurement():
    from conftest import make_tiny_vit

    method = Dense(make_tiny_vit(depth=1))
    settings = throughput.Settings(batch_sizes=[1, 2], dtypes=["fp32"], warmup=1, repeats=2, min_time_s=0.0,
                                   compile="both", compile_backend="eager")
    entries = throughput.measure(method, None, torch.device("cpu"), settings, 1.0, images=images(4, 1.0))
    assert [(e["batch_size"], e["compile"]) for e in entries] == [(1, False), (1, True), (2, False), (2, True)]
    for entry in entries:
        if entry["compile"]:
            assert entry["compile_backend"] == "eager" and entry["compiled_frames"] >= 1
            assert entry["timed_recompiles"] == 0 and entry["speedup_vs_eager_dense"] > 0
        else:
            assert entry["compile_backend"] is None and "recompiles" not in entry


@pytest.mark.parametrize("override, key, valid", [
    ("measure.compile_backend=tvm", "measure.compile_backend", "inductor, aot_eager, eager"),
    ("measure.compile=maybe", "measure.compile", "False, True, both"),
])
def test_bad_compile_settings_name_the_key_and_the_choices(tmp_path, override, key, valid):
    cfg = compose_config(f"paths.results_dir={tmp_path}", "device=cpu", "measure.compile=true", override)
    with pytest.raises(ConfigError) as error:
        plan.validate(cfg)
    assert key in str(error.value) and valid in str(error.value)


def test_an_unknown_backend_is_refused_before_any_timing():
    settings = throughput.Settings(batch_sizes=[1], dtypes=["fp32"], compile=True, compile_backend="tvm")
    with pytest.raises(ValueError, match="measure.compile_backend='tvm' unknown; valid: inductor, aot_eager, eager"):
        throughput.measure(build("dense"), None, torch.device("cpu"), settings, 1.0)


def test_dynamic_from_the_first_call_compiles_fewer_frames_than_automatic_dynamic_shapes():
    """``compile_dynamic=True`` (experiments/compile_strategies.py): the ragged method's frames are symbolic from
    its first forward, so its first forward compiles fewer frames than automatic dynamic shapes (which compile
    each piece for its first length, then again as dynamic when the length shrinks in a later block)."""
    method = create_method("adavit", peaked_vit(), gate_center=1.5, gate_scale=5.0).eval()
    pool = images(6, 1.0)
    counts = {}
    for dynamic in (None, True):
        torch._dynamo.reset()
        settings = throughput.Settings(batch_sizes=[1, 3], dtypes=["fp32"], warmup=1, repeats=1, min_time_s=0.0,
                                       compile=True, compile_backend="eager", compile_dynamic=dynamic)
        entries = throughput.measure(method, None, torch.device("cpu"), settings, 1.0, images=pool)
        counts[dynamic] = [(e["compiled_frames"], e["recompiles"], e["timed_recompiles"]) for e in entries]
    assert all(timed == 0 for *_, timed in counts[None] + counts[True])
    assert counts[True][0][0] < counts[None][0][0]  # first forward, batch 1
    assert sum(later for _, later, _ in counts[True]) == 0


def test_compile_strategies_prints_one_line_per_strategy_and_refuses_unknown_ones(tmp_path, capsys):
    import json
    from conftest import run_paths
    from experiments import compile_strategies

    overrides = [*run_paths(tmp_path), "method=adavit", "model=deit_digits", "+model.depth=2",
                 "measure.compile_backend=eager", "measure.timing_images=4", "measure.batch_sizes=[2]",
                 "measure.warmup=1", "measure.repeats=1", "measure.min_time_s=0", "measure.wrapper_check=false"]
    compile_strategies.strategies_task.__wrapped__(compose_config(*overrides))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(line["strategy"], line["batch_size"]) for line in lines] == [("auto", 2), ("dynamic", 2)]
    assert all(line["img_per_s"] > 0 and line["timed_recompiles"] == 0 for line in lines)
    with pytest.raises(ConfigError, match=r"strategies=\['bucketed'\]: unknown \['bucketed'\]; valid: auto, dynamic"):
        compile_strategies.chosen_strategies(compose_config(*overrides, "+strategies=[bucketed]"))
