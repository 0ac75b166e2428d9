"""What the figures draw from: owns the selection of records and settings shared by :mod:`analysis.plots`,
:mod:`analysis.depth_figures` and :mod:`analysis.video`: the backbones of an aggregate, the block count of a
backbone, the records behind one aggregated row, and the one representative setting per method that the
token-map figures compare.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from . import load
from .formatting import REFERENCE


def backbones(agg: pd.DataFrame) -> list[tuple[str, str, str, pd.DataFrame]]:
    return [(m, d, s, g.reset_index(drop=True)) for (m, d, s), g in agg.groupby(["model", "data", "slug"], sort=True)]


def depth_of(records: pd.DataFrame) -> Optional[int]:
    """Block count L: from the token curves (or the depth histogram) of the records."""
    for tokens in records["tokens"]:
        curve = (tokens or {}).get("attn_mean")
        if isinstance(curve, list) and curve:
            return len(curve)
        hist = (tokens or {}).get("depth_histogram")
        if isinstance(hist, list) and len(hist) > 1:
            return len(hist) - 1
    return None


def records_of(records: pd.DataFrame, row: pd.Series) -> pd.DataFrame:
    """The records behind one aggregated row (same backbone, method, params and kind)."""
    return records[(records["model"] == row["model"]) & (records["data"] == row["data"]) &
                   (records["method"] == row["method"]) & (records["params_key"] == row["params_key"]) &
                   (records["kind"] == row["kind"])]


def representative_settings(agg: pd.DataFrame, records: pd.DataFrame, model: str, data: str,
                            need: str = "maps") -> pd.DataFrame:
    """One setting per reduction method (the reference, family ``none``, excluded) whose records carry ``tokens.<need>``: the one with
    FLOPs ratio closest to the median ratio of all such settings (ties and missing FLOPs: sort order)."""
    part = agg[(agg["model"] == model) & (agg["data"] == data) & (agg["family"] != REFERENCE)]
    recs = records[(records["model"] == model) & (records["data"] == data)]
    has = set()
    for _, rec in recs.iterrows():
        tokens = rec["tokens"] or {}
        ok = bool(load.depth_maps(tokens)) if need == "maps" else load.mean_patch_depth(tokens) is not None
        if ok:
            has.add((rec["method"], rec["params_key"], rec["kind"]))
    # a boolean array, not a list: an empty list would select columns (a backbone with dense records only)
    part = part[np.array([key in has for key in zip(part["method"], part["params_key"], part["kind"])], dtype=bool)]
    if (part["kind"] == "run").any():
        part = part[part["kind"] == "run"]  # trained models, when there are any
    if part.empty:
        return part
    target = part["flops_ratio_mean"].median()
    chosen = []
    for _, settings in part.groupby("method", sort=False):
        distance = (settings["flops_ratio_mean"] - target).abs().fillna(np.inf)
        chosen.append(settings.index[int(np.argmin(distance.to_numpy()))])
    return part.loc[chosen]
