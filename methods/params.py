"""Method parameters: the range and choice types the factories' signatures use, the one check that reads them,
and the checks that span parameters or need the model.

A factory declares each parameter's range or choices in its signature (``KeepRate``, ``Literal["a", "b"]``,
``Annotated[int, Field(ge=1, le=...)]``); :func:`check_value` checks a value against that annotation with pydantic
(strict: ``1`` is not ``true``) and words a violation as one line derived from the constraint, e.g.
``method.params.keep_rate=1.5 must be in (0, 1]``. :func:`check_params` runs it for every parameter, in
``methods.create_method`` and in ``experiments.plan`` before anything is built. What a signature cannot say (block indices against the model's depth, a keep rate that
leaves no patch on this grid) is checked where the method is built, with the helpers here, and raised as
:class:`ParamError`; a model setting that does not fit the model (``data.img_size``, ``model.num_frames``,
``model.pos_init``) is a :class:`ModelSettingError`. Callers tell the two apart by type, never by text.
"""
from __future__ import annotations

import functools
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from collections.abc import Sequence as AbcSequence
from typing import Annotated, Any, Literal, Optional, Sequence, Union

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError


class ParamError(ValueError):
    """A method parameter is invalid; the message names ``method.params.<key>``, the value and the valid range."""


class ModelSettingError(ValueError):
    """A model setting (``data.img_size``, ``model.num_frames``, ``model.pos_init``) does not fit the model; the
    message names the key, the value and the valid choices."""


# --- bounds: every count or size that drives a loop or an allocation has one --------------------------------
MAX_BLOCKS = 1000  # block indices: no published ViT comes near (ViT-22B has 48); model.depth has the same bound
MAX_TOKENS = 2 ** 20  # token counts: a 16384 px image (model.img_size's bound) in 16 px patches
MAX_ROUNDS = 100  # iterative clustering rounds: the papers use 3; each round is a pass over P x K distances
MAX_GROUP = 2 ** 16  # images per padded attention call: the largest batch the config admits (MAX_BATCH)
MAX_WEIGHT = 1e6  # loss weights and learning-rate factors: the tuned ones are 1e-3 to 2; keeps products finite

# --- the shared parameter types -------------------------------------------------------------------------------
KeepRate = Annotated[float, Field(gt=0, le=1)]  # fraction of the tokens kept
BlockIndex = Annotated[int, Field(ge=0, le=MAX_BLOCKS - 1)]
Locations = Annotated[Sequence[BlockIndex], Field(min_length=1, max_length=MAX_BLOCKS)]
TokenCount = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
PatchCounts = Optional[Annotated[Sequence[TokenCount], Field(min_length=1, max_length=MAX_BLOCKS)]]
Rounds = Annotated[int, Field(ge=1, le=MAX_ROUNDS)]
Weight = Annotated[float, Field(ge=0, le=MAX_WEIGHT)]  # a loss weight or a learning-rate factor
AttnGroup = Optional[Annotated[int, Field(ge=0, le=MAX_GROUP)]]  # null: the device default; 0: one call


# --- the signature check ----------------------------------------------------------------------------------
def check_params(factory: Callable, params: Mapping[str, Any], prefix: str = "method.params") -> None:
    """Every value of ``params`` against ``factory``'s signature annotation (:func:`check_value`): what
    ``methods.create_method`` runs before it calls a factory, so a library call is refused as the plan refuses a
    config. Keys the signature does not annotate are left to the caller."""
    adapters = _adapters(factory)
    for key, value in params.items():
        if key in adapters:
            check_value(f"{prefix}.{key}", value, *adapters[key])


@functools.lru_cache(maxsize=None)
def _adapters(factory: Callable) -> dict[str, tuple[Any, TypeAdapter]]:
    """Per annotated parameter of ``factory`` (after the backbone), its annotation and a strict validator (built
    once: milliseconds)."""
    hints = typing.get_type_hints(factory, include_extras=True)
    keys = list(inspect.signature(factory).parameters)[1:]
    return {key: (hints[key], _strict(hints[key])) for key in keys if key in hints}


def _strict(annotation: Any) -> TypeAdapter:
    return TypeAdapter(annotation, config=ConfigDict(strict=True))


def check_value(key: str, value: Any, annotation: Any, adapter: Optional[TypeAdapter] = None) -> None:
    """``value`` against ``annotation`` (strict); raise :class:`ParamError` naming ``key``, the value and the
    valid range or choices. Numbers must also be finite."""
    try:
        (adapter or _strict(annotation)).validate_python(value)
    except ValidationError:
        choices = _choices(annotation)
        if choices is not None:
            raise ParamError(f"{key}={value!r} unknown; valid: {', '.join(map(str, choices))}") from None
        raise ParamError(f"{key}={value!r} must be {_valid_text(annotation, value)}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamError(f"{key}={value!r} must be a finite number")


def _valid_text(annotation: Any, value: Any) -> str:
    """The valid values of ``annotation`` in words; a number of the right type is told only its range."""
    base, bounds = _split(annotation)
    if bounds and base in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool) \
            and (base is float or isinstance(value, int)):
        return bounds
    return describe(annotation)


def describe(annotation: Any) -> str:
    """``annotation`` in words, derived from its types and constraints: ``a number in (0, 1]``, ``null or a
    list of 1 to 1000 integers in [0, 999]``."""
    if annotation is type(None):
        return "null"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arg) for arg in sorted(args, key=lambda a: a is not type(None)))
    if origin is Literal:
        return f"one of: {', '.join(map(str, args))}"
    base, bounds = _split(annotation)
    if base is not annotation:
        sizes = _lengths(annotation)
        if sizes:
            return describe(base).replace("a list of", f"a list of {sizes}", 1)
        return f"{describe(base)} {bounds}".strip()
    if origin in (list, tuple, AbcSequence) or annotation in (list, tuple, Sequence):
        if not args:
            return "a list"
        kinds = typing.get_args(args[0]) if typing.get_origin(args[0]) in (Union, types.UnionType) else args[:1]
        words = " or ".join(_plural(describe(kind)) for kind in kinds)
        return f"a list of ({words})" if len(kinds) > 1 else f"a list of {words}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _split(annotation: Any) -> tuple[Any, str]:
    """``(base type, range text)`` of an ``Annotated`` type (``(annotation, "")`` otherwise)."""
    if typing.get_origin(annotation) is not Annotated:
        return annotation, ""
    base, *extra = typing.get_args(annotation)
    limits = {name: getattr(item, name) for field in extra for item in getattr(field, "metadata", [field])
              for name in ("gt", "ge", "lt", "le") if getattr(item, name, None) is not None}
    low = f"[{_num(limits['ge'])}" if "ge" in limits else f"({_num(limits['gt'])}" if "gt" in limits else None
    high = f"{_num(limits['le'])}]" if "le" in limits else f"{_num(limits['lt'])})" if "lt" in limits else None
    if low and high:
        return base, f"in {low}, {high}"
    if low or high:
        return base, f"{'>=' if low[0] == '[' else '>'} {low[1:]}" if low else \
            f"{'<=' if high[-1] == ']' else '<'} {high[:-1]}"
    return base, ""


def _lengths(annotation: Any) -> str:
    extra = typing.get_args(annotation)[1:]
    sizes = {name: getattr(item, name) for field in extra for item in getattr(field, "metadata", [field])
             for name in ("min_length", "max_length") if getattr(item, name, None) is not None}
    return f"{sizes.get('min_length', 0)} to {sizes['max_length']}" if "max_length" in sizes else \
        f"at least {sizes['min_length']}" if sizes else ""


def _choices(annotation: Any) -> Optional[list]:
    """The choices of a ``Literal`` (``null`` first where it is optional), else None."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return list(args)
    if typing.get_origin(annotation) in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = _choices(next(arg for arg in args if arg is not type(None)))
        return None if inner is None else ["null", *inner]
    return None


def _plural(words: str) -> str:
    for single, many in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings")):
        if words.startswith(single):
            return many + words[len(single):]
    return words


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else str(int(value)) if value.is_integer() and abs(value) < 1e7 \
        else f"{value:g}"


# --- checks that need the model ----------------------------------------------------------------------------
def check_locations(locations: Sequence[int], depth: int, first: int = 0,
                    key: str = "method.params.locations") -> list[int]:
    """Block indices in ``[first, depth - 1]`` of this model, strictly increasing. ``first`` is 1 for a stage
    *before* a block that needs the block before it (K-Medoids' attention, DynamicViT's scores), 0 for pruning
    inside a block after its attention (EViT, top-k)."""
    locations = list(locations)
    valid = f"[{first}, {depth - 1}]"
    bad = [v for v in locations if not first <= v < depth]
    if bad:
        raise ParamError(f"{key}={locations}: {bad} outside the valid block range {valid} of this {depth}-block "
                         f"model")
    if any(b <= a for a, b in zip(locations, locations[1:])):
        raise ParamError(f"{key}={locations} must be strictly increasing (valid: indices in {valid})")
    return locations


def check_cumulative_keep(key: str, keep_rate: float, num_patches: int, stages: int) -> None:
    """Cumulative rates ``keep_rate ** s`` (floor, s = 1..stages) must keep a patch at the last stage: a rate
    that removes every patch token is refused, naming ``key`` and the smallest rate that keeps one."""
    if stages < 1 or math.floor(num_patches * keep_rate ** stages + 1e-9) >= 1:
        return
    smallest = (1.0 / num_patches) ** (1.0 / stages)
    raise ParamError(f"{key}={keep_rate!r} removes every patch token: after {stages} pruning stage(s), "
                     f"floor({num_patches} x {keep_rate!r}^{stages}) = 0; valid: a rate in "
                     f"[{math.ceil(smallest * 1e4) / 1e4:.4f}, 1] for {num_patches} patches")


def check_one_per_location(key: str, values: Sequence, stages: int, valid: str) -> list:
    """``values`` holds one entry per location (``stages`` of them)."""
    values = list(values)
    if len(values) != stages:
        raise ParamError(f"{key}={values!r} has {len(values)} entries for {stages} locations; valid: {valid}")
    return values
