"""The harness: Hydra entry points, the training/evaluation engine, measurement and results records."""
