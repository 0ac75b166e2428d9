"""Operator profile of one method forward: how many aten ops run per block, and which.

``python experiments/profile_ops.py method=adavit model.checkpoint=PATH +profile.batch_size=1`` (also
``python -m experiments.profile_ops``)

Takes the same Hydra config and overrides as ``measure.py`` (weights from ``model.checkpoint``, else random), runs
``profile.repeats`` eval forwards on the first validation images under ``torch.profiler`` and prints one JSON
line: aten ops per forward and per block run, host syncs (``aten::item``, ``aten::nonzero``, ``_local_scalar_dense``)
per forward, and the most frequent ops. It is the tool behind the per-block op counts the README quotes; it
writes nothing.
"""
from __future__ import annotations

import collections
import json

import hydra
import torch
from omegaconf import DictConfig, open_dict
from torch.profiler import ProfilerActivity, profile

from experiments.build import build_method, resolve_device
from experiments.config_store import register_configs
from experiments.cost import costs
from experiments.data.registry import build_data
from experiments.plan import validate
from experiments.refusal import command, leave_nothing_on_refusal
from experiments.train.checkpoints import seed_everything

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")


def op_profile(method: torch.nn.Module, images: torch.Tensor, repeats: int) -> dict:
    """Counts of aten ops per forward of ``method(images)`` (eval, inference mode), averaged over repeats."""
    method.eval()
    with torch.inference_mode():
        out = method(images)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                method(images)
    ops = collections.Counter()
    for event in prof.events():
        if event.name.startswith("aten::") and (event.cpu_parent is None or
                                                 not event.cpu_parent.name.startswith("aten::")):
            ops[event.name] += 1  # top-level aten ops only (not the ops a composite op calls)
    per_forward = sum(ops.values()) / repeats
    blocks_run = (out.token_counts[..., 0] > 0).sum(dim=1).float().max().item()  # blocks the longest image ran
    return {
        "ops_per_forward": per_forward,
        "blocks_run": blocks_run,
        "ops_per_block": per_forward / max(blocks_run, 1.0),
        "syncs_per_forward": sum(ops[name] for name in SYNC_OPS) / repeats,
        "top_ops": {name: count / repeats for name, count in ops.most_common(15)},
    }


register_configs()  # the schemas main() composes against


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@leave_nothing_on_refusal
def profile_task(cfg: DictConfig) -> None:
    with open_dict(cfg):
        batch = int(cfg.get("profile", {}).get("batch_size", 1))
        repeats = int(cfg.get("profile", {}).get("repeats", 5))
        cfg.pop("profile", None)
    plan = validate(cfg, cfg.measure.num_classes, train=False)
    device = resolve_device(plan.config.device)
    seed_everything(plan.config.seed)
    images, _ = costs.load_images(build_data(plan.config.data, plan.data_scan).val, batch, 0, plan.config.seed)
    method = build_method(plan).to(device)
    torch.set_num_threads(plan.config.threads or torch.get_num_threads())
    print(json.dumps({"method": plan.method_name, "batch_size": batch, **op_profile(method, images.to(device),
                                                                                      repeats)}))


main = command(profile_task)

if __name__ == "__main__":
    main()
