"""Accuracy-vs-compute curves from one set of weights: validate a sweep of a method's inference knob, then
evaluate, measure and record every point (``run``), which ``experiments/tradeoff.py`` runs as a Hydra entry point.

The knob is declared at registration (``methods.inference_knob``); the grid is ``method.tradeoff_values``, else
the method's registered default grid. Every point is checked before anything runs: a value out of its range, or
one that removes every patch token, is a ``ConfigError`` naming ``method.params.<knob>`` and the valid range, and
nothing is written. Weights resolve as in ``run.py``; a method with trained modules of its own needs a checkpoint
of that method or ``experiment.train=true`` (``check_weights``). Each record carries ``tradeoff``:
``{"knob", "value", "values", "curve", "weights", "weights_sha256"}``; ``curve`` identifies the curve (method,
backbone, data, seed, the other parameters and the weights' content), which is how ``analysis`` joins the points.

A knob that names a calibration target (``methods.knob_target``: threshold ToMe's ``r`` under
``threshold=calibrated``) is swept by calibrating every point: the weights are loaded (and fine-tuned) as the
method without the target's parameter (ToMe at its ``r``), then each point calibrates on the training split for
its knob value (``experiments/calibration.py``'s defaults: ``CALIBRATION``) and is evaluated with what it
calibrated; its record's ``tradeoff.calibration`` says on what. So DToMe's curve and ToMe's, swept with the same
overrides, start from the same weights and differ only in how the merges are allocated.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

import methods
from experiments import calibration, identity, pipeline, records
from experiments.build import build_method
from experiments.config import ConfigError
from experiments.plan import RunPlan, build_on_meta, validate
from experiments.train import distributed
from experiments.train.checkpoints import clear_resume_state
from methods.models import CheckpointError, read_checkpoint

log = logging.getLogger(__name__)

KIND = "tradeoff"
CALIBRATION = calibration.CalibrationConfig()  # how a calibrating sweep's points calibrate (training split)


def point_config(cfg: DictConfig, plan: RunPlan, knob: str, value: Any) -> DictConfig:
    """``cfg`` with ``method.params.<knob>`` set to ``value``: the config a point's record carries. A sweep that
    fine-tunes first also records the knob value it fine-tuned at (``method.fine_tuned_at``), so that curves
    fine-tuned at different settings get different identities although every point overrides the knob."""
    point = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # plain: the schema has no fine_tuned_at
    with open_dict(point):
        point.method.params[knob] = value
        if plan.trains:
            point.method.fine_tuned_at = {knob: methods.resolved_params(plan.method_name,
                                                                        plan.method_params)[knob]}
    return point


def calibration_target(cfg: DictConfig) -> dict[str, Any]:
    """``{parameter: value}`` when the swept knob names a calibration target (``methods.knob_target``), else
    ``{}``: the parameter the weights are loaded without and every point is evaluated with."""
    name = cfg.method.name
    if name not in methods.list_methods():
        return {}
    params = OmegaConf.to_container(cfg.method.params, resolve=True) if cfg.method.get("params") else {}
    fixer = methods.knob_target(name, params or {})
    return {fixer: params[fixer]} if fixer else {}


def validate_sweep(cfg: DictConfig) -> tuple[RunPlan, str, list, dict[str, Any]]:
    """Everything a sweep needs, checked before anything is loaded or written; returns ``(plan, knob, values,
    target)`` (``target``: :func:`calibration_target`; the plan is then the method without it).
    ``experiment.train`` null becomes false in ``cfg`` (a sweep does not retrain unless asked)."""
    with open_dict(cfg):
        cfg.experiment.train = bool(cfg.experiment.train)
    name = cfg.method.name
    if name in methods.list_methods() and methods.inference_knob(name) is None:
        raise ConfigError(f"method={name} has no inference knob to sweep; valid methods: {_knobbed()}")
    target = calibration_target(cfg)
    loaded = copy.deepcopy(cfg)
    with open_dict(loaded):
        for key in target:  # loaded and fine-tuned without it; each point calibrates its own
            loaded.method.params[key] = None
    plan = validate(loaded, needs_train=True if target else None)
    knob, values = methods.inference_knob(plan.method_name), check_grid(plan)
    fixer = methods.knob_fixed(plan.method_name, plan.method_params, sweeping=True)
    if fixer is not None:  # the registered grid: the plan saw no explicit one
        raise ConfigError(f"tradeoff.py sweeps method.params.{knob} over {values}, but method.params.{fixer}="
                          f"{plan.method_params[fixer]!r} fixes the compute {knob} would set, so every point would "
                          f"be the same; valid: {fixer}=null")
    for value in values:
        params = {**plan.method_params, knob: value}
        try:
            meta = build_on_meta(plan.config, plan.method_name, params, plan.num_classes)
        except ConfigError as error:
            raise ConfigError(f"method.tradeoff_values: the point {knob}={value!r} is invalid: {error}") from error
        if target and meta.calibration_error():
            raise ConfigError(f"method.tradeoff_values: the point {knob}={value!r} cannot be calibrated for "
                              f"{_pairs(target)}: {meta.calibration_error()}")
    check_weights(plan)
    return plan, knob, values, target


def _pairs(params: dict[str, Any]) -> str:
    return ", ".join(f"method.params.{key}={value}" for key, value in params.items())


def _knobbed() -> str:
    return ", ".join(f"{m} ({k})" for m, k in methods.methods_with_knob().items())


def check_grid(plan: RunPlan) -> list:
    """The grid to sweep (typed and checked by ``plan.check_grid``): it must exist."""
    if plan.tradeoff_values is None:
        knob = methods.inference_knob(plan.method_name)
        raise ConfigError(f"method.tradeoff_values is null; pass the {knob} values to sweep, e.g. "
                          f"'method.tradeoff_values=[...]'")
    return plan.tradeoff_values


def check_weights(plan: RunPlan) -> None:
    """Refuse a sweep whose weights lack the method's own trained modules (they would stay random)."""
    if plan.trains:
        return
    name, checkpoint = plan.method_name, plan.config.model.checkpoint
    if checkpoint and read_checkpoint(checkpoint).get("method") == name:
        return
    own = sorted({key.split(".")[0] for key in plan.meta_method.state_dict() if not key.startswith("vit.")})
    source = f"model.checkpoint={checkpoint}" if checkpoint else "the dense weights"
    if own:
        raise CheckpointError(
            f"{source} has no trained {', '.join(own)} for method {name!r}; valid: model.checkpoint=<the "
            f"final.pth of 'run.py method={name}' (in its run dir, checkpoints/)>, or experiment.train=true to "
            f"fine-tune once before the sweep")
    if methods.method_spec(name).finetune:
        log.warning("sweeping %s on %s, which were not fine-tuned with %s; pass its final.pth as model.checkpoint "
                    "or experiment.train=true for the method's real curve", name, source, name)


def calibrate_point(point, session: pipeline.Session, plan: RunPlan):
    """``point`` calibrated on the training split (:data:`CALIBRATION`): the calibrated method (on ``point``'s
    backbone, evaluation mode) and the parameters that build it."""
    batches = calibration.batches(session.data.train, CALIBRATION, plan, session.device)
    calibrated, params = point.calibrate(batches)
    return calibrated.to(session.device).eval(), params


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Validate, load (and fine-tune if ``experiment.train=true``) once, then evaluate, measure and record every
    point; returns the records (rank 0; other ranks get their metrics only)."""
    plan, knob, values, target = validate_sweep(cfg)
    session = pipeline.prepare(plan)
    sha = session.evaluated_sha256  # the weights every point evaluates (final.pth when it fine-tuned first)
    curve = identity.curve_id(plan.method_name, cfg, {**plan.recorded_params, **target}, knob,
                              sha or session.weights)
    trained_state = session.method.state_dict()
    done = []
    for value in tqdm(values, desc=f"{plan.method_name} {knob}", disable=not plan.config.progress,
                      dynamic_ncols=True):
        start_time = records.now_iso()
        params = {**plan.method_params, knob: value}
        point = build_method(plan, params=params, vit=copy.deepcopy(session.method.vit))
        point.load_state_dict(trained_state)  # same weights (predictors, halting heads included), new knob
        point = point.to(session.device).eval()
        if target:
            point, params = calibrate_point(point, session, plan)
        log.info("point %s=%r", knob, value)
        result, tokens = pipeline.evaluate(session, point, map_images=0)  # no figure reads a point's maps
        if not session.dist.is_main:
            done.append({"metrics": result.metrics, "rank": session.dist.rank})
            continue
        tradeoff = {"knob": knob, "value": value, "values": values, "curve": curve, "weights": session.weights,
                    "weights_sha256": sha}
        if target:
            tradeoff["calibration"] = {"split": CALIBRATION.split, "images": CALIBRATION.images,
                                       "batch_size": CALIBRATION.batch_size, "seed": plan.config.seed}
        done.append(pipeline.write_record(session, point, result, tokens, start_time,
                                          cfg=point_config(cfg, plan, knob, value), params=params, kind=KIND,
                                          tradeoff=tradeoff))
    if session.dist.is_main:
        for record in done:
            fl = record.get("flops") or {}
            log.info("%s=%-8s top-1 %6.2f%%  GFLOPs %.4g (x%.3f dense)", knob, record["tradeoff"]["value"],
                     record["metrics"]["top1"], fl.get("gflops", float("nan")), fl.get("flops_ratio", float("nan")))
    if plan.trains and session.dist.is_main:
        clear_resume_state(plan.resume_dir)
    session.release()
    distributed.teardown(session.dist)
    return done
