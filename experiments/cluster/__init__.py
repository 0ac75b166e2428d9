"""Sweeps on a cluster: the Hydra launchers over submitit (``launch``), the checks before a sweep is submitted
(``sweep_checks``) and the launcher's own setting ranges (``launcher_ranges``)."""
