"""Tables of the report: owns which columns each table shows, how its cells read, and the table files.

- :func:`main_table` (one backbone: every method and setting, throughput at one condition),
  :func:`throughput_table` (every timed condition) and :func:`ablation_table` (any method with several settings
  on a backbone) select and format columns from the frame of :func:`analysis.aggregation.aggregate`;
- :func:`write_tables` writes every table as Markdown, LaTeX (booktabs) and CSV through
  :class:`analysis.table_files.Table`, with its footnote under the Markdown and LaTeX versions;
  :func:`analysis.table_files.write_index` writes ``report.md``, which links every table and figure.

The report aggregates once (``aggregation.aggregate(aggregation.without_tradeoff(records))``) and passes that
frame to every table and figure; the definitions of its numbers are :mod:`analysis.aggregation`'s. Number
formats, setting labels and the method order live in :mod:`analysis.formatting`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import pandas as pd

from . import controls
from .formatting import (DASH, REFERENCE, condition_title, fmt, fmt_rate, format_value, plus_minus,
                         varying_keys)
from .throughput import headline_condition
from .table_files import FOOTNOTE, Table, latex_escape, write_index  # noqa: F401  (re-exported: tables.Table...)

TOP1_COLUMN = "Top-1 (%, mean ± 95% CI)"  # every accuracy of the report: mean ± CI half-width, n = Seeds
DELTA_COLUMN = "Δ Top-1 (paired, ± 95% CI)"


def _condition_columns(row: pd.Series, conds: list[str], with_images: bool) -> dict:
    out = {}
    for cond in conds:
        if with_images:
            out[f"img/s ({cond})"] = fmt_rate(row[f"img_per_s_mean[{cond}]"])
        out[f"Speedup ({cond})"] = fmt(row[f"speedup_mean[{cond}]"], ".2f", "×")
        if with_images:
            out[f"Eff. ({cond})"] = fmt(row[f"efficiency_mean[{cond}]"], ".2f")
    return out


def _numeric(agg: pd.DataFrame, conds: Optional[list[str]] = None) -> pd.DataFrame:
    """The numeric columns of ``agg`` for CSV, throughput for ``conds`` (default: every condition)."""
    conds = agg.attrs.get("conditions", []) if conds is None else conds
    columns = ["model", "data", "method", "setting", "kind", "params_key", "n_seeds", "seeds", "record_ids", "params",
               "top1_mean", "top1_std", "top1_ci", "top1_n", "top1_delta", "top1_delta_ci", "top1_delta_n",
               "delta_against", "top5_mean", "top5_std", "top5_ci", "gflops_mean", "gflops_std",
               "flops_ratio_mean", "flops_ratio_std", "gflops_change_pct", "depth_mean", "depth_std"]
    for cond in conds:
        for metric in ("img_per_s", "speedup", "efficiency"):
            columns += [f"{metric}_mean[{cond}]", f"{metric}_std[{cond}]"]
    return agg[columns].reset_index(drop=True)


def _present_conditions(agg: pd.DataFrame, part: pd.DataFrame) -> list[str]:
    """The throughput conditions measured for at least one row of ``part``."""
    return [c for c in agg.attrs.get("conditions", []) if part[f"img_per_s_mean[{c}]"].notna().any()]


def short_id(record_id: str) -> str:
    """The distinctive tail of a record id (``20261203T171944_sinkhorn_..._s0_2eba98b6`` -> ``2eba98b6``): what
    a table cell shows; the CSV keeps the full ids."""
    return str(record_id).rsplit("_", 1)[-1]


def records_cell(ids: str) -> str:
    """The short ids of a comma-separated list of record ids, space-separated (:data:`DASH` for none)."""
    return " ".join(short_id(i) for i in ids.split(",") if i) or DASH


def main_condition(agg: pd.DataFrame, part: pd.DataFrame) -> Optional[str]:
    """The one throughput condition the main table of ``part`` (one backbone's rows) shows:
    :func:`analysis.throughput.headline_condition` over the conditions measured there."""
    return headline_condition({c: int(part[f"img_per_s_mean[{c}]"].notna().sum())
                               for c in _present_conditions(agg, part)})


def main_table(agg: pd.DataFrame, model: str, data: str) -> Table:
    """The main comparison for one backbone: one row per method and setting, throughput at one condition
    (:func:`main_condition`; the others are in :func:`throughput_table`), the records each row averages."""
    part = agg[(agg["model"] == model) & (agg["data"] == data)].reset_index(drop=True)
    headline = main_condition(agg, part)
    conds = [headline] if headline else []
    rows = []
    deltas, notes = controls.delta_cells(part)
    for (_, row), delta in zip(part.iterrows(), deltas):
        dense = row["family"] == REFERENCE
        rows.append({
            "Method": row["method"], "Setting": row["setting"], "Seeds": str(row["n_seeds"]),
            "Params (M)": fmt(row["params"] / 1e6, ".2f"), "GFLOPs": fmt(row["gflops_mean"], ".3f"),
            "Δ GFLOPs": DASH if dense else fmt(row["gflops_change_pct"], "+.1f", "%"),
            **_condition_columns(row, conds, with_images=True),
            TOP1_COLUMN: plus_minus(row["top1_mean"], row["top1_ci"], ".2f"),
            DELTA_COLUMN: delta, "Δ against": row["delta_against"] or DASH,
            "Records": records_cell(row["record_ids"]),
        })
    display = pd.DataFrame(rows)
    align = "ll" + "r" * (len(display.columns) - 4) + "ll"
    rules = [i for i in range(1, len(part)) if part["method"][i] != part["method"][i - 1]]
    title = f"Main results: {model} on {data}"
    if headline:  # the other conditions: the throughput table (the footnote says so)
        title += f" (throughput: {condition_title(headline)})"
    return Table(title, display, _numeric(part, conds), align, rules, notes)


def _rate_spread(mean: float, std: float) -> str:
    """img/s as ``mean ± std``, both with :func:`analysis.formatting.fmt_rate`'s digits (the mean alone for one
    seed)."""
    return fmt_rate(mean) if math.isnan(std) else f"{fmt_rate(mean)} ± {fmt_rate(std)}"


def throughput_table(agg: pd.DataFrame, model: str, data: str) -> Optional[Table]:
    """Every measured throughput of one backbone, one row per condition and setting (conditions as rows, in
    their fixed order); ``None`` when nothing was timed. One timing protocol per condition
    (:func:`analysis.throughput.single_protocol`)."""
    part = agg[(agg["model"] == model) & (agg["data"] == data)].reset_index(drop=True)
    conds = _present_conditions(agg, part)
    rows, numeric = [], []
    for cond in conds:
        measured = part[part[f"img_per_s_mean[{cond}]"].notna()]
        for _, row in measured.iterrows():
            ids = row[f"record_ids[{cond}]"]
            rows.append({"Condition": condition_title(cond), "Method": row["method"], "Setting": row["setting"],
                         "Seeds": str(len(ids.split(","))),
                         "img/s": _rate_spread(row[f"img_per_s_mean[{cond}]"], row[f"img_per_s_std[{cond}]"]),
                         "Speedup": fmt(row[f"speedup_mean[{cond}]"], ".2f", "×"),
                         "Eff.": fmt(row[f"efficiency_mean[{cond}]"], ".2f"), "Records": records_cell(ids)})
            numeric.append({"model": model, "data": data, "condition": cond, "method": row["method"],
                            "setting": row["setting"], "params_key": row["params_key"], "record_ids": ids,
                            **{f"{m}_{k}": row[f"{m}_{k}[{cond}]"] for m in ("img_per_s", "speedup", "efficiency")
                               for k in ("mean", "std")}})
    if not rows:
        return None
    display = pd.DataFrame(rows)
    rules = [i for i in range(1, len(display)) if display["Condition"][i] != display["Condition"][i - 1]]
    return Table(f"Throughput: {model} on {data}", display, pd.DataFrame(numeric), "lll" + "r" * 4 + "l", rules)


def ablation_table(agg: pd.DataFrame, model: str, data: str, method: str) -> Optional[Table]:
    """The settings of ``method`` on one backbone side by side, one column per differing ``method_params`` key
    (e.g. A-ViT's ponder and prior weights, a keep rate); ``None`` unless the method has several settings
    (distinct ``method_params``; a run and a measure of one setting are one)."""
    part = agg[(agg["model"] == model) & (agg["data"] == data) & (agg["method"] == method)].reset_index(drop=True)
    if part["params_key"].nunique() < 2:
        return None
    conds = _present_conditions(agg, part)
    params = list(part["method_params"])
    keys = varying_keys(params) or sorted(set().union(*[p.keys() for p in params]))
    rows = []
    deltas, notes = controls.delta_cells(part)
    for (_, row), delta in zip(part.iterrows(), deltas):
        rows.append({
            **{k: format_value(row["method_params"][k]) if k in row["method_params"] else DASH for k in keys},
            "Seeds": str(row["n_seeds"]), TOP1_COLUMN: plus_minus(row["top1_mean"], row["top1_ci"], ".2f"),
            DELTA_COLUMN: delta, "GFLOPs": fmt(row["gflops_mean"], ".3f"),
            "Δ GFLOPs": fmt(row["gflops_change_pct"], "+.1f", "%"),
            "Mean depth": plus_minus(row["depth_mean"], row["depth_std"], ".2f"),
            **_condition_columns(row, conds, with_images=False),
        })
    display = pd.DataFrame(rows)
    numeric = _numeric(part, conds)
    for k in reversed(keys):
        numeric.insert(5, k, [p.get(k) for p in params])
    title = f"{method} ablation: {model} on {data}"
    return Table(title, display, numeric, "l" * len(keys) + "r" * (len(display.columns) - len(keys)), notes=notes)


def write_tables(agg: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write the main table of every backbone of ``agg`` (:func:`aggregate` of :func:`without_tradeoff`
    records: ``analysis.curves`` tabulates the tradeoff points) and the ablation of every method with several
    settings there into ``out_dir``; returns the paths.

    Files: ``main_<backbone>.{md,tex,csv}``, ``throughput_<backbone>.{md,tex,csv}`` (every timed condition),
    ``<method>_ablation_<backbone>.{md,tex,csv}`` (backbone = model
    name, plus the data set name when a model was run on several) and ``all_settings.csv`` (every aggregate).
    """
    out = Path(out_dir)
    if agg.empty:
        print("note: no run or measure records, no tables written")
        return []
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for (model, data, slug), part in agg.groupby(["model", "data", "slug"], sort=True):
        paths += main_table(agg, model, data).write(out / f"main_{slug}", f"tab:main-{slug}")
        timing = throughput_table(agg, model, data)
        if timing is not None:
            paths += timing.write(out / f"throughput_{slug}", f"tab:throughput-{slug}")
        for method in dict.fromkeys(part["method"]):  # agg order: the reference, then by family and name
            ablation = ablation_table(agg, model, data, method)
            if ablation is not None:
                paths += ablation.write(out / f"{method}_ablation_{slug}", f"tab:{method}-{slug}")
    everything = out / "all_settings.csv"
    numeric = _numeric(agg)
    everything.write_text(numeric.to_csv(index=False, float_format="%.10g", lineterminator="\n"), encoding="utf-8")
    paths.append(everything)
    return paths
