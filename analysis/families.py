"""Which tokens to use: pruning vs merging vs clustering at matched FLOPs. Owns the family comparison table.

Haurum et al. ("Which Tokens to Use?", ICCVW 2023) compare token-reduction *families* and find plain top-k
pruning a surprisingly strong baseline. This module asks the same question of our records. A method's family is
the one its registration declares (``methods.registry.FAMILIES``: pruning, merging, clustering, halting), as the
harness writes it into each record (``method_info.family``); the compared families are those present, without
the dense reference (``none``) and methods whose records declare none (``—``).

Every method contributes *curves* on a backbone:

- its run settings (``kind: run``, seeds averaged), ordered by FLOPs, as one curve: between two trained
  settings, choosing either model at random reaches any point on the segment, so linear interpolation is an
  achievable (if conservative) accuracy at that budget;
- each of its trade-off curves (one checkpoint swept over its knob, :mod:`analysis.curves`).

At each FLOPs budget (50/65/80% of dense), each curve's top-1 is interpolated, never extrapolated
(:func:`analysis.curves.top1_at_flops`), and a family's entry is its best curve there, named, with the 95% CI of
the seeds' own interpolated values (:func:`analysis.curves.seed_interval`). Every family whose interval
overlaps the best family's is marked tied for best (:func:`analysis.stats.tied_for_best`). The caveat printed
under the table: on the embedded digits data the ranking says little about ImageNet.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd

from . import curves, tables
from .formatting import DASH, REFERENCE, plus_minus
from .stats import tied_for_best

FOOTNOTE = (
    "Best top-1 (%) of each family at a FLOPs budget (FLOPs ratio = GFLOPs ÷ dense GFLOPs), with the method and "
    "source that reach it: 'runs' interpolates between a method's trained or off-the-shelf run settings "
    "(seed means), 'curve' one checkpoint per seed swept over its knob. Linear interpolation, never "
    "extrapolated; ± the 95% CI half-width of the seeds' own interpolated values (Student t over the n seeds "
    "spanning the budget, n=…). Tied for best: every family whose interval overlaps that of the "
    "highest top-1 at the budget (one seed: no interval, counted as tied). — = no curve of the family spans the "
    "budget. Families as registered (methods/registry.py). Caveat: on the "
    "embedded digits data (8x8 px upsampled, 10 classes) these rankings need not carry over to ImageNet."
)


def compared(frame: pd.DataFrame) -> list[str]:
    """The families of ``frame`` the table compares, by name: every declared one but the reference."""
    return sorted(set(frame["family"]) - {REFERENCE, DASH})


def family_curves(agg: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    """One row per point of every curve: ``model``, ``data``, ``slug``, ``family``, ``method``, ``source``
    (``runs``, or ``curve`` with the curve's label where it is not just the method), ``flops_ratio``,
    ``top1`` and, per seed (seed -> value), ``top1_by_seed`` and ``flops_by_seed``."""
    rows: list[dict[str, Any]] = []
    runs = agg[agg["kind"] == "run"] if not agg.empty else agg
    for _, row in runs.iterrows():
        rows.append({"model": row["model"], "data": row["data"], "slug": row["slug"], "family": row["family"],
                     "method": row["method"], "source": "runs", "flops_ratio": row["flops_ratio_mean"],
                     "top1": row["top1_mean"], "top1_by_seed": row["top1_by_seed"],
                     "flops_by_seed": row["flops_ratio_by_seed"]})
    for _, row in (points.iterrows() if not points.empty else iter(())):
        rows.append({"model": row["model"], "data": row["data"], "slug": row["slug"], "family": row["family"],
                     "method": row["method"],
                     "source": "curve" if row["label"] == row["method"] else f"curve {row['label']}",
                     "flops_ratio": row["flops_ratio_mean"], "top1": row["top1_mean"],
                     "top1_by_seed": row["top1_by_seed"], "flops_by_seed": row["flops_ratio_by_seed"]})
    return pd.DataFrame(rows, columns=["model", "data", "slug", "family", "method", "source", "flops_ratio", "top1",
                                       "top1_by_seed", "flops_by_seed"])


def family_frame(frame: pd.DataFrame, targets: Iterable[float] = curves.TARGETS) -> pd.DataFrame:
    """Per backbone, target and compared family: the best interpolated top-1, its 95% CI half-width and seeds
    (``ci``, ``n``), the curve reaching it, and ``tied`` (its interval overlaps the best family's)."""
    rows = []
    for (model, data, slug), part in frame.groupby(["model", "data", "slug"], sort=False):
        for target in targets:
            entries = []
            for family in compared(frame):
                best: dict[str, Any] = {"model": model, "data": data, "slug": slug, "target": float(target),
                                        "family": family, "top1": math.nan, "ci": math.nan, "n": 0,
                                        "method": None, "source": None}
                members = part[part["family"] == family]
                for (method, source), curve in members.groupby(["method", "source"], sort=False):
                    value = curves.top1_at_flops(curve["flops_ratio"], curve["top1"], target)
                    if not math.isnan(value) and (math.isnan(best["top1"]) or value > best["top1"]):
                        half, n = curves.seed_interval(curve["flops_by_seed"], curve["top1_by_seed"], target)
                        best.update(top1=value, ci=half, n=n, method=method, source=source)
                entries.append(best)
            tied = tied_for_best([e["top1"] for e in entries], [e["ci"] for e in entries])
            rows += [{**entry, "tied": flag} for entry, flag in zip(entries, tied)]
    return pd.DataFrame(rows)


def family_table(frame: pd.DataFrame, model: str, data: str) -> Optional[tables.Table]:
    part = frame[(frame["model"] == model) & (frame["data"] == data)]
    if part.empty or part["top1"].isna().all():
        return None
    present = [f for f in compared(part) if part.loc[part["family"] == f, "top1"].notna().any()]
    display, numeric = [], []
    for target, rows in part.groupby("target", sort=False):
        cells: dict[str, str] = {"FLOPs budget": f"{target * 100:.0f}% of dense"}
        for family in present:
            row = rows[rows["family"] == family].iloc[0]
            seeds = f", n={row['n']}" if row["n"] else ""
            cells[family] = (DASH if row["method"] is None else
                             f"{plus_minus(row['top1'], row['ci'], '.2f')} ({row['method']}, {row['source']}{seeds})")
            numeric.append({"target": target, "family": family, "top1": row["top1"], "ci": row["ci"],
                            "n": row["n"], "tied": bool(row["tied"]), "method": row["method"],
                            "source": row["source"]})
        cells["Tied for best"] = ", ".join(f for f in present if rows.loc[rows["family"] == f, "tied"].iloc[0]) \
            or DASH
        display.append(cells)
    return tables.Table(f"Which tokens to use: families at matched FLOPs, {model} on {data}",
                        pd.DataFrame(display), pd.DataFrame(numeric), "l" + "l" * len(present) + "l")


def write_family_tables(agg: pd.DataFrame, records: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """``families_<backbone>.{md,tex,csv}`` for every backbone where some family spans a budget."""
    if agg.empty:
        return []
    frame = family_frame(family_curves(agg, curves.curve_points(records)))
    if frame.empty:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for (model, data, slug), _ in frame.groupby(["model", "data", "slug"], sort=False):
        table = family_table(frame, model, data)
        if table is not None:
            paths += table.write(out / f"families_{slug}", f"tab:families-{slug}", footnote=FOOTNOTE)
    if not paths:
        print("note: no family spans a 50/65/80% FLOPs budget; no family comparison table")
    return paths
