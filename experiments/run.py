"""Entry point: ``python experiments/run.py method=adavit model=deit_small ...`` (Hydra overrides).

Trains or fine-tunes one method on one backbone, evaluates it, measures its cost and writes one results record.
The same script runs locally and inside SLURM jobs (``launcher=slurm``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any folder

from experiments import pipeline  # noqa: E402
from experiments.config import register_configs  # noqa: E402
from experiments.refusal import leave_nothing_on_refusal  # noqa: E402


register_configs()  # the schemas main() composes against


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@leave_nothing_on_refusal
def main(cfg: DictConfig) -> float:
    record = pipeline.run(cfg)
    return record["metrics"]["top1"]


if __name__ == "__main__":
    main()
