"""The harness: config, plan, training, evaluation, measurement and records.

Importing it does nothing else: the entry points file the config schemas in Hydra's ConfigStore
(``experiments.config_store.register_configs``) before they compose, so ``experiments.records`` can be read without
Hydra state, torch or the methods.
"""
