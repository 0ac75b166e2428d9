"""Evaluation metrics as data: owns the registry of metric functions, their names and valid ranges.

A metric is one function of the evaluation pass's per-image results (``EvalOutputs``: the engine's per-batch
parts joined in batch order) that returns a number, registered with :func:`register_metric` under the name it
has in a record's ``metrics`` and its valid range (an ``annotated_types.Interval``). ``engine.evaluate``
returns what :func:`compute_metrics` produces; the records package checks each registered metric against its
range when a record is written and read, and ``analysis`` carries every numeric ``metrics.*`` into its
DataFrame, so adding a metric is one function here (and its test).

This module imports neither torch nor the methods (the functions only call methods of the tensors they get),
so the records package and ``analysis/`` read the names and ranges without them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from annotated_types import Interval

EvalOutputs = Mapping[str, Any]  # per-image tensors of the whole pass: correct1, correct5 (bool), loss (float)
MetricFn = Callable[[EvalOutputs], float]


@dataclass(frozen=True)
class Metric:
    name: str
    compute: MetricFn
    valid: Interval  # checked when a record is written and read; every metric must also be finite or null


METRICS: dict[str, Metric] = {}


def register_metric(name: str, valid: Interval) -> Callable[[MetricFn], MetricFn]:
    """Decorator: file ``fn`` as metric ``name`` with valid range ``valid``; a second metric of one name is an
    error (it would silently replace the first's numbers)."""
    def add(fn: MetricFn) -> MetricFn:
        if name in METRICS:
            raise ValueError(f"metric {name!r} is already registered (by {METRICS[name].compute.__qualname__})")
        METRICS[name] = Metric(name, fn, valid)
        return fn

    return add


def unregister_metric(name: str) -> None:
    """Remove metric ``name`` (tests that register a throwaway metric clean up with it)."""
    METRICS.pop(name, None)


def metric_ranges() -> dict[str, Interval]:
    """Every registered metric's valid range, by name."""
    return {name: metric.valid for name, metric in METRICS.items()}


def compute_metrics(outputs: EvalOutputs) -> dict[str, float]:
    """Every registered metric of one evaluation pass, in registration order."""
    return {name: metric.compute(outputs) for name, metric in METRICS.items()}


def _count(outputs: EvalOutputs) -> int:
    return len(outputs["correct1"])


@register_metric("top1", Interval(ge=0.0, le=100.0))
def top1(outputs: EvalOutputs) -> float:
    """Percent of images whose highest logit is the label."""
    return 100.0 * int(outputs["correct1"].sum().item()) / _count(outputs)


@register_metric("top5", Interval(ge=0.0, le=100.0))
def top5(outputs: EvalOutputs) -> float:
    """Percent of images whose label is among the five highest logits (all logits with fewer classes)."""
    return 100.0 * int(outputs["correct5"].sum().item()) / _count(outputs)


@register_metric("val_loss", Interval(ge=0.0, le=math.inf))
def val_loss(outputs: EvalOutputs) -> float:
    """Mean cross-entropy per image, summed in float64."""
    return outputs["loss"].double().sum().item() / _count(outputs)


@register_metric("num_images", Interval(ge=0.0, le=math.inf))
def num_images(outputs: EvalOutputs) -> int:
    """Images evaluated."""
    return _count(outputs)
