"""Tests of ``analysis/``: loading, tables against hand-computed aggregates, Pareto fronts, robustness to bad or
missing input, determinism, and the headless notebook on the fixture records (``tests/fixtures/records``)."""
from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import aggregation, depth_figures, formatting, load, pareto, plots, run_report, tables
from analysis.load import RecordWarning
from test_curves import point_record

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "records"
BAD_FILES = ("corrupt_evit_s0.json", "incomplete_tome_s0.json")
B32 = "cpu b32 fp32"


def fixture_records() -> pd.DataFrame:
    with pytest.warns(RecordWarning):
        return load.load_records(FIXTURES)


def raw_records(method: str, **params) -> list[dict]:
    """The fixture JSON files of one setting, read without the analysis code."""
    out = []
    for path in sorted(FIXTURES.glob("2*.json")):
        record = json.loads(path.read_text())
        if record["method"] == method and all(record["method_params"].get(k) == v for k, v in params.items()):
            out.append(record)
    return out


def copy_results(tmp_path: Path, names=None) -> Path:
    """The fixture records laid out like a results folder: ``<results>/runs/*.json``."""
    runs = tmp_path / "results" / "runs"
    runs.mkdir(parents=True)
    for path in sorted(FIXTURES.glob("*.json")):
        if names is None or path.name in names:
            shutil.copy(path, runs / path.name)
    return tmp_path / "results"


def table_row(table: tables.Table, **match) -> dict:
    frame = table.display
    mask = np.ones(len(frame), dtype=bool)
    for column, value in match.items():
        mask &= (frame[column] == value).to_numpy()
    assert mask.sum() == 1, f"expected one row matching {match}, got {mask.sum()}"
    return frame[mask].iloc[0].to_dict()


# --- loading --------------------------------------------------------------------------------------------------

def test_load_fixture_set_skips_the_two_bad_files_by_name():
    with pytest.warns(RecordWarning) as caught:
        records = load.load_records(FIXTURES)
    messages = [str(w.message) for w in caught]
    for name in BAD_FILES:
        assert any(name in m for m in messages), f"no warning names {name}: {messages}"
    assert len(records) == len(list(FIXTURES.glob("2*.json"))) == 45
    assert records["kind"].value_counts().to_dict() == {"run": 44, "measure": 1}
    assert set(records["method"]) == {"dense", "adavit", "dynamicvit", "evit", "tome", "topk", "random", "ats"}


def test_corrupt_record_is_skipped_with_a_warning_naming_the_file(tmp_path):
    good = sorted(FIXTURES.glob("2*_evit_*.json"))[:2]
    for path in good:
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "broken_run.json").write_text('{"schema_version": 1, "record_id": ')
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "a_list.json").write_text("[1, 2, 3]")
    with pytest.warns(RecordWarning) as caught:
        records = load.load_records(tmp_path)
    messages = " ".join(str(w.message) for w in caught)
    assert "broken_run.json" in messages and "corrupt" in messages
    assert "a_list.json" in messages  # found recursively, skipped
    assert sorted(records["record_id"]) == sorted(json.loads(p.read_text())["record_id"] for p in good)


def test_incomplete_record_is_skipped_with_a_warning_naming_the_file(tmp_path):
    record = json.loads(next(FIXTURES.glob("2*_dense_*.json")).read_text())
    (tmp_path / "ok.json").write_text(json.dumps(record))
    (tmp_path / "running.json").write_text(json.dumps({**record, "record_id": "r2", "status": "running"}))
    (tmp_path / "no_metrics.json").write_text(json.dumps({k: v for k, v in record.items() if k != "metrics"}))
    with pytest.warns(RecordWarning) as caught:
        records = load.load_records(tmp_path)
    messages = " ".join(str(w.message) for w in caught)
    assert "running.json" in messages and "no_metrics.json" in messages
    assert list(records["record_id"]) == [record["record_id"]]


def test_older_duplicate_of_the_same_run_is_superseded(tmp_path):
    record = json.loads(next(FIXTURES.glob("2*_dense_*_s0_*.json")).read_text())
    newer = {**record, "record_id": "newer", "metrics": {**record["metrics"], "top1": 50.0},
             "provenance": {**record["provenance"], "end_time": "2030-01-01T00:00:00+00:00"}}
    (tmp_path / "old.json").write_text(json.dumps(record))
    (tmp_path / "new.json").write_text(json.dumps(newer))
    with pytest.warns(RecordWarning, match="old.json"):
        records = load.load_records(tmp_path)
    assert list(records["record_id"]) == ["newer"] and records["top1"].iloc[0] == 50.0


def test_empty_results_folder_gives_a_clear_message(tmp_path, capsys):
    empty = tmp_path / "results"
    empty.mkdir()
    records = load.load_records(empty)
    assert records.empty
    message = load.summary(records, empty)
    assert "No usable records" in message and str(empty) in message and "nothing to report" in message
    agg = aggregation.aggregate(aggregation.without_tradeoff(records))
    assert agg.empty and tables.write_tables(agg, empty / "report") == []
    assert plots.write_figures(agg, records, empty / "report") == []
    assert not (empty / "report").exists()
    missing = tmp_path / "nowhere"
    assert "No results folder" in load.summary(load.load_records(missing), missing)
    # the headless entry point: a message and exit 0 for an empty folder, exit 2 for a missing one
    capsys.readouterr()
    assert run_report.run(empty, timeout=120) == 0
    out = capsys.readouterr()
    assert "No usable records" in out.out and "Traceback" not in out.out + out.err
    assert not (empty / "report").exists()
    assert run_report.main([str(missing)]) == 2
    assert "no results folder" in capsys.readouterr().err


# --- tables ---------------------------------------------------------------------------------------------------

def test_efficiency_uses_the_timed_images_flops_and_threads_are_separate_conditions(tmp_path):
    """Protocol-2 entries carry the FLOPs ratio of the images they timed: efficiency divides by that one, not
    the record's (evaluation) ratio; CPU entries at 1 and 2 threads are two conditions, never averaged."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (source,) = [p for p in sorted(FIXTURES.glob("2*evit*.json"))
                 if json.loads(p.read_text())["method_params"].get("keep_rate") == 0.7][:1]
    record = json.loads(source.read_text())
    base = {"device": "cpu", "batch_size": 32, "dtype": "fp32", "timing_protocol": 2, "flops_ratio": 0.5}
    record["throughput"] = [{**base, "threads": 1, "speedup_vs_dense": 1.8, "img_per_s": 180.0,
                             "dense_img_per_s": 100.0},
                            {**base, "threads": 2, "speedup_vs_dense": 1.6, "img_per_s": 320.0,
                             "dense_img_per_s": 200.0}]
    (runs / source.name).write_text(json.dumps(record))
    agg = aggregation.aggregate(load.load_records(runs))
    row = agg.iloc[0]
    assert agg.attrs["conditions"] == ["cpu b32 fp32 t1", "cpu b32 fp32 t2"]
    assert row["efficiency_mean[cpu b32 fp32 t1]"] == pytest.approx(0.9)  # 1.8 x 0.5, not x the record's
    assert row["efficiency_mean[cpu b32 fp32 t2]"] == pytest.approx(0.8)
    assert row["flops_ratio_mean"] != pytest.approx(0.5)


def test_table_values_match_hand_computed_aggregates():
    agg = aggregation.aggregate(fixture_records())
    main = tables.main_table(agg, "deit_digits", "digits")

    # top-1 mean ± 95% CI half-width over seeds (t_{0.975,n-1} s / sqrt(n)), values chosen by hand in
    # tests/fixtures/make_records.py; dense 97, 97.5, 98: s = 0.5, 4.302653 x 0.5 / sqrt(3) = 1.2421
    top1, delta = tables.TOP1_COLUMN, tables.DELTA_COLUMN
    dense = table_row(main, Method="dense")
    assert dense[top1] == "97.50 ± 1.24" and dense[delta] == formatting.DASH  # fine-tuned, no baseline here
    evit = table_row(main, Method="evit", Setting="keep_rate=0.7")
    # every fixture record is fine-tuned (train.epochs 3, no recipe): the control is dense fine-tuned, paired by
    # seed; evit 96, 96.5, 97 against 97, 97.5, 98: every difference -1, so the interval has zero width
    assert evit[top1] == "96.50 ± 1.24" and evit[delta] == "-1.00 ± 0.00"
    assert evit["Δ against"] == "dense, fine-tuned"
    # 95.0, 95.5, 96.6: mean 95.7, s = sqrt((0.49 + 0.04 + 0.81) / 2) = 0.8185, x 4.302653 / sqrt(3) = 2.0333;
    # differences -2, -2, -1.4: mean -1.8, s = sqrt((0.04 + 0.04 + 0.16) / 2) = 0.3464, half 0.8605
    adavit = table_row(main, Method="adavit", Setting="ponder_weight=0.001, prior=correct, target_depth=8")
    assert adavit[top1] == "95.70 ± 2.03" and adavit[delta] == "-1.80 ± 0.86"
    # two seeds, 95.0 and 95.5: s = 0.3536, t_{0.975,1} = 12.7062, half 3.1766; paired with dense seeds 0 and 1
    # (97, 97.5): both differences -2
    ats = table_row(main, Method="ats")
    assert ats[top1] == "95.25 ± 3.18" and ats[delta] == "-2.00 ± 0.00"
    assert table_row(main, Method="ats")["GFLOPs"] == formatting.DASH  # not measured
    assert table_row(main, Method="dense")["Seeds"] == "3"
    assert not (main.display["Setting"] == "keep_rate=0.6").any()  # the corrupt record stays out
    measured = table_row(main, Method="tome", Setting="r=4 [measure]")  # untrained: costs only, own row
    assert measured[top1] == formatting.DASH and measured["Seeds"] == "1" and measured[delta] == formatting.DASH
    assert table_row(main, Method="tome", Setting="r=4")[top1] == "96.00 ± 1.24"
    assert main.notes == []  # every control is there

    # GFLOPs change vs dense and efficiency, from the raw JSON
    raw = raw_records("evit", keep_rate=0.7)
    ratios = [r["flops"]["gflops"] / r["flops"]["dense_gflops"] for r in raw]
    change = (statistics.mean(ratios) - 1) * 100
    speedups = [next(t["speedup_vs_dense"] for t in r["throughput"] if t["batch_size"] == 32) for r in raw]
    efficiency = statistics.mean(s * q for s, q in zip(speedups, ratios))
    assert evit["GFLOPs"] == f"{statistics.mean(r['flops']['gflops'] for r in raw):.3f}"
    assert evit["Δ GFLOPs"] == f"{change:+.1f}%" == "-33.4%"
    assert evit[f"Speedup ({B32})"] == f"{statistics.mean(speedups):.2f}×"
    assert evit[f"Eff. ({B32})"] == f"{efficiency:.2f}"
    row = agg[(agg["method"] == "evit") & (agg["setting"] == "keep_rate=0.7")].iloc[0]
    assert row["gflops_change_pct"] == pytest.approx(change, rel=1e-12)
    assert row[f"efficiency_mean[{B32}]"] == pytest.approx(efficiency, rel=1e-12)
    assert row[f"efficiency_std[{B32}]"] == pytest.approx(statistics.stdev(s * q for s, q in zip(speedups, ratios)))
    assert row["top1_std"] == pytest.approx(0.5)  # the CSV keeps the std next to the interval
    assert row["top1_ci"] == pytest.approx(4.302653 * 0.5 / 3 ** 0.5, rel=1e-6) and row["top1_n"] == 3
    csv = main.numeric.set_index(["method", "setting"]).loc[("evit", "keep_rate=0.7")]
    assert csv["top1_std"] == pytest.approx(0.5) and csv["top1_delta_ci"] == pytest.approx(0.0, abs=1e-9)


def test_ablation_has_one_column_per_differing_param():
    agg = aggregation.aggregate(fixture_records())
    ablation = tables.ablation_table(agg, "deit_digits", "digits", "adavit")
    assert list(ablation.display.columns[:3]) == ["ponder_weight", "prior", "target_depth"]
    assert len(ablation.display) == 3
    row = table_row(ablation, prior="official")
    # 94, 94, 94 against dense 97, 97.5, 98: differences -3, -3.5, -4, s = 0.5, half 4.302653 x 0.5 / sqrt(3)
    assert row["target_depth"] == "6" and row[tables.TOP1_COLUMN] == "94.00 ± 0.00"
    assert row[tables.DELTA_COLUMN] == "-3.50 ± 1.24"
    assert "gate_scale" not in ablation.display.columns  # the same in every setting
    assert tables.ablation_table(agg, "deit_digits", "digits", "no_such_method") is None
    assert tables.ablation_table(agg, "deit_digits", "digits", "dense") is None  # one setting: nothing to ablate
    # any method with several settings gets one, e.g. the fixtures' top-k at two keep ratios
    topk = tables.ablation_table(agg, "deit_digits", "digits", "topk")
    assert list(topk.display.columns[:1]) == ["keep_ratio"] and len(topk.display) == 2
    assert topk.title == "topk ablation: deit_digits on digits"


def test_every_method_with_several_settings_gets_an_ablation_file(tmp_path):
    agg = aggregation.aggregate(fixture_records())
    names = {p.name for p in tables.write_tables(agg, tmp_path) if p.suffix == ".md"}
    runs = agg[agg["model"] == "deit_digits"]
    several = {m for m, n in runs.groupby("method")["params_key"].nunique().items() if n > 1}
    assert {n.removesuffix("_ablation_deit_digits.md") for n in names if "_ablation_" in n} == several
    assert "adavit" in several and "dense" not in several


def test_table_files_are_written_and_deterministic(tmp_path):
    records = fixture_records()
    first = tables.write_tables(aggregation.aggregate(records), tmp_path / "a")
    shuffled = records.sample(frac=1.0, random_state=3).reset_index(drop=True)
    second = tables.write_tables(aggregation.aggregate(shuffled), tmp_path / "b")
    assert [p.name for p in first] == [p.name for p in second]
    assert {p.name for p in first} >= {"main_deit_digits.md", "main_deit_digits.tex", "main_deit_digits.csv",
                                       "adavit_ablation_deit_digits.md", "all_settings.csv"}
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    latex = (tmp_path / "a" / "main_deit_digits.tex").read_text()
    assert r"\toprule" in latex and r"\midrule" in latex and r"\bottomrule" in latex
    assert "1 multiply-add as 1 FLOP" in latex and "inference" in latex  # the footnote
    markdown = (tmp_path / "a" / "main_deit_digits.md").read_text()
    assert "LayerNorm, softmax, GELU, gather" in markdown and "median of at least 5" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ")][2:]
    methods = [line.split("|")[1].strip() for line in rows]
    # the reference (family none) first, then by family (clustering, halting, merging, pruning), then by name
    assert methods[0] == "dense" and methods.index("adavit") < methods.index("tome") < methods.index("evit") \
        < methods.index("random")


def test_missing_flops_and_throughput_give_nan_columns_and_skipped_figures(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    for path in sorted(FIXTURES.glob("2*.json")):
        record = json.loads(path.read_text())
        if record["method"] in ("dense", "evit"):
            record["flops"], record["throughput"] = None, None
            (runs / path.name).write_text(json.dumps(record))
    records = load.load_records(tmp_path)
    agg = aggregation.aggregate(records)
    assert agg["gflops_mean"].isna().all() and agg.attrs["conditions"] == []
    main = tables.main_table(agg, "deit_digits", "digits")
    assert (main.display["GFLOPs"] == formatting.DASH).all()
    assert table_row(main, Method="evit", Setting="keep_rate=0.7")[tables.TOP1_COLUMN] == "96.50 ± 1.24"
    assert tables.write_tables(agg, tmp_path / "report")
    capsys.readouterr()
    assert plots.plot_accuracy_vs_gflops(agg, records, tmp_path / "report") == []
    assert plots.plot_accuracy_vs_throughput(agg, records, tmp_path / "report") == []
    notes = capsys.readouterr().out
    assert "skipped top-1 vs GFLOPs" in notes and "skipped top-1 vs throughput" in notes


# --- Pareto fronts and token statistics -----------------------------------------------------------------------

@pytest.mark.parametrize("value, text", [(5e-4, "0.0005"), (8.0, "8"), (None, "default"), (True, "true"),
                                         ([3, 6, 9], "[3,6,9]"), ("head", "head")])
def test_format_value(value, text):
    assert formatting.format_value(value) == text


def test_pareto_front_on_crafted_points():
    gflops = [1.0, 2.0, 2.0, 3.0, 4.0, 0.5, math.nan, 4.0]
    top1 = [70.0, 75.0, 74.0, 75.0, 80.0, 60.0, 99.0, 80.0]
    front = pareto.pareto_front(gflops, top1)
    # (2, 74) and (3, 75) are dominated by (2, 75); NaN is never on the front; the (4, 80) twins both are
    assert front.tolist() == [True, True, False, False, True, True, False, True]
    # throughput: higher is better on both axes
    img_s = [100.0, 300.0, 200.0, 300.0]
    acc = [80.0, 79.0, 78.0, 70.0]
    assert pareto.pareto_front(img_s, acc, maximize_x=True).tolist() == [True, True, False, False]
    assert pareto.pareto_front([], []).tolist() == []
    with pytest.raises(ValueError):
        pareto.pareto_front([1.0], [1.0, 2.0])


def test_kept_iou_by_hand():
    a = np.array([[12, 3], [5, 1]])
    b = np.array([[12, 12], [2, 1]])
    assert depth_figures.kept_iou(a, b, 0) == pytest.approx(1.0)  # every patch saw block 0
    assert depth_figures.kept_iou(a, b, 2) == pytest.approx(2 / 3)  # kept: a {0,1,2}, b {0,1}
    assert depth_figures.kept_iou(a, b, 4) == pytest.approx(1 / 3)  # kept: a {0,2}, b {0,1}
    assert math.isnan(depth_figures.kept_iou(a, b, 12))


def test_token_maps_in_the_engine_layout_and_alternatives():
    rgb = np.zeros((16, 16, 3), dtype=int)
    rgb[4:12, 4:12] = 255
    tokens = {"grid": [4, 4], "mean_patch_depth": list(range(16)),
              "maps": [{"index": 7, "patch_depth": list(range(16)), "thumbnail": rgb.tolist()},
                       {"image_index": 9, "depth": [[1, 2], [3, 4]], "image": [[0.0, 0.5], [1.0, 0.25]]},
                       {"index": 3, "patch_depth": None}]}
    maps = load.depth_maps(tokens)
    assert [m["index"] for m in maps] == [7, 9]  # the entry without a depth map is dropped
    assert maps[0]["depth"].shape == (4, 4) and maps[0]["depth"][1, 0] == 4
    assert maps[0]["image"].shape == (16, 16, 3) and maps[0]["image"].max() == 1.0  # 0..255 scaled
    assert maps[1]["depth"].shape == (2, 2) and maps[1]["image"][0, 1] == 0.5
    assert load.mean_patch_depth(tokens).shape == (4, 4)
    assert load.mean_patch_depth({"mean_patch_depth": {"grid": [2, 8], "values": list(range(16))}}).shape == (2, 8)
    assert load.mean_patch_depth({"mean_patch_depth": list(range(9))}).shape == (3, 3)  # square, no grid
    assert load.depth_maps(None) == [] and load.mean_patch_depth({}) is None


def test_packed_token_maps_decode_to_what_was_packed():
    """The compact map format of ``experiments/records/token_maps.py`` (the writer) read back by ``analysis.load``."""
    from experiments.records import token_maps

    rng = np.random.default_rng(0)
    depth = rng.integers(0, 13, size=(3, 16))
    thumbs = np.empty((3, 8, 8, 3), dtype=np.uint8)
    thumbs[0] = rng.integers(0, 256, size=(8, 8, 1))  # grey: every channel equal
    thumbs[1] = rng.integers(0, 256, size=(8, 8, 3))  # colour
    thumbs[2] = 1  # dark: packed values are 0..255 whatever their maximum
    maps = json.loads(json.dumps(token_maps.encode_maps(depth, thumbs, (4, 4))))
    assert [m["thumbnail"]["shape"] for m in maps] == [[8, 8, 1], [8, 8, 3], [8, 8, 1]]
    assert maps[0]["patch_depth"]["shape"] == [4, 4] and maps[0]["thumbnail"]["filter"] == "diff2d"
    decoded = load.depth_maps({"grid": [4, 4], "maps": maps})
    assert [m["index"] for m in decoded] == [0, 1, 2]
    for i, entry in enumerate(decoded):
        assert np.array_equal(entry["depth"], depth[i].reshape(4, 4))
    assert np.array_equal(decoded[0]["image"], thumbs[0, :, :, 0] / 255.0)
    assert np.array_equal(decoded[1]["image"], thumbs[1] / 255.0)
    assert np.allclose(decoded[2]["image"], 1 / 255.0)
    flat = token_maps.pack_depth(depth[0], None)  # no grid: flat, reshaped by the reader when square
    assert flat["shape"] == [16] and load.depth_maps({"maps": [{"patch_depth": flat}]})[0]["depth"].shape == (4, 4)

    maps[1]["patch_depth"]["zlib_base64"] = "not base64!"
    assert [m["index"] for m in load.depth_maps({"grid": [4, 4], "maps": maps})] == [0, 2]  # dropped, no crash
    with pytest.raises(ValueError, match="corrupt"):
        load.unpack_array(maps[1]["patch_depth"])
    with pytest.raises(ValueError, match="filter 'png' unknown"):
        load.unpack_array({**maps[0]["patch_depth"], "filter": "png"})
    with pytest.raises(ValueError, match="0..255, got 0..300"):
        token_maps.pack(np.array([0, 300]))
    with pytest.raises(ValueError, match=r"\[H, W, C\], got shape \[8, 8\]"):
        token_maps.pack_thumbnail(thumbs[0, :, :, 0])


def _drawn_panels(monkeypatch, draw) -> dict[str, object]:
    """The axes of the figures ``draw()`` saves, by panel title (nothing is written)."""
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, out_dir, stem: figures.append(fig) or [])
    draw()
    return {ax.get_title().replace("\n", " "): ax for fig in figures for ax in fig.axes if ax.get_visible()}


def test_depth_prior_figure_draws_the_prior_target_its_records_carry(monkeypatch, capsys):
    records = fixture_records()
    agg = aggregation.aggregate(records)
    panels = _drawn_panels(monkeypatch, lambda: plots.plot_depth_prior(agg, records, "unused"))
    official = next(ax for title, ax in panels.items() if "prior=official" in title)
    [line] = [line for line in official.get_lines() if line.get_label().startswith("prior target")]
    recorded = raw_records("adavit", prior="official")[0]["method_info"]["prior_target"]
    assert list(line.get_ydata()) == recorded and list(line.get_xdata()) == list(range(1, 13))
    # the official target is the unnormalised pdf at 0-based blocks: target_depth=6 peaks at halting depth 7
    assert line.get_label() == f"prior target (official, sums to {sum(recorded):.2f})"
    assert int(np.argmax(line.get_ydata())) + 1 == 7 and sum(recorded) != pytest.approx(1.0)
    correct = next(ax for title, ax in panels.items() if "prior=correct, target_depth=8" in title)
    [line] = [line for line in correct.get_lines() if line.get_label().startswith("prior target")]
    assert line.get_label() == "prior target (correct)" and int(np.argmax(line.get_ydata())) + 1 == 8

    stripped = records.copy()
    without = (stripped["method"] == "adavit") & stripped["params_key"].str.contains('"prior":"official"')
    stripped.loc[without, "method_info"] = None  # records written before method_info existed
    capsys.readouterr()
    panels = _drawn_panels(monkeypatch, lambda: plots.plot_depth_prior(agg, stripped, "unused"))
    official = next(ax for title, ax in panels.items() if "prior=official" in title)
    assert not [line for line in official.get_lines() if line.get_label().startswith("prior target")]
    assert official.patches  # the histogram is still drawn
    assert "no method_info.prior_target" in capsys.readouterr().out


def test_depth_prior_figure_for_any_method_whose_records_carry_a_target(monkeypatch):
    """Not a method list: a top-k record given a prior target gets its own figure next to A-ViT's."""
    records = fixture_records()
    target = [1.0 / 12] * 12
    records["method_info"] = [{**(info or {}), "prior_target": target} if method == "topk" else info
                              for method, info in zip(records["method"], records["method_info"])]
    stems = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, out_dir, stem: stems.append(stem) or [])
    plots.plot_depth_prior(aggregation.aggregate(records), records, "unused")
    assert sorted(stems) == ["adavit_depth_deit_digits", "topk_depth_deit_digits"]


def test_a_backbone_with_dense_records_only_gets_notes_not_a_crash(tmp_path):
    """E.g. a dense DeiT-T cost measurement next to the embedded results: no method settings to compare."""
    results = copy_results(tmp_path, names=[p.name for p in FIXTURES.glob("*_dense_*s0*.json")])
    [path] = list((results / "runs").glob("*.json"))
    record = json.loads(path.read_text())
    record.update(model="deit_tiny", record_id="dense_tiny")
    record["config"]["model"].update(name="deit_tiny_patch16_224", short_name="deit_tiny")  # another run
    (results / "runs" / "dense_tiny.json").write_text(json.dumps(record))
    records = load.load_records(results)
    figures = plots.write_figures(aggregation.aggregate(records), records, tmp_path / "report")
    assert any(p.name == "top1_vs_gflops_deit_digits.png" for p in figures)


def test_kept_iou_frame_on_fixtures_is_symmetric_with_unit_diagonal():
    records = fixture_records()
    frame = depth_figures.kept_iou_frame(aggregation.aggregate(records), records, "deit_digits", "digits")
    assert set(frame["block"]) == {3, 6, 9, 11}
    assert "dense" not in set(frame["method_a"])
    diagonal = frame[frame["method_a"] == frame["method_b"]]
    assert np.allclose(diagonal["iou"], 1.0)
    pivot = frame[frame["block"] == 6].pivot(index="method_a", columns="method_b", values="iou")
    assert np.allclose(pivot.to_numpy(), pivot.to_numpy().T)


# --- notebook and isolation -----------------------------------------------------------------------------------

def test_notebook_is_stored_without_outputs():
    notebook = json.loads((ROOT / "analysis" / "report.ipynb").read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert any("parameters" in c["metadata"].get("tags", []) for c in code)


# analysis reads records with the records package and the metric registry, which are torch-free; nothing else
# of the harness, and neither torch, timm, Hydra nor the methods
HARNESS_READ_BY_ANALYSIS = ("experiments", "experiments.records", "experiments.train", "experiments.train.metrics")


def test_analysis_imports_neither_torch_nor_the_suite():
    script = ("import sys, analysis.load, analysis.tables, analysis.plots, analysis.run_report, analysis.curves, "
              "analysis.published, analysis.formatting, analysis.style, analysis.throughput, analysis.token_stats, "
              "analysis.summary, analysis.provenance, analysis.object_figures; "
              f"allowed = {HARNESS_READ_BY_ANALYSIS!r}; "
              "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'methods', 'timm', 'hydra', 'omegaconf')"
              " or (m.startswith('experiments') and m not in allowed and not m.startswith('experiments.records.'))]; "
              "assert not bad, bad; assert 'experiments.records.schema' in sys.modules")
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=120)


@pytest.mark.slow
def test_notebook_executes_headless_on_the_fixture_records(tmp_path, capsys):
    results = copy_results(tmp_path)
    curve = [point_record("evit", "keep_rate", k, 0, top1, ratio) for k, top1, ratio in ((0.5, 90.0, 0.5),
                                                                                         (1.0, 97.0, 1.0))]
    for record in curve:
        (results / "runs" / f"{record['record_id']}.json").write_text(json.dumps(record))
    assert run_report.main([str(results)]) == 0
    out = capsys.readouterr()
    for name in BAD_FILES:
        assert name in out.err, f"the skipped file {name} is not named in the notebook's output"
    report = results / "report"
    expected = ["README.md", "report.md", "report.ipynb", "report.html", "all_settings.csv",
                "kept_iou_deit_digits.csv", "summary_deit_digits.png"]
    expected += [f"{stem}_deit_digits.{ext}" for stem in ("main", "throughput", "adavit_ablation", "matched_flops",
                                                          "summary_fronts") for ext in ("md", "tex", "csv")]
    expected += ["tradeoff_points.csv", "tradeoff_curves_deit_digits.png", "tradeoff_curves_deit_digits.pdf"]
    expected += [f"published_vs_measured.{ext}" for ext in ("md", "tex", "csv")]
    expected += [f"{stem}_deit_digits.{ext}" for stem in ("top1_vs_gflops", "top1_vs_throughput", "tokens_per_block",
                                                          "adavit_depth", "depth_maps", "mean_depth", "kept_iou")
                 for ext in ("png", "pdf")]
    missing = [name for name in expected if not (report / name).is_file()]
    assert not missing, f"not written: {missing}"
    assert all((report / name).stat().st_size > 0 for name in expected)
    with pytest.warns(RecordWarning):
        records = load.load_records(results)
    runs = records[records["kind"] != "tradeoff"]
    assert (report / "main_deit_digits.md").read_text() == \
        tables.main_table(aggregation.aggregate(runs), "deit_digits", "digits").to_markdown()
    readme = (report / "README.md").read_text()
    assert "- Records read: " in readme and "corrupt_evit_s0.json" in readme  # the header names skipped files
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5  # the figures travel inside the file: it opens offline
    assert 'src="http' not in html  # and asks the network for nothing
    assert "<h2" in html and "Pareto fronts" in html  # the summary section, rendered


def test_the_shipped_baselines_manifest_is_not_read_as_a_record(tmp_path):
    (tmp_path / "baselines").mkdir()
    (tmp_path / "baselines" / "manifest.json").write_text('{"format": 1, "baselines": {}}')
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.json").write_text("{}")
    assert [p.relative_to(tmp_path).as_posix() for p in load.find_record_files(tmp_path)] == ["runs/a.json"]


def test_a_methods_default_is_per_backbone():
    """ToMe's default is r=4 on the 65-token embedded model and r=13 on DeiT-S: each backbone's records say which
    of their settings is the default, so a record of one backbone does not hide the other's default row."""
    import pandas as pd
    from analysis.formatting import method_defaults

    records = pd.DataFrame({"method": ["tome", "tome"], "model": ["deit_small", "deit_scenes"],
                            "method_defaults": [{"r": 13}, {"r": 4}]})
    assert method_defaults(records) == {("tome", "deit_small"): {"r": 13}, ("tome", "deit_scenes"): {"r": 4}}
