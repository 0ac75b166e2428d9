"""``analysis.published``: the shipped table of published numbers loads and is sourced row by row; bad tables
are refused naming the row and column; reported vs measured matching and the FLOPs flag by value."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis import published
from analysis.published import PublishedError

HEADER = ",".join(published.COLUMNS)
GOOD = ("dynamicvit,deit_small,keep_rate=0.7,fine-tuned,79.32,2.9,,,,,,DynamicViT README,Model Zoo,"
        "https://github.com/raoyongming/DynamicViT,")


def test_the_shipped_table_loads_and_every_row_has_a_source():
    table = published.load_published()
    assert len(table) >= 10
    assert table["source"].str.strip().astype(bool).all() and table["locator"].str.strip().astype(bool).all()
    assert table["url"].str.startswith("https://").all()
    assert set(table["method"]) == {"dense", "adavit", "dynamicvit", "evit", "tome"}
    assert set(table["backbone"]) == set(published.BACKBONES)
    evit = table[(table["method"] == "evit") & (table["setting"] == "keep_rate=0.7;fuse=true")].iloc[0]
    assert (evit["top1"], evit["gflops"], evit["params"]) == (79.5, 3.0, {"keep_rate": 0.7, "fuse": True})
    # every printed number is quoted in the evidence file next to its source text
    evidence = published.PUBLISHED.with_name("published_numbers_evidence.md").read_text(encoding="utf-8")
    raw = pd.read_csv(published.PUBLISHED, dtype=str, keep_default_na=False)
    missing = [(i + 1, c, row[c]) for i, row in raw.iterrows() for c in published.NUMERIC
               if row[c] and row[c] not in evidence]
    assert not missing, f"numbers without a quote in published_numbers_evidence.md: {missing}"


@pytest.mark.parametrize("text, expected", [
    ("", {}), ("keep_rate=0.7", {"keep_rate": 0.7}), ("keep_rate=0.7;fuse=false", {"keep_rate": 0.7, "fuse": False}),
    ("r=13", {"r": 13}), (" r = 8 ; prop_attn=true ", {"r": 8, "prop_attn": True}), ("unspecified", None),
])
def test_parse_setting(text, expected):
    assert published.parse_setting(text) == expected


@pytest.mark.parametrize("printed, digits", [("2.9", 1), ("11.4", 1), ("79.32", 2), ("4385", 0), ("3.0", 1)])
def test_decimals_as_printed(printed, digits):
    assert published.decimals(printed) == digits


@pytest.mark.parametrize("row, message", [
    (GOOD.replace("DynamicViT README,", ","), r"row 1: empty source"),
    (GOOD.replace(",Model Zoo,", ",,"), r"row 1: empty locator"),
    (GOOD.replace("https://github.com/raoyongming/DynamicViT", "github.com/x"), r"row 1: url 'github.com/x'"),
    (GOOD.replace("deit_small", "swin_small"), r"row 1: backbone 'swin_small' unknown; valid: deit_tiny"),
    (GOOD.replace("79.32", "79.3%"), r"row 1: top1='79.3%' is not a number"),
    (GOOD.replace("79.32,2.9", ","), r"row 1: no top1, gflops or throughput"),
    (GOOD.replace("keep_rate=0.7", "keep_rate"), r"row 1: setting 'keep_rate': 'keep_rate' is not key=value"),
    (GOOD + ",extra", r"row 1: wrong number of fields"),
])
def test_a_bad_row_is_refused_naming_row_and_column(tmp_path, row, message):
    path = tmp_path / "published.csv"
    path.write_text(f"{HEADER}\n{row}\n", encoding="utf-8")
    with pytest.raises(PublishedError, match=message):
        published.load_published(path)


def test_a_wrong_header_is_refused(tmp_path):
    path = tmp_path / "published.csv"
    path.write_text(HEADER.replace("locator", "where") + "\n" + GOOD + "\n", encoding="utf-8")
    with pytest.raises(PublishedError, match=r"header .* is not"):
        published.load_published(path)


def measured(method, params, gflops, *, model="deit_small", img_size=224, kind="measure", data="digits",
             top1=math.nan):
    return {"kind": kind, "method": method, "model": model, "img_size": img_size, "method_params": params,
            "gflops": gflops, "data": data, "top1": top1}


def test_compare_matches_settings_and_flags_flops_beyond_rounding(tmp_path):
    path = tmp_path / "published.csv"
    path.write_text("\n".join([
        HEADER, GOOD,
        GOOD.replace("dynamicvit,", "evit,").replace("keep_rate=0.7", "keep_rate=0.7;fuse=true").replace("2.9", "3.0"),
        GOOD.replace("dynamicvit,", "evit,").replace("keep_rate=0.7", "keep_rate=0.7;fuse=false").replace("2.9", "3.0"),
        GOOD.replace("deit_small", "deit_base").replace("2.9", "11.4"),
        GOOD.replace("keep_rate=0.7", "unspecified").replace("2.9", ""),                 # an abstract's claim
    ]) + "\n", encoding="utf-8")
    records = pd.DataFrame([
        measured("dynamicvit", {"keep_rate": 0.7, "inference_keep_rate": None}, 2.98),   # 0.08 > 0.05: differs
        measured("dynamicvit", {"keep_rate": 0.7}, 9.99, img_size=32),                  # other resolution: ignored
        measured("dynamicvit", {"keep_rate": 0.5}, 1.9),                                # other setting: ignored
        measured("evit", {"keep_rate": 0.7, "fuse": True}, 3.03),                        # within 0.05: matches
        measured("evit", {"keep_rate": 0.7, "fuse": True}, 3.05, kind="tradeoff"),       # not a run/measure
        measured("dynamicvit", {"keep_rate": 0.7}, 11.43, model="deit_base", kind="run", data="imagefolder",
                 top1=81.0),
        measured("dynamicvit", {"keep_rate": 0.7}, 11.41, model="deit_base", kind="run", data="imagefolder",
                 top1=81.5),
    ])
    frame = published.compare(published.load_published(path), records).set_index("row")
    assert frame.loc[1, "measured_gflops"] == pytest.approx(2.98) and frame.loc[1, "flops_flag"] == "differs"
    assert frame.loc[1, "gflops_diff"] == pytest.approx(0.08) and frame.loc[1, "measured_records"] == 1
    assert frame.loc[2, "flops_flag"] == "matches" and frame.loc[2, "measured_gflops"] == pytest.approx(3.03)
    assert frame.loc[3, "measured_records"] == 0 and frame.loc[3, "flops_flag"] == ""  # no fuse=false record
    assert frame.loc[4, "measured_gflops"] == pytest.approx(11.42) and frame.loc[4, "flops_flag"] == "matches"
    assert frame.loc[4, "measured_top1"] == pytest.approx(81.25) and math.isnan(frame.loc[1, "measured_top1"])
    assert frame.loc[5, "measured_records"] == 0 and math.isnan(frame.loc[5, "measured_gflops"])
    table = published.comparison_table(frame.reset_index())
    assert list(table.display["Flag"]) == ["FLOPs differ", "ok", "—", "ok", "—"]
    assert list(table.display["GFLOPs reported"]) == ["2.9", "3.0", "3.0", "11.4", "—"]
    # 81.0 and 81.5: s = 0.3536, t_{0.975,1} = 12.706205, half-width 12.706205 x 0.3536 / sqrt(2) = 3.18
    assert frame.loc[4, "measured_top1_ci"] == pytest.approx(12.706205 * 0.5 / 2, rel=1e-6)
    assert list(table.display["Top-1 measured (± 95% CI)"]) == ["—", "—", "—", "81.25 ± 3.18 (n=2)", "—"]
