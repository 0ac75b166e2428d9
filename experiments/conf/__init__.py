"""Hydra's config files (a package, so that an installed console script such as ``avb-run`` finds them)."""
