"""The report's one-page summary (``<out>/README.md``): owns what a reader sees first.

Per backbone (``model`` on ``data``), from the one aggregate (:func:`analysis.aggregation.aggregate`):

- **two sentences** generated from the records (:func:`sentences`): which methods are tied for the best paired
  Δ top-1 at their default settings (every method whose 95% CI overlaps the best one's,
  :func:`analysis.stats.tied_for_best`) and the cheapest of them; and, where the records carry ground truth
  (``tokens.objects``), the object recall and which methods spend less of their compute on the background than
  the background's share of the tokens (the per-seed difference's 95% CI above zero), i.e. spend it on the object;
- **the defaults table** (:func:`defaults_table`): every method at its default setting (the setting whose
  parameters equal the ``method_defaults`` its records state), fine-tuned and off the shelf as separate rows:
  top-1 and the paired Δ top-1 with their 95% CI, GFLOPs, the speedup at the main table's one condition
  (stated), object recall and background compute, and the records each row averages;
- **the Pareto fronts** (:func:`front_table`) of top-1 against GFLOPs and against measured throughput (that
  condition) over every run setting, each point with its 95% CI, and the figure of both
  (``summary_<backbone>.png``).

The page opens with the header of :func:`analysis.provenance.header` (commit, records per kind, skipped).
No method is named in the code: families, defaults and controls come from the records.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import aggregation, controls, pareto, tables
from .formatting import DASH, REFERENCE, condition_title, fmt, fmt_rate, plus_minus
from .stats import mean_ci, tied_for_best
from .style import GFLOPS_LABEL, TOP1_LABEL, figure_style, legend_outside, method_styles, save_figure
from .table_files import Table

OBJECT_KEYS = ("object_recall", "background_compute", "background_share")


def object_scores(records: pd.DataFrame, ids: str) -> dict[str, Any]:
    """Mean, 95% CI half-width and n over the records ``ids`` (comma-separated) of each of
    :data:`OBJECT_KEYS` (``tokens.objects``), in percent, and of ``background_gap`` (background share minus
    background compute, per record: > 0 means less compute on the background than its share of the tokens)."""
    chosen = records[records["record_id"].isin(ids.split(","))]
    values: dict[str, list[float]] = {key: [] for key in (*OBJECT_KEYS, "background_gap")}
    for tokens in chosen["tokens"]:
        objects = (tokens or {}).get("objects") if isinstance(tokens, dict) else None
        if not isinstance(objects, dict):
            continue
        for key in OBJECT_KEYS:
            value = objects.get(key)
            values[key].append(100.0 * value if isinstance(value, (int, float)) else math.nan)
        values["background_gap"].append(values["background_share"][-1] - values["background_compute"][-1])
    return {key: mean_ci(series) for key, series in values.items()}


def default_rows(agg: pd.DataFrame, model: str, data: str) -> pd.DataFrame:
    """The run rows of one backbone at their method's default setting (``is_default``), in the aggregate's
    order; fine-tuned and off-the-shelf runs of a default are separate rows."""
    part = agg[(agg["model"] == model) & (agg["data"] == data) & (agg["kind"] == "run")]
    return part[part["is_default"].map(lambda v: isinstance(v, (bool, np.bool_)) and bool(v))].reset_index(drop=True)


def _object_cells(scores: dict[str, Any]) -> tuple[str, str]:
    recall, _, _ = scores["object_recall"]
    if math.isnan(recall):
        return DASH, DASH
    compute, share = scores["background_compute"][0], scores["background_share"][0]
    return (plus_minus(recall, scores["object_recall"][1], ".1f"), f"{compute:.1f} / {share:.1f}")


def defaults_table(agg: pd.DataFrame, records: pd.DataFrame, model: str, data: str) -> Optional[Table]:
    """Every method at its default setting on one backbone (module docstring); ``None`` when no record states
    its method's default."""
    part = default_rows(agg, model, data)
    if part.empty:
        return None
    headline = tables.main_condition(agg, agg[(agg["model"] == model) & (agg["data"] == data)])
    deltas, notes = controls.delta_cells(part)
    speed = f"Speedup ({condition_title(headline)})" if headline else "Speedup"
    rows, numeric = [], []
    for (_, row), delta in zip(part.iterrows(), deltas):
        scores = object_scores(records, row["record_ids"])
        recall, background = _object_cells(scores)
        rows.append({"Method": row["method"], "Family": row["family"],
                     "Fine-tuned": "yes" if row["fine_tuned"] else "no", "Seeds": str(row["n_seeds"]),
                     tables.TOP1_COLUMN: plus_minus(row["top1_mean"], row["top1_ci"], ".2f"),
                     tables.DELTA_COLUMN: delta, "GFLOPs": fmt(row["gflops_mean"], ".3f"),
                     speed: fmt(row[f"speedup_mean[{headline}]"], ".2f", "×") if headline else DASH,
                     "Object recall (%)": recall, "Bg. compute / bg. tokens (%)": background,
                     "Records": tables.records_cell(row["record_ids"])})
        numeric.append({"model": model, "data": data, "method": row["method"], "family": row["family"],
                        "fine_tuned": row["fine_tuned"], "n_seeds": row["n_seeds"], "top1_mean": row["top1_mean"],
                        "top1_ci": row["top1_ci"], "top1_delta": row["top1_delta"],
                        "top1_delta_ci": row["top1_delta_ci"], "top1_delta_n": row["top1_delta_n"],
                        "delta_against": row["delta_against"], "gflops_mean": row["gflops_mean"],
                        "condition": headline or "",
                        "speedup_mean": row[f"speedup_mean[{headline}]"] if headline else math.nan,
                        **{f"{key}_{stat}": value for key, triple in scores.items()
                           for stat, value in zip(("mean", "ci", "n"), triple)},
                        "record_ids": row["record_ids"]})
    notes = [*notes, "Object recall: the share of ground-truth object tokens that reach the last block (a merged "
             "token counts while it represents its group); bg. compute / bg. tokens: the share of the summed "
             "token depth spent on background tokens next to the background's share of the tokens (lower "
             "compute than share: the method spends its blocks on the object); — = the data has no ground truth."]
    display = pd.DataFrame(rows)
    return Table(f"Every method at its default setting: {model} on {data}", display, pd.DataFrame(numeric),
                 "lll" + "r" * (len(display.columns) - 4) + "l", notes=notes)


def front_rows(agg: pd.DataFrame, model: str, data: str, x: str, maximize_x: bool) -> pd.DataFrame:
    """The run rows of one backbone on the Pareto front of top-1 against column ``x``, sorted by ``x``."""
    part = agg[(agg["model"] == model) & (agg["data"] == data) & (agg["kind"] == "run")]
    part = part.dropna(subset=[x, "top1_mean"])
    if part.empty:
        return part
    mask = pareto.pareto_front(part[x], part["top1_mean"], maximize_x=maximize_x)
    return part[mask].sort_values(x, kind="stable").reset_index(drop=True)


def front_table(agg: pd.DataFrame, model: str, data: str) -> Optional[Table]:
    """The Pareto front of top-1 against GFLOPs and against img/s at the main table's condition, one row per
    point (which front it is on), each with its 95% CI and records; ``None`` when neither front has a point."""
    headline = tables.main_condition(agg, agg[(agg["model"] == model) & (agg["data"] == data)])
    fronts = [("GFLOPs", front_rows(agg, model, data, "gflops_mean", False))]
    if headline:
        fronts.append((f"img/s ({condition_title(headline)})",
                       front_rows(agg, model, data, f"img_per_s_mean[{headline}]", True)))
    rows = []
    for axis, front in fronts:
        for _, row in front.iterrows():
            rate = row[f"img_per_s_mean[{headline}]"] if headline else math.nan
            rows.append({"Front": f"top-1 vs {axis}", "Method": row["method"], "Setting": row["setting"],
                         "Seeds": str(row["n_seeds"]),
                         tables.TOP1_COLUMN: plus_minus(row["top1_mean"], row["top1_ci"], ".2f"),
                         "GFLOPs": fmt(row["gflops_mean"], ".3f"), "img/s": fmt_rate(rate),
                         "Records": tables.records_cell(row["record_ids"])})
    if not rows:
        return None
    display = pd.DataFrame(rows)
    note = ("A point is on the front when no other setting has at least its top-1 at no more GFLOPs (or at "
            "least its throughput), better in one; fronts are of seed means, the CI says how firm each point is.")
    return Table(f"Pareto fronts: {model} on {data}", display, display.copy(), "llll" + "rrr" + "l", notes=[note])


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def sentences(agg: pd.DataFrame, records: pd.DataFrame, model: str, data: str) -> list[str]:
    """The two sentences on what the records of one backbone say (module docstring)."""
    every = default_rows(agg, model, data)
    part = every[every["family"] != REFERENCE].reset_index(drop=True)
    if part.empty:
        if len(every):
            return [f"No reduction method of {model} on {data} has a run at its default setting yet (only the "
                    "reference), so no method is compared at its default."]
        return [f"No record of {model} on {data} states its method's default setting (method_defaults), so no "
                "method is compared at its default."]
    use_delta = part["top1_delta"].notna().any()
    value, half = ("top1_delta", "top1_delta_ci") if use_delta else ("top1_mean", "top1_ci")
    tied = tied_for_best(part[value], part[half])
    best = int(np.nanargmax(part[value].to_numpy(dtype=float)))
    label = [f"{m}{' (fine-tuned)' if ft else ''}" for m, ft in zip(part["method"], part["fine_tuned"])]
    winners = [label[i] for i in range(len(part)) if tied[i]]
    what = "paired Δ top-1 against its control" if use_delta else "top-1"
    unit = "points" if use_delta else "%"
    first = (f"At their default settings on {model}/{data}, {_names(winners)} "
             f"{'is' if len(winners) == 1 else 'are tied for'} the best {what} "
             f"({label[best]}: {format(part[value][best], '+.2f' if use_delta else '.2f')}"
             + ("" if math.isnan(part[half][best]) else f" ± {part[half][best]:.2f}")
             + f" {unit}; ties: overlapping 95% CIs, {len(winners)} of {len(part)} settings)")
    costs = part[np.array(tied, dtype=bool)].dropna(subset=["gflops_mean"])
    if len(costs):
        cheap = costs.loc[costs["gflops_mean"].idxmin()]
        ratio = cheap["flops_ratio_mean"]
        first += (f"; the cheapest of them is {label[int(cheap.name)]} at {cheap['gflops_mean']:.3f} GFLOPs"
                  + (f" ({100 * ratio:.0f}% of dense)" if not math.isnan(ratio) else ""))
    second = _object_sentence(part, records, label)
    return [first + ".", second]


def _object_sentence(part: pd.DataFrame, records: pd.DataFrame, label: list[str]) -> str:
    scored = []
    for i, ids in enumerate(part["record_ids"]):
        scores = object_scores(records, ids)
        if not math.isnan(scores["object_recall"][0]):
            scored.append((label[i], scores))
    if not scored:
        return ("These records carry no ground-truth object scores (tokens.objects, written on data with object "
                "masks such as data=digit_scenes), so where the methods spend their compute is not scored here.")
    recall = sorted(scored, key=lambda item: item[1]["object_recall"][0])
    low, high = recall[0], recall[-1]
    text = (f"Object recall at the defaults ranges from {low[1]['object_recall'][0]:.1f}% ({low[0]}) to "
            f"{high[1]['object_recall'][0]:.1f}% ({high[0]})")
    shifting = []
    for name, scores in scored:
        gap, gap_half, n = scores["background_gap"]
        if gap > 0 and (n < 2 or math.isnan(gap_half) or gap - gap_half > 0):
            shifting.append(f"{name} ({scores['background_compute'][0]:.0f}% of its compute on "
                            f"{scores['background_share'][0]:.0f}% background tokens)")
    if shifting:
        one = len(shifting) == 1
        text += (f"; {_names(shifting)} spend{'s' if one else ''} less of {'its' if one else 'their'} compute on the "
                 "background than the background's share of the tokens (95% CI of the per-seed difference above "
                 "zero), i.e. more on the object")
    else:
        text += "; no method spends measurably less of its compute on the background than its share of the tokens"
    return text + "."


def plot_summary(agg: pd.DataFrame, model: str, data: str, slug: str, out_dir: str | Path) -> list[Path]:
    """``summary_<slug>.png``/``.pdf``: top-1 (95% CI bars) against GFLOPs and against img/s at the main
    table's condition, every run setting, the Pareto front dashed."""
    from .plots import _accuracy_scatter, _draw_front  # the report's one way of drawing these axes

    part = agg[(agg["model"] == model) & (agg["data"] == data) & (agg["kind"] == "run")]
    part = part.dropna(subset=["top1_mean"])
    headline = tables.main_condition(agg, agg[(agg["model"] == model) & (agg["data"] == data)])
    axes_spec = [("gflops_mean", GFLOPS_LABEL, False)]
    if headline:
        axes_spec.append((f"img_per_s_mean[{headline}]", f"Throughput (images/s, {condition_title(headline)})", True))
    axes_spec = [spec for spec in axes_spec if part[spec[0]].notna().any()]
    if not axes_spec:
        return []
    styles = method_styles(dict(zip(agg["method"], agg["family"])))
    with figure_style():
        fig = Figure(figsize=(4.2 * len(axes_spec) + 1.6, 4.0))
        axes = np.atleast_1d(fig.subplots(1, len(axes_spec), sharey=True))
        for ax, (column, xlabel, maximize) in zip(axes, axes_spec):
            _accuracy_scatter(ax, part, column, None, styles)
            usable = part.dropna(subset=[column])
            _draw_front(ax, usable[column], usable["top1_mean"], maximize_x=maximize)
            ax.set_xlabel(xlabel)
        axes[0].set_ylabel(TOP1_LABEL)
        fig.suptitle(f"{model} on {data}: accuracy (95% CI) against compute and throughput", y=1.0)
        legend_outside(axes[-1], title="method")
        return save_figure(fig, Path(out_dir), f"summary_{slug}")


def backbone_order(agg: pd.DataFrame) -> list[tuple[str, str, str]]:
    """The backbones of the run rows, the one with most methods at their default first (then by name)."""
    runs = agg[agg["kind"] == "run"] if not agg.empty else agg
    if runs.empty:
        return []
    keys = runs[["model", "data", "slug"]].drop_duplicates().itertuples(index=False)
    count = {(m, d): len(default_rows(agg, m, d)) for m, d, _ in runs[["model", "data", "slug"]].drop_duplicates()
             .itertuples(index=False)}
    return sorted(((m, d, s) for m, d, s in keys), key=lambda k: (-count[(k[0], k[1])], k[0], k[1]))


def write_summary(agg: pd.DataFrame, records: pd.DataFrame, out_dir: str | Path, header: str) -> list[Path]:
    """``README.md`` (the one-page summary, module docstring) with its tables (``summary_defaults_<backbone>``,
    ``summary_fronts_<backbone>`` as Markdown, LaTeX and CSV) and figures; returns the paths, README first.
    Without records nothing is written (an empty results folder gets no report folder)."""
    if records.empty and agg.empty:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Token-reduction benchmark: summary", "",
             "Generated by `analysis/report.ipynb` (`make report`); do not edit by hand. Every table and figure: "
             "[report.md](report.md); the executed notebook: [report.html](report.html).", "", header, ""]
    paths: list[Path] = []
    backbones = backbone_order(agg)
    if not backbones:
        lines += ["No run records: nothing to summarise.", ""]
    for model, data, slug in backbones:
        lines += [f"## {model} on {data}", "", " ".join(sentences(agg, records, model, data)), ""]
        figure = plot_summary(agg, model, data, slug, out)
        paths += figure
        if figure:
            lines += [f"![summary_{slug}]({figure[0].name})", ""]
        for stem, table in ((f"summary_defaults_{slug}", defaults_table(agg, records, model, data)),
                            (f"summary_fronts_{slug}", front_table(agg, model, data))):
            if table is None:
                continue
            written = table.write(out / stem, f"tab:{stem}")
            paths += written
            lines += [written[0].read_text(encoding="utf-8").rstrip(), ""]
    readme = out / "README.md"
    readme.write_text("\n".join(lines), encoding="utf-8")
    return [readme, *paths]
