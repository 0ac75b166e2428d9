"""``analysis.video``: the report's video section on crafted video records (3-D token grids, packed maps in the
writer's format, motion summaries), its numbers worked out by hand, and the notes when records lack them."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis import aggregation, depth_figures, load, plots, tables, video
from experiments.records import token_maps
from test_families import run_record
from test_curves import write

GRID = (4, 4, 4)  # vit_video_digits: time, rows, cols
BLOCKS = 12


def video_record(method: str, seed: int, top1: float, ratio: float, motion: dict | None = None, maps: bool = True,
                 model: str = "vit_video_digits", **params) -> dict:
    """A run of a video backbone: 3-D grid, packed depth maps with filmstrip thumbnails, optional motion."""
    record = run_record(method, seed, top1, ratio, **params)
    record.update(model=model, architecture=model, data="moving_digits",
                  record_id=f"{model}_{record['record_id']}")
    rng = np.random.default_rng(seed)
    depth = np.full((3, int(np.prod(GRID))), BLOCKS) if method == "dense" else rng.integers(1, BLOCKS + 1, (3, 64))
    tokens = {"grid": list(GRID), "attn_mean": [65.0] * BLOCKS, "mlp_mean": [65.0] * BLOCKS,
              "mean_patch_depth": depth.mean(0).tolist()}
    if maps:
        thumbs = rng.integers(0, 256, size=(3, 8, 8 * GRID[0], 1), dtype=np.uint8)  # filmstrip [H, T' * W, C]
        tokens["maps"] = json.loads(json.dumps(token_maps.encode_maps(depth, thumbs, GRID)))
    if motion is not None:
        tokens["motion"] = motion
    record["tokens"] = tokens
    return record


def motion(token_share: float, depth_share: float, moving: float, static: float) -> dict:
    return {"token_share": token_share, "depth_share": depth_share, "mean_depth_moving": moving,
            "mean_depth_static": static}


def report_inputs(folder) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What the notebook's ``load`` cell gives: the records and the aggregate of the runs."""
    records = load.load_records(folder)
    return aggregation.aggregate(aggregation.without_tradeoff(records)), records


@pytest.fixture
def video_results(tmp_path):
    records = [
        video_record("dense", 0, 90.0, 1.0, motion(0.25, 0.25, 12.0, 12.0)),
        video_record("dense", 1, 92.0, 1.0, motion(0.25, 0.25, 12.0, 12.0)),
        video_record("adavit", 0, 85.0, 0.6, motion(0.25, 0.40, 10.0, 5.0), target_depth=6),
        video_record("adavit", 1, 87.0, 0.6, motion(0.25, 0.30, 8.0, 4.0), target_depth=6),
    ]
    return write(tmp_path / "results", records)


def test_video_section_writes_the_depth_figure_and_the_motion_table(video_results, tmp_path):
    agg, records = report_inputs(video_results)
    out = tmp_path / "report"
    paths = video.write_video_section(agg, records, out)
    names = sorted(p.name for p in paths)
    assert names == sorted(f"video_{stem}_vit_video_digits.{ext}" for stem, exts in
                           (("depth", ("png", "pdf")), ("motion", ("md", "tex", "csv"))) for ext in exts)
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    markdown = (out / "video_motion_vit_video_digits.md").read_text()
    assert "tubelet holds a pixel that changes by > 0.25" in markdown and "attention's quadratic part aside" in markdown


def test_motion_table_numbers_are_the_seed_means(video_results, tmp_path):
    agg, records = report_inputs(video_results)
    video.write_video_section(agg, records, tmp_path / "report")
    frame = pd.read_csv(tmp_path / "report" / "video_motion_vit_video_digits.csv")
    assert list(frame["method"]) == ["dense", "adavit"]  # the suite's method order
    adavit = frame[frame["method"] == "adavit"].iloc[0]
    assert adavit["n_seeds"] == 2
    assert adavit["token_share_mean"] == pytest.approx(0.25)
    assert adavit["depth_share_mean"] == pytest.approx(0.35)           # (0.40 + 0.30) / 2
    assert adavit["depth_share_std"] == pytest.approx(np.std([0.40, 0.30], ddof=1))
    assert adavit["depth_ratio_mean"] == pytest.approx(2.0)            # 10/5 and 8/4: per seed, then averaged
    dense = frame[frame["method"] == "dense"].iloc[0]
    assert dense["depth_ratio_mean"] == pytest.approx(1.0) and dense["depth_share_mean"] == pytest.approx(0.25)
    markdown = (tmp_path / "report" / "video_motion_vit_video_digits.md").read_text()
    assert "35.0 ± 7.1" in markdown and "2.000" in markdown


def test_depth_figure_shows_adavit_one_row_per_clip_one_panel_per_time_slot(video_results, tmp_path, monkeypatch):
    agg, records = report_inputs(video_results)
    figures = []
    monkeypatch.setattr(video, "save_figure", lambda fig, out_dir, stem: figures.append(fig) or [])
    video.write_video_section(agg, records, tmp_path / "report")
    (fig,) = figures
    assert "adavit" in fig._suptitle.get_text()
    panels = [ax for ax in fig.axes if ax.images and ax.images[0].get_array().shape == GRID[1:]]
    assert len(panels) == 3 * GRID[0]  # 3 clips x 4 time slots, the filmstrips aside
    assert [ax.get_title() for ax in panels[:GRID[0]]] == [f"time slot {t}" for t in range(GRID[0])]
    depth = load.unpack_array(records.iloc[0]["tokens"]["maps"][0]["patch_depth"])  # adavit seed 0 sorts first
    assert records.iloc[0]["method"] == "adavit" and depth.shape == GRID
    assert np.array_equal(panels[1].images[0].get_array(), depth[1])
    assert panels[0].images[0].norm.vmax == BLOCKS  # shared scale 0..depth


def test_a_backbone_without_maps_or_motion_gets_notes_and_no_files(tmp_path, capsys):
    records = [video_record("dense", 0, 90.0, 1.0, maps=False, model="vit_video_bare"),
               video_record("adavit", 0, 85.0, 0.6, maps=False, model="vit_video_bare", target_depth=6)]
    agg, loaded = report_inputs(write(tmp_path / "results", records))
    assert video.write_video_section(agg, loaded, tmp_path / "report") == []
    notes = capsys.readouterr().out
    assert "vit_video_bare" in notes and "per-frame depth figure" in notes and "no motion table" in notes
    assert not (tmp_path / "report").exists()


def test_image_records_give_no_video_files(tmp_path, capsys):
    records = [run_record("dense", 0, 95.0, 1.0), run_record("topk", 0, 90.0, 0.7, keep_rate=0.7)]
    agg, loaded = report_inputs(write(tmp_path / "results", records))
    assert video.video_backbones(agg, loaded) == []
    assert video.write_video_section(agg, loaded, tmp_path / "report") == []
    assert "no video records" in capsys.readouterr().out
    assert not (tmp_path / "report").exists()


def test_existing_tables_and_figures_read_video_records(video_results, tmp_path):
    """The image report's pieces on a 3-D grid: no crash, the mean depth map is the mean over time."""
    agg, records = report_inputs(video_results)
    runs = aggregation.without_tradeoff(records)
    out = tmp_path / "report"
    names = {p.name for p in tables.write_tables(agg, out) + plots.write_figures(agg, runs, out)}
    assert {"main_vit_video_digits.md", "top1_vs_gflops_vit_video_digits.png",
            "mean_depth_vit_video_digits.png"} <= names
    tokens = runs.iloc[0]["tokens"]
    expected = np.asarray(tokens["mean_patch_depth"]).reshape(GRID).mean(axis=0)
    assert np.allclose(load.mean_patch_depth(tokens), expected)
    assert load.mean_patch_depth({"grid": [4, 4], "mean_patch_depth": list(range(16))}).shape == (4, 4)  # image


def test_without_adavit_the_figure_takes_a_method_whose_depths_vary(tmp_path, monkeypatch):
    records = [video_record("dense", 0, 90.0, 1.0), video_record("topk", 0, 80.0, 0.5, keep_rate=0.5)]
    agg, loaded = report_inputs(write(tmp_path / "results", records))
    figures = []
    monkeypatch.setattr(video, "save_figure", lambda fig, out_dir, stem: figures.append(fig) or [])
    video.write_video_section(agg, loaded, tmp_path / "report")
    assert len(figures) == 1 and "topk" in figures[0]._suptitle.get_text()
    tokens = loaded[loaded["method"] == "dense"].iloc[0]["tokens"]
    assert [m["depth"].shape for m in video.video_maps(tokens)] == [GRID] * 3
    assert video.video_maps({"grid": [4, 4], "maps": tokens["maps"]}) == []  # an image grid: not video maps
    broken = {**tokens, "maps": [{"patch_depth": {**tokens["maps"][0]["patch_depth"], "zlib_base64": "x!"}}]}
    assert video.video_maps(broken) == []  # a corrupt entry is dropped, no crash


def test_kept_token_iou_reads_space_time_maps(tmp_path):
    """Kept-token IoU on [T', H', W'] maps: the video maps are read whole, not dropped as malformed."""
    records = [video_record("adavit", 0, 85.0, 0.6), video_record("evit", 1, 80.0, 0.6)]  # different depths
    agg, loaded = report_inputs(write(tmp_path / "results", records))
    maps = {m: load.depth_maps(loaded[loaded["method"] == m].iloc[0]["tokens"]) for m in ("adavit", "evit")}
    assert maps["adavit"][0]["depth"].shape == GRID
    frame = depth_figures.kept_iou_frame(agg, loaded, "vit_video_digits", "moving_digits", blocks=[5])
    pair = frame[(frame["method_a"] == "adavit") & (frame["method_b"] == "evit")].iloc[0]
    # by hand: per clip |kept_a & kept_b| / |kept_a | kept_b| at block 5 (kept = depth > 5), then the mean
    by_hand = [np.logical_and(a["depth"] > 5, b["depth"] > 5).sum() / np.logical_or(a["depth"] > 5, b["depth"] > 5).sum()
               for a, b in zip(maps["adavit"], maps["evit"])]
    assert pair["n"] == 3 and pair["iou"] == pytest.approx(np.mean(by_hand)) and pair["iou"] < 1
