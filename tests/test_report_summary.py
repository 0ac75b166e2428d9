"""The report's summary page, header and traceability on fabricated records (no torch, no methods): the Pareto
fronts, the defaults table and the two sentences by value; one timing protocol per column; provenance issues by
name; every table row traced to its records; settings shown as what differs from the default."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Optional

import pandas as pd
import pytest

from analysis import aggregation, formatting, load, provenance, summary, tables

T2 = 4.302653  # t_{0.975, 2}
RECIPE = {"epochs": 4, "lr": 0.0005}
B32, B1 = "cpu b32 fp32 t1", "cpu b1 fp32 t1"
FAMILIES = {"dense": "none", "prune_a": "pruning", "merge_b": "merging", "prune_c": "pruning"}
DEFAULTS = {"dense": {}, "prune_a": {"keep_rate": 0.7}, "merge_b": {"r": 13}, "prune_c": {"keep_rate": 0.5}}


def timing(img_s: float, batch: int = 32, protocol: Optional[int] = 2) -> dict:
    entry = {"device": "cpu", "batch_size": batch, "dtype": "float32", "threads": 1, "img_per_s": img_s,
             "dense_img_per_s": 1000.0, "speedup_vs_dense": img_s / 1000.0}
    return {**entry, "timing_protocol": protocol} if protocol else entry


def record(method: str, seed: int, top1: float, gflops: float, tuned: bool = False, params: Optional[dict] = None,
           img_s: Optional[float] = None, objects: Optional[tuple] = None, extra_timing: Optional[list] = None,
           **top) -> dict:
    """A complete ``run`` record of ``method`` on model ``m``, data ``scenes``: fine-tuned with :data:`RECIPE`
    when ``tuned``; ``objects`` = (recall, background compute, background share) as fractions."""
    params = dict(DEFAULTS[method] if params is None else params)
    rid = f"2026_{method}_{'ft' if tuned else 'ots'}_{json.dumps(params, sort_keys=True)}_s{seed}_id{method[:2]}{seed}"
    rid = rid.replace(" ", "").replace('"', "").replace(":", "=").replace("{", "").replace("}", "")
    tokens = None
    if objects:
        tokens = {"objects": {"object_recall": objects[0], "background_compute": objects[1],
                              "background_share": objects[2]}}
    throughput = ([timing(img_s)] if img_s else []) + list(extra_timing or [])
    out = {"schema_version": 1, "record_id": rid, "kind": "run", "status": "complete", "method": method,
           "method_params": params, "method_defaults": DEFAULTS[method],
           "method_info": {"family": FAMILIES[method]}, "model": "m", "architecture": "m_arch", "data": "scenes",
           "seed": seed, "metrics": {"top1": top1, "top5": 100.0, "num_images": 100},
           "flops": {"gflops": gflops, "dense_gflops": 1.0, "flops_ratio": gflops},
           "throughput": throughput or None, "tokens": tokens, "train": {"epochs": RECIPE["epochs"] if tuned else 0},
           "config": {"model": {"name": "m"}, "data": {"name": "scenes"}, "seed": seed,
                      **({"train": RECIPE} if tuned else {})},
           "provenance": {"end_time": "2026-12-01T00:00:00+00:00", "git_commit": "abc", "git_dirty": False}}
    out.update(top)
    return out


def scenario() -> list[dict]:
    """Dense off the shelf and fine-tuned; prune_a fine-tuned at its default and at keep_rate 0.5; merge_b and
    prune_c off the shelf at their defaults; three seeds each. merge_b's seed 0 was timed under the old protocol
    at b32; prune_a's default also at b1."""
    out = []
    for seed in range(3):
        out.append(record("dense", seed, 90.0 + seed, 1.0, img_s=1000.0, objects=(1.0, 0.75, 0.75)))
        out.append(record("dense", seed, 91.0 + seed, 1.0, tuned=True))
        out.append(record("prune_a", seed, [92.0, 92.5, 93.5][seed], 0.7, tuned=True, img_s=1300.0 + 10 * seed,
                          objects=([0.9, 0.95, 1.0][seed], [0.5, 0.55, 0.6][seed], 0.75),
                          extra_timing=[timing(40.0 + seed, batch=1)]))
        out.append(record("prune_a", seed, 90.0, 0.5, tuned=True, params={"keep_rate": 0.5}, img_s=1500.0))
        out.append(record("merge_b", seed, 89.0 + seed, 0.6, img_s=1200.0 + 100 * seed,
                          objects=(1.0, 0.75, 0.75))
                   if seed else record("merge_b", seed, 89.0, 0.6, objects=(1.0, 0.75, 0.75),
                                       extra_timing=[timing(5000.0, protocol=None)]))
        out.append(record("prune_c", seed, [91.0, 91.0, 92.0][seed], 0.5, img_s=1400.0,
                          objects=(0.6, [0.76, 0.74, 0.75][seed], 0.75)))
    return out


def load_frame(folder: Path, records: list[dict]) -> pd.DataFrame:
    runs = folder / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for rec in records:
        (runs / f"{rec['record_id']}.json").write_text(json.dumps(rec))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load.load_records(folder)


@pytest.fixture()
def frames(tmp_path):
    records = load_frame(tmp_path / "results", scenario())
    return records, aggregation.aggregate(records)


def row_of(agg: pd.DataFrame, method: str, setting: str) -> pd.Series:
    match = agg[(agg["method"] == method) & (agg["setting"] == setting)]
    assert len(match) == 1, (method, setting, list(agg["setting"]))
    return match.iloc[0]


# --- settings and defaults -----------------------------------------------------------------------------------
def test_the_setting_shows_only_what_differs_from_the_default_the_records_state(frames):
    _, agg = frames
    assert sorted(zip(agg["method"], agg["setting"])) == [
        ("dense", "—"), ("dense", "—, fine-tuned"), ("merge_b", "default"), ("prune_a", "default"),
        ("prune_a", "keep_rate=0.5"), ("prune_c", "default")]
    assert row_of(agg, "prune_a", "default")["is_default"]
    assert not row_of(agg, "prune_a", "keep_rate=0.5")["is_default"]
    # without stated defaults (older records), the labels fall back to the parameters that differ between settings
    assert formatting.setting_labels([{"keep_rate": 0.7, "fuse": True}, {"keep_rate": 0.5, "fuse": True}]) == \
        ["keep_rate=0.7", "keep_rate=0.5"]
    assert formatting.setting_labels([{"keep_rate": 0.7, "fuse": True}], defaults={"keep_rate": 0.7, "fuse": False}) \
        == ["fuse=true"]


# --- one timing protocol per column --------------------------------------------------------------------------
def test_a_column_never_mixes_timing_protocols_and_the_left_out_records_are_named(frames, tmp_path):
    records, agg = frames
    left = agg.attrs["protocol_left_out"]
    assert left == [{"record_id": records.loc[(records["method"] == "merge_b") & (records["seed"] == 0),
                                              "record_id"].item(),
                     "model": "m", "data": "scenes", "condition": B32, "protocol": 1, "kept_protocol": 2}]
    merge = row_of(agg, "merge_b", "default")
    # seeds 1 and 2 only (1300 and 1400 img/s); seed 0's 5000 img/s of protocol 1 is not averaged in
    assert merge[f"img_per_s_mean[{B32}]"] == pytest.approx(1350.0)
    assert merge[f"record_ids[{B32}]"].split(",") == [r for r in merge["record_ids"].split(",") if r.endswith(
        ("idme1", "idme2"))]
    head = provenance.header(records, tmp_path, "results", left, commit="c0ffee")
    assert f"`{left[0]['record_id']}` ({B32}: protocol 1, column on 2)" in head
    # a condition whose entries are all of the old protocol keeps them: nothing newer to prefer
    old = [record("dense", s, 90.0, 1.0, extra_timing=[timing(900.0, protocol=None)]) for s in range(2)]
    old_agg = aggregation.aggregate(load_frame(tmp_path / "old", old))
    assert old_agg.attrs["protocol_left_out"] == [] and old_agg[f"img_per_s_mean[{B32}]"].item() == 900.0


# --- traceability -------------------------------------------------------------------------------------------
def test_every_table_row_names_the_records_it_averages(frames):
    records, agg = frames
    main = tables.main_table(agg, "m", "scenes")
    for (_, row), (_, shown) in zip(agg.iterrows(), main.display.iterrows()):
        mine = records[(records["method"] == row["method"]) & (records["setting_key"] == row["setting_key"])]
        assert row["record_ids"].split(",") == list(mine.sort_values("seed")["record_id"])
        assert shown["Records"].split(" ") == [tables.short_id(r) for r in mine.sort_values("seed")["record_id"]]
    assert list(main.numeric["record_ids"]) == list(agg["record_ids"])
    assert tables.short_id("20261203T171944_sinkhorn_vit_video_small_s0_2eba98b6") == "2eba98b6"
    timing_table = tables.throughput_table(agg, "m", "scenes")
    b1 = timing_table.display[timing_table.display["Condition"] == "cpu, batch 1, fp32, 1 thread(s)"]
    assert list(b1["Method"]) == ["prune_a"] and b1["Records"].item() == "idpr0 idpr1 idpr2"


# --- main and throughput tables --------------------------------------------------------------------------------
def test_the_main_table_keeps_one_condition_and_the_throughput_table_has_conditions_as_rows(frames):
    _, agg = frames
    main = tables.main_table(agg, "m", "scenes")
    assert main.title == "Main results: m on scenes (throughput: cpu, batch 32, fp32, 1 thread(s))"
    assert [c for c in main.display.columns if "(" in c and "cpu" in c] == \
        [f"img/s ({B32})", f"Speedup ({B32})", f"Eff. ({B32})"]
    assert main.notes == []  # the footnote says where the other conditions are
    timing_table = tables.throughput_table(agg, "m", "scenes")
    assert list(timing_table.display.columns) == ["Condition", "Method", "Setting", "Seeds", "img/s", "Speedup",
                                                  "Eff.", "Records"]
    conditions = list(timing_table.display["Condition"])
    assert conditions == ["cpu, batch 1, fp32, 1 thread(s)"] + ["cpu, batch 32, fp32, 1 thread(s)"] * 5
    b1 = timing_table.display.iloc[0]
    assert (b1["img/s"], b1["Speedup"], b1["Seeds"]) == ("41.0 ± 1.00", "0.04×", "3")


# --- the summary page by value ------------------------------------------------------------------------------
def test_the_defaults_table_by_value(frames):
    records, agg = frames
    table = summary.defaults_table(agg, records, "m", "scenes")
    shown = table.display.set_index(["Method", "Fine-tuned"])
    assert list(shown.index) == [("dense", "no"), ("dense", "yes"), ("merge_b", "no"), ("prune_a", "yes"),
                                 ("prune_c", "no")]  # the fine-tuned reference: what the extra epochs give
    a = shown.loc[("prune_a", "yes")]
    # Δ against dense fine-tuned, seed by seed: +1, +0.5, +0.5; mean 2/3, s = sqrt(1/12), half = t s / sqrt(3)
    half = T2 * math.sqrt(1 / 12) / math.sqrt(3)
    assert a[tables.DELTA_COLUMN] == f"+0.67 ± {half:.2f}" == "+0.67 ± 0.72"
    assert a["GFLOPs"] == "0.700" and a["Speedup (cpu, batch 32, fp32, 1 thread(s))"] == "1.31×"
    # recall 90, 95, 100 %: mean 95, s = 5, half = t 5 / sqrt(3) = 12.42; background compute 55 % on 75 %
    assert a["Object recall (%)"] == "95.0 ± 12.4" and a["Bg. compute / bg. tokens (%)"] == "55.0 / 75.0"
    assert shown.loc[("merge_b", "no")][tables.DELTA_COLUMN] == "-1.00 ± 0.00"  # against the baseline
    assert shown.loc[("dense", "no")][tables.DELTA_COLUMN] == "—"  # the baseline itself
    assert shown.loc[("dense", "yes")][tables.DELTA_COLUMN] == "+1.00 ± 0.00"
    numeric = table.numeric.set_index("method")
    assert numeric.loc["prune_a", "record_ids"] == row_of(agg, "prune_a", "default")["record_ids"]
    assert numeric.loc["prune_a", "background_gap_mean"] == pytest.approx(20.0)


def test_the_pareto_fronts_by_value(frames):
    _, agg = frames
    front = summary.front_table(agg, "m", "scenes").display
    gflops = front[front["Front"] == "top-1 vs GFLOPs"]
    # prune_c (0.5 GFLOPs, 91.33) and prune_a (0.7, 92.67); everything else has less top-1 for as many GFLOPs
    assert list(zip(gflops["Method"], gflops["Setting"], gflops["GFLOPs"])) == [("prune_c", "default", "0.500"),
                                                                                ("prune_a", "default", "0.700")]
    assert gflops.iloc[0][tables.TOP1_COLUMN] == f"91.33 ± {T2 * math.sqrt(1 / 3) / math.sqrt(3):.2f}"
    rate = front[front["Front"] == "top-1 vs img/s (cpu, batch 32, fp32, 1 thread(s))"]
    # img/s: prune_a@0.5 1500 (90.0), prune_c 1400 (91.33), prune_a 1310 (92.67); merge_b (1350, 90) and the
    # dense rows are dominated
    assert list(zip(rate["Method"], rate["img/s"])) == [("prune_a", "1310"), ("prune_c", "1400"),
                                                        ("prune_a", "1500")]


def test_the_two_sentences_by_value(frames):
    records, agg = frames
    first, second = summary.sentences(agg, records, "m", "scenes")
    # the defaults of the reduction methods: prune_a +0.67 ± 0.72, prune_c +0.33 ± 1.43 (tied), merge_b -1 ± 0
    assert first == ("At their default settings on m/scenes, prune_a (fine-tuned) and prune_c are tied for the best "
                     "paired Δ top-1 against its control (prune_a (fine-tuned): +0.67 ± 0.72 points; ties: "
                     "overlapping 95% CIs, 2 of 3 settings); the cheapest of them is prune_c at 0.500 GFLOPs "
                     "(50% of dense).")
    assert second == ("Object recall at the defaults ranges from 60.0% (prune_c) to 100.0% (merge_b); prune_a "
                      "(fine-tuned) (55% of its compute on 75% background tokens) spends less of its compute on "
                      "the background than the background's share of the tokens (95% CI of the per-seed "
                      "difference above zero), i.e. more on the object.")


def test_the_summary_page_is_written_with_header_sentences_figure_and_tables(frames, tmp_path):
    records, agg = frames
    head = provenance.header(records, tmp_path, "results", agg.attrs["protocol_left_out"], commit="c0ffee")
    paths = summary.write_summary(agg, records, tmp_path / "out", head)
    readme = paths[0].read_text()
    assert paths[0].name == "README.md"
    assert "- Generated at commit `c0ffee` from the records under `results`." in readme
    assert "- Records read: 18 (18 run)." in readme
    assert " ".join(summary.sentences(agg, records, "m", "scenes")) in readme
    assert "![summary_m](summary_m.png)" in readme and (tmp_path / "out" / "summary_m.png").stat().st_size > 0
    for stem in ("summary_defaults_m", "summary_fronts_m"):
        assert all((tmp_path / "out" / f"{stem}.{ext}").is_file() for ext in ("md", "tex", "csv"))
    assert readme.index("## m on scenes") < readme.index("### Every method at its default setting")


def test_without_ground_truth_or_defaults_the_sentences_say_so(tmp_path):
    plain = [record(m, s, 90.0 + s, g) for m, g in (("dense", 1.0), ("prune_c", 0.5)) for s in range(2)]
    for rec in plain:
        rec["tokens"] = None
    records = load_frame(tmp_path / "a", plain)
    agg = aggregation.aggregate(records)
    assert summary.sentences(agg, records, "m", "scenes")[1].startswith("These records carry no ground-truth")
    for rec in plain:
        del rec["method_defaults"]
    records = load_frame(tmp_path / "b", plain)
    agg = aggregation.aggregate(records)
    assert agg["is_default"].isna().all()
    assert summary.sentences(agg, records, "m", "scenes") == [
        "No record of m on scenes states its method's default setting (method_defaults), so no method is "
        "compared at its default."]
    assert summary.defaults_table(agg, records, "m", "scenes") is None


# --- provenance by name -------------------------------------------------------------------------------------
def test_absolute_paths_and_missing_checkpoints_are_reported_by_name(tmp_path):
    good = record("dense", 0, 90.0, 1.0)
    good["config"]["model"]["checkpoint"] = "tests/fixtures/adavit_removal_reference.pt"  # committed: fine
    bad = record("dense", 1, 91.0, 1.0)
    bad["config"]["paths"] = {"run_dir": "/work/main/outputs/multirun/x"}
    bad["train"]["init"] = "checkpoint:outputs/gone/final.pth"
    outside = record("dense", 2, 92.0, 1.0, subset_metrics={"weights": "checkpoint:/work/adavit_demo_final.pth"})
    outside["provenance"]["git_dirty"] = True
    assert provenance.record_issues(good) == []
    assert provenance.record_issues(bad) == ["absolute path config.paths.run_dir=/work/main/outputs/multirun/x",
                                             "checkpoint train.init=outputs/gone/final.pth is missing"]
    assert provenance.record_issues(outside) == [
        "absolute path subset_metrics.weights=checkpoint:/work/adavit_demo_final.pth",
        "checkpoint subset_metrics.weights=/work/adavit_demo_final.pth is outside the repository",
        "written from a dirty tree (provenance.git_dirty)"]
    records = load_frame(tmp_path / "results", [good, bad, outside])
    head = provenance.header(records, tmp_path, "results", [], commit="c0ffee")
    line = next(l for l in head.splitlines() if l.startswith("- Provenance issues"))
    assert f"`runs/{bad['record_id']}.json` (absolute path config.paths.run_dir" in line
    assert f"`runs/{outside['record_id']}.json`" in line and good["record_id"] not in line
    assert "2 record(s), 1 with a checkpoint outside the repository, 1 with a dirty tree, 1 with a missing " \
           "checkpoint, 2 with an absolute path" in line
    csv = pd.read_csv(provenance.write_provenance(records, tmp_path / "out"))
    assert list(csv.columns) == ["path", "record_id", "issue"] and len(csv) == 5
    assert set(csv["record_id"]) == {bad["record_id"], outside["record_id"]}


def test_the_header_names_skipped_files_and_why(tmp_path):
    records = [record("dense", 0, 90.0, 1.0)]
    folder = load_frame(tmp_path / "results", records)
    (tmp_path / "results" / "runs" / "broken.json").write_text("{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = load.load_records(tmp_path / "results")
    head = provenance.header(frame, tmp_path, "results", [], commit="c0ffee")
    assert "- Records read: 1 (1 run)." in head
    assert "- Skipped: 1 file(s): `runs/broken.json` (corrupt record (not readable JSON:" in head
    assert folder.attrs["skipped"] == []


# --- the object-outline figure --------------------------------------------------------------------------------
def test_the_object_outline_figure_draws_each_default_over_the_mask(tmp_path, monkeypatch):
    """Two 8 px images of a 4x4-token model with 4 blocks; object tokens 5, 6, 9, 10 (a 4 px square)."""
    import numpy as np

    from analysis import object_figures
    from experiments.records import token_maps

    mask = np.zeros((2, 8, 8), dtype=bool)
    mask[:, 2:6, 2:6] = True
    objects = mask.reshape(2, 4, 2, 4, 2).all(axis=(2, 4)).reshape(2, 16)
    thumbs = np.zeros((2, 8, 8, 1), dtype=np.uint8)
    thumbs[:, 2:6, 2:6] = 255

    def with_maps(rec: dict, depth: np.ndarray) -> dict:
        rec["tokens"] = {"attn_mean": [17.0] * 4, "maps": token_maps.encode_maps(depth, thumbs, (4, 4), mask, objects)}
        return rec

    keep_half = np.full((2, 16), 1)
    keep_half[:, [5, 6]] = 4  # two of the four object tokens reach block 4: recall 50%
    keep_all = np.where(objects, 4, 2)
    recs = [with_maps(record("prune_a", 0, 92.0, 0.7, tuned=True), keep_half),
            with_maps(record("prune_a", 0, 90.0, 0.5, tuned=True, params={"keep_rate": 0.5}), keep_half),
            with_maps(record("merge_b", 0, 91.0, 0.6), keep_all),
            with_maps(record("dense", 0, 93.0, 1.0), np.full((2, 16), 4))]
    records = load_frame(tmp_path / "results", recs)
    agg = aggregation.aggregate(records)
    figures = []
    monkeypatch.setattr(object_figures, "save_figure", lambda fig, out, stem: figures.append((stem, fig)) or [])
    object_figures.plot_object_depth(agg, records, tmp_path)
    [(stem, fig)] = figures
    assert stem == "object_depth_m"
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 4  # merge_b and prune_a (its default only), two images each; dense left out
    labels = [ax.get_ylabel().split("\n")[:2] for ax in panels[::2]]
    assert labels == [["merge_b", "default"], ["prune_a", "default"]]
    assert [ax.get_xlabel() for ax in panels] == ["recall 100%"] * 2 + ["recall 50%"] * 2
    for ax in panels:
        [outline] = [c for c in ax.collections if c.__class__.__name__ in ("QuadContourSet", "ContourSet")]
        xs = np.concatenate([path.vertices[:, 0] for path in outline.get_paths()])
        # the square's outline lies between pixel centres 1.5 and 5.5 of 8 (extent 0..1, half-pixel threshold)
        assert xs.min() == pytest.approx(1.5 / 8 + 0.5 / 8, abs=1 / 8) and xs.max() <= 6.5 / 8
    assert object_figures.image_recall({"depth": keep_half[0].reshape(4, 4),
                                        "object_tokens": objects[0].reshape(4, 4)}, 4) == 0.5
