"""Per-image compute in records (experiments/cost/per_image.py, ``compute_per_image``): the histogram, the
spread, the rank correlations and their Fisher-z intervals by hand; the schema's checks; the entry a tiny run
writes (a fixed-count method: one bin; an adaptive one: spread)."""
import json
import math

import numpy as np
import pytest

from experiments import records
from experiments.cost import per_image

from test_records import minimal_record


# ------------------------------------------------------------------------------------------------ by hand
def test_a_fixed_count_method_gets_one_bin_with_equal_edges():
    hist = per_image.histogram(np.full(5, 2.5), np.array([1, 0, 1, 1, 0]))
    assert hist == {"edges": [2.5, 2.5], "images": [5], "correct": [3]}


def test_bins_follow_the_distinct_values_up_to_the_cap():
    # three distinct values -> three even bins over [1, 3]: [1, 5/3), [5/3, 7/3), [7/3, 3]
    hist = per_image.histogram(np.array([1.0, 1.0, 2.0, 3.0, 3.0, 3.0]), np.array([1, 1, 0, 1, 0, 0]))
    assert hist["edges"] == pytest.approx([1.0, 5 / 3, 7 / 3, 3.0], abs=1e-12)
    assert hist["images"] == [2, 1, 3] and hist["correct"] == [2, 0, 1]
    many = per_image.histogram(np.arange(200.0) + 1.0, np.ones(200))
    assert len(many["images"]) == 50 and len(many["edges"]) == 51 and sum(many["images"]) == 200
    assert many["images"] == [4] * 50 and many["correct"] == [4] * 50  # the last bin holds its right edge


def test_spearman_and_its_fisher_interval_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y = np.array([2.0, 1.0, 4.0, 3.0, 6.0, 5.0])  # ranks swapped in pairs: d = ±1 each, rho = 1 - 6*6/(6*35)
    entry = per_image.spearman(x, y)
    rho = 1 - 6 * 6 / (6 * 35)
    assert entry["rho"] == pytest.approx(rho, abs=1e-12) and entry["n"] == 6
    half = 1.959963984540054 * math.sqrt(1.06 / 3)  # z_{0.975} * sqrt(1.06 / (n - 3))
    assert entry["ci"] == pytest.approx([math.tanh(math.atanh(rho) - half), math.tanh(math.atanh(rho) + half)],
                                        abs=1e-9)
    # ties take average ranks: x ranks [1.5, 1.5, 3, 4], y ranks [1, 2, 3, 4] -> Pearson r of the ranks
    tied = per_image.spearman(np.array([1.0, 1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert tied["rho"] == pytest.approx(np.corrcoef([1.5, 1.5, 3, 4], [1, 2, 3, 4])[0, 1], abs=1e-12)


def test_a_constant_side_or_too_few_images_has_no_correlation():
    assert per_image.spearman(np.full(10, 3.0), np.arange(10.0)) == {"rho": None, "ci": None, "n": 10}
    assert per_image.spearman(np.arange(3.0), np.arange(3.0)) == {"rho": None, "ci": None, "n": 3}
    assert per_image.fisher_interval(1.0, 10) == (1.0, 1.0)


def test_summarise_gives_the_spread_the_histogram_and_the_ground_truth_correlations():
    gflops = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    correct = np.array([1, 1, 1, 0, 0, 0])  # the images that got more compute were wrong: harder
    entry = per_image.summarise(gflops, correct, dense_gflops=8.0, object_tokens=np.array([1, 2, 3, 4, 5, 6]),
                                clutter=np.array([0.0, 0.0, 0.1, 0.0, 0.2, 0.0]), object_compute_share=0.4)
    assert entry["images"] == 6 and entry["gflops_mean"] == pytest.approx(3.5)
    assert entry["gflops_std"] == pytest.approx(np.std(gflops)) and entry["dense_gflops"] == 8.0
    assert (entry["gflops_min"], entry["gflops_max"]) == (1.0, 6.0)
    assert entry["histogram"]["images"] == [1] * 6 and entry["histogram"]["correct"] == [1, 1, 1, 0, 0, 0]
    assert entry["correlations"]["correct"]["rho"] < 0
    assert entry["correlations"]["object_tokens"]["rho"] == pytest.approx(1.0)
    assert entry["correlations"]["object_tokens"]["ci"] == [1.0, 1.0]
    assert entry["object_compute_share"] == 0.4 and "Spearman" in entry["correlation"]
    records.validate_record({**minimal_record(), "compute_per_image": entry})


# ------------------------------------------------------------------------------------------------- schema
def _entry():
    return per_image.summarise(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1, 0, 1, 1]), 4.0)


@pytest.mark.parametrize("change, message", [
    (lambda e: e["histogram"]["images"].append(0), r"3 edges|4 bins"),
    (lambda e: e["histogram"].update(correct=[9, 0, 0]), r"correct=\[9, 0, 0\] exceeds images"),
    (lambda e: e.update(images=5), r"holds 4 images, not images=5"),
    (lambda e: e.update(gflops_mean=-1.0), r"compute_per_image\.gflops_mean=-1\.0 is outside the valid range > 0"),
    (lambda e: e.update(object_compute_share=1.5), r"object_compute_share=1\.5 is outside the valid range \[0, 1\]"),
    (lambda e: e["correlations"]["correct"].update(rho=0.9, ci=[-0.5, 0.5]), r"does not hold rho=0\.9"),
    (lambda e: e["histogram"].update(edges=[3.0, 2.0, 1.0, 0.5]), r"decrease"),
    (lambda e: e["histogram"].update(edges=list(range(52)), images=[0] * 50 + [4], correct=[0] * 51),
     r"valid: 1\.\.50 bins"),
])
def test_the_schema_refuses_a_bad_entry_naming_it(change, message):
    entry = _entry()
    change(entry)
    with pytest.raises(records.RecordValueError, match=message):
        records.validate_record({**minimal_record(), "compute_per_image": entry})


def test_records_without_the_entry_stay_valid_at_version_1():
    """An optional section: older records (no key) and unmeasured ones (null) are current records."""
    assert records.SCHEMA_VERSION == 1
    records.validate_record(minimal_record())
    records.validate_record({**minimal_record(), "compute_per_image": None})


# ------------------------------------------------------------------------------------------------ a tiny run
@pytest.mark.slow
@pytest.mark.parametrize("method, spread", [("topk", False), ("adavit", True)])
def test_a_tiny_run_records_its_per_image_compute(tmp_path, one_thread, method, spread):
    """On digit scenes (ground truth) the embedded model, off the shelf: top-k's fixed count gives one bin,
    A-ViT's per-image halting (with the gate constants that make untrained heads halt, as the benchmark's) a
    spread; both carry the ground-truth correlations and the object compute share."""
    from experiments import pipeline
    from conftest import run_config

    overrides = ["data=digit_scenes", "data.val_images=48", "baseline.epochs=1", "eval.map_images=0",
                 f"method={method}", "experiment.train=false"]
    if method == "adavit":
        overrides += ["method.params.gate_scale=10", "method.params.gate_center=3.0"]
    pipeline.run(run_config(tmp_path, *overrides))
    [path] = sorted((tmp_path / "results" / "runs").glob("*.json"))
    record = json.loads(path.read_text())
    records.validate_record(record)
    entry = record["compute_per_image"]
    assert entry["images"] == 48 and sum(entry["histogram"]["images"]) == 48
    assert entry["gflops_mean"] == pytest.approx(record["flops"]["gflops"], rel=1e-12)
    assert entry["gflops_std"] == pytest.approx(record["flops"]["gflops_std"], rel=1e-9, abs=1e-15)
    right = sum(entry["histogram"]["correct"])
    assert right == round(record["metrics"]["top1"] * 48 / 100)
    assert entry["object_compute_share"] == pytest.approx(1 - record["tokens"]["objects"]["background_compute"])
    assert set(entry["correlations"]) == {"correct", "object_tokens", "clutter"}
    if spread:
        assert len(entry["histogram"]["images"]) > 1 and entry["gflops_max"] > entry["gflops_min"]
        assert entry["correlations"]["object_tokens"]["rho"] is not None
    else:
        assert len(entry["histogram"]["images"]) == 1 and entry["gflops_std"] == 0.0
        assert all(c["rho"] is None for c in entry["correlations"].values())
    assert len(path.read_bytes()) < 60_000  # compact: no per-image arrays


# -------------------------------------------------------------------------------------- the scenes' clutter
def test_scene_clutter_is_the_fragments_visible_ink():
    from experiments.data.digit_scenes import DigitScenesData, build_digit_scenes

    def clutter(**overrides):
        return build_digit_scenes(DigitScenesData(img_size=32, val_images=40, **overrides)).val.scene_clutter()

    assert clutter(fragments=0).abs().max().item() == 0.0  # no fragments, nothing added
    assert clutter(clutter=0.0).abs().max().item() == 0.0  # fragments without ink
    default = clutter()
    assert default.shape == (40,) and (default >= 0).all() and (default > 0).float().mean() > 0.5
    assert clutter(clutter=0.7).mean() > default.mean()  # brighter fragments, more visible ink
    val = build_digit_scenes(DigitScenesData(img_size=32, val_images=40)).val
    image, mask = val.scene(7)  # the same draws: scene() renders what layers() measured
    layered = val.scenes.layers(7 % len(val.labels), val.generator(7))
    assert (layered[0] == image).all() and (layered[1] == mask).all() and layered[2] == default[7].item()


def test_the_upgrade_fills_the_declared_counterpart_into_older_records():
    import methods
    from experiments.records import upgrade

    old = {**minimal_record(), "method": "ats", "method_params": {}, "method_info": {"family": "pruning"}}
    new = upgrade.upgraded(old, methods.resolved_params, methods.registered_info)
    assert new["method_info"] == {"counterpart": "evit", "family": "pruning"}
    plain = upgrade.upgraded({**old, "method": "evit"}, methods.resolved_params, methods.registered_info)
    assert plain["method_info"] == {"family": "pruning"}  # a fixed-count method declares none
    legacy = upgrade.upgraded(old, methods.resolved_params, lambda m: methods.method_spec(m).family)
    assert legacy["method_info"] == {"family": "pruning"}  # a family callable still works
