"""Released checkpoints reproduced here next to the numbers their authors published.

Owns the "Reproduced vs published" table. Its rows are the records of ``experiments/reproduce.py`` runs: ``run``
records evaluated on ImageNet-style data (``data=imagefolder``) at 224 px, off the shelf (not fine-tuned here),
from a named checkpoint file (``weights.checkpoint``, with its sha256 in ``weights.start_sha256``). Each is
matched to the rows of ``analysis/published_numbers.csv`` of the same method and backbone whose setting the
record's ``method_params`` agree with (as :func:`analysis.published.compare` matches), and shows the published
top-1 / GFLOPs, ours, and the difference (ours - published). A checkpoint with no published row keeps its row
with dashes; the method is the one its layout was detected as (``methods.official``), never its file name.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from . import load, published, tables
from .formatting import DASH, fmt

FOOTNOTE = ("Reproduced: the released checkpoint (file name, first 12 hex digits of its sha256) evaluated here "
            "by experiments/reproduce.py on the ImageNet validation folder, off the shelf; method and settings "
            "as detected from the file. Published: analysis/published_numbers.csv (source per row). "
            "Δ = reproduced - published; GFLOPs are GMACs on both sides.")
COLUMNS = ("checkpoint", "sha256", "method", "model", "method_params", "top1", "gflops", "path")


def reproduced(folder: str | Path, img_size: int = published.IMG_SIZE) -> pd.DataFrame:
    """One row per reproduction record under ``folder`` (module docstring; evaluated at ``img_size``), sorted
    by checkpoint name."""
    rows = []
    for path in load.find_record_files(folder):
        try:
            record = load.read_record(path)
        except load.RecordError:  # load.load_records names every skipped file once already
            continue
        weights = record.get("weights") if isinstance(record.get("weights"), dict) else {}
        data = (record.get("config") or {}).get("data") or {}
        if (record.get("kind") != "run" or not weights.get("checkpoint") or record.get("data") != "imagefolder"
                or data.get("img_size") != img_size or (record.get("train") or {}).get("epochs")):
            continue
        flops = record.get("flops") if isinstance(record.get("flops"), dict) else {}
        rows.append({"checkpoint": weights["checkpoint"], "sha256": str(weights.get("start_sha256") or ""),
                     "method": record["method"], "model": record["model"],
                     "method_params": record.get("method_params") or {},
                     "top1": load.number(record["metrics"].get("top1")), "gflops": load.number(flops.get("gflops")),
                     "path": str(Path(path).relative_to(folder))})
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(["checkpoint", "path"], ignore_index=True)


def compare(rows: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (:func:`reproduced`) with the matching published row's numbers and the differences; a record
    matching several published rows (e.g. two sources) gets one line per row."""
    out = []
    for _, row in rows.iterrows():
        found = table[(table["method"] == row["method"]) & (table["backbone"] == row["model"])]
        found = found[[published._matches(row["method_params"], p) for p in found["params"]]]
        for _, pub in (found.iterrows() if len(found) else [(None, None)]):
            top1 = pub["top1"] if pub is not None else math.nan
            gflops = pub["gflops"] if pub is not None else math.nan
            out.append({**row.to_dict(), "setting": pub["setting"] if pub is not None else "",
                        "source": f"{pub['source']}, {pub['locator']}" if pub is not None else "",
                        "published_top1": top1, "published_gflops": gflops,
                        "top1_diff": row["top1"] - top1, "gflops_diff": row["gflops"] - gflops})
    return pd.DataFrame(out)


def reproduction_table(frame: pd.DataFrame) -> tables.Table:
    display = pd.DataFrame([{
        "Checkpoint": f"{row['checkpoint']} ({row['sha256'][:12]})", "Method": row["method"],
        "Backbone": row["model"], "Setting": row["setting"] or DASH,
        "Top-1 published": fmt(row["published_top1"], ".2f"), "Top-1 reproduced": fmt(row["top1"], ".2f"),
        "Δ top-1": fmt(row["top1_diff"], "+.2f"),
        "GFLOPs published": fmt(row["published_gflops"], ".2f"), "GFLOPs here": fmt(row["gflops"], ".3f"),
        "Δ GFLOPs": fmt(row["gflops_diff"], "+.3f"), "Source": row["source"] or "no published row",
    } for _, row in frame.iterrows()])
    return tables.Table("Reproduced vs published", display, frame.reset_index(drop=True), "llll" + "r" * 6 + "l")


def write_reproduction(folder: str | Path, out_dir: str | Path,
                       path: str | Path = published.PUBLISHED) -> list[Path]:
    """``reproduced_vs_published.{md,tex,csv}`` in ``out_dir``; none (and a note) without reproduction records."""
    rows = reproduced(folder)
    if rows.empty:
        print("note: no reproduction records (experiments/reproduce.py), no reproduced-vs-published table written")
        return []
    frame = compare(rows, published.load_published(path))
    return reproduction_table(frame).write(Path(out_dir) / "reproduced_vs_published", "tab:reproduced",
                                           footnote=FOOTNOTE)

