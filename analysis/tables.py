"""Tables of the report: owns seed aggregation, comparisons against dense, Pareto fronts and the table files.

- :func:`aggregate` turns the per-record frame of :func:`analysis.load.load_records` into one row per backbone
  (``model`` and ``data``) and setting (``method`` and ``method_params``): mean and sample std over seeds of
  top-1, GFLOPs, FLOPs ratio and, per throughput condition, img/s, speedup and efficiency, the 95% CI of the
  accuracies (:mod:`analysis.stats`); the GFLOPs change against dense and the Δ top-1 paired by seed against
  the setting's control (:mod:`analysis.controls`).
- :func:`main_table` and :func:`ablation_table` (any method with several settings on a backbone) select and
  format columns; :func:`write_tables` writes every table as Markdown, LaTeX (booktabs) and CSV through
  :class:`analysis.table_files.Table`, with its footnote under the Markdown and LaTeX versions.
- :func:`pareto_front` is shared with the figures; :func:`analysis.table_files.write_index` writes
  ``report.md``, which links every table and figure.

The report aggregates once (``aggregate(without_tradeoff(records))``) and passes that frame to every table and
figure. Number formats and the method order live in :mod:`analysis.formatting`.

Definitions: ``flops_ratio = GFLOPs / dense GFLOPs`` (per record, the record's own dense reference);
``speedup = img/s / dense img/s`` (per record, as measured in the same process); ``efficiency = speedup ×
flops_ratio``, i.e. the measured speedup over the FLOP reduction (1 = wall clock follows FLOPs). Each is
computed per record, then averaged over seeds. The dense reference is the method whose records declare the
family ``none`` (``method_info.family``, from the registry). Rows are sorted by backbone, by method (the
reference first, then by family and name: :func:`analysis.formatting.method_rank`), then by ``method_params``;
numbers are printed with fixed formats, so the same records always give the same files.
"""
from __future__ import annotations

import json
import math
import numbers
import re
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

from . import controls, load
from .formatting import (DASH, REFERENCE, condition_title, differing_params, fmt, fmt_rate, format_value,
                         mean_std, method_defaults, method_families, method_rank, plus_minus)
from .throughput import headline_condition, single_protocol
from .stats import mean_ci
from .table_files import FOOTNOTE, Table, latex_escape, write_index  # noqa: F401  (re-exported: tables.Table...)

# --- ordering and labels --------------------------------------------------------------------------------------

def _value_key(value: Any) -> tuple:
    if isinstance(value, bool):
        return (1, str(value))
    if isinstance(value, numbers.Real):
        return (0, float(value), "")
    return (2, json.dumps(value, sort_keys=True, default=str))


def params_sort_key(params: dict[str, Any]) -> tuple:
    """Settings sort by their parameters, key by key, numbers numerically."""
    return tuple((key, _value_key(params[key])) for key in sorted(params))


def varying_keys(params_list: Iterable[dict[str, Any]]) -> list[str]:
    """The parameter names whose value differs between settings (a key missing somewhere counts as differing)."""
    params_list = list(params_list)
    keys = sorted(set().union(*[p.keys() for p in params_list])) if params_list else []
    return [k for k in keys
            if len({json.dumps(p.get(k, "<missing>"), sort_keys=True, default=str) for p in params_list}) > 1]


def setting_labels(params_list: list[dict[str, Any]], max_keys: int = 3,
                   defaults: Optional[dict[str, Any]] = None) -> list[str]:
    """Short labels telling the settings of one method apart: with the method's ``defaults`` (as its records
    state them), the parameters that differ from them (``default`` when none does); without, the parameters
    that differ between the settings, or all of them for a single setting with at most ``max_keys``
    parameters, else ``default``."""
    if defaults is not None:
        return [differing_params(params, defaults) if params else DASH for params in params_list]
    keys = varying_keys(params_list)
    labels = []
    for params in params_list:
        shown = keys or (sorted(params) if len(params) <= max_keys else [])
        text = ", ".join(f"{k}={format_value(params[k])}" for k in shown if k in params)
        labels.append(text or ("default" if params else DASH))
    return labels


def backbone_slug(model: str, data: str, several_data: bool) -> str:
    text = f"{model}_{data}" if several_data else model
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


# --- Pareto fronts --------------------------------------------------------------------------------------------

def pareto_front(x: Iterable[float], y: Iterable[float], *, maximize_x: bool = False,
                 maximize_y: bool = True) -> np.ndarray:
    """Boolean mask of the points no other point dominates.

    A point is dominated when another is at least as good on both axes and strictly better on one
    (by default: lower ``x``, e.g. GFLOPs, and higher ``y``, e.g. top-1). NaN points are never on the front;
    exact duplicates of a front point are both on it.
    """
    xs = np.asarray(list(x), dtype=float)
    ys = np.asarray(list(y), dtype=float)
    if xs.shape != ys.shape:
        raise ValueError(f"x and y differ in length: {xs.shape} vs {ys.shape}")
    gx = xs if maximize_x else -xs  # larger is better on both after the sign flips
    gy = ys if maximize_y else -ys
    valid = ~(np.isnan(gx) | np.isnan(gy))
    mask = valid.copy()
    for i in np.flatnonzero(valid):
        others = valid.copy()
        others[i] = False
        dominated = others & (gx >= gx[i]) & (gy >= gy[i]) & ((gx > gx[i]) | (gy > gy[i]))
        mask[i] = not dominated.any()
    return mask


# --- aggregation ----------------------------------------------------------------------------------------------

def without_tradeoff(records: pd.DataFrame) -> pd.DataFrame:
    """The ``run`` and ``measure`` records: what the tables and figures aggregate (``tradeoff`` points are
    :mod:`analysis.curves`')."""
    return records[records["kind"] != "tradeoff"] if not records.empty else records


def mean_depth(tokens: Optional[dict]) -> float:
    """Mean number of blocks that saw a patch token: from ``depth_histogram``, else ``mean_patch_depth``."""
    hist = load.depth_histogram(tokens)
    if hist is not None:
        return float(np.sum(hist * np.arange(len(hist))))
    grid = load.mean_patch_depth(tokens)
    return float(np.mean(grid)) if grid is not None else math.nan


def aggregate(records: pd.DataFrame) -> pd.DataFrame:
    """One row per backbone and setting, seeds aggregated; see the module docstring for the definitions.

    Records of another ``kind`` than ``run`` (``measure``: costs of an untrained model) form their own rows,
    marked ``[measure]`` in ``setting`` and sorted after the run of the same setting.

    Columns: ``model``, ``data``, ``slug``, ``method``, ``family`` (``—`` where no record declares one),
    ``method_params``, ``params_key``, ``kind``, ``setting``,
    ``n_seeds``, ``seeds``, ``params``, then ``<metric>_mean``/``<metric>_std`` for ``top1``, ``top5``,
    ``gflops``, ``flops_ratio``, ``depth`` and, per condition ``c``, ``img_per_s[c]``, ``speedup[c]``,
    ``efficiency[c]``; ``top1_ci``/``top1_n`` and ``top5_ci``/``top5_n`` (95% CI half-width, seeds with a
    value); ``top1_by_seed`` and ``flops_ratio_by_seed`` (seed -> value); ``top1_delta``, ``top1_delta_ci``,
    ``top1_delta_n``, ``delta_against`` and ``control_missing`` (:func:`analysis.controls.paired_delta`);
    ``gflops_change_pct`` against dense; ``record_ids`` (the records the row averages, comma-separated) and, per
    condition, ``record_ids[c]`` (those with a timing there); ``fine_tuned``; ``is_default`` (the method's
    default setting, as its records state it; ``None`` when they do not). ``setting`` shows the parameters that
    differ from the default. ``conditions`` and ``protocol_left_out`` (throughput entries of an older timing
    protocol than their column's: :func:`analysis.throughput.single_protocol`) are stored in ``frame.attrs``.
    """
    if records.empty:
        return pd.DataFrame()
    records = records.copy()
    records["depth"] = records["tokens"].map(mean_depth)
    families = method_families(records)
    defaults = method_defaults(records)
    records["family"] = records["method"].map(families)
    # a record without its own dense reference falls back to the dense records of its backbone
    dense_g = records[records["family"] == REFERENCE].groupby(["model", "data"])["gflops"].mean()
    fallback = [g / dense_g.get((m, d), math.nan) for m, d, g in zip(records["model"], records["data"],
                                                                        records["gflops"])]
    records["flops_ratio"] = records["flops_ratio"].fillna(pd.Series(fallback, index=records.index))
    through, protocol_left_out = single_protocol(load.throughput_frame(records))  # one protocol per column
    conds = load.conditions(through)
    if not through.empty:
        # the FLOPs of the timed images where the entry has them (timing protocol 2), else the record's
        ratio = through["timed_flops_ratio"].fillna(through["record_id"].map(records.set_index("record_id")
                                                                            ["flops_ratio"]))
        through["efficiency"] = through["speedup"] * ratio
    several = records.groupby("model")["data"].nunique().to_dict()

    rows = []
    # a row averages the seeds of one setting (record identity without seed and starting weights): records of
    # another recipe, data folder or fine-tuning choice with the same parameters are rows of their own
    keys = ["model", "data", "method", "params_key", "kind", "setting_key"]
    for (model, data, method, pkey, kind, setting_key), group in records.groupby(keys, sort=False):
        group = group.sort_values("seed", key=load.text_sort_key, kind="stable")
        row: dict[str, Any] = {
            "model": model, "data": data, "slug": backbone_slug(model, data, several[model] > 1),
            "method": method, "family": families[method], "method_params": group["method_params"].iloc[0],
            "params_key": pkey, "kind": kind, "setting_key": setting_key,
            "n_seeds": len(group), "seeds": ",".join(str(s) for s in group["seed"]),
            "record_ids": ",".join(group["record_id"]),  # what the row averages, in seed order
            "fine_tuned": bool(group["fine_tuned"].iloc[0]),
            "is_default": (None if defaults.get(method) is None
                           else differing_params(group["method_params"].iloc[0], defaults[method]) == "default"),
            "params": group["params"].mean() if group["params"].notna().any() else math.nan,
        }
        for metric in ("top1", "top5", "gflops", "flops_ratio", "depth"):
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(group[metric])
        for metric in ("top1", "top5"):  # accuracies carry their 95% CI and n (analysis.stats)
            _, row[f"{metric}_ci"], row[f"{metric}_n"] = mean_ci(group[metric])
        row["top1_by_seed"] = dict(zip(group["seed"], group["top1"]))  # per-seed curves (analysis.families)
        row["flops_ratio_by_seed"] = dict(zip(group["seed"], group["flops_ratio"]))
        row.update(controls.paired_delta(group, records))
        sub = through[through["record_id"].isin(group["record_id"])] if not through.empty else through
        for cond in conds:
            part = sub[sub["condition"] == cond] if not sub.empty else sub
            for metric in ("img_per_s", "speedup", "efficiency"):
                values = part[metric] if not part.empty else pd.Series(dtype=float)
                row[f"{metric}_mean[{cond}]"], row[f"{metric}_std[{cond}]"] = mean_std(values)
            timed = set(part["record_id"]) if not part.empty else set()
            row[f"record_ids[{cond}]"] = ",".join(r for r in group["record_id"] if r in timed)  # in seed order
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame["_order"] = [(m, d, method_rank(me, f), params_sort_key(p), k != "run", k) for m, d, me, f, p, k in
                       zip(frame["model"], frame["data"], frame["method"], frame["family"], frame["method_params"],
                           frame["kind"])]
    frame = frame.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    frame["setting"] = ""
    for _, idx in frame.groupby(["model", "data", "method"], sort=False).groups.items():
        labels = setting_labels(list(frame.loc[idx, "method_params"]),
                                defaults=defaults.get(frame.loc[idx[0], "method"]))
        frame.loc[idx, "setting"] = [label if kind == "run" else f"{label} [{kind}]"
                                     for label, kind in zip(labels, frame.loc[idx, "kind"])]
    # rows whose parameters agree but whose identities differ (recipe, data files, measurement) say which is which:
    # fine-tuned or not first, then by the identity's digest
    twins = frame.duplicated(["model", "data", "method", "setting"], keep=False)
    tuned = twins & frame["fine_tuned"] & (frame["kind"] == "run")
    frame.loc[tuned, "setting"] = [f"{label}, fine-tuned" for label in frame.loc[tuned, "setting"]]
    twins = frame.duplicated(["model", "data", "method", "setting"], keep=False)
    frame.loc[twins, "setting"] = [f"{label} [setting {key[:6]}]" for label, key in
                                   zip(frame.loc[twins, "setting"], frame.loc[twins, "setting_key"])]
    frame["gflops_change_pct"] = (frame["flops_ratio_mean"] - 1.0) * 100.0
    frame.attrs["conditions"] = conds
    frame.attrs["protocol_left_out"] = protocol_left_out  # throughput entries of an older timing protocol
    return frame


# --- tables ----------------------------------------------------------------------------------------------------

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
