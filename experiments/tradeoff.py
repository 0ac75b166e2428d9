"""Entry point: accuracy-vs-compute curves from one checkpoint: sweep a method's inference knob, no retraining.

``python experiments/tradeoff.py method=adavit model.checkpoint=PATH`` (also ``python -m experiments.tradeoff``
and ``avb-tradeoff``; the work is ``experiments/curve.py``) loads the weights once, then for each
value of the method's *inference knob* (declared at registration, ``methods.inference_knob``) rebuilds the
method with that value, copies the same weights in, evaluates it on the validation split, measures FLOPs and
throughput, and writes one results record of kind ``tradeoff`` per point. The values come from
``method.tradeoff_values`` (each method's config has a default grid)::

    adavit      inference_gate_shift   added to gate_center at eval (larger = tokens halt later)
    dynamicvit  inference_keep_rate    the eval keep rate, apart from the training rho (keep_rate)
    evit, topk, random  keep_rate      no trained parameters depend on it
    tome        r                      tokens merged per block (with threshold=calibrated: the target each
                                       point's thresholds are calibrated for, on the training split)

Weights resolve as in ``run.py`` (``model.checkpoint``, ``model.pretrained``, else the cached dense baseline).
The sweep never retrains unless ``experiment.train=true``, which fine-tunes once (``run.py``'s recipe) and then
sweeps, so a single command can also start from scratch. A method with trained modules of its own
(DynamicViT's predictors, A-ViT's ``halting=head``) needs a checkpoint of that method or ``experiment.train=true``;
a fine-tuned method swept on weights it was not fine-tuned on (A-ViT with channel-0 halting on the dense
baseline) runs with a warning.

The grid is ``method.tradeoff_values``, else the method's registered default grid. Every point is checked
before anything runs: a value out of its range, or one that removes every patch token,
is a ``ConfigError`` naming ``method.params.<knob>`` and the valid range, and nothing is written. Each record
carries ``tradeoff``: ``{"knob", "value", "values", "curve", "weights", "weights_sha256"}``; ``curve`` identifies
the curve (method, backbone, data, seed, the other parameters and the weights' content), which is how
``analysis`` joins the points.
"""
from __future__ import annotations

from typing import Optional

import hydra
from omegaconf import DictConfig

from experiments import curve
from experiments.config_store import register_configs
from experiments.refusal import command, leave_nothing_on_refusal

register_configs()  # the schemas the task composes against


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@leave_nothing_on_refusal
def tradeoff_task(cfg: DictConfig) -> Optional[float]:
    done = curve.run(cfg)
    top1 = [r["metrics"]["top1"] for r in done]
    return max(top1) if top1 else None


main = command(tradeoff_task)

if __name__ == "__main__":
    main()
