"""Entry point: calibrate threshold ToMe (DToMe) on a checkpoint, e.g.
``python -m experiments.calibrate method=tome method.params.r=13 model.checkpoint=PATH`` (also
``python experiments/calibrate.py`` and ``avb-calibrate``).

Composes ``conf/calibrate.yaml`` (the run config plus a ``calibration`` section: ``images``, ``batch_size``,
``split``, ``out``) with the same overrides as ``run.py``, runs the method's calibration over the split's images and
writes a checkpoint holding the weights and the calibrated thresholds (``experiments/calibration.py``). Prints one
JSON line: the checkpoint, the thresholds, the images used and the command that evaluates it. A refused config
prints one ``error:`` line, exits with status 2 and writes nothing (``experiments/refusal.py``).
"""
from __future__ import annotations

import json
from typing import Optional

import hydra
from omegaconf import DictConfig

from experiments import calibration
from experiments.config_store import register_configs
from experiments.refusal import command, leave_nothing_on_refusal

register_configs()  # the schemas the task composes against


@hydra.main(version_base="1.3", config_path="conf", config_name="calibrate")
@leave_nothing_on_refusal
def calibrate_task(cfg: DictConfig) -> Optional[str]:
    summary = calibration.run(cfg)
    print(json.dumps(summary), flush=True)
    return summary["checkpoint"]


main = command(calibrate_task)

if __name__ == "__main__":
    main()
