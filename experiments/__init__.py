"""The harness: config, plan, training, evaluation, measurement and records (importing it registers the config
schemas in Hydra's ConfigStore)."""
from . import config  # noqa: F401
