"""The ranges of ``hydra.launcher`` keys, checked with the rest of a run's config (inside a Hydra app only).

hydra-submitit-launcher's own structured config types these keys; it does not bound them, and a bad value would
otherwise surface only as an sbatch refusal or a job that never requeues.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from omegaconf import OmegaConf

from experiments.config import ConfigError, check_ranges, spec


@dataclass
class LauncherRanges:
    """``hydra.launcher`` keys of hydra-submitit-launcher with a range (its own structured config types them)."""

    timeout_min: Optional[int] = spec(None, ge=1)
    nodes: Optional[int] = spec(None, ge=1)
    tasks_per_node: Optional[int] = spec(None, ge=1)
    gpus_per_node: Optional[int] = spec(None, ge=0)
    cpus_per_task: Optional[int] = spec(None, ge=1)
    cpus_per_gpu: Optional[int] = spec(None, ge=1)
    gpus_per_task: Optional[int] = spec(None, ge=1)
    mem_gb: Optional[int] = spec(None, gt=0)
    array_parallelism: Optional[int] = spec(None, ge=1)
    max_num_timeout: Optional[int] = spec(None, ge=0)
    signal_delay_s: Optional[int] = spec(None, ge=0)

    def check(self, key: str) -> None:
        if self.timeout_min is not None and self.signal_delay_s is not None \
                and self.signal_delay_s >= self.timeout_min * 60:
            raise ConfigError(f"{key}.signal_delay_s={self.signal_delay_s} must be < {key}.timeout_min * 60 "
                              f"({self.timeout_min * 60}); the checkpoint signal would come before the job starts")


def check_launcher() -> None:
    """``hydra.launcher`` ranges, inside a Hydra app only (``experiments.cluster.launch`` validates every cell with its
    launcher before submitting)."""
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

    if not HydraConfig.initialized() or HydraConfig.get().get("launcher") is None:
        return
    values = OmegaConf.to_container(HydraConfig.get().launcher, resolve=False)
    known = {item.name for item in fields(LauncherRanges)}
    ranges = LauncherRanges(**{k: v for k, v in values.items() if k in known and isinstance(v, (int, type(None)))})
    check_ranges(ranges, "hydra.launcher")
