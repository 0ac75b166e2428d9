"""The record schema: owns the one typed model of a results record, its version and the valid ranges.

:class:`Record` (pydantic) is what a record must be to be written (``store.write_record``) and to be read
(``store.load_record``, ``analysis.load``); the package docstring describes the sections. A record may carry
more keys than the model names (it allows extras), and the file holds the dict as built, never a re-dump of the
model, so validating changes no byte of a record.

Every metric must be a finite number or null; a registered metric (``experiments/train/metrics.py``) must also
lie in its range, as must the FLOP counts (``FLOPS_RANGES``), the token statistics (``TOKEN_LISTS``) and the
per-image compute (:class:`ComputePerImage`: ``COMPUTE_RANGES``, at most ``MAX_COMPUTE_BINS`` bins, counts that add
up, correlations in [-1, 1] inside their interval).

``compute_per_image`` was added without a version bump: it is an optional section (null or absent: not
measured, as in every record written before it existed), so a version-1 record without it is still a current
one and nothing needs migrating. A version bump (``migrate.py``) is for changes that alter what an existing key
means or remove one.
A bad value raises :class:`RecordValueError` naming the field, the value and the valid range; a record that is
not finished (missing keys, ``status`` other than ``complete``, a run without its headline metric) raises
:class:`IncompleteRecordError`.
"""
from __future__ import annotations

import math
import numbers
from typing import Annotated, Any, Literal, Optional, Union

from annotated_types import Interval
from pydantic import (BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError,
                      field_validator, model_validator)

from experiments.train.metrics import metric_ranges

SCHEMA_VERSION = 1
FLOP_CONVENTION = ("1 FLOP = 1 multiply-add (fvcore/field convention, i.e. GMACs); LayerNorm, softmax, GELU, "
                   "gather and top-k not counted")
HEADLINE_METRIC = "top1"  # a run or trade-off point without it is not a result
FLOPS_RANGES = {"gflops": Interval(gt=0.0), "dense_gflops": Interval(gt=0.0), "gflops_min": Interval(gt=0.0),
                "gflops_max": Interval(gt=0.0), "gflops_std": Interval(ge=0.0), "flops_ratio": Interval(gt=0.0)}
TOKEN_LISTS = {"attn_mean": Interval(ge=0.0), "mlp_mean": Interval(ge=0.0), "depth_histogram": Interval(ge=0.0)}
MAX_COMPUTE_BINS = 50  # compute_per_image.histogram: at most this many bins (records stay compact)
COMPUTE_RANGES = {"gflops_mean": Interval(gt=0.0), "gflops_std": Interval(ge=0.0), "gflops_min": Interval(gt=0.0),
                  "gflops_max": Interval(gt=0.0), "dense_gflops": Interval(gt=0.0),
                  "object_compute_share": Interval(ge=0.0, le=1.0)}


class RecordValueError(ValueError):
    """A value of a record is out of its valid range or of the wrong type; the message names the field, the value
    and what is valid."""


class IncompleteRecordError(RecordValueError):
    """A record that is not (yet) a result: a required key missing, ``status`` not ``complete``, a run or
    trade-off point without its headline metric or knob."""


def range_text(valid: Interval) -> str:
    """``[0, 100]``, ``> 0`` or ``>= 0``: an interval as the error messages write it."""
    low, closed = (valid.ge, True) if valid.ge is not None else (valid.gt, False)
    high = valid.le if valid.le is not None else math.inf
    if math.isfinite(high):
        return f"{'[' if closed else '('}{low:g}, {high:g}]"
    return f"{'>=' if closed else '>'} {low:g}"


def check_range(field: str, value: Any, valid: Optional[Interval]) -> None:
    """Nothing when ``value`` is null or a finite number in ``valid`` (any finite number when ``valid`` is
    ``None``); else :class:`RecordValueError`."""
    if value is None:
        return
    text = f"a finite number {range_text(valid)}" if valid else "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RecordValueError(f"{field}={value!r} is not a number; valid: {text}")
    if not math.isfinite(value):
        raise RecordValueError(f"{field}={value!r} is not finite; valid: {text}")
    if valid is None:
        return
    low_ok = value >= valid.ge if valid.ge is not None else value > valid.gt
    if not (low_ok and (valid.le is None or value <= valid.le)):
        raise RecordValueError(f"{field}={value!r} is outside the valid range {range_text(valid)}")


def check_metrics(metrics: Any) -> dict[str, Any]:
    """Any metric, as long as it is a finite number or null; registered ones also within their range."""
    if not isinstance(metrics, dict):
        raise RecordValueError(f"metrics={metrics!r} is not an object of metric values")
    known = metric_ranges()
    for name, value in metrics.items():
        check_range(f"metrics.{name}", value, known.get(name))
    return metrics


def check_flops(flops: Any) -> Any:
    """``flops`` null (not measured) or an object whose FLOP counts lie in ``FLOPS_RANGES``."""
    if flops is None:
        return flops
    if not isinstance(flops, dict):
        raise RecordValueError(f"flops={flops!r} is not an object of FLOP counts (or null: not measured)")
    for field, valid in FLOPS_RANGES.items():
        check_range(f"flops.{field}", flops.get(field), valid)
    return flops


Seed = Union[StrictInt, StrictFloat, StrictStr, None]  # an integer; text and floats from older writers read too


class Flops(BaseModel):
    """``flops``: mean GFLOPs per image and their spread, the dense model's, the ratio, the convention."""

    model_config = ConfigDict(extra="allow")
    convention: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _ranges(cls, values: Any) -> Any:
        return check_flops(values)


class Tokens(BaseModel):
    """``tokens``: per-block token counts, the depth histogram, mean patch depth and the packed maps."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _lists(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            raise RecordValueError(f"tokens={values!r} is not an object of token statistics")
        for field, valid in TOKEN_LISTS.items():
            series = values.get(field)
            if series is not None and not isinstance(series, list):
                raise RecordValueError(f"tokens.{field}={series!r} is not a list of numbers")
            for index, value in enumerate(series or []):
                check_range(f"tokens.{field}[{index}]", value, valid)
        return values


class Weights(BaseModel):
    """``weights``: the sha256 of the weights file a run started from and of the one it evaluated (its
    ``final.pth`` when it trained), and ``checkpoint``, the file name of ``model.checkpoint`` when the run
    started from one (a released checkpoint's name: ``experiments/reproduce.py``)."""

    model_config = ConfigDict(extra="allow")
    start_sha256: Optional[StrictStr] = None
    evaluated_sha256: Optional[StrictStr] = None
    checkpoint: Optional[Annotated[StrictStr, Field(min_length=1)]] = None


class Correlation(BaseModel):
    """One rank correlation of ``compute_per_image.correlations``: ``rho`` in [-1, 1] and its 95% interval
    ``ci`` (``[low, high]`` around it), both null where undefined, over ``n`` images."""

    model_config = ConfigDict(extra="allow")
    rho: Optional[Annotated[float, Field(ge=-1.0, le=1.0)]] = None
    ci: Optional[tuple[Annotated[float, Field(ge=-1.0, le=1.0)], Annotated[float, Field(ge=-1.0, le=1.0)]]] = None
    n: Annotated[StrictInt, Field(ge=0)]

    @model_validator(mode="after")
    def _ordered(self) -> "Correlation":
        if (self.rho is None) != (self.ci is None):
            raise RecordValueError(f"a correlation with rho={self.rho!r} and ci={self.ci!r}: both or neither")
        if self.ci is not None and not self.ci[0] <= self.rho <= self.ci[1]:
            raise RecordValueError(f"correlation ci={list(self.ci)} does not hold rho={self.rho!r}")
        return self


class ComputeHistogram(BaseModel):
    """``compute_per_image.histogram``: ``edges`` (GFLOPs, non-decreasing, one more than the bins), images and
    top-1 correct images per bin."""

    model_config = ConfigDict(extra="allow")
    edges: list[float]
    images: list[Annotated[StrictInt, Field(ge=0)]]
    correct: list[Annotated[StrictInt, Field(ge=0)]]

    @model_validator(mode="after")
    def _shape(self) -> "ComputeHistogram":
        bins = len(self.images)
        if not 1 <= bins <= MAX_COMPUTE_BINS or len(self.edges) != bins + 1 or len(self.correct) != bins:
            raise RecordValueError(f"compute_per_image.histogram has {bins} bins, {len(self.edges)} edges and "
                                   f"{len(self.correct)} correct counts; valid: 1..{MAX_COMPUTE_BINS} bins, one "
                                   f"more edge, one correct count per bin")
        for index, edge in enumerate(self.edges):
            check_range(f"compute_per_image.histogram.edges[{index}]", edge, Interval(ge=0.0))
        if any(b < a for a, b in zip(self.edges, self.edges[1:])):
            raise RecordValueError(f"compute_per_image.histogram.edges={self.edges} decrease; valid: non-decreasing")
        if any(c > i for c, i in zip(self.correct, self.images)):
            raise RecordValueError(f"compute_per_image.histogram.correct={self.correct} exceeds images="
                                   f"{self.images} in some bin")
        return self


class ComputePerImage(BaseModel):
    """``compute_per_image`` (``experiments/cost/per_image.py``): the per-image GFLOPs' summary, histogram with
    accuracy per bin, rank correlations and, on data with ground truth, the object compute share."""

    model_config = ConfigDict(extra="allow")
    images: Annotated[StrictInt, Field(ge=1)]
    histogram: ComputeHistogram
    correlations: dict[str, Correlation] = {}

    @model_validator(mode="before")
    @classmethod
    def _ranges(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            raise RecordValueError(f"compute_per_image={values!r} is not an object (or null: not measured)")
        for field, valid in COMPUTE_RANGES.items():
            check_range(f"compute_per_image.{field}", values.get(field), valid)
        return values

    @model_validator(mode="after")
    def _counted(self) -> "ComputePerImage":
        if sum(self.histogram.images) != self.images:
            raise RecordValueError(f"compute_per_image.histogram holds {sum(self.histogram.images)} images, not "
                                   f"images={self.images}")
        return self


class Record(BaseModel):
    """One results record (package docstring); fields without a default are the required keys."""

    model_config = ConfigDict(extra="allow")
    schema_version: StrictInt
    record_id: Annotated[str, Field(min_length=1)]
    kind: Literal["run", "measure", "tradeoff"]
    status: Literal["complete"] = "complete"
    method: Annotated[str, Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)]
    data: Any
    seed: Seed
    metrics: dict[str, Any]
    config: Any
    provenance: Any
    method_params: Optional[dict[str, Any]] = None
    method_defaults: Optional[dict[str, Any]] = None  # the method's parameters at its default setting
    method_info: Any = None
    flops: Optional[Flops] = None
    tokens: Optional[Tokens] = None
    tradeoff: Optional[dict[str, Any]] = None
    weights: Optional[Weights] = None
    compute_per_image: Optional[ComputePerImage] = None

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, seed: Any) -> Any:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, float, str))):
            raise RecordValueError(f"seed={seed!r} is not a number (valid: an integer)")
        return seed

    @field_validator("metrics", mode="before")
    @classmethod
    def _metrics(cls, metrics: Any) -> Any:
        return check_metrics(metrics)

    @model_validator(mode="after")
    def _finished(self) -> "Record":
        if self.kind in ("run", "tradeoff") and self.metrics.get(HEADLINE_METRIC) is None:
            raise IncompleteRecordError(f"a {self.kind} without a numeric metrics.{HEADLINE_METRIC}")
        if self.kind == "tradeoff" and not (self.tradeoff or {}).get("knob"):
            raise IncompleteRecordError("a tradeoff point without tradeoff.knob")
        return self


REQUIRED_KEYS = tuple(name for name, field in Record.model_fields.items() if field.is_required())


def missing_keys(record: Any) -> list[str]:
    """The required keys ``record`` lacks (all of them when it is not an object)."""
    return [key for key in REQUIRED_KEYS if key not in record] if isinstance(record, dict) else list(REQUIRED_KEYS)


def validate_record(record: Any) -> Record:
    """``record`` as a :class:`Record`, or the first problem as :class:`RecordValueError` (or
    :class:`IncompleteRecordError`) naming the field, the value and what is valid."""
    missing = missing_keys(record)
    if missing:
        raise IncompleteRecordError(f"missing {', '.join(missing)}")
    if record.get("status", "complete") != "complete":
        raise IncompleteRecordError(f"status={record['status']!r} (valid: complete)")
    try:
        return Record.model_validate(record)
    except ValidationError as error:
        first = error.errors()[0]
        raised = (first.get("ctx") or {}).get("error")
        if isinstance(raised, RecordValueError):
            raise raised from None
        field = ".".join(f"[{part}]" if isinstance(part, int) else str(part) for part in first["loc"])
        field = field.replace(".[", "[") or "record"
        raise RecordValueError(f"{field}={first['input']!r} is invalid: {first['msg']}") from None


def check_values(record: dict[str, Any]) -> None:
    """Refuse out-of-range metrics and costs (``metrics.top1`` of inf, 150 or -5; zero, negative or non-finite
    ``flops.gflops``) with a :class:`RecordValueError` naming the field and the value; what a record builder
    checks before anything else exists."""
    check_metrics(record.get("metrics"))
    check_flops(record.get("flops"))
