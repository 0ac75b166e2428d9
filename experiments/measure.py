"""Entry point: ``python experiments/measure.py model=deit_small method=evit method.params.keep_rate=0.7``
(also ``python -m experiments.measure`` and ``avb-measure``): measure one method without training it.

At DeiT-S's native 224 px (``data.img_size`` follows the model), on random weights, or ``model.checkpoint=PATH``
(``model.pretrained`` is honoured too). It takes the same Hydra config and overrides as ``run.py``, uses the
data only for ``measure.images`` validation images (per-image token counts and throughput inputs), prints one
JSON line and writes a results record of kind ``measure`` (unless ``measure.record=false``); the work is
``experiments/cost/measure_record.py``. No baseline is trained.

The benchmark tables (every method at its default and a stronger setting, DeiT-S on CPU, DeiT-S/B on GPU, the
embedded model with ``make demo``'s A-ViT checkpoint) are ``experiments/bench.py`` (``make bench-cpu``,
``make bench-gpu``), which runs ``measure_record.measure_run`` once per row. A single row::

    python experiments/measure.py model=deit_small measure.num_classes=1000 method=tome \
        'measure.batch_sizes=[1,32,64]' measure.threads=1 progress=false

``adavit`` on random weights halts nothing with its trained gate constants; give it ``gate_scale=10
gate_center=4.7`` (about 0.65x FLOPs on DeiT-S) or ``model.checkpoint=...`` of a trained A-ViT.
"""
from __future__ import annotations

import json
from typing import Optional

import hydra
from omegaconf import DictConfig

from experiments.config_store import register_configs
from experiments.cost.measure_record import measure_run, summary_line
from experiments.refusal import command, leave_nothing_on_refusal

register_configs()  # the schemas the task composes against


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@leave_nothing_on_refusal
def measure_task(cfg: DictConfig) -> Optional[float]:
    record = measure_run(cfg)
    print(json.dumps(summary_line(record)), flush=True)
    return (record.get("flops") or {}).get("gflops")


main = command(measure_task)

if __name__ == "__main__":
    main()
