"""The reference each setting's Δ top-1 is measured against: owns the control matching and the paired Δ.

A reduction method that was fine-tuned trains for longer than the dense baseline it started from, so comparing
it with that baseline measures the extra epochs. Its control is the reference (family ``none``) fine-tuned with
the *same recipe* (``config.train``) on the same model and data (:func:`control_fields`: the ``model``,
``data``, ``baseline`` and ``eval`` sections and the data folder's digest), matched seed by seed (and by
starting weights where both records name them: for a calibrated checkpoint, the weights it was calibrated on,
``weights.calibrated_from_sha256``). An off-the-shelf method is compared with the baseline itself
(the reference not fine-tuned); so is the fine-tuned reference (what the extra epochs give).

:func:`paired_delta` returns the mean of the per-seed differences with its 95% CI
(:func:`analysis.stats.paired_difference`), or, when no control record shares a seed, a note naming the missing
control and the command that produces it. When several control settings qualify, the one covering most seeds
wins (then the first by identity), so a row is always compared with one control setting.
"""
from __future__ import annotations

import copy
import json
import math
from typing import Any

import pandas as pd

from experiments.records.identity import NOT_RESULT_KEYS, content_digest, drop_key, fine_tuned

from .formatting import REFERENCE
from .stats import paired_difference

CONTEXT_SECTIONS = ("model", "data", "baseline", "eval")  # what a control shares with the setting besides seeds
NO_DELTA = {"top1_delta": math.nan, "top1_delta_ci": math.nan, "top1_delta_n": 0, "delta_against": "",
            "control_missing": ""}


def control_fields(record: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
    """The record's columns for control matching: ``fine_tuned``, ``recipe`` (canonical JSON of
    ``config.train`` when fine-tuned, else ``None``), ``control_context`` (digest of :data:`CONTEXT_SECTIONS`
    without the keys that cannot change a result, and the data folder's digest) and ``start_sha256`` (the
    weights it started from or, calibrated, was calibrated on)."""
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    context = {section: copy.deepcopy(config.get(section)) for section in CONTEXT_SECTIONS}
    for dotted in NOT_RESULT_KEYS:
        if "." in dotted:  # keys inside the shared sections; whole sections are not in the context
            drop_key(context, dotted)
    context["data_files"] = identity.get("data_files")
    trained = fine_tuned(record)
    weights = record.get("weights") if isinstance(record.get("weights"), dict) else {}
    return {"fine_tuned": trained,
            "recipe": json.dumps(config.get("train"), sort_keys=True, default=str) if trained else None,
            "control_context": content_digest(context),
            # calibrated weights pair with the control of the weights they were calibrated on
            "start_sha256": weights.get("calibrated_from_sha256") or identity.get("start_weights_sha256")}


def _text(value: Any) -> str:
    """A value as the command line takes it: strings bare, the rest as JSON (true, null, 0.0005)."""
    return value if isinstance(value, str) else json.dumps(value)


def _seeds(seeds: Any) -> str:
    return ",".join(str(s) for s in seeds)


def missing_note(first: pd.Series, fine_tuned: bool, seeds: list, reference: str) -> str:
    """What is missing, and the command that produces it (the same model, data, seeds and ``train.*``)."""
    where = f"{first['model']} on {first['data']}, seed(s) {_seeds(seeds)}"
    command = (f"python experiments/run.py -m method={reference} model={first['model']} data={first['data']} "
               f"seed={_seeds(seeds)}")
    if not fine_tuned:
        return f"no {reference} baseline record (not fine-tuned) of {where}: `{command}`"
    recipe = json.loads(first["recipe"]) if isinstance(first["recipe"], str) else None
    items = sorted(recipe.items()) if isinstance(recipe, dict) else []
    overrides = " ".join(f"train.{k}={_text(v)}" for k, v in items)
    shown = ", ".join(f"{k}={_text(v)}" for k, v in items) or "none"
    return (f"no {reference} control fine-tuned with this recipe ({shown}) for {where}: "
            f"`{command} experiment.train=true {overrides}`".rstrip())


def _compatible(a: Any, b: Any) -> bool:
    """Starting weights agree, or one record does not say."""
    return not (isinstance(a, str) and isinstance(b, str)) or a == b


def paired_delta(group: pd.DataFrame, records: pd.DataFrame) -> dict[str, Any]:
    """Δ top-1 of one setting (``group``: its records, with ``family``) against its control among ``records``
    (module docstring): ``top1_delta``, ``top1_delta_ci``, ``top1_delta_n`` (pairs), ``delta_against`` and
    ``control_missing`` (a note, empty when a control was found)."""
    first = group.iloc[0]
    own_reference = first["family"] == REFERENCE
    if first["kind"] != "run" or (own_reference and not first["fine_tuned"]):
        return dict(NO_DELTA)  # costs only, or the baseline itself
    fine_tuned = bool(first["fine_tuned"]) and not own_reference
    pool = records[(records["family"] == REFERENCE) & (records["kind"] == "run") &
                   (records["model"] == first["model"]) & (records["data"] == first["data"]) &
                   (records["control_context"] == first["control_context"]) &
                   (records["fine_tuned"] == fine_tuned) & records["top1"].notna()]
    if fine_tuned:
        pool = pool[pool["recipe"] == first["recipe"]]
    mine = group[group["top1"].notna()]
    best: tuple[int, str, dict, dict] = (0, "", {}, {})
    for setting_key, control in sorted(pool.groupby("setting_key"), key=lambda item: item[0]):
        a, b = {}, {}
        for index, rec in mine.iterrows():
            match = control[(control["seed"] == rec["seed"]) &
                            control["start_sha256"].map(lambda s: _compatible(s, rec["start_sha256"]))]
            if not match.empty:
                a[index], b[index] = rec["top1"], match["top1"].iloc[0]
        if len(a) > best[0]:
            best = (len(a), setting_key, a, b)
    references = records.loc[records["family"] == REFERENCE, "method"]
    reference = str(references.iloc[0]) if len(references) else "<the method of family none>"
    if best[0] == 0 and own_reference:
        return dict(NO_DELTA)  # a fine-tuned reference without its baseline: nothing is missing for the methods
    if best[0] == 0:
        return {**NO_DELTA, "control_missing": missing_note(first, fine_tuned, list(mine["seed"]), reference)}
    mean, half, n = paired_difference(best[2], best[3])
    control = pool[pool["setting_key"] == best[1]]
    against = f"{control['method'].iloc[0]}, {'fine-tuned' if fine_tuned else 'baseline'}"
    return {"top1_delta": mean, "top1_delta_ci": half, "top1_delta_n": n, "delta_against": against,
            "control_missing": ""}


def delta_cells(part: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The Δ top-1 cell of each row of ``part`` (aggregate rows) and the numbered notes they refer to:
    ``+1.20 ± 0.85``, ``(n=2)`` appended where fewer seeds paired than the row has, ``— (1)`` where the control
    is missing (note 1 names it and the command that produces it), ``—`` where no Δ applies."""
    cells, notes = [], []
    for _, row in part.iterrows():
        if row.get("control_missing"):
            if row["control_missing"] not in notes:
                notes.append(row["control_missing"])
            cells.append(f"— ({notes.index(row['control_missing']) + 1})")
            continue
        delta, half, n = row["top1_delta"], row["top1_delta_ci"], row["top1_delta_n"]
        if delta is None or math.isnan(delta):
            cells.append("—")
            continue
        text = f"{delta:+.2f}" if math.isnan(half) else f"{delta:+.2f} ± {half:.2f}"
        cells.append(text if n == row["top1_n"] else f"{text} (n={n})")
    return cells, [f"({i}) Missing control: {note}." for i, note in enumerate(notes, start=1)]
