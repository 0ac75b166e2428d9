"""Registry of token-reduction methods by name, as timm's ``register_model``/``create_model`` do for models.

``create_method`` is the only place in the suite where a method name is read. Unknown names and unknown
parameters raise errors that list the valid choices. A method may declare its *inference knob*: the parameter
that sets its compute at evaluation without retraining (``experiments/tradeoff.py`` sweeps it on one
checkpoint); changing it must not change the method's parameter shapes, so one checkpoint serves every value.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

from torch import nn

from .base import TokenReducer

_METHODS: dict[str, Callable[..., TokenReducer]] = {}
_KNOBS: dict[str, str] = {}


def register_method(name: str, inference_knob: Optional[str] = None) -> Callable:
    """Decorator filing a factory ``fn(vit, **params) -> TokenReducer`` under ``name``; ``inference_knob``
    names the factory parameter that sets the compute at evaluation (see the module docstring)."""

    def decorate(factory: Callable[..., TokenReducer]) -> Callable[..., TokenReducer]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        if inference_knob is not None and inference_knob not in inspect.signature(factory).parameters:
            raise ValueError(f"method {name!r}: inference knob {inference_knob!r} is not a factory parameter")
        _METHODS[name] = factory
        if inference_knob is not None:
            _KNOBS[name] = inference_knob
        return factory

    return decorate


def inference_knob(name: str) -> Optional[str]:
    """The parameter of method ``name`` that trades compute at evaluation, or ``None`` (e.g. ``dense``)."""
    get_factory(name)
    return _KNOBS.get(name)


def methods_with_knob() -> dict[str, str]:
    return dict(sorted(_KNOBS.items()))


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_parameters(name: str) -> dict[str, inspect.Parameter]:
    """Keyword parameters a method accepts (its factory's signature, without the backbone)."""
    factory = get_factory(name)
    params = list(inspect.signature(factory).parameters.values())[1:]
    return {p.name: p for p in params}


def get_factory(name: str) -> Callable[..., TokenReducer]:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; valid choices: {', '.join(list_methods())}")
    return _METHODS[name]


def create_method(name: str, vit: nn.Module, **params) -> TokenReducer:
    """Wrap the timm ViT ``vit`` with method ``name``; ``params`` are checked against the factory's keywords."""
    valid = method_parameters(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for method {name!r}; valid: {', '.join(valid) or '(none)'}"
        )
    return get_factory(name)(vit, **params)
