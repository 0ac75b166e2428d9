"""Entry point: ``python experiments/run.py method=adavit model=deit_small ...`` (Hydra overrides), also
``python -m experiments.run`` and ``avb-run`` once the project is installed.

Trains or fine-tunes one method on one backbone, evaluates it, measures its cost and writes one results record
(``experiments/pipeline.py``). The same script runs locally and inside SLURM jobs (``launcher=slurm``).
A refused config prints one ``error:`` line and exits with status 2 (``experiments/refusal.py``).
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments import pipeline
from experiments.config_store import register_configs
from experiments.refusal import command, leave_nothing_on_refusal

register_configs()  # the schemas the task composes against


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@leave_nothing_on_refusal
def run_task(cfg: DictConfig) -> float:
    record = pipeline.run(cfg)
    return record["metrics"]["top1"]


main = command(run_task)

if __name__ == "__main__":
    main()
