"""The config schemas filed in Hydra's ``ConfigStore``, and the resolvers the YAML files use: what must exist
before anything composes a run config.

The entry points (``run.py``, ``measure.py``, ``tradeoff.py``, ``profile_ops.py``, ``bench.py``) and the tests call
:func:`register_configs` before they compose, never at import, so importing the harness (and
``experiments.records``) stays free of Hydra state. It imports the method and data registries, which import
``experiments.config``: keeping it out of ``config.py`` keeps that module free of both (no import cycle).
"""
from __future__ import annotations

import os
import secrets

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from experiments.config import MethodConfig, RunConfig

_RUN_TOKEN = f"{os.getpid()}{secrets.token_hex(2)}"


def run_token() -> str:
    """``${run_token:}`` in ``hydra.run.dir``: this process's id and 4 random hex digits, the same for every
    resolution in one process. Two identical commands started in the same second (Hydra's ``${now:}`` has
    one-second resolution) get distinct run folders, also on two hosts of a cluster sharing one ``outputs/``."""
    return _RUN_TOKEN


def register_configs() -> None:
    """File ``base_config`` (the primary config's schema, which types ``method`` and ``model`` too),
    ``data/base_<name>`` (each registered dataset's schema) and one ``method/<name>_defaults`` per registered
    method, holding its factory's signature defaults (so a method's defaults are written once, in its factory);
    register the ``run_token`` resolver. Idempotent."""
    import methods  # noqa: PLC0415 - the registry fills on import (methods are discovered, not listed)
    from experiments.data import registry as data_registry  # noqa: PLC0415 - datasets too

    if not OmegaConf.has_resolver("run_token"):
        OmegaConf.register_new_resolver("run_token", run_token)
    store = ConfigStore.instance()
    store.store(name="base_config", node=RunConfig)
    from experiments.calibration import CalibrateConfig  # noqa: PLC0415 - imports the harness (torch)
    store.store(name="base_calibrate_config", node=CalibrateConfig)  # conf/calibrate.yaml's schema
    for name in data_registry.list_data():
        store.store(group="data", name=f"base_{name}", node=data_registry.data_spec(name).config)
    for name in methods.list_methods():
        defaults = methods.resolved_params(name, {})
        store.store(group="method", name=f"{name}_defaults", node=MethodConfig(name=name, params=defaults))
