"""Registry of datasets by name (``data.name``), as ``methods/registry.py`` is for methods.

A dataset is one module in ``experiments/data/`` (found by ``experiments.data.discover``, no list names it) whose
builder carries ``@register_data``: its name, its config dataclass (a :class:`~experiments.config.DataConfig`,
filed by ``config_store.register_configs`` as ``data/base_<name>``), its class count and, for data on disk, its startup
check. The check (e.g. a folder scan) runs in ``plan.validate`` before anything is built or written; its result
travels on the run plan (``RunPlan.data_scan``) to :func:`build_data`, so the run reads exactly what the check
counted. This module is the only place where a dataset name is looked up; unknown names are refused naming the
valid choices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from experiments.config import DataConfig, DataError
from experiments.data.loaders import DataBundle


@dataclass(frozen=True)
class DataSpec:
    """What the registry knows about one dataset."""

    name: str
    config: type  # its config dataclass (a DataConfig whose ``name`` defaults to ``name``)
    build: Callable[[Any, Any], DataBundle]  # fn(data config, startup scan or None) -> DataBundle
    num_classes: Union[int, Callable[[Any, Any], int]]  # a count, or fn(data config, startup scan) -> int
    check: Optional[Callable[..., Any]]  # the startup check: fn(data config, needs_train) -> scan (raises
    # DataError); or None. needs_train=False: the run reads no training sample, so the train split may be absent

    def classes(self, data, scan) -> int:
        return self.num_classes if isinstance(self.num_classes, int) else int(self.num_classes(data, scan))


_SPECS: dict[str, DataSpec] = {}


def register_data(name: str, *, config: type, num_classes: Union[int, Callable[[Any, Any], int]],
                  check: Optional[Callable[[Any], Any]] = None) -> Callable:
    """Decorator filing a builder ``fn(data, scan) -> DataBundle`` under ``name`` (see :class:`DataSpec`).

    ``check`` is the startup check, ``fn(data, needs_train=True)`` (its result is the ``scan`` the builder
    receives; without one it gets None); ``num_classes`` is the head's class count, or a function of the config
    and the scan."""

    def decorate(build: Callable[[Any, Any], DataBundle]) -> Callable[[Any, Any], DataBundle]:
        if name in _SPECS:
            raise ValueError(f"dataset {name!r} is registered twice")
        if not (isinstance(config, type) and issubclass(config, DataConfig)):
            raise ValueError(f"dataset {name!r}: config={config!r} must be a DataConfig dataclass")
        if getattr(config, "name", None) != name:
            raise ValueError(f"dataset {name!r}: its config {config.__name__} has name={config.name!r}; it must "
                             f"default to {name!r}")
        if not (callable(num_classes) or (isinstance(num_classes, int) and num_classes >= 1)):
            raise ValueError(f"dataset {name!r}: num_classes={num_classes!r} must be a positive int or a function")
        _SPECS[name] = DataSpec(name, config, build, num_classes, check)
        return build

    return decorate


def list_data() -> list[str]:
    return sorted(_SPECS)


def data_spec(name: Any, key: str = "data") -> DataSpec:
    """The registration of dataset ``name``; an unknown name raises a ``DataError`` listing the valid choices."""
    if name not in _SPECS:
        raise DataError(f"{key}.name={name!r} unknown; valid: {', '.join(list_data())}")
    return _SPECS[name]


def check_data(data, needs_train: bool = True) -> Any:
    """Run the startup check of the data config ``data``; returns its scan (None for data without a check).
    ``needs_train=False``: the run reads no training sample (a folder option then accepts a missing train
    split)."""
    spec = data_spec(data.name)
    return spec.check(data, needs_train=needs_train) if spec.check is not None else None


def count_classes(data, scan: Any = None) -> int:
    """The class count of ``data``'s head; ``scan`` is its startup check's result (run here when None)."""
    spec = data_spec(data.name)
    return spec.classes(data, scan if scan is not None or spec.check is None else spec.check(data))


def build_data(data, scan: Any = None) -> DataBundle:
    """The datasets of the data config ``data``. ``scan``: the startup check's result, which the run plan carries
    (``RunPlan.data_scan``); a caller without a plan passes None and the check runs here."""
    spec = data_spec(data.name)
    if scan is None and spec.check is not None:
        scan = spec.check(data)
    return spec.build(data, scan)
