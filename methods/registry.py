"""Registry of token-reduction methods by name, as timm's ``register_model``/``create_model`` do for models.

``create_method`` is the only place in the suite where a method name is read. Unknown names and unknown
parameters raise errors that list the valid choices.
"""
from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from .base import TokenReducer

_METHODS: dict[str, Callable[..., TokenReducer]] = {}


def register_method(name: str) -> Callable:
    """Decorator filing a factory ``fn(vit, **params) -> TokenReducer`` under ``name``."""

    def decorate(factory: Callable[..., TokenReducer]) -> Callable[..., TokenReducer]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = factory
        return factory

    return decorate


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
