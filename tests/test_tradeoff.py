"""Trade-off curves from one checkpoint (``experiments/curve.py``, which ``experiments/tradeoff.py`` runs): compute
by value as each method's knob moves, complete records per point, agreement with a plain run, and bad input
refused before anything is written.

A depth-4 embedded model with random weights (``baseline.enabled=false``) keeps every sweep at a few seconds;
the token counts are those of the fixed-count rules, so they are checked by value.
"""
import json
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from conftest import build_for, run_config
from experiments import curve, pipeline, plan, records
from experiments.train import checkpoints
from experiments.config import ConfigError
from methods.models import CheckpointError

SMALL = ["+model.depth=4", "baseline.enabled=false", "eval.map_images=0"]
AT_1_2_3 = "method.params.locations=[1,2,3]"


def make_cfg(tmp_path, *overrides):
    return run_config(tmp_path, *SMALL, *overrides)


def saved_records(tmp_path):
    folder = tmp_path / "results" / "runs"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []


def save_method_checkpoint(tmp_path, name, *overrides) -> Path:
    """A suite checkpoint of ``name`` (random weights, as run.py writes them after fine-tuning)."""
    cfg = make_cfg(tmp_path, f"method={name}", *overrides)
    method = build_for(cfg, 10)
    path = tmp_path / f"{name}.pth"
    torch.save({"version": checkpoints.CHECKPOINT_VERSION, "method": name, "model": method.state_dict(),
                "method_params": plan.validate(cfg).recorded_params}, path)
    return path


def by_value(done):
    return {r["tradeoff"]["value"]: r for r in done}


def test_fixed_count_methods_give_hand_computed_tokens_and_monotone_flops(tmp_path):
    """topk (floor(64 k^s) patches kept inside blocks 1-3, between attention and MLP) and ToMe (r merged per
    block): per-block counts by hand, FLOPs strictly monotone in the knob, dense at the knob's neutral end."""
    topk = by_value(curve.run(make_cfg(tmp_path, "method=topk", AT_1_2_3, "method.tradeoff_values=[0.25,0.5,1.0]")))
    assert topk[0.25]["tokens"]["attn_mean"] == [65, 65, 17, 5] and topk[0.25]["tokens"]["mlp_mean"] == [65, 17, 5, 2]
    assert topk[0.5]["tokens"]["attn_mean"] == [65, 65, 33, 17] and topk[0.5]["tokens"]["mlp_mean"] == [65, 33, 17, 9]
    assert topk[1.0]["tokens"]["attn_mean"] == [65] * 4
    gflops = [topk[k]["flops"]["gflops"] for k in (0.25, 0.5, 1.0)]
    assert gflops[0] < gflops[1] < gflops[2] and topk[1.0]["flops"]["flops_ratio"] == pytest.approx(1.0)

    tome = by_value(curve.run(make_cfg(tmp_path, "method=tome", "method.tradeoff_values=[0,4,16]")))
    assert [tome[r]["tokens"]["attn_mean"] for r in (0, 4, 16)] == [[65] * 4, [65, 61, 57, 53], [65, 49, 33, 17]]
    assert tome[16]["tokens"]["mlp_mean"] == [49, 33, 17, 9]
    gflops = [tome[r]["flops"]["gflops"] for r in (0, 4, 16)]
    assert gflops[0] > gflops[1] > gflops[2] and tome[0]["flops"]["flops_ratio"] == pytest.approx(1.0)


def test_learned_methods_sweep_their_own_checkpoint(tmp_path):
    """DynamicViT's inference keep rate (kept before blocks 1-3) and A-ViT's gate shift, each on a checkpoint
    of the method; the trained predictors are the checkpoint's, not fresh ones."""
    checkpoint = save_method_checkpoint(tmp_path, "dynamicvit", AT_1_2_3)
    done = by_value(curve.run(make_cfg(tmp_path, "method=dynamicvit", AT_1_2_3, f"model.checkpoint={checkpoint}",
                                          "method.tradeoff_values=[0.5,0.75,1.0]")))
    assert done[0.5]["tokens"]["attn_mean"] == [65, 33, 17, 9]
    assert done[0.75]["tokens"]["attn_mean"] == [65, 49, 37, 28]  # floor(64 x 0.75^s) + CLS
    assert done[0.5]["flops"]["gflops"] < done[0.75]["flops"]["gflops"] < done[1.0]["flops"]["gflops"]
    assert all(r["method_params"]["keep_rate"] == 0.7 for r in done.values())  # the training rho is untouched

    checkpoint = save_method_checkpoint(tmp_path, "adavit", "method.params.halting=head",
                                        "method.params.gate_center=0.0", "method.params.gate_scale=1.0")
    shifts = [-2.0, 0.0, 1.0, 2.0, 4.0]
    done = by_value(curve.run(make_cfg(tmp_path, "method=adavit", "method.params.halting=head",
                                          "method.params.gate_center=0.0", "method.params.gate_scale=1.0",
                                          f"model.checkpoint={checkpoint}", f"method.tradeoff_values={shifts}")))
    gflops = [done[s]["flops"]["gflops"] for s in shifts]
    assert gflops == sorted(gflops) and gflops[0] < gflops[-1]  # larger shift: tokens halt later


def test_every_point_record_is_complete_and_joins_one_curve(tmp_path):
    checkpoint = save_method_checkpoint(tmp_path, "evit", AT_1_2_3)
    cfg = make_cfg(tmp_path, "method=evit", AT_1_2_3, f"model.checkpoint={checkpoint}",
                   "method.tradeoff_values=[0.5,0.9]")
    done = curve.run(cfg)
    saved = saved_records(tmp_path)
    assert len(saved) == 2 and sorted(r["record_id"] for r in saved) == sorted(r["record_id"] for r in done)
    curves = set()
    for record in saved:
        assert set(records.REQUIRED_KEYS) <= set(record) and record["kind"] == "tradeoff"
        assert record["status"] == "complete"
        point = record["tradeoff"]
        assert point["knob"] == "keep_rate" and point["values"] == [0.5, 0.9]
        assert record["method_params"]["keep_rate"] == point["value"]
        assert record["config"]["method"]["params"]["keep_rate"] == point["value"]
        assert point["weights"] == f"checkpoint:{checkpoint}"
        assert point["weights_sha256"] == checkpoints.file_sha256(checkpoint)
        assert 0 <= record["metrics"]["top1"] <= 100 and record["metrics"]["num_images"] == 360
        assert record["flops"]["gflops"] > 0 and len(record["tokens"]["attn_mean"]) == 4
        assert record["train"]["epochs"] == 0 and record["config"]["experiment"]["train"] is False
        assert torch.__version__.startswith(record["provenance"]["packages"]["torch"])
        curves.add(point["curve"])
    assert len(curves) == 1


def test_a_point_equals_a_plain_run_at_that_setting(tmp_path):
    """The sweep rebuilds the method around the same weights: its point at keep 0.7 is run.py's result."""
    checkpoint = save_method_checkpoint(tmp_path, "evit", AT_1_2_3)
    common = ["method=evit", AT_1_2_3, f"model.checkpoint={checkpoint}"]
    point = by_value(curve.run(make_cfg(tmp_path, *common, "method.tradeoff_values=[0.7,1.0]")))[0.7]
    plain = pipeline.run(make_cfg(tmp_path, *common, "method.params.keep_rate=0.7", "experiment.train=false"))
    assert point["metrics"] == plain["metrics"]
    assert point["tokens"]["attn_mean"] == plain["tokens"]["attn_mean"]
    assert point["flops"]["gflops"] == pytest.approx(plain["flops"]["gflops"])


def test_a_calibrated_threshold_curve_calibrates_every_point_as_calibrate_py_would(tmp_path):
    """``threshold=calibrated`` names r a calibration target: each point calibrates on the training split (the
    calibration's defaults) and equals calibrate.py for that r followed by run.py on what it wrote."""
    from conftest import run_paths
    from experiments import calibration
    from test_tome_threshold import compose_calibrate

    source = save_method_checkpoint(tmp_path, "tome")
    done = by_value(curve.run(make_cfg(tmp_path, "method=tome", "method.params.threshold=calibrated",
                                       f"model.checkpoint={source}", "method.tradeoff_values=[2,6]")))
    assert set(done) == {2, 6} and len({r["tradeoff"]["curve"] for r in done.values()}) == 1
    for r, record in done.items():
        assert record["method_params"] == {"r": r, "prop_attn": True, "threshold": "calibrated"}
        assert record["method_info"]["calibration_r"] == [r] * 4 and record["method_info"]["counterpart"] == "tome"
        assert record["tradeoff"]["calibration"] == {"split": "train", "images": 1024, "batch_size": 64, "seed": 0}
    assert done[6]["flops"]["gflops"] < done[2]["flops"]["gflops"]  # a larger target calibrates lower thresholds

    out = tmp_path / "calibrated.pth"
    calibration.run(compose_calibrate(*run_paths(tmp_path / "cal"), *SMALL, "model=deit_digits", "progress=false",
                                      "method.params.r=6", f"model.checkpoint={source}", f"calibration.out={out}"))
    plain = pipeline.run(make_cfg(tmp_path / "plain", "method=tome", "method.params.threshold=calibrated",
                                  "method.params.r=6", f"model.checkpoint={out}"))
    assert done[6]["method_info"]["thresholds"] == plain["method_info"]["thresholds"]
    assert done[6]["metrics"] == plain["metrics"] and done[6]["tokens"]["attn_mean"] == plain["tokens"]["attn_mean"]
    # the report pairs the calibrated run with the control of the weights it was calibrated on
    assert plain["weights"]["calibrated_from_sha256"] == checkpoints.file_sha256(source) == \
        done[6]["weights"]["start_sha256"]


def test_a_calibrated_curve_refuses_a_point_with_nothing_to_calibrate(tmp_path):
    with pytest.raises(ConfigError, match=r"point r=0 cannot be calibrated for method\.params\.threshold="
                                          r"calibrated: method\.params\.r=\[0, 0, 0, 0\] merges nothing"):
        curve.run(make_cfg(tmp_path, "method=tome", "method.params.threshold=calibrated",
                           "method.tradeoff_values=[0,2]"))
    assert not (tmp_path / "results").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_true_fine_tunes_once_then_sweeps(tmp_path):
    done = curve.run(make_cfg(tmp_path, "method=adavit", "experiment.train=true", "train.epochs=1",
                                 "method.tradeoff_values=[-1.0,0.0,1.0]"))
    assert len(done) == 3 and all(r["train"]["epochs"] == 1 for r in done)
    final = tmp_path / "run" / "checkpoints" / "final.pth"
    assert all(r["tradeoff"]["weights_sha256"] == checkpoints.file_sha256(final) for r in done)
    assert not any((tmp_path / "state").rglob("last.pth"))  # resume state cleared once the sweep is recorded


@pytest.mark.parametrize("overrides, error, message", [
    (["method=topk", AT_1_2_3, "method.tradeoff_values=[0.01,0.5]"], ConfigError,
     r"point keep_rate=0\.01 is invalid: method\.params\.keep_rate=0\.01 removes every patch token.*"
     r"valid: a rate in \[0\.2500, 1\]"),
    (["method=evit", AT_1_2_3, "method.tradeoff_values=[0.0,0.5]"], ConfigError,
     r"^method\.tradeoff_values\[0\]=0\.0 must be in \(0, 1\]$"),
    (["method=tome", "method.tradeoff_values=[2,-1]"], ConfigError, r"^method\.tradeoff_values\[1\]=-1 must be "),
    (["method=adavit", "method.tradeoff_values=[0.0,inf]"], ConfigError,
     r"method\.tradeoff_values\[1\]=inf must be in \[-1000000, 1000000\]"),
    (["method=evit", "method.tradeoff_values=[0.5,0.5]"], ConfigError, r"repeats a value"),
    (["method=evit", "method.tradeoff_values=[]"], ConfigError, r"must be a non-empty list of keep_rate values"),
    (["method=evit", "method.tradeoff_values=[high]"], ConfigError, r"method\.tradeoff_values\[0\]='high' must be a number in \(0, 1\]"),
    (["method=evit", "method.tradeoff_values=0.5"], ConfigCompositionException,
     r"Error merging override method\.tradeoff_values=0\.5"),  # a list, typed at composition
    (["method=dense"], ConfigError, r"method=dense has no inference knob to sweep; valid methods: adavit "
                                    r"\(inference_gate_shift\), ats \(budget\), dpcknn \(keep_rate\), "
                                    r"dynamicvit \(inference_keep_rate\)"),
    (["method=dynamicvit", AT_1_2_3], CheckpointError, r"the dense weights has no trained predictors for method "
                                             r"'dynamicvit'.*experiment\.train=true"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        curve.run(make_cfg(tmp_path, *overrides))
    assert not (tmp_path / "results").exists() and not (tmp_path / "run").exists()


def test_a_null_grid_is_the_registered_one(tmp_path):
    """The default grid is written once, at registration; the config overrides it only when set."""
    import methods

    checked = plan.validate(make_cfg(tmp_path, "method=evit", AT_1_2_3, "method.tradeoff_values=null"))
    assert checked.tradeoff_values == list(methods.method_spec("evit").tradeoff_values)
    assert plan.validate(make_cfg(tmp_path, "method=evit", AT_1_2_3, "method.tradeoff_values=[0.5]")).tradeoff_values == [0.5]


def test_a_grid_for_a_method_without_knob_is_refused_by_run_py_too(tmp_path):
    with pytest.raises(ConfigError, match=r"method\.tradeoff_values=\[1\]: method 'dense' has no inference knob"):
        plan.validate(make_cfg(tmp_path, "method=dense", "method.tradeoff_values=[1]"))


def test_a_checkpoint_of_another_method_is_refused(tmp_path):
    checkpoint = save_method_checkpoint(tmp_path, "dynamicvit", AT_1_2_3)
    with pytest.raises(CheckpointError, match=r"trained with method 'dynamicvit', not 'adavit'.*method=dynamicvit"):
        curve.run(make_cfg(tmp_path, "method=adavit", f"model.checkpoint={checkpoint}"))
    assert not (tmp_path / "results").exists()
