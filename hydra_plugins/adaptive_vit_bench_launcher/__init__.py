"""Hydra's door to ``experiments.launch``: Hydra only instantiates launchers defined under ``hydra_plugins``.

The classes here are the ones ``experiments/conf/launcher/{slurm,local}.yaml`` name as ``_target_``; all their
behaviour lives in ``experiments/launch.py`` (and the pre-submission checks in ``experiments/sweep_checks.py``).
"""
from experiments.launch import DebugLauncher as _Debug
from experiments.launch import LocalLauncher as _Local
from experiments.launch import SlurmLauncher as _Slurm


class SlurmLauncher(_Slurm):
    """``launcher=slurm`` (see ``experiments.launch.SlurmLauncher``)."""


class LocalLauncher(_Local):
    """``launcher=local`` (see ``experiments.launch.LocalLauncher``)."""


class DebugLauncher(_Debug):
    """submitit's in-process debug executor (see ``experiments.launch.DebugLauncher``)."""
