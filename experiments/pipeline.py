"""One run, end to end (DeiT's ``main.py`` role): validate, prepare, evaluate, measure, record.

``run(cfg)`` is called by ``experiments/run.py`` locally and inside SLURM jobs alike; ``curve.py`` reuses
``prepare``, ``evaluate`` and ``write_record``. Every decision comes from the :class:`~experiments.plan.RunPlan`
that ``plan.validate`` returns; the rooms it calls own the rest: ``build`` (backbone and method), ``baseline``
(the cached dense baseline), ``training`` (fit and resume), ``checkpoints`` (files and RNG state), ``engine``
(the loops), ``costs`` (FLOPs and throughput) and ``records`` (the record).

Nothing is written before validation passes, and the results record is written last, atomically, so a failed
or killed run leaves no record.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

import methods
from methods.models import read_checkpoint

from experiments import identity, records
from experiments.cost import costs, per_image
from experiments.train import distributed, engine
from experiments.baseline import ensure_baseline
from experiments.build import build_method, resolve_device
from experiments.train.checkpoints import (CHECKPOINT_VERSION, clear_resume_state, file_sha256, save_checkpoint,
                                           seed_everything, strip_prefix)
from experiments.config import ConfigError  # noqa: F401  (re-exported: pipeline.ConfigError)
from experiments.data.loaders import DataBundle, make_loader
from experiments.data.registry import build_data
from experiments.plan import RunPlan, validate
from experiments.train.fit import amp_dtype_for, fit
from experiments.train.run_lock import RunLock

log = logging.getLogger(__name__)


@dataclass
class Session:
    """A built (and, if the plan says so, fine-tuned) method with everything evaluation and recording need."""

    plan: RunPlan
    dist: distributed.DistEnv
    device: torch.device
    data: Any
    method: methods.TokenReducer
    weights: str  # checkpoint:PATH, pretrained:timm, baseline:FILE (shipped|cached|trained now), random
    weights_file: Optional[Path]  # the file behind them, if any
    train_summary: dict[str, Any]
    lock: RunLock  # held on the resume folder until the record is written (train/run_lock.py)
    start_sha256: Optional[str] = None  # the weights file the run started from (checkpoint or baseline)
    evaluated_sha256: Optional[str] = None  # the weights it evaluates: its final.pth when it trained
    calibrated_from_sha256: Optional[str] = None  # a calibrated checkpoint's source weights (experiments/calibrate.py)

    def release(self) -> None:
        """Let another process run this configuration (after the record is written)."""
        self.lock.release()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate, build, train, evaluate, measure and write one results record; returns the record."""
    start_time = records.now_iso()
    session = prepare(validate(cfg))
    result, tokens = evaluate(session, session.method)
    if not session.dist.is_main:  # rank 0 measures and writes the record
        distributed.teardown(session.dist)
        return {"metrics": result.metrics, "tokens": tokens, "path": None, "rank": session.dist.rank}
    record = write_record(session, session.method, result, tokens, start_time)
    if session.plan.trains:
        clear_resume_state(session.plan.resume_dir)  # finished: a new run of this config starts afresh
    session.release()
    distributed.teardown(session.dist)
    return record


def prepare(plan: RunPlan) -> Session:
    """Set up the process (threads, device, DDP), take the resume folder's lock, load the data, resolve the
    weights, build the method and fine-tune it when the plan trains. The lock is released on any error here, and
    otherwise by :meth:`Session.release` once the record is written (or when the process ends)."""
    config = plan.config
    if config.threads:
        torch.set_num_threads(config.threads)  # inside SLURM tasks distributed.setup() then uses the task's CPUs
    dist, device = distributed.setup(resolve_device(config.device))  # a multi-task job: DDP, one task per GPU
    lock = RunLock(plan.resume_dir if plan.trains and dist.is_main else None).acquire()
    try:
        return _prepare(plan, dist, device, lock)
    except BaseException:
        lock.release()
        raise


def _prepare(plan: RunPlan, dist: distributed.DistEnv, device: torch.device, lock: RunLock) -> Session:
    config = plan.config
    seed_everything(config.seed)
    data = build_data(config.data, plan.data_scan)  # the files the startup check counted

    init_state, weights, weights_file = None, plan.weights.label, plan.weights.path
    if plan.weights.kind == "baseline":
        weights_file, how = ensure_baseline(plan, data, device, dist)
        init_state = strip_prefix(read_checkpoint(weights_file)["model"], "vit.")
        weights = f"baseline:{weights_file.name} ({how})"
    start_sha256 = file_sha256(weights_file) if dist.is_main else None
    source = calibrated_from(weights_file) if plan.weights.kind == "checkpoint" and dist.is_main else None
    seed_everything(config.seed)
    method = build_method(plan, init_state).to(device)
    log.info("method %s on %s (%s), weights from %s", plan.method_name, config.model.name, config.data.name, weights)

    train_summary: dict[str, Any] = {"epochs": 0, "history": [], "wall_time_s": 0.0}
    if plan.trains:
        teacher = None
        if method.needs_teacher:
            teacher = methods.create_method("dense", copy.deepcopy(method.vit)).to(device).eval()
            teacher.requires_grad_(False)
        train_summary = fit(method, data, config.train, config, device, plan.resume_dir, plan.method_name, teacher,
                            dist)
        if dist.is_main:
            weights_file = Path(config.paths.run_dir) / "checkpoints" / "final.pth"
            save_checkpoint(weights_file, {"version": CHECKPOINT_VERSION, "method": plan.method_name,
                                           "model": method.state_dict(), "method_params": plan.recorded_params})
    train_summary["init"] = weights
    evaluated_sha256 = file_sha256(weights_file) if plan.trains and dist.is_main else start_sha256
    return Session(plan, dist, device, data, method, weights, weights_file, train_summary, lock, start_sha256,
                   evaluated_sha256, source)


def evaluate(session: Session, method: methods.TokenReducer,
             map_images: Optional[int] = None) -> tuple[engine.EvalResult, dict[str, Any]]:
    """Evaluate ``method`` on the session's validation split (all ranks); returns the engine's result and the
    record's token summary, with depth maps of ``map_images`` images (default: ``eval.map_images``)."""
    config, dist, device = session.plan.config, session.dist, session.device
    maps = config.eval.map_images if map_images is None else map_images
    if dist.enabled:  # each rank evaluates whole batches; merged in order, the metrics are single-process ones
        loader = distributed.eval_loader(session.data.val, config.eval.batch_size, config.num_workers, dist)
    else:
        loader = make_loader(session.data.val, config.eval.batch_size, False, config.num_workers, config.seed)
    result = engine.evaluate(method, loader, device, amp_dtype_for(config, device), maps,
                             progress=config.progress,
                             merge=(lambda parts: distributed.merge_batches(parts, dist)) if dist.enabled else None)
    tokens = token_summary(method, result, maps, session.data)
    log.info("top-1 %.2f%%, top-5 %.2f%%, tokens per block %s", result.metrics["top1"], result.metrics["top5"],
             [round(v, 1) for v in tokens["attn_mean"]])
    return result, tokens


def token_summary(method: methods.TokenReducer, result: engine.EvalResult, map_images: int,
                  data: Optional[DataBundle] = None) -> dict[str, Any]:
    """The record's ``tokens`` entry; video data that marks its moving region (``token_regions``) adds the
    compute share spent on it, data with ground-truth objects (``token_objects``) the scores against them, and
    data with object masks (``mask(index)``, ``[H, W]`` bool) the mask of each mapped image."""
    embed = method.vit.patch_embed
    whole = data is not None and len(result.patch_depth) == len(data.val)  # a sharded eval is merged whole
    regions = getattr(data.val, "token_regions", None) if whole else None
    moving = regions(embed.grid_size, (embed.tubelet_size, *embed.patch_size)) if regions is not None else None
    objects = ground_truth(method, result, data)[0]
    mask = getattr(data.val, "mask", None) if whole else None
    count = min(map_images, len(result.map_images)) if result.map_images is not None else 0
    masks = torch.stack([torch.as_tensor(mask(i), dtype=torch.bool) for i in range(count)]) \
        if mask is not None and count else None
    return engine.token_summary(result, method.depth, tuple(embed.grid_size), map_images, moving, objects, masks)


def ground_truth(method: methods.TokenReducer, result: engine.EvalResult,
                 data: Optional[DataBundle]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The data's per-image ground truth for the evaluated images, where it has some (``data=digit_scenes``):
    the object tokens ``[N, P]`` bool (``token_objects``) and the scenes' clutter ``[N]`` (``scene_clutter``);
    ``(None, None)`` otherwise."""
    if data is None or len(result.patch_depth) != len(data.val):
        return None, None
    truth, clutter = getattr(data.val, "token_objects", None), getattr(data.val, "scene_clutter", None)
    patch = method.vit.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    return (truth(int(patch)) if truth is not None else None), (clutter() if clutter is not None else None)


def data_read(data: DataBundle) -> dict[str, Any]:
    """What the run read, for its record: the class count and the data's scalar facts (images per split,
    classes per split, folders), the very counts the startup check took; lists such as digits' validation
    indices stay out to keep records small."""
    scalars = {key: value for key, value in data.info.items() if isinstance(value, (bool, int, float, str))}
    return {"classes": data.num_classes, **scalars}


def weights_entry(session: Session) -> dict[str, Any]:
    """The record's ``weights``: the sha256 of the file the run started from and of the one it evaluates, and,
    for a run from ``model.checkpoint``, that file's name (``checkpoint``: the tag the reproduction report
    shows next to the published number; the folder stays out, as it is this machine's) and, for a calibrated
    checkpoint (``experiments/calibrate.py``), the sha256 of the weights it was calibrated on
    (``calibrated_from_sha256``: how the report pairs it with the dense control of those weights)."""
    entry = {"start_sha256": session.start_sha256, "evaluated_sha256": session.evaluated_sha256}
    if session.plan.weights.kind == "checkpoint" and session.plan.weights.path is not None:
        entry["checkpoint"] = Path(session.plan.weights.path).name
    if session.calibrated_from_sha256:
        entry["calibrated_from_sha256"] = session.calibrated_from_sha256
    return entry


def calibrated_from(path: Path) -> Optional[str]:
    """The sha256 of the weights the checkpoint at ``path`` was calibrated on (its ``calibration`` facts), or
    None."""
    facts = read_checkpoint(path).get("calibration")
    return facts.get("source_sha256") if isinstance(facts, dict) else None


def write_record(session: Session, method: methods.TokenReducer, result: engine.EvalResult,
                 tokens: dict[str, Any], start_time: str, cfg: Optional[DictConfig] = None,
                 params: Optional[dict[str, Any]] = None, kind: str = "run", **extra: Any) -> dict[str, Any]:
    """Measure ``method`` and write its record (rank 0 only). ``cfg`` and ``params`` (default: the plan's) are
    the config and the method parameters the record carries; ``extra`` adds top-level entries."""
    plan = session.plan
    cfg = cfg if cfg is not None else plan.cfg
    images = None
    need = costs.images_needed(plan.config.measure, session.device)
    if need:
        images, _ = costs.load_images(session.data.val, need, plan.config.num_workers, plan.config.seed)
    measured = costs.measure_costs(method, result, plan.config.measure, session.device, images)
    compute = None
    if plan.config.measure.flops:
        compute = per_image.compute_per_image(method, result, *ground_truth(method, result, session.data), tokens)
    config = OmegaConf.to_container(cfg, resolve=True)
    recorded = plan.recorded_params if params is None else methods.resolved_params(plan.method_name, params)
    ident = identity.result_identity(config, plan.method_name, recorded, kind, plan.trains, session.start_sha256,
                                     plan.data_files)
    record = records.build_record(
        kind, config, plan.method_name, recorded, result.metrics, tokens, measured, session.train_summary,
        start_time, plan.config.paths.run_dir, sum(p.numel() for p in method.parameters()), methods.method_info(plan.method_name, method),
        methods.default_params(plan.method_name, plan.config.model.short_name), data_read=data_read(session.data), identity=ident,
        compute_per_image=compute, weights=weights_entry(session), **extra)
    path = records.write_record(Path(plan.config.paths.results_dir), record)
    log.info("results record: %s", path)
    record["path"] = str(path)
    return record
