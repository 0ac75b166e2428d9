"""Hydra's door to ``experiments.cluster.launch``: Hydra only instantiates launchers defined under ``hydra_plugins``.

The classes here are the ones ``experiments/conf/launcher/{slurm,local}.yaml`` name as ``_target_``; all their
behaviour lives in ``experiments/cluster/launch.py`` (and the pre-submission checks in ``experiments/cluster/sweep_checks.py``).
"""
from experiments.cluster.launch import DebugLauncher as _Debug
from experiments.cluster.launch import LocalLauncher as _Local
from experiments.cluster.launch import SlurmLauncher as _Slurm


class SlurmLauncher(_Slurm):
    """``launcher=slurm`` (see ``experiments.cluster.launch.SlurmLauncher``)."""


class LocalLauncher(_Local):
    """``launcher=local`` (see ``experiments.cluster.launch.LocalLauncher``)."""


class DebugLauncher(_Debug):
    """submitit's in-process debug executor (see ``experiments.cluster.launch.DebugLauncher``)."""
