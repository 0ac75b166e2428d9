"""Published numbers as data: owns ``published_numbers.csv`` (loading and validating it) and the "reported vs
measured here" comparison.

``published_numbers.csv`` (next to this module) has one row per number a paper or an official README states:
``method, backbone, setting, training, top1, gflops, throughput, throughput_unit, throughput_hardware,
throughput_batch, throughput_precision, source, locator, url, note``. Every row names its source, the exact
place in it (``locator``: a table, a README section) and a URL; ``published_numbers_evidence.md`` quotes the
source text of each row. Numbers are kept as printed (their decimals are the rounding the source applied).
Where sources disagree about a baseline, both rows stay, each with its source.

``setting`` uses our parameter names, ``key=value`` pairs joined by ``;`` (``keep_rate=0.7;fuse=true``); empty
means the method's published default, ``unspecified`` a claim that names no setting (an abstract's), which is
never matched to a measurement.
:func:`compare` matches each row to records of the same method and backbone at 224 px whose ``method_params``
agree on every key of the setting (kinds ``run`` and ``measure``), averages their GFLOPs, and flags a
difference larger than the rounding of the printed value (half a unit of its last decimal).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from . import tables
from .formatting import DASH, fmt, plus_minus
from .stats import mean_ci

PUBLISHED = Path(__file__).with_name("published_numbers.csv")
COLUMNS = ("method", "backbone", "setting", "training", "top1", "gflops", "throughput", "throughput_unit",
           "throughput_hardware", "throughput_batch", "throughput_precision", "source", "locator", "url", "note")
REQUIRED = ("method", "backbone", "source", "locator", "url")
NUMERIC = ("top1", "gflops", "throughput")
# timm's AugReg ViT-S/B (ToMe's README) share DeiT-S/B's architecture but not their weights: own names
BACKBONES = ("deit_tiny", "deit_small", "deit_base", "vit_small", "vit_base")
IMG_SIZE = 224  # every published DeiT number is at 224 px
MEASURED_KINDS = ("run", "measure")
FOOTNOTE = (
    "Reported: as printed by the source (GFLOPs in these papers are GMACs, our convention too). Measured: the "
    "mean GFLOPs per image of our records of the same method, backbone (224 px) and setting; for fixed-count "
    "methods they do not depend on the weights. Flag: the measured GFLOPs differ from the printed value by more "
    "than its rounding (half a unit of its last decimal). A-ViT's FLOPs depend on its trained halting, so they "
    "are only comparable with a record of an ImageNet-trained A-ViT. Measured top-1 is shown only for records "
    "evaluated on ImageNet-style data (imagefolder)."
)


class PublishedError(ValueError):
    """A row of the published table is unusable; the message names the file, the row and the column."""


def parse_setting(text: str) -> Optional[dict[str, Any]]:
    """``"keep_rate=0.7;fuse=true"`` -> ``{"keep_rate": 0.7, "fuse": True}``; ``""`` -> ``{}``;
    ``"unspecified"`` -> ``None``."""
    if (text or "").strip() == "unspecified":
        return None
    setting: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{part!r} is not key=value")
        setting[key.strip()] = _typed(value.strip())
    return setting


def _typed(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def decimals(printed: str) -> int:
    """Decimals of a number as printed: ``"2.9"`` -> 1, ``"11"`` -> 0."""
    text = printed.strip()
    return len(text.split(".", 1)[1]) if "." in text else 0


def load_published(path: str | Path = PUBLISHED) -> pd.DataFrame:
    """The published table, validated: the header is :data:`COLUMNS`, every row has a method, a backbone of
    :data:`BACKBONES`, a source, a locator and an http(s) URL, numbers parse, settings parse. Adds ``row``
    (1-based data row), ``params`` (the parsed setting) and ``<col>_decimals`` for the numeric columns."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise PublishedError(f"{path}: header {reader.fieldnames} is not {list(COLUMNS)}")
        raw = list(reader)
    rows = []
    for number, row in enumerate(raw, start=1):
        where = f"{path} row {number}"
        if None in row or any(v is None for v in row.values()):
            raise PublishedError(f"{where}: wrong number of fields (expected {len(COLUMNS)})")
        for column in REQUIRED:
            if not row[column].strip():
                raise PublishedError(f"{where}: empty {column}; every published number needs its {column}")
        if not row["url"].startswith(("http://", "https://")):
            raise PublishedError(f"{where}: url {row['url']!r} is not an http(s) address")
        if row["backbone"] not in BACKBONES:
            raise PublishedError(f"{where}: backbone {row['backbone']!r} unknown; valid: {', '.join(BACKBONES)}")
        out: dict[str, Any] = {**row, "row": number}
        for column in NUMERIC:
            text = row[column].strip()
            try:
                out[column] = float(text) if text else math.nan
            except ValueError:
                raise PublishedError(f"{where}: {column}={text!r} is not a number") from None
            out[f"{column}_decimals"] = decimals(text) if text else None
        if all(math.isnan(out[c]) for c in NUMERIC):
            raise PublishedError(f"{where}: no top1, gflops or throughput; a row must report a number")
        try:
            out["params"] = parse_setting(row["setting"])
        except ValueError as error:
            raise PublishedError(f"{where}: setting {row['setting']!r}: {error}") from None
        rows.append(out)
    return pd.DataFrame(rows)


def _matches(params: Any, setting: Optional[dict[str, Any]]) -> bool:
    if setting is None:
        return False
    params = params if isinstance(params, dict) else {}
    return all(key in params and _same(params[key], value) for key, value in setting.items())


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
    return a == b


def compare(published: pd.DataFrame, records: pd.DataFrame) -> pd.DataFrame:
    """One row per published row: the reported numbers, the matching records' measured GFLOPs (mean) and
    top-1 (ImageNet-style data only), ``gflops_diff`` (measured - reported) and ``flops_flag``: ``differs``
    (beyond the printed rounding), ``matches``, or empty when either side is missing."""
    usable = records
    if not records.empty:
        usable = records[records["kind"].isin(MEASURED_KINDS) & (records["img_size"] == IMG_SIZE)]
    rows = []
    for _, pub in published.iterrows():
        found = usable
        if not usable.empty:
            found = usable[(usable["method"] == pub["method"]) & (usable["model"] == pub["backbone"])]
            found = found[[_matches(p, pub["params"]) for p in found["method_params"]]]
        gflops = float(found["gflops"].mean()) if len(found) and found["gflops"].notna().any() else math.nan
        imagenet = found[found["data"] == "imagefolder"] if len(found) else found
        top1, top1_ci, top1_n = mean_ci(imagenet["top1"]) if len(imagenet) else (math.nan, math.nan, 0)
        diff = gflops - pub["gflops"]
        flag = ""
        if not math.isnan(diff):
            tolerance = 0.5 * 10 ** -int(pub["gflops_decimals"] or 0) + 1e-9
            flag = "differs" if abs(diff) > tolerance else "matches"
        rows.append({**{c: pub[c] for c in ("row", "method", "backbone", "setting", "training", "top1", "gflops",
                                            "throughput", "throughput_unit", "source", "locator")},
                     "gflops_decimals": pub["gflops_decimals"], "measured_records": len(found),
                     "measured_gflops": gflops, "gflops_diff": diff, "flops_flag": flag,
                     "measured_top1": top1, "measured_top1_ci": top1_ci, "measured_top1_n": top1_n,
                     "measured_top1_records": len(imagenet)})
    return pd.DataFrame(rows)


def comparison_table(frame: pd.DataFrame) -> tables.Table:
    display = pd.DataFrame([{
        "Method": row["method"], "Backbone": row["backbone"], "Setting": row["setting"] or DASH,
        "Source": f"{row['source']}, {row['locator']}",
        "Top-1 reported": _printed(row["top1"]),
        "GFLOPs reported": _printed(row["gflops"], row["gflops_decimals"]),
        "Throughput reported": _throughput(row),
        "GFLOPs measured": fmt(row["measured_gflops"], ".3f"),
        "Δ GFLOPs": fmt(row["gflops_diff"], "+.3f"),
        "Flag": {"differs": "FLOPs differ", "matches": "ok"}.get(row["flops_flag"], DASH),
        "Top-1 measured (± 95% CI)": plus_minus(row["measured_top1"], row["measured_top1_ci"], ".2f")
        + (f" (n={row['measured_top1_n']})" if row["measured_top1_n"] else ""),
    } for _, row in frame.iterrows()])
    return tables.Table("Reported vs measured here", display, frame.reset_index(drop=True), "llll" + "r" * 7)


def _printed(value: float, digits: Optional[float] = None) -> str:
    """A reported number with the decimals it was printed with."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    if digits is None or (isinstance(digits, float) and math.isnan(digits)):
        return format(value, "g")
    return f"{value:.{int(digits)}f}"


def _throughput(row: pd.Series) -> str:
    if math.isnan(row["throughput"]):
        return DASH
    unit = row["throughput_unit"]
    return f"+{row['throughput']:g}%" if unit == "% gain" else f"{row['throughput']:g} {unit}"


def write_comparison(records: pd.DataFrame, out_dir: str | Path, path: str | Path = PUBLISHED) -> list[Path]:
    """``published_vs_measured.{md,tex,csv}`` in ``out_dir``; returns the paths (none without records: the
    published table alone is in ``published_numbers.csv``)."""
    table = load_published(path)  # a broken table is an error even when there is nothing to compare
    if records.empty:
        print("note: no records, no reported-vs-measured table written")
        return []
    frame = compare(table, records)
    return comparison_table(frame).write(Path(out_dir) / "published_vs_measured", "tab:published",
                                         footnote=FOOTNOTE)
