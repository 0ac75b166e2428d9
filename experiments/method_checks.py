"""The method section of a run's plan: its parameters against the factory's signature (type, range, choices:
``methods.params``), the trade-off grid of its inference knob, and a knob that another parameter makes inert.
Each refusal is a :class:`~experiments.config.ConfigError` naming the key, the value and what is valid.
``experiments.plan.validate`` calls them in this order."""
from __future__ import annotations

import typing
from typing import Any, Optional

import methods
from methods.params import ParamError, check_params, check_value

from experiments.config import ConfigError


def check_method_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Each parameter against the factory's signature annotation (type, range, choices), strictly (``1`` is not
    ``true``)."""
    valid = methods.method_parameters(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(f"method.params: unknown key(s) {unknown} for {name!r}; valid: {', '.join(valid)}")
    try:
        check_params(methods.method_spec(name).factory, params)
    except ParamError as error:
        raise ConfigError(str(error)) from None
    return dict(params)


def check_type(key: str, value: Any, method: str, param: str) -> None:
    """``value`` against the annotation of parameter ``param`` of ``method``'s factory: its type, range or
    choices (``methods.params.check_value``; one line naming ``key``, the value and what is valid)."""
    annotation = typing.get_type_hints(methods.method_spec(method).factory, include_extras=True).get(param, Any)
    try:
        check_value(key, value, annotation)
    except ParamError as error:
        raise ConfigError(str(error)) from None


def check_grid(name: str, grid: Optional[list]) -> None:
    """``method.tradeoff_values``: null, or a non-empty list of distinct values of the method's inference knob,
    each typed like the knob (their ranges are checked by ``experiments.curve``, which builds each point)."""
    if grid is None:
        return
    knob = methods.inference_knob(name)
    if knob is None:
        knobs = ", ".join(f"{m} ({k})" for m, k in methods.methods_with_knob().items())
        raise ConfigError(f"method.tradeoff_values={grid!r}: method {name!r} has no inference knob; valid: null, "
                          f"or a list for one of {knobs}")
    if not grid:
        raise ConfigError(f"method.tradeoff_values={grid!r} must be a non-empty list of {knob} values")
    for index, value in enumerate(grid):
        if value is None:
            raise ConfigError(f"method.tradeoff_values[{index}]=None: every point needs a value of {knob}")
        check_type(f"method.tradeoff_values[{index}]", value, name, knob)
    identities = {repr(float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else repr(v) for v in grid}
    if len(identities) < len(grid):  # 1 and 1.0 are one point
        raise ConfigError(f"method.tradeoff_values={grid!r} repeats a value; valid: distinct values")


def check_knob_not_fixed(name: str, params: dict[str, Any], grid: Optional[list]) -> None:
    """A knob value (set, or swept by ``method.tradeoff_values``) while another parameter fixes the compute it
    would set: refused naming both, since every value would give the same result under a different label."""
    fixer = methods.knob_fixed(name, params, sweeping=grid is not None)
    knob = methods.inference_knob(name)
    if fixer is None or knob is None:
        return
    default = methods.resolved_params(name, {})[knob]
    if grid is not None or (knob in params and params[knob] != default):
        what = f"method.tradeoff_values={grid!r} sweeps" if grid is not None else \
            f"method.params.{knob}={params[knob]!r} sets"
        raise ConfigError(f"{what} method.params.{knob}, but method.params.{fixer}={params[fixer]!r} fixes the "
                          f"compute {knob} would set, so {knob} has no effect; valid: {fixer}=null to use {knob}, "
                          f"or leave {knob} at its default ({default!r})")
