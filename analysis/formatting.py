"""How numbers, settings and methods are shown in the report: owns the seed statistics (mean and sample std),
the fixed number formats of every table, parameter values as short text, the labels and sort order of a method's
settings and the backbones' file-name slugs, and each method's family and order (read from the records'
``method_info.family``).

Shared by :mod:`analysis.aggregation`, :mod:`analysis.tables`, :mod:`analysis.curves`, :mod:`analysis.published`
and :mod:`analysis.plots`, so the same value prints the same way in every table and figure.
"""
from __future__ import annotations

import json
import math
import numbers
import re
from typing import Any, Iterable, Optional

import pandas as pd

DASH = "—"  # a value that was not measured
# The family of the unreduced reference in the registry (methods/registry.py): every ratio and Δ refers to it.
REFERENCE = "none"


def family_of(info: Any) -> str:
    """The family a record's ``method_info`` declares (the harness writes it from the method's registration);
    :data:`DASH` for a record without one."""
    family = info.get("family") if isinstance(info, dict) else None
    return family if isinstance(family, str) and family else DASH


def method_families(records: pd.DataFrame) -> dict[str, str]:
    """Each method of ``records`` (a frame with ``method`` and ``method_info``) -> the family its records
    declare (the first that declares one), :data:`DASH` where none does."""
    families: dict[str, str] = {}
    if records.empty:
        return families
    infos = records["method_info"] if "method_info" in records else [None] * len(records)
    for method, info in zip(records["method"], infos):
        if families.get(method, DASH) == DASH:
            families[method] = family_of(info)
    return families


def method_rank(method: str, family: str) -> tuple[bool, bool, str, str]:
    """Sort key of a method: the reference (family :data:`REFERENCE`) first, then by family name (undeclared
    last), then by name. No method list: a new method sorts by its family."""
    return (family != REFERENCE, family == DASH, family, method)


def mean_std(values: pd.Series) -> tuple[float, float]:
    """Mean and sample std (``ddof=1``) of the non-NaN values; std is NaN for one value, both for none."""
    values = values.dropna().astype(float)
    if values.empty:
        return math.nan, math.nan
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else math.nan)


def format_value(value: Any) -> str:
    """A parameter value as short text: ``5e-04`` -> ``0.0005``, ``8.0`` -> ``8``, ``None`` -> ``default`` (a
    null parameter takes the method's or backbone's default, e.g. A-ViT's gate constants)."""
    if value is None:
        return "default"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Real):
        return format(float(value), "g")
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def fmt(value: Any, spec: str, suffix: str = "") -> str:
    """``value`` with format ``spec`` and ``suffix``; :data:`DASH` for ``None`` or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return format(value, spec) + suffix


def fmt_rate(value: float) -> str:
    """img/s with at least three significant digits: 2400, 57.3, 3.25."""
    if math.isnan(value):
        return DASH
    return format(value, ".0f" if value >= 100 else ".1f" if value >= 10 else ".2f")


def plus_minus(mean: float, std: float, spec: str) -> str:
    """``mean ± std`` (just the mean when std is NaN, :data:`DASH` when the mean is)."""
    if math.isnan(mean):
        return DASH
    return format(mean, spec) if math.isnan(std) else f"{format(mean, spec)} ± {format(std, spec)}"


def condition_title(condition: str) -> str:
    """A throughput condition label as a title: ``cpu b32 fp32 t1`` -> ``cpu, batch 32, fp32, 1 thread(s)``
    (``..., compiled`` for a compiled model)."""
    device, batch, dtype, *rest = condition.split(" ")
    threads = [f"{part[1:]} thread(s)" for part in rest if part.startswith("t")]
    return ", ".join([device, f"batch {batch[1:]}", dtype, *threads, *[p for p in rest if p == "compiled"]])


def method_defaults(records: pd.DataFrame) -> dict[tuple[str, str], Optional[dict[str, Any]]]:
    """Each (method, model) of ``records`` -> the parameters of the method's default setting on that backbone,
    as its records state them (``method_defaults``, written by the harness from the registry: ToMe's r=4 on the
    65-token embedded models, r=13 on DeiT; the first record that states them), ``None`` where no record does
    (records written before the field existed: ``python -m experiments.records.upgrade`` fills it)."""
    defaults: dict[tuple[str, str], Optional[dict[str, Any]]] = {}
    if records.empty:
        return defaults
    stated = records["method_defaults"] if "method_defaults" in records else [None] * len(records)
    for method, model, value in zip(records["method"], records["model"], stated):
        if defaults.get((method, model)) is None:
            defaults[(method, model)] = dict(value) if isinstance(value, dict) else None
    return defaults


def differing_params(params: dict[str, Any], defaults: dict[str, Any]) -> str:
    """The parameters of ``params`` that differ from ``defaults`` as ``key=value, ...``; ``default`` when none
    does (a key the defaults lack counts as differing)."""
    shown = [f"{k}={format_value(params[k])}" for k in sorted(params)
             if k not in defaults or _same(params[k], defaults[k]) is False]
    return ", ".join(shown) or "default"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


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
