"""Seed aggregation of the report: one row per backbone and setting from the per-record frame.

:func:`aggregate` turns the per-record frame of :func:`analysis.load.load_records` into one row per backbone
(``model`` and ``data``) and setting (``method`` and ``method_params``): mean and sample std over seeds of
top-1, GFLOPs, FLOPs ratio and, per throughput condition, img/s, speedup and efficiency, the 95% CI of the
accuracies (:mod:`analysis.stats`); the GFLOPs change against dense and the Δ top-1 paired by seed against
the setting's control (:mod:`analysis.controls`). :func:`without_tradeoff` picks the records it aggregates for
the tables and figures (``tradeoff`` points are :mod:`analysis.curves`'). The tables
(:mod:`analysis.tables`) and the figures read its frame.

Definitions: ``flops_ratio = GFLOPs / dense GFLOPs`` (per record, the record's own dense reference);
``speedup = img/s / dense img/s`` (per record, as measured in the same process); ``efficiency = speedup ×
flops_ratio``, i.e. the measured speedup over the FLOP reduction (1 = wall clock follows FLOPs). Each is
computed per record, then averaged over seeds. The dense reference is the method whose records declare the
family ``none`` (``method_info.family``, from the registry). Rows are sorted by backbone, by method (the
reference first, then by family and name: :func:`analysis.formatting.method_rank`), then by ``method_params``;
numbers are printed with fixed formats, so the same records always give the same files.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import pandas as pd

from . import controls, load
from .formatting import (REFERENCE, backbone_slug, differing_params, mean_std, method_defaults, method_families,
                         method_rank, params_sort_key, setting_labels)
from .throughput import single_protocol
from .stats import mean_ci


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
            "is_default": (None if defaults.get((method, model)) is None
                           else differing_params(group["method_params"].iloc[0], defaults[(method, model)])
                           == "default"),
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
                                defaults=defaults.get((frame.loc[idx[0], "method"], frame.loc[idx[0], "model"])))
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
