"""``analysis.curves``: matched-FLOPs interpolation on crafted curves, curve aggregation over seeds from
``tradeoff`` records, the best-method table, and the separation from the main tables."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

import methods
from analysis import aggregation, curves, load, tables
from analysis.load import RecordWarning

B32 = "cpu b32 fp32"


def point_record(method: str, knob: str, value, seed: int, top1: float, ratio: float, img_s: float = 1000.0,
                 **params) -> dict:
    """A minimal, complete ``tradeoff`` record (the fields analysis reads; the family as the harness writes it,
    from the registration)."""
    dense = 0.05
    return {
        "schema_version": 1, "record_id": f"{method}_{knob}_{value}_s{seed}_{sorted(params.items())}",
        "kind": "tradeoff", "status": "complete", "method": method, "method_params": {**params, knob: value},
        "method_info": {"family": methods.method_spec(method).family},
        "model": "deit_digits", "architecture": "deit_digits_patch4_32", "data": "digits", "seed": seed,
        "metrics": {"top1": top1, "top5": 100.0, "num_images": 360},
        "flops": {"gflops": ratio * dense, "dense_gflops": dense, "flops_ratio": ratio},
        "throughput": [{"device": "cpu", "batch_size": 32, "dtype": "float32", "img_per_s": img_s,
                        "dense_img_per_s": 900.0, "speedup_vs_dense": img_s / 900.0}],
        "tradeoff": {"knob": knob, "value": value, "curve": f"{method}-s{seed}"},
        "config": {}, "provenance": {"end_time": "2026-11-25T00:00:00+00:00"},
    }


def write(folder: Path, records: list[dict]) -> Path:
    runs = folder / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for i, record in enumerate(records):
        (runs / f"{i:03d}.json").write_text(json.dumps(record))
    return folder


# --- interpolation on crafted curves ----------------------------------------------------------------------------
@pytest.mark.parametrize("x, y, target, expected", [
    ([0.4, 0.6], [80.0, 90.0], 0.5, 85.0),                       # midpoint
    ([0.4, 0.6, 1.0], [80.0, 90.0, 94.0], 0.8, 92.0),            # second segment
    ([1.0, 0.4, 0.6], [94.0, 80.0, 90.0], 0.45, 82.5),           # unsorted input
    ([0.4, 0.6], [80.0, 90.0], 0.6, 90.0),                       # exactly on a point
    ([0.5, 0.5, 0.7], [80.0, 90.0, 95.0], 0.5, 85.0),            # same FLOPs: averaged
    ([0.5, 0.5, 0.7], [80.0, 90.0, 95.0], 0.6, 90.0),
    ([0.4, float("nan"), 0.8], [80.0, 99.0, 88.0], 0.6, 84.0),   # NaN points ignored
    ([0.4, 0.6, 0.8], [80.0, 70.0, 90.0], 0.7, 80.0),            # non-monotone accuracy is kept as measured
    ([0.65], [81.0], 0.65, 81.0),                                # a single point matches only itself
])
def test_top1_at_flops_interpolates_linearly(x, y, target, expected):
    assert curves.top1_at_flops(x, y, target) == pytest.approx(expected)


@pytest.mark.parametrize("x, y, target", [
    ([0.4, 0.6], [80.0, 90.0], 0.3), ([0.4, 0.6], [80.0, 90.0], 0.61), ([0.65], [81.0], 0.5), ([], [], 0.5),
])
def test_top1_at_flops_never_extrapolates(x, y, target):
    assert math.isnan(curves.top1_at_flops(x, y, target))


def test_top1_at_flops_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        curves.top1_at_flops([0.4, 0.6], [80.0], 0.5)


def test_matched_flops_table_picks_the_best_curve_per_budget():
    """Curve A (0.4,70) (0.6,80) (1.0,90); curve B (0.55,78) (0.7,88) (1.0,90). At 50%: A 75, B out of range;
    at 65%: A 81.25, B 78 + 10 x 0.1/0.15 = 84.67; at 80%: A 85, B 88 + 2 x 0.1/0.3 = 88.67."""
    rows = [("A", 0.4, 70.0), ("A", 0.6, 80.0), ("A", 1.0, 90.0), ("B", 0.55, 78.0), ("B", 0.7, 88.0),
            ("B", 1.0, 90.0)]
    points = pd.DataFrame([{"model": "m", "data": "d", "slug": "m", "label": label, "flops_ratio_mean": x,
                            "top1_mean": y} for label, x, y in rows])
    frame = curves.matched_flops_frame(points)
    assert list(frame["target"]) == [0.5, 0.65, 0.8]
    assert frame["top1[A]"].tolist() == pytest.approx([75.0, 81.25, 85.0])
    assert math.isnan(frame["top1[B]"][0])
    assert frame["top1[B]"][1:].tolist() == pytest.approx([78 + 10 * 0.1 / 0.15, 88 + 2 * 0.1 / 0.3])
    assert frame["best"].tolist() == ["A", "B", "B"]
    assert frame["best_top1"].tolist() == pytest.approx([75.0, 78 + 10 * 0.1 / 0.15, 88 + 2 * 0.1 / 0.3])
    # no per-seed values, so no intervals: nothing separates the curves that span a budget
    assert frame["tied"].tolist() == ["A", "A, B", "A, B"]


def test_matched_flops_marks_every_curve_whose_interval_overlaps_the_best_as_tied():
    """Three seeds per curve, each seed's points at 40% and 60% of dense: at 50% each seed's own value is the
    midpoint. A: 85, 86, 87 (mean 86, s = 1, half-width 4.302653 / sqrt(3) = 2.484138, interval [83.52, 88.48]);
    B: 82, 83, 84 (83 ± 2.484138, up to 85.48: overlaps A's, tied); C: 73, 73, 73 (73 ± 0: not tied)."""
    seeds = {"A": ({0: 80.0, 1: 81.0, 2: 82.0}, {0: 90.0, 1: 91.0, 2: 92.0}),
             "B": ({0: 78.0, 1: 78.0, 2: 78.0}, {0: 86.0, 1: 88.0, 2: 90.0}),
             "C": ({0: 70.0, 1: 70.0, 2: 70.0}, {0: 76.0, 1: 76.0, 2: 76.0})}
    rows = []
    for label, by_x in seeds.items():
        for x, values in zip((0.4, 0.6), by_x):
            rows.append({"model": "m", "data": "d", "slug": "m", "label": label, "flops_ratio_mean": x,
                         "top1_mean": sum(values.values()) / 3, "top1_by_seed": values,
                         "flops_ratio_by_seed": {s: x for s in values}})
    points = pd.DataFrame(rows)
    frame = curves.matched_flops_frame(points, targets=(0.5,))
    row = frame.iloc[0]
    assert row["top1[A]"] == pytest.approx(86.0) and row["top1[B]"] == pytest.approx(83.0)
    assert row["ci[A]"] == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-6) and row["n[A]"] == 3
    assert row["ci[C]"] == pytest.approx(0.0, abs=1e-9)
    assert row["best"] == "A" and row["tied"] == "A, B"
    # B three points lower (80 ± 2.48, up to 82.48 < 83.52) is no longer tied
    shifted = points.assign(top1_by_seed=[{s: v - (3.0 if lab == "B" else 0.0) for s, v in d.items()}
                                          for lab, d in zip(points["label"], points["top1_by_seed"])],
                            top1_mean=points["top1_mean"] - points["label"].eq("B") * 3.0)
    assert curves.matched_flops_frame(shifted, targets=(0.5,))["tied"].tolist() == ["A"]
    table = curves.matched_flops_table(points, "m", "d", targets=(0.5,))
    assert table.display.iloc[0].to_dict() == {"FLOPs budget": "50% of dense", "A": "86.00 ± 2.48 (n=3)",
                                               "B": "83.00 ± 2.48 (n=3)", "C": "73.00 ± 0.00 (n=3)",
                                               "Tied for best": "A, B"}


# --- from records -------------------------------------------------------------------------------------------------
def crafted_results(tmp_path: Path) -> Path:
    records = []
    for seed, shift in ((0, 0.0), (1, 2.0)):  # two seeds: means are the midpoints, stds sqrt(2)
        records += [point_record("evit", "keep_rate", k, seed, top1 + shift, ratio, img_s=1000.0 + 100 * seed)
                    for k, top1, ratio in ((0.5, 80.0, 0.5), (0.7, 86.0, 0.7), (1.0, 94.0, 1.0))]
        records += [point_record("tome", "r", r, seed, top1 + shift, ratio, prop_attn=True)
                    for r, top1, ratio in ((0, 94.0, 1.0), (4, 90.0, 0.6), (8, 84.0, 0.4))]
        for gate in (8.0, 10.0):  # two A-ViT settings: two curves, labelled by their differing parameter
            records += [point_record("adavit", "inference_gate_shift", s, seed, top1 + shift, ratio,
                                     gate_center=gate)
                        for s, top1, ratio in ((-1.0, 85.0 + gate, 0.45), (1.0, 88.0 + gate, 0.75))]
    dense = point_record("dense", "unused", 0, 0, 94.0, 1.0)
    dense.update(kind="run", tradeoff=None, method_params={})
    return write(tmp_path / "results", records + [dense])


def test_curve_points_average_seeds_per_knob_value(tmp_path):
    frame = load.load_records(crafted_results(tmp_path))
    points = curves.curve_points(frame)
    assert set(points["label"]) == {"evit", "tome", "adavit (gate_center=8)", "adavit (gate_center=10)"}
    evit = points[points["method"] == "evit"].set_index("knob_value")
    assert evit.loc[0.7, "top1_mean"] == pytest.approx(87.0) and evit.loc[0.7, "top1_std"] == pytest.approx(2 ** 0.5)
    assert evit.loc[0.7, "n_seeds"] == 2 and evit.loc[0.7, f"img_per_s[{B32}]"] == pytest.approx(1050.0)
    assert list(evit["flops_ratio_mean"]) == [0.5, 0.7, 1.0]  # sorted by compute
    table = curves.matched_flops_table(points, "deit_digits", "digits")
    row = table.numeric.set_index("target")
    # 50%: evit 81, tome 85 + (0.1/0.2) x 6 = 88, adavit@10 96 + (0.05/0.3) x 3 = 96.5
    assert row.loc[0.5, "top1[evit]"] == pytest.approx(81.0)
    assert row.loc[0.5, "top1[tome]"] == pytest.approx(88.0)
    assert row.loc[0.5, "top1[adavit (gate_center=10)]"] == pytest.approx(96.5)
    assert row.loc[0.5, "best"] == "adavit (gate_center=10)"
    # two seeds two points apart everywhere: s = sqrt(2), half-width t_{0.975,1} x sqrt(2) / sqrt(2) = 12.706205,
    # wide enough that every curve spanning 50% is tied with the best
    assert row.loc[0.5, "ci[evit]"] == pytest.approx(12.706205, rel=1e-6) and row.loc[0.5, "n[evit]"] == 2
    assert set(row.loc[0.5, "tied"].split(", ")) == {"evit", "tome", "adavit (gate_center=8)",
                                                     "adavit (gate_center=10)"}
    assert evit.loc[0.7, "top1_ci"] == pytest.approx(12.706205, rel=1e-6)  # the curve figure's band
    assert math.isnan(row.loc[0.8, "top1[adavit (gate_center=8)]"])  # beyond its last point (0.75)
    assert "| 50% of dense |" in table.to_markdown(curves.FOOTNOTE)


def test_tradeoff_points_stay_out_of_the_main_tables_and_get_their_own_files(tmp_path):
    results = crafted_results(tmp_path)
    frame = load.load_records(results)
    out = tmp_path / "report"
    main_files = tables.write_tables(aggregation.aggregate(aggregation.without_tradeoff(frame)), out)
    main = (out / "main_deit_digits.md").read_text()
    assert "dense" in main and "evit" not in main and "tradeoff" not in main
    table_files, figure_files = curves.write_curves(frame, out)
    assert {p.name for p in table_files} == {"matched_flops_deit_digits.md", "matched_flops_deit_digits.tex",
                                             "matched_flops_deit_digits.csv", "tradeoff_points.csv"}
    assert {p.name for p in figure_files} == {"tradeoff_curves_deit_digits.png", "tradeoff_curves_deit_digits.pdf"}
    assert all(p.stat().st_size > 0 for p in table_files + figure_files) and main_files
    again = tmp_path / "again"
    curves.write_curves(frame, again)
    assert (again / "matched_flops_deit_digits.md").read_text() == (out / "matched_flops_deit_digits.md").read_text()


def test_no_tradeoff_records_is_a_note_not_an_error(tmp_path, capsys):
    dense = point_record("dense", "unused", 0, 0, 94.0, 1.0)
    dense.update(kind="run", tradeoff=None, method_params={})
    frame = load.load_records(write(tmp_path / "results", [dense]))
    assert curves.write_curves(frame, tmp_path / "report") == ([], [])
    assert "no tradeoff records" in capsys.readouterr().out


def test_a_tradeoff_record_without_its_knob_is_skipped_by_name(tmp_path):
    broken = point_record("evit", "keep_rate", 0.5, 0, 80.0, 0.5)
    broken["tradeoff"] = {"value": 0.5}
    with pytest.warns(RecordWarning, match=r"000\.json: incomplete record, a tradeoff point without tradeoff\.knob"):
        frame = load.load_records(write(tmp_path / "results", [broken]))
    assert frame.empty


def test_a_budget_no_curve_reaches_shows_a_dash(tmp_path):
    """One curve from 57% to 100% of dense: the 50% row has no value and no best (it crashed the table once:
    the missing best came back as a NaN, which is truthy)."""
    points = pd.DataFrame([{"model": "m", "data": "d", "slug": "m", "label": "A", "flops_ratio_mean": x,
                            "top1_mean": y} for x, y in ((0.57, 76.0), (0.8, 88.0), (1.0, 90.0))])
    table = curves.matched_flops_table(points, "m", "d")
    assert table.display["Tied for best"].tolist() == ["—", "A", "A"]
    assert table.display["A"].tolist()[0] == "—"
    assert "| 50% of dense" in table.to_markdown()
