"""A swept or set inference knob that another parameter makes inert (issue 27): refused before anything runs,
naming both keys, since every value would record the same result under a different label."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import methods
from experiments import curve, plan
from experiments.config import ConfigError

CONF = Path(__file__).resolve().parents[1] / "experiments" / "conf"
COUNTS = "method.params.token_counts=[65,65,65,65,40,40,40,30,30,30,20,20]"  # deit_digits: 64 patches + CLS


def config(tmp_path, *overrides):
    paths = [f"paths.{key}_dir={tmp_path}/{key}" for key in ("results", "cache", "state", "run")]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[*paths, "baseline.enabled=false", *overrides])


def test_the_registry_names_what_fixes_each_knob():
    assert methods.knob_fixed("topk", {"token_counts": [65], "keep_rate": 0.7}) == "token_counts"
    assert methods.knob_fixed("topk", {"token_counts": None, "keep_rate": 0.7}) is None
    assert methods.knob_fixed("kmedoids", {"patch_counts": [40, 20, 10]}) == "patch_counts"
    assert methods.knob_fixed("evit", {"keep_rate": 0.5}) is None  # nothing fixes EViT's knob
    # ToMe's r with calibrated thresholds names the calibration's target; with given thresholds it is inert
    assert methods.knob_fixed("tome", {"threshold": "calibrated", "r": 4}) is None
    assert methods.knob_fixed("tome", {"threshold": "calibrated", "r": 4}, sweeping=True) == "threshold"
    # ... which a sweep reaches by calibrating every point (experiments/curve.py); given thresholds name nothing
    assert methods.knob_target("tome", {"threshold": "calibrated", "r": 4}) == "threshold"
    assert methods.knob_target("tome", {"threshold": 0.9}) is None and methods.knob_target("tome", {}) is None
    assert methods.knob_target("topk", {"token_counts": [65], "keep_rate": 0.7}) is None
    assert methods.knob_fixed("tome", {"threshold": 0.9, "r": 4}) == "threshold"
    with pytest.raises(ValueError, match=r"knob_fixed_by=\['nope'\] needs an inference knob and factory "):
        methods.register_method("zz_bad_fixed", inference_knob="keep_rate", knob_fixed_by=("nope",))(
            lambda vit, keep_rate=0.5: None)


def test_a_fixed_count_with_the_knob_at_its_default_is_fine(tmp_path):
    built = plan.validate(config(tmp_path, "method=topk", COUNTS))
    assert built.recorded_params["token_counts"][4] == 40


def test_a_knob_set_while_counts_fix_the_compute_is_refused_naming_both(tmp_path):
    with pytest.raises(ConfigError, match=r"method\.params\.keep_rate=0\.5 sets method\.params\.keep_rate, but "
                                          r"method\.params\.token_counts=\[65, .*\] fixes the compute .*valid: "
                                          r"token_counts=null to use keep_rate, or leave keep_rate at its default "
                                          r"\(0\.7\)"):
        plan.validate(config(tmp_path, "method=topk", COUNTS, "method.params.keep_rate=0.5"))
    assert not (tmp_path / "results").exists() and not (tmp_path / "state").exists()


def test_a_swept_knob_while_counts_fix_the_compute_is_refused_naming_both(tmp_path):
    with pytest.raises(ConfigError, match=r"method\.tradeoff_values=\[0\.5, 0\.7\] sweeps method\.params\.keep_rate, "
                                          r"but method\.params\.token_counts="):
        plan.validate(config(tmp_path, "method=topk", COUNTS, "method.tradeoff_values=[0.5,0.7]"))
    # the registered grid (no tradeoff_values given): tradeoff.py refuses it the same way
    with pytest.raises(ConfigError, match=r"tradeoff\.py sweeps method\.params\.keep_rate over \[.*\], but "
                                          r"method\.params\.token_counts=.* every point would be the same"):
        curve.validate_sweep(config(tmp_path, "method=random", COUNTS))
