"""Registry of token-reduction methods by name, as timm's ``register_model``/``create_model`` do for models.

``create_method`` is the only place in the suite where a method name is read. Unknown names and unknown
parameters raise errors that list the valid choices.

Registration carries each method's metadata (:class:`MethodSpec`), so every default is written once: the
parameters' defaults in the factory's signature, the harness defaults (``finetune``, ``tradeoff_values``) and
the README summary in the ``@register_method`` call. A method may declare its *inference knob*: the parameter
that sets its compute at evaluation without retraining (``experiments/tradeoff.py`` sweeps it on one
checkpoint); changing it must not change the method's parameter shapes, so one checkpoint serves every value.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn

from .base import TokenReducer
from .params import check_params


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about one method."""

    name: str
    factory: Callable[..., TokenReducer]  # fn(vit, **params) -> TokenReducer; its signature holds the defaults
    inference_knob: Optional[str]  # the factory parameter that trades compute at evaluation, or None
    finetune: bool  # whether the harness fine-tunes the method by default (else: evaluated off the shelf)
    tradeoff_values: Optional[tuple]  # default grid of the knob for experiments/tradeoff.py; None without a knob
    summary: str  # one line for the README's method table
    family: Optional[str]  # how it reduces, one of FAMILIES (None: undeclared); the report compares families
    stronger: Optional[dict] = None  # the one stronger setting the benchmark tables time next to the default
    # backbone -> (default, stronger) parameters where the defaults do not fit that backbone's benchmark (random
    # weights, few tokens); experiments/bench.py reads it, so no backbone constant is written there
    bench_settings: Optional[dict] = None
    # parameters that, when set (not None), fix the compute the knob would set (top-k's token_counts): sweeping
    # the knob then records identical points under different values, so the harness refuses it
    knob_fixed_by: tuple = ()
    # the fixed-count method whose trade-off curve this adaptive one's is compared with at matched mean FLOPs
    # ("what adaptivity buys", analysis/adaptivity.py): A-ViT -> top-k, ATS -> EViT, LTMP and threshold ToMe -> ToMe
    counterpart: Optional[str] = None
    # fixer -> the value under which the knob, when set, names what the fixed compute was made for (threshold
    # ToMe's ``threshold="calibrated"``: ``r`` is the calibration's target, checked against the weights); a sweep
    # of the knob stays refused
    knob_names_target: tuple = ()  # (fixer, value) pairs


# pruning: keeps a subset of the tokens as they are; merging: mixes tokens pairwise or softly into fewer;
# clustering: groups the tokens and keeps one per cluster (a medoid, a centre, a weighted mean);
# halting: tokens stop per image (A-ViT); none: the dense reference.
FAMILIES = ("none", "pruning", "merging", "clustering", "halting")


_SPECS: dict[str, MethodSpec] = {}


def register_method(name: str, *, family: Optional[str] = None, inference_knob: Optional[str] = None,
                    finetune: bool = False, tradeoff_values: Optional[Sequence] = None, summary: Optional[str] = None,
                    stronger: Optional[Mapping[str, Any]] = None,
                    bench_settings: Optional[Mapping[str, Sequence[Mapping[str, Any]]]] = None,
                    knob_fixed_by: Sequence[str] = (), counterpart: Optional[str] = None,
                    knob_names_target: Optional[Mapping[str, Any]] = None) -> Callable:
    """Decorator filing a factory ``fn(vit, **params) -> TokenReducer`` under ``name`` (see :class:`MethodSpec`).

    ``summary`` defaults to the first line of the factory's docstring. The knob must be a factory parameter,
    and a grid needs a knob and distinct values. ``stronger`` and each ``bench_settings`` pair name factory
    parameters only (their values are checked when a run is planned). ``knob_fixed_by`` names the parameters
    that make the knob inert when set, ``knob_names_target`` the fixer values under which setting it names a
    target instead (see :class:`MethodSpec`). ``counterpart`` names the fixed-count method
    an adaptive (per-image) one is compared with at matched mean FLOPs; it needs an inference knob (the
    comparison is between trade-off curves) and cannot be the method itself; that it names a registered method
    with a knob is checked once all are registered (:func:`check_counterparts`)."""

    def decorate(factory: Callable[..., TokenReducer]) -> Callable[..., TokenReducer]:
        if name in _SPECS:
            raise ValueError(f"method {name!r} is registered twice")
        if inference_knob is not None and inference_knob not in inspect.signature(factory).parameters:
            raise ValueError(f"method {name!r}: inference knob {inference_knob!r} is not a factory parameter")
        if not isinstance(finetune, bool):
            raise ValueError(f"method {name!r}: finetune={finetune!r} must be true or false")
        if family is not None and family not in FAMILIES:
            raise ValueError(f"method {name!r}: family={family!r} is not one of: {', '.join(FAMILIES)}")
        if counterpart is not None and (not isinstance(counterpart, str) or counterpart == name
                                        or inference_knob is None):
            raise ValueError(f"method {name!r}: counterpart={counterpart!r} must name another method, and "
                             f"{name!r} needs an inference knob (the comparison is of trade-off curves)")
        unknown = [key for key in [*knob_fixed_by, *(knob_names_target or {})]
                   if key not in inspect.signature(factory).parameters]
        if unknown or (knob_fixed_by and inference_knob is None):
            raise ValueError(f"method {name!r}: knob_fixed_by={list(knob_fixed_by)} needs an inference knob and "
                             f"factory parameters (not {unknown})")
        _SPECS[name] = MethodSpec(name, factory, inference_knob, finetune,
                                  _check_grid(name, inference_knob, tradeoff_values),
                                  summary if summary is not None else _first_line(factory.__doc__), family,
                                  _check_setting(name, factory, "stronger", stronger),
                                  _check_bench_settings(name, factory, bench_settings), tuple(knob_fixed_by),
                                  counterpart, tuple((knob_names_target or {}).items()))
        return factory

    return decorate


def _check_grid(name: str, knob: Optional[str], values: Optional[Sequence]) -> Optional[tuple]:
    if values is None:
        return None
    if knob is None:
        raise ValueError(f"method {name!r}: tradeoff_values={values!r} given without an inference knob")
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"method {name!r}: tradeoff_values={values!r} must be a non-empty list of {knob} values")
    if len({repr(v) for v in values}) != len(values):
        raise ValueError(f"method {name!r}: tradeoff_values={list(values)!r} repeats a value")
    return tuple(values)


def _check_setting(name: str, factory: Callable, key: str, setting: Optional[Mapping]) -> Optional[dict]:
    if setting is None:
        return None
    if not isinstance(setting, Mapping):
        raise ValueError(f"method {name!r}: {key}={setting!r} must be a mapping of parameter -> value")
    unknown = sorted(set(setting) - set(list(inspect.signature(factory).parameters)[1:]))
    if unknown:
        raise ValueError(f"method {name!r}: {key} names {unknown}, which are not factory parameters")
    return dict(setting)


def _check_bench_settings(name: str, factory: Callable, settings: Optional[Mapping]) -> Optional[dict]:
    if settings is None:
        return None
    checked = {}
    for model, pair in settings.items():
        if isinstance(pair, (str, bytes, Mapping)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"method {name!r}: bench_settings[{model!r}]={pair!r} must be a (default, stronger) "
                             f"pair of parameter mappings")
        checked[model] = tuple(_check_setting(name, factory, f"bench_settings[{model!r}]", s) for s in pair)
    return checked


def bench_settings(name: str, model: Optional[str] = None) -> list[dict]:
    """The settings a benchmark table times for method ``name`` on backbone ``model``: the default and the
    registered ``stronger`` one (the backbone's own pair where the registration gives one; the default alone
    for a method with nothing to make stronger, e.g. the dense reference). ``model=None``: trained weights,
    so no backbone pair applies."""
    spec = method_spec(name)
    if model is not None and spec.bench_settings and model in spec.bench_settings:
        return [dict(setting) for setting in spec.bench_settings[model]]
    return [{}] if spec.stronger is None else [{}, dict(spec.stronger)]


def default_params(name: str, model: Optional[str] = None) -> dict[str, Any]:
    """The parameters of method ``name``'s default setting on backbone ``model`` (a model config's short name):
    the backbone's registered default where ``bench_settings`` gives one (ToMe's r on the 65-token embedded
    model), else the factory's defaults; every parameter filled. Records keep it as ``method_defaults``."""
    return resolved_params(name, bench_settings(name, model)[0])


def method_info(name: str, method: TokenReducer) -> dict[str, Any]:
    """What a record keeps about the built method: its registered family and, where declared, its fixed-count
    ``counterpart``, then ``method.record_info()``."""
    return {**registered_info(name), **method.record_info()}


def registered_info(name: str) -> dict[str, Any]:
    """The registration facts a record's ``method_info`` carries: ``family`` and, where declared,
    ``counterpart`` (``experiments.records.upgrade`` fills them into older records)."""
    spec = method_spec(name)
    return {"family": spec.family, **({"counterpart": spec.counterpart} if spec.counterpart else {})}


def check_counterparts() -> None:
    """Every declared counterpart is a registered method with an inference knob (it has a trade-off curve) and
    no counterpart of its own (a fixed-count reference); raises ``ValueError`` naming the first that is not."""
    for name, spec in sorted(_SPECS.items()):
        if spec.counterpart is None:
            continue
        other = _SPECS.get(spec.counterpart)
        if other is None or other.inference_knob is None or other.counterpart is not None:
            valid = ", ".join(n for n, s in sorted(_SPECS.items()) if s.inference_knob and not s.counterpart)
            raise ValueError(f"method {name!r}: counterpart={spec.counterpart!r} is not a registered fixed-count "
                             f"method with an inference knob; valid: {valid}")


def _first_line(doc: Optional[str]) -> str:
    lines = inspect.cleandoc(doc or "").splitlines()
    return lines[0].strip() if lines else ""


def method_spec(name: str) -> MethodSpec:
    """The registration of method ``name``; an unknown name raises, listing the valid choices."""
    if name not in _SPECS:
        raise ValueError(f"unknown method {name!r}; valid choices: {', '.join(list_methods())}")
    return _SPECS[name]


def get_factory(name: str) -> Callable[..., TokenReducer]:
    return method_spec(name).factory


def inference_knob(name: str) -> Optional[str]:
    """The parameter of method ``name`` that trades compute at evaluation, or ``None`` (e.g. ``dense``)."""
    return method_spec(name).inference_knob


def methods_with_knob() -> dict[str, str]:
    return {name: spec.inference_knob for name, spec in sorted(_SPECS.items()) if spec.inference_knob}


def list_methods() -> list[str]:
    return sorted(_SPECS)


def method_parameters(name: str) -> dict[str, inspect.Parameter]:
    """Keyword parameters a method accepts (its factory's signature, without the backbone)."""
    params = list(inspect.signature(get_factory(name)).parameters.values())[1:]
    return {p.name: p for p in params}


def _check_params(name: str, params: Mapping[str, Any]) -> dict[str, inspect.Parameter]:
    valid = method_parameters(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for method {name!r}; valid: {', '.join(valid) or '(none)'}"
        )
    return valid


def resolved_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The factory's signature defaults with ``params`` applied on top, as plain JSON-able values (tuples and
    config lists become lists): what a record stores, so a record written before a parameter existed compares
    equal to a newer one that leaves it at its default. Unknown parameters raise as in :func:`create_method`."""
    valid = _check_params(name, params)
    missing = [key for key, p in valid.items() if key not in params and p.default is inspect.Parameter.empty]
    if missing:
        raise ValueError(f"method {name!r} needs parameter(s) {missing}, which have no default")
    merged = {key: params[key] if key in params else p.default for key, p in valid.items()}
    return {key: _plain(value, f"method.params.{key}") for key, value in merged.items()}


def _plain(value: Any, key: str) -> Any:
    """``value`` as JSON-able Python: mappings -> dict, sequences -> list; anything else unsupported raises."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        return [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{key}={value!r} is a {type(value).__name__}, not a JSON value (number, string, bool, "
                     f"null, list or mapping)")


def create_method(name: str, vit: nn.Module, **params) -> TokenReducer:
    """Wrap the timm ViT ``vit`` with method ``name``; ``params`` are checked against the factory's keywords and
    their annotated ranges and choices (``methods.params``: a bad value raises ``ParamError``)."""
    _check_params(name, params)
    check_params(get_factory(name), params)
    return get_factory(name)(vit, **params)


def knob_fixed(name: str, params: Mapping[str, Any], sweeping: bool = False) -> Optional[str]:
    """The parameter of ``params`` that fixes method ``name``'s compute, so its knob has no effect, or None.
    Setting the knob (``sweeping=False``) is allowed where the fixer's value makes it name a target
    (``knob_names_target``); sweeping it never is."""
    spec = method_spec(name)
    targets = dict(spec.knob_names_target)
    return next((key for key in spec.knob_fixed_by if params.get(key) is not None
                 and (sweeping or key not in targets or params.get(key) != targets[key])), None)


def knob_target(name: str, params: Mapping[str, Any]) -> Optional[str]:
    """The parameter of ``params`` whose value makes method ``name``'s knob name a target reached by calibration
    (``knob_names_target``: threshold ToMe's ``threshold=calibrated``, where ``r`` is what the thresholds are
    calibrated for), or None. A trade-off sweep of the knob then calibrates every point
    (``experiments/curve.py``)."""
    targets = dict(method_spec(name).knob_names_target)
    return next((key for key, value in targets.items() if params.get(key) == value), None)
