"""Accuracy-vs-compute curves from one checkpoint: sweep a method's inference knob, no retraining.

``python experiments/tradeoff.py method=adavit model.checkpoint=PATH`` loads the weights once, then for each
value of the method's *inference knob* (declared at registration, ``methods.inference_knob``) rebuilds the
method with that value, copies the same weights in, evaluates it on the validation split, measures FLOPs and
throughput, and writes one results record of kind ``tradeoff`` per point. The values come from
``method.tradeoff_values`` (each method's config has a default grid)::

    adavit      inference_gate_shift   added to gate_center at eval (larger = tokens halt later)
    dynamicvit  inference_keep_rate    the eval keep rate, apart from the training rho (keep_rate)
    evit, topk, random  keep_rate      no trained parameters depend on it
    tome        r                      tokens merged per block

Weights resolve as in ``run.py`` (``model.checkpoint``, ``model.pretrained``, else the cached dense baseline).
The sweep never retrains unless ``experiment.train=true``, which fine-tunes once (``run.py``'s recipe) and then
sweeps, so a single command can also start from scratch. A method with trained modules of its own
(DynamicViT's predictors, A-ViT's ``halting=head``) needs a checkpoint of that method or ``experiment.train=true``;
a fine-tuned method swept on weights it was not fine-tuned on (A-ViT with channel-0 halting on the dense
baseline) runs with a warning.

Every point is checked before anything runs: a value out of its range, or one that removes every patch token,
is a ``ConfigError`` naming ``method.params.<knob>`` and the valid range, and nothing is written. Each record
carries ``tradeoff``: ``{"knob", "value", "values", "curve", "weights", "weights_sha256"}``; ``curve`` identifies
the curve (method, backbone, data, seed, the other parameters and the weights' content), which is how
``analysis`` joins the points.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, open_dict
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script: make the repository importable, as experiments/run.py does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods  # noqa: E402
from experiments import distributed, pipeline, records, schema  # noqa: E402
from experiments.schema import ConfigError  # noqa: E402
from methods.models import CheckpointError, read_checkpoint  # noqa: E402

log = logging.getLogger(__name__)

KIND = "tradeoff"


def point_config(cfg: DictConfig, knob: str, value: Any) -> DictConfig:
    """``cfg`` with ``method.params.<knob>`` set to ``value``: the config a point's record carries."""
    point = copy.deepcopy(cfg)
    with open_dict(point):
        if point.method.get("params") is None:
            point.method.params = {}
        point.method.params[knob] = value
    return point


def validate(cfg: DictConfig) -> tuple[str, list]:
    """Everything a sweep needs, checked before anything is loaded or written; returns ``(knob, values)``.
    ``experiment.train`` null becomes false in ``cfg`` (a sweep does not retrain unless asked)."""
    with open_dict(cfg):
        cfg.experiment.train = bool(cfg.experiment.train)
    name = cfg.method.name
    knob = methods.inference_knob(name)
    if knob is None:
        knobs = ", ".join(f"{m} ({k})" for m, k in methods.methods_with_knob().items())
        raise ConfigError(f"method={name} has no inference knob to sweep; valid methods: {knobs}")
    checked = schema.validate_config(cfg)  # types method.tradeoff_values too
    values = checked.config["method"]["tradeoff_values"]
    if values is None:
        raise ConfigError(f"method.tradeoff_values is null; pass the {knob} values to sweep, e.g. "
                          f"'method.tradeoff_values=[...]'")
    for value in values:
        point = copy.deepcopy(checked.config)
        point["method"] = {**point["method"], "params": {**point["method"]["params"], knob: value}}
        try:
            schema.build_on_meta(point, checked.num_classes)
        except ConfigError as error:
            raise ConfigError(f"method.tradeoff_values: the point {knob}={value!r} is invalid: {error}") from error
    check_weights(cfg, checked.method)
    return knob, values


def check_weights(cfg: DictConfig, meta_method) -> None:
    """Refuse a sweep whose weights lack the method's own trained modules (they would stay random)."""
    if cfg.experiment.train:
        return
    name = cfg.method.name
    saved = None
    if cfg.model.checkpoint:
        saved = read_checkpoint(cfg.model.checkpoint).get("method")
    if saved == name:
        return
    own = sorted({key.split(".")[0] for key in meta_method.state_dict() if not key.startswith("vit.")})
    source = f"model.checkpoint={cfg.model.checkpoint}" if cfg.model.checkpoint else "the dense weights"
    if own:
        raise CheckpointError(
            f"{source} has no trained {', '.join(own)} for method {name!r}; valid: model.checkpoint=<the "
            f"final.pth of 'run.py method={name}' (in its run dir, checkpoints/)>, or experiment.train=true to "
            f"fine-tune once before the sweep")
    if cfg.method.finetune:
        log.warning("sweeping %s on %s, which were not fine-tuned with %s; pass its final.pth as model.checkpoint "
                    "or experiment.train=true for the method's real curve", name, source, name)


def file_sha256(path: Optional[Path]) -> Optional[str]:
    if path is None or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def curve_id(cfg: DictConfig, knob: str, weights: str) -> str:
    """The identity of one curve: everything but the knob value."""
    params = {k: v for k, v in pipeline.method_params(cfg).items() if k != knob}
    key = {"method": cfg.method.name, "model": cfg.model.name, "data": cfg.data.name, "seed": cfg.seed,
           "params": params, "weights": weights}
    return pipeline.content_digest(key)


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Validate, load (and fine-tune if ``experiment.train=true``) once, then evaluate, measure and record every
    point; returns the records (rank 0; other ranks get their metrics only)."""
    knob, values = validate(cfg)
    session = pipeline.prepare(cfg, train=cfg.experiment.train)
    sha = file_sha256(session.weights_file) if session.dist.is_main else None
    weights_id = sha or session.weights
    curve = curve_id(cfg, knob, weights_id)
    trained_state = session.method.state_dict()
    done = []
    for value in tqdm(values, desc=f"{cfg.method.name} {knob}", disable=not cfg.progress, dynamic_ncols=True):
        start_time = records.now_iso()
        point_cfg = point_config(cfg, knob, value)
        point = methods.create_method(cfg.method.name, copy.deepcopy(session.method.vit),
                                      **pipeline.method_params(point_cfg))
        point.load_state_dict(trained_state)  # same weights (predictors, halting heads included), new knob
        point = point.to(session.device).eval()
        log.info("point %s=%r", knob, value)
        result, tokens = pipeline.evaluate_session(session, point)
        if not session.dist.is_main:
            done.append({"metrics": result.metrics, "rank": session.dist.rank})
            continue
        extra = {"tradeoff": {"knob": knob, "value": value, "values": values, "curve": curve,
                              "weights": session.weights, "weights_sha256": sha}}
        done.append(pipeline.write_session_record(session, point, result, tokens, start_time, cfg=point_cfg,
                                                  kind=KIND, extra=extra))
    if session.dist.is_main:
        for record in done:
            fl = record.get("flops") or {}
            log.info("%s=%-8s top-1 %6.2f%%  GFLOPs %.4g (x%.3f dense)", knob, record["tradeoff"]["value"],
                     record["metrics"]["top1"], fl.get("gflops", float("nan")), fl.get("flops_ratio", float("nan")))
    if session.trained and session.dist.is_main:
        pipeline.clear_resume_state(session.resume_dir)
    distributed.teardown(session.dist)
    return done


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    done = run(cfg)
    top1 = [r["metrics"]["top1"] for r in done]
    return max(top1) if top1 else None


if __name__ == "__main__":
    main()
