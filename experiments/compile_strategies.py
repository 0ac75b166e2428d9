"""Which ``torch.compile`` strategy pays for a method whose token counts vary per image: the method compiled with
dynamo's automatic dynamic shapes (``dynamic=None``, what ``measure.compile`` uses) against symbolic shapes from
the first call (``dynamic=True``), each timed against timm's forward compiled the protocol's way.

``python -m experiments.compile_strategies method=ltmp model=deit_small measure.threads=1 "measure.batch_sizes=[32]"``
(``+strategies=[auto]`` narrows the list)

Takes ``measure.py``'s config (random weights unless ``model.checkpoint``) and times the method with the
throughput protocol (``experiments/cost/throughput.py``: the pool of the first validation images, repeats
alternating with the reference) once per strategy. Prints one JSON line per strategy and batch size: img/s, the
speedup over compiled timm, the efficiency (speedup x FLOPs ratio), compile seconds, the frames dynamo compiled at
the first forward and later, and graph breaks. Writes nothing. The reasons behind the protocol's choice, and why
no bucketing, are ``methods/ragged.py``'s ("Compiled runs").
"""
from __future__ import annotations

import dataclasses
import json

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from experiments.build import build_method, resolve_device
from experiments.config import ConfigError
from experiments.config_store import register_configs
from experiments.cost import costs, throughput
from experiments.data.registry import build_data
from experiments.plan import validate
from experiments.refusal import command, leave_nothing_on_refusal
from experiments.train.checkpoints import seed_everything

STRATEGIES = {"auto": None, "dynamic": True}  # name -> torch.compile(dynamic=...)
REPORTED = ("batch_size", "img_per_s", "dense_img_per_s", "speedup_vs_dense", "efficiency", "compile_s",
            "compiled_frames", "recompiles", "timed_recompiles", "graph_breaks")


def chosen_strategies(cfg: DictConfig) -> list[str]:
    """``+strategies`` (default: all of :data:`STRATEGIES`), removed from ``cfg``; unknown names are refused."""
    with open_dict(cfg):
        chosen = cfg.pop("strategies", None)
    names = list(STRATEGIES) if chosen is None else list(OmegaConf.to_container(chosen)
                                                          if OmegaConf.is_config(chosen) else [chosen])
    unknown = [name for name in names if name not in STRATEGIES]
    if unknown or not names:
        raise ConfigError(f"strategies={names}: unknown {unknown or '(empty list)'}; valid: {', '.join(STRATEGIES)}")
    return names


register_configs()  # the schemas main() composes against


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@leave_nothing_on_refusal
def strategies_task(cfg: DictConfig) -> None:
    names = chosen_strategies(cfg)
    plan = validate(cfg, cfg.measure.num_classes, train=False)
    measure = plan.config.measure
    device = resolve_device(plan.config.device)
    seed_everything(plan.config.seed)
    images, _ = costs.load_images(build_data(plan.config.data, plan.data_scan).val, measure.timing_images, 0,
                                  plan.config.seed)
    method = build_method(plan).to(device).eval()
    ratio = costs.pool_flops(method, images, device, measure.timing_images)["flops_ratio"]
    for name in names:
        settings = dataclasses.replace(costs.settings_for(measure, device), compile=True,
                                       compile_dynamic=STRATEGIES[name])
        torch._dynamo.reset()  # each strategy compiles from nothing
        for entry in throughput.measure(method, None, device, settings, ratio, images,
                                        pool_size=measure.timing_images):
            print(json.dumps({"method": plan.method_name, "model": plan.config.model.name, "strategy": name,
                              "flops_ratio": ratio, **{key: entry.get(key) for key in REPORTED}}), flush=True)


main = command(strategies_task)

if __name__ == "__main__":
    main()
