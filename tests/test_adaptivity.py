"""The report's "what adaptivity buys" (analysis/adaptivity.py, analysis/adaptivity_report.py) on fabricated
records, every number by hand: the spread as fractions of dense, accuracy per compute group, correlations over
seeds, re-binning, and the oracle comparison of an adaptive curve with its declared counterpart's at matched
mean FLOPs (paired by seed)."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis import adaptivity, adaptivity_report, curves, load
from test_curves import point_record, write

DENSE = 0.05  # GFLOPs of the fabricated backbone


def entry(gflops_values, correct_flags, **extra):
    """A ``compute_per_image`` entry as the harness writes it (experiments/cost/per_image.py)."""
    import numpy as np
    from experiments.cost import per_image

    return per_image.summarise(np.asarray(gflops_values, dtype=float), np.asarray(correct_flags), DENSE, **extra)


def run_record(method: str, seed: int, compute: dict, family: str, counterpart=None, objects=None, **params):
    info = {"family": family, **({"counterpart": counterpart} if counterpart else {})}
    top1 = 100.0 * sum(compute["histogram"]["correct"]) / compute["images"]
    return {
        "schema_version": 1, "record_id": f"{method}_s{seed}_{sorted(params.items())}", "kind": "run",
        "status": "complete", "method": method, "method_params": params, "method_info": info,
        "model": "deit_digits", "architecture": "deit_digits_patch4_32", "data": "digit_scenes", "seed": seed,
        "metrics": {"top1": top1, "num_images": compute["images"]},
        "flops": {"gflops": compute["gflops_mean"], "dense_gflops": DENSE,
                  "flops_ratio": compute["gflops_mean"] / DENSE},
        "tokens": {"objects": objects} if objects else None, "compute_per_image": compute,
        "config": {}, "provenance": {"end_time": "2026-11-25T00:00:00+00:00"},
    }


# eight images; the adaptive method spends 0.02, 0.03 or 0.04 GFLOPs and gets the costly ones wrong
ADAPTIVE_G = [0.02, 0.02, 0.02, 0.02, 0.03, 0.03, 0.04, 0.04]
ADAPTIVE_RIGHT = [1, 1, 1, 1, 1, 0, 0, 0]


@pytest.fixture
def frame(tmp_path):
    truth = {"object_tokens": [3, 3, 4, 4, 6, 6, 8, 9], "clutter": [0.0, 0.1, 0.0, 0.2, 0.1, 0.0, 0.3, 0.2]}
    recs = [run_record("topk", seed, entry([0.03] * 8, [1, 1, 1, 1, 1, 1, 0, 0], **truth), "pruning",
                       objects={"object_share": 0.25}) for seed in (0, 1)]
    recs += [run_record("adavit", seed, entry(ADAPTIVE_G, ADAPTIVE_RIGHT, object_compute_share=0.3 + 0.1 * seed,
                                              **truth), "halting", counterpart="topk",
                        objects={"object_share": 0.25}) for seed in (0, 1)]
    return load.load_records(write(tmp_path, recs))


def test_spread_is_read_as_fractions_of_dense_and_adaptivity_from_the_numbers(frame):
    rows = adaptivity.settings_frame(frame).set_index("method")
    assert list(rows.index) == ["adavit", "topk"]  # by family (halting < pruning), then name
    fixed, adaptive = rows.loc["topk"], rows.loc["adavit"]
    assert not fixed["adaptive"] and fixed["std"] == 0.0 and fixed["min"] == fixed["max"] == pytest.approx(0.6)
    assert adaptive["adaptive"] and adaptive["mean"] == pytest.approx(0.0275 / DENSE)
    assert (adaptive["min"], adaptive["max"]) == (pytest.approx(0.4), pytest.approx(0.8))
    std = math.sqrt(sum((g - 0.0275) ** 2 for g in ADAPTIVE_G) / 8)  # ddof 0, as flops.gflops_std
    assert adaptive["std"] == pytest.approx(std / DENSE)


def test_accuracy_per_compute_group_by_hand():
    # bins 0.02 (4 images, 4 right), 0.03 (2, 1), 0.04 (2, 0): middles at 2, 5, 7 of 8 -> groups 1, 2, 3
    groups = adaptivity.accuracy_groups(entry(ADAPTIVE_G, ADAPTIVE_RIGHT))
    assert [g["share"] for g in groups] == [0.0, 0.5, 0.25, 0.25]
    assert math.isnan(groups[0]["top1"]) and [g["top1"] for g in groups[1:]] == [100.0, 50.0, 0.0]
    assert adaptivity.accuracy_groups(entry([0.03] * 8, [1] * 8)) is None  # one compute level: no groups


def test_the_accuracy_table_says_costly_images_are_harder(frame):
    rows = adaptivity.settings_frame(frame).set_index("method")
    assert rows.loc["adavit", "group3"] == 0.0 and rows.loc["adavit", "group1"] == 100.0
    assert rows.loc["adavit", "rho[correct]"] < 0 and rows.loc["adavit", "source[correct]"] == "seeds"
    assert math.isnan(rows.loc["topk", "rho[correct]"])  # constant compute goes with nothing


def test_correlations_over_seeds_and_for_one_seed():
    one = adaptivity.combine_correlations([{"rho": 0.5, "ci": [0.1, 0.8], "n": 30}, None])
    assert one == {"rho": 0.5, "low": 0.1, "high": 0.8, "n": 1, "source": "fisher-z"}
    two = adaptivity.combine_correlations([{"rho": 0.2, "ci": [0.0, 0.4], "n": 30},
                                           {"rho": 0.4, "ci": [0.2, 0.6], "n": 30}])
    half = 12.706204736174705 * math.sqrt(0.02) / math.sqrt(2)  # t_{0.975,1} * s / sqrt(n), s = sqrt(0.02)
    assert two["rho"] == pytest.approx(0.3) and two["high"] - two["rho"] == pytest.approx(half)
    assert adaptivity.combine_correlations([{"rho": None, "ci": None, "n": 8}])["n"] == 0


def test_object_share_and_ground_truth_correlations(frame):
    rows = adaptivity.settings_frame(frame).set_index("method")
    assert rows.loc["adavit", "object_compute_share"] == pytest.approx(0.35)
    assert rows.loc["adavit", "object_compute_share_ci"] == pytest.approx(12.706204736174705 * 0.05)
    assert rows.loc["adavit", "rho[object_tokens]"] > 0.8  # costlier images hold bigger objects here
    assert rows.loc["topk", "object_token_share"] == 0.25


def test_rebin_spreads_a_bin_evenly_and_keeps_a_fixed_count_a_point():
    assert list(adaptivity.rebin([0.0, 2.0], [4], [0.0, 1.0, 2.0])) == [2.0, 2.0]
    assert list(adaptivity.rebin([0.0, 1.0, 3.0], [2, 4], [0.0, 2.0, 4.0])) == [4.0, 2.0]
    assert list(adaptivity.rebin([0.6, 0.6], [8], [0.0, 0.5, 1.0])) == [0.0, 8.0]
    assert list(adaptivity.rebin([1.0, 1.0], [8], [0.0, 0.5, 1.0])) == [0.0, 8.0]  # the right edge: last bin


def test_the_section_writes_its_tables_and_figure(frame, tmp_path):
    paths = adaptivity_report.write_adaptivity_section(frame, tmp_path / "out")
    names = sorted(p.name for p in paths)
    for stem in ("spread", "accuracy", "objects"):
        assert f"adaptivity_{stem}_deit_digits.md" in names
    assert "adaptivity_compute_deit_digits.png" in names
    spread = (tmp_path / "out" / "adaptivity_spread_deit_digits.md").read_text()
    assert "| topk " in spread and "0.600" in spread
    accuracy = (tmp_path / "out" / "adaptivity_accuracy_deit_digits.md").read_text()
    assert "topk" not in accuracy.split("*Notes.*")[0]  # one compute level: not in the accuracy table


# --- the oracle question: an adaptive curve against its declared counterpart's -----------------------------
def curve_records(counterpart="topk"):
    """adavit (declaring ``counterpart``) and topk curves, two seeds each, on digits."""
    recs = []
    for seed, shift in ((0, 0.0), (1, 2.0)):
        for value, (ratio, top1) in enumerate([(0.4, 80.0), (0.6, 90.0), (1.0, 96.0)]):
            record = point_record("adavit", "inference_gate_shift", value, seed, top1 + shift, ratio)
            record["method_info"]["counterpart"] = counterpart
            recs.append(record)
        for value, (ratio, top1) in zip((0.5, 0.7, 1.0), [(0.4, 78.0), (0.6, 84.0), (1.0, 96.0)]):
            recs.append(point_record("topk", "keep_rate", value, seed, top1 - shift, ratio))
    return recs


def test_per_image_allocation_against_the_fixed_count_at_matched_flops(tmp_path):
    frame = load.load_records(write(tmp_path, curve_records()))
    oracle = adaptivity.oracle_frame(frame, targets=(0.5, 0.8)).set_index("target")
    # at 0.5: adavit 85 (+2 for seed 1), topk 81 (-2): per-seed Δ 4 and 8 -> mean 6, CI t_1 * 2.828 / sqrt(2)
    assert oracle.loc[0.5, "top1_adaptive"] == pytest.approx(86.0) and oracle.loc[0.5, "top1_fixed"] == 80.0
    assert oracle.loc[0.5, "delta"] == pytest.approx(6.0) and oracle.loc[0.5, "n"] == 2
    assert oracle.loc[0.5, "ci"] == pytest.approx(12.706204736174705 * math.sqrt(8) / math.sqrt(2))
    assert oracle.loc[0.5, "verdict"] == "tied"  # two seeds: a wide interval
    # at 0.8: adavit 93 (+2), topk 90 (-2): Δ 3 and 7
    assert oracle.loc[0.8, "delta"] == pytest.approx(5.0)
    assert set(oracle["adaptive"]) == {"adavit"} and set(oracle["counterpart"]) == {"topk"}


def test_the_counterpart_comes_from_the_records_not_the_name(tmp_path):
    """Declared as dpcknn in the records: no topk row; undeclared: no comparison at all."""
    frame = load.load_records(write(tmp_path / "a", curve_records(counterpart="dpcknn")))
    assert adaptivity.oracle_frame(frame).empty
    assert set(curves.curve_points(frame).groupby("method")["counterpart"].first().items()) == \
        {("adavit", "dpcknn"), ("topk", "")}
    plain = [r for r in curve_records() if r["method"] != "adavit"]
    assert adaptivity.oracle_frame(load.load_records(write(tmp_path / "b", plain))).empty


def test_a_curve_declaring_its_own_method_meets_that_method_s_fixed_curves_only(tmp_path):
    """Threshold ToMe's records are method tome declaring tome: its curve meets the fixed-r ToMe curve, whose
    records declare nothing, and never itself."""
    recs = []
    for seed, shift in ((0, 0.0), (1, 2.0)):
        for value, (ratio, top1) in zip((1, 2, 3), [(0.4, 80.0), (0.6, 90.0), (1.0, 96.0)]):
            record = point_record("tome", "r", value, seed, top1 + shift, ratio, threshold="calibrated")
            record["method_info"]["counterpart"] = "tome"
            record["tradeoff"]["curve"] = f"dtome-s{seed}"
            recs.append(record)
            recs.append(point_record("tome", "r", value, seed, top1 - 4 - shift, ratio))
    oracle = adaptivity.oracle_frame(load.load_records(write(tmp_path, recs)), targets=(0.5,))
    assert len(oracle) == 1 and oracle["adaptive"].iloc[0] != oracle["counterpart"].iloc[0]
    assert "calibrated" in oracle["adaptive"].iloc[0]
    # at 0.5: adaptive 85 (+2 for seed 1), fixed 81 (-2): per-seed Δ 4 and 8 -> 6
    assert oracle["delta"].iloc[0] == pytest.approx(6.0) and oracle["n"].iloc[0] == 2


def test_verdicts():
    assert adaptivity.verdict(3.0, 1.0) == "per-image" and adaptivity.verdict(-3.0, 1.0) == "fixed"
    assert adaptivity.verdict(0.5, 1.0) == "tied" and adaptivity.verdict(2.0, math.nan) == "one seed"
    assert adaptivity.verdict(math.nan, math.nan) == "—"


def test_records_without_per_image_compute_give_a_note_and_no_files(tmp_path, capsys):
    frame = load.load_records(write(tmp_path, [r for r in curve_records() if r["method"] == "topk"]))
    assert adaptivity_report.write_adaptivity_section(frame, tmp_path / "out") == []
    assert "note:" in capsys.readouterr().out
    assert adaptivity.settings_frame(pd.DataFrame()).empty


def test_the_section_stays_torch_free():
    """Like the rest of analysis/ (tests/test_analysis.py): records package and metric registry only."""
    import subprocess
    import sys

    from test_analysis import HARNESS_READ_BY_ANALYSIS, ROOT

    script = ("import sys, analysis.adaptivity, analysis.adaptivity_report; "
              f"allowed = {HARNESS_READ_BY_ANALYSIS!r}; "
              "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'methods', 'timm', 'hydra', 'omegaconf')"
              " or (m.startswith('experiments') and m not in allowed and not m.startswith('experiments.records.'))]; "
              "assert not bad, bad")
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=120)
