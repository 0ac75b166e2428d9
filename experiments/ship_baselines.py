"""Entry point: ``python -m experiments.ship_baselines -m seed=0,1,2,3,4`` (``make baselines``): train the dense
baseline of each composed config where the cache lacks it, and ship it into ``paths.baselines_dir`` with its
manifest entry (``experiments/shipped.py``). The default config is the embedded benchmark, so this recreates the
committed ``results/baselines``; ``model=``/``data=`` overrides ship others.

A shipped entry of the same key is replaced: to retrain from scratch rather than re-ship a cached baseline,
delete the cache entry first (``paths.cache_dir``, ``.cache/baselines/<key>.pth``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from experiments import shipped
from experiments.baseline import ensure_baseline
from experiments.build import resolve_device
from experiments.config import ConfigError
from experiments.config_store import register_configs
from experiments.data.registry import build_data
from experiments.plan import validate
from experiments.records.provenance import git_state, now_iso
from experiments.refusal import command, leave_nothing_on_refusal
from methods.models import read_checkpoint

register_configs()
log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@leave_nothing_on_refusal
def ship_task(cfg: DictConfig) -> str:
    folder = cfg.paths.baselines_dir
    if folder is None:
        raise ConfigError("paths.baselines_dir=null: nowhere to ship; valid: a folder path (results/baselines)")
    # validate and train with shipping off: the cache, never the shipped copy (which may be the very entry
    # being replaced, changed or missing)
    cfg.paths.baselines_dir = None
    plan = validate(cfg, train=False)
    if plan.weights.kind != "baseline":
        raise ConfigError(f"weights come from {plan.weights.label}: only a trained dense baseline ships; valid: "
                          "model.checkpoint=null, model.pretrained=false, baseline.enabled=true")
    if plan.config.threads:
        torch.set_num_threads(plan.config.threads)
    data = build_data(plan.config.data, plan.data_scan)
    path, how = ensure_baseline(plan, data, resolve_device(plan.config.device))
    key = path.stem
    state = read_checkpoint(path)["model"]
    git = git_state()
    entry = {"seed": plan.config.seed, "model": plan.config.model.name, "data": plan.config.data.name,
             "recipe": OmegaConf.to_container(cfg.baseline, resolve=True), "torch": torch.__version__,
             "commit": git["git_commit"], "dirty": git["git_dirty"], "shipped": now_iso()}
    target = shipped.ship(Path(folder), key, state, entry)
    log.info("shipped %s (%s) as %s", key, how, target)
    return str(target)


main = command(ship_task)

if __name__ == "__main__":
    main()
