"""``analysis.families``: the family comparison at matched FLOPs on crafted records, worked out by hand, and
each method's family and order as the report reads them from the records (``method_info.family``, which the
harness writes from the registry)."""
from __future__ import annotations

import math
import re

import pytest

import methods
from analysis import aggregation, curves, families, formatting, load
from test_curves import point_record, write


def run_record(method: str, seed: int, top1: float, ratio: float, **params) -> dict:
    record = point_record(method, "keep_rate", params.pop("keep_rate", None), seed, top1, ratio, **params)
    record["kind"] = "run"
    del record["tradeoff"]
    return record


def test_the_report_reads_each_family_from_the_records(tmp_path):
    """Families come from ``method_info.family`` alone: a record without one shows ``—`` and sorts last; the
    reference (``none``) sorts first, then by family, then by name. No method list is involved: a method
    the report has never seen (``zz_new``) sorts by the family its records declare."""
    new = run_record("topk", 0, 50.0, 0.5, keep_rate=0.5)
    new.update(method="zz_new", record_id="zz_new", method_info={"family": "clustering"})
    old = run_record("evit", 0, 60.0, 0.6, keep_rate=0.6)
    del old["method_info"]  # written before the harness recorded families
    records = [run_record(name, 0, 90.0, 0.7) for name in methods.list_methods()] + [new, old]
    frame = load.load_records(write(tmp_path, records))
    families = formatting.method_families(frame)
    assert families == {**{n: methods.method_spec(n).family for n in methods.list_methods()},
                        "zz_new": "clustering", "evit": methods.method_spec("evit").family}
    assert formatting.method_families(frame[frame["record_id"] == "zz_new"]) == {"zz_new": "clustering"}
    assert formatting.family_of(None) == formatting.family_of({}) == formatting.DASH
    agg = aggregation.aggregate(frame)
    assert list(agg["family"]) == sorted(agg["family"], key=lambda f: (f != "none", f == formatting.DASH, f))
    ranks = sorted(["b", "a", "c", "d"], key=lambda m: formatting.method_rank(
        m, {"a": "pruning", "b": "none", "c": formatting.DASH, "d": "merging"}[m]))
    assert ranks == ["b", "d", "a", "c"]


def test_best_of_each_family_at_matched_flops(tmp_path):
    records = [
        run_record("dense", 0, 95.0, 1.0),
        # topk runs: keep 0.7 at ratio 0.7 (seeds 90, 92 -> 91), keep 0.5 at ratio 0.5 (80)
        run_record("topk", 0, 90.0, 0.7, keep_rate=0.7), run_record("topk", 1, 92.0, 0.7, keep_rate=0.7),
        run_record("topk", 0, 80.0, 0.5, keep_rate=0.5),
        run_record("random", 0, 70.0, 0.5, keep_rate=0.5), run_record("random", 0, 85.0, 0.8, keep_rate=0.8),
        # a ToMe curve from one checkpoint: (0.4, 60) to (0.9, 95)
        point_record("tome", "r", 8, 0, 60.0, 0.4), point_record("tome", "r", 2, 0, 95.0, 0.9),
        run_record("kmedoids", 0, 99.0, 0.6, keep_rate=0.6),  # one point spans no budget
    ]
    frame = load.load_records(write(tmp_path, records))
    agg = aggregation.aggregate(aggregation.without_tradeoff(frame))
    best = families.family_frame(families.family_curves(agg, curves.curve_points(frame)))
    got = {(row.target, row.family): (row.method, row.source, row.top1) for row in best.itertuples()}
    # pruning at 0.65: topk's runs 80 + 0.15 / 0.2 * 11 = 88.25 beat random's 70 + 0.15 / 0.3 * 15 = 77.5;
    # at 0.8 only random spans it (85). Merging: ToMe 60 + 35 * (t - 0.4) / 0.5 = 67, 77.5, 88.
    assert got[(0.5, "pruning")] == ("topk", "runs", pytest.approx(80.0))
    assert got[(0.65, "pruning")] == ("topk", "runs", pytest.approx(88.25))
    assert got[(0.8, "pruning")] == ("random", "runs", pytest.approx(85.0))
    assert [got[(t, "merging")][2] for t in curves.TARGETS] == pytest.approx([67.0, 77.5, 88.0])
    assert got[(0.65, "merging")][:2] == ("tome", "curve")
    assert all(math.isnan(got[(t, "clustering")][2]) for t in curves.TARGETS)
    paths = families.write_family_tables(agg, frame, tmp_path / "report")
    text = (tmp_path / "report" / "families_deit_digits.md").read_text()
    # columns: the compared families by name (merging, then pruning)
    # one seed per curve at 65% (topk's 0.5 setting ran seed 0 only): no interval, so both families are tied
    assert re.search(r"\| 65% of dense \| 77\.50 \(tome, curve, n=1\) +\| 88\.25 \(topk, runs, n=1\) +\| "
                     r"merging, pruning +\|", text), text
    assert "clustering" not in text.split("*Notes.*")[0]  # a family that spans no budget gets no column
    assert "need not carry over to ImageNet" in text and len(paths) == 3


def test_a_family_is_tied_for_best_only_when_its_interval_overlaps_the_best(tmp_path):
    """Three seeds. topk runs at 50% (80, 81, 82) and 70% (90, 91, 92): at 65% each seed's own value is
    v50 + 0.75 x 10 = 87.5, 88.5, 89.5 (mean 88.5, s = 1, half-width 4.302653 / sqrt(3) = 2.484138). ToMe runs
    at 50% (70, 70, 70) and 70% (74 three times): 73 ± 0, far below 88.5 - 2.48: not tied. Random, 87 ± 0 at
    65% (84 and 88 per seed), lies inside topk's interval but is of the same family: only topk is named."""
    records = []
    for seed in range(3):
        records += [run_record("topk", seed, 80.0 + seed, 0.5, keep_rate=0.5),
                    run_record("topk", seed, 90.0 + seed, 0.7, keep_rate=0.7),
                    run_record("tome", seed, 70.0, 0.5, r=8), run_record("tome", seed, 74.0, 0.7, r=4),
                    run_record("random", seed, 84.0, 0.5, keep_rate=0.5),
                    run_record("random", seed, 88.0, 0.7, keep_rate=0.7)]
    frame = load.load_records(write(tmp_path, records))
    agg = aggregation.aggregate(frame)
    best = families.family_frame(families.family_curves(agg, curves.curve_points(frame)), targets=(0.65,))
    got = best.set_index("family")
    assert got.loc["pruning", "top1"] == pytest.approx(88.5) and got.loc["pruning", "method"] == "topk"
    assert got.loc["pruning", "ci"] == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-6) and got.loc["pruning", "n"] == 3
    assert got.loc["merging", "top1"] == pytest.approx(73.0) and got.loc["merging", "ci"] == pytest.approx(0.0)
    assert got["tied"].to_dict() == {"merging": False, "pruning": True}
    table = families.family_table(best, "deit_digits", "digits")
    assert table.display.iloc[0]["Tied for best"] == "pruning"
    assert table.display.iloc[0]["pruning"] == "88.50 ± 2.48 (topk, runs, n=3)"


def test_no_records_no_table(tmp_path):
    assert families.write_family_tables(aggregation.aggregate(load.load_records(write(tmp_path, []))),
                                        load.load_records(tmp_path), tmp_path / "report") == []


@pytest.mark.parametrize("condition,title", [
    ("cpu b32 fp32 t1", "cpu, batch 32, fp32, 1 thread(s)"),  # CPU entries name their threads
    ("cuda b64 bf16", "cuda, batch 64, bf16"),
])
def test_condition_titles_with_and_without_threads(condition, title):
    assert formatting.condition_title(condition) == title
