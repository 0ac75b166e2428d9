"""One run, end to end (DeiT's ``main.py`` role): validate, build, train or fine-tune, evaluate, measure, record.

``run(cfg)`` is called by ``experiments/run.py`` locally and inside SLURM jobs alike. The method is built by
name through the registry in exactly one place (``build_method``); everything else goes through the method
interface. Weights come from, in order: ``model.checkpoint`` (a local timm/DeiT or suite checkpoint),
``model.pretrained`` (timm's hub), or the dense baseline trained with the ``baseline`` recipe and cached by its
config under ``paths.cache_dir`` (the embedded default), else random initialisation.

Nothing is written before validation passes, and the results record is written last, atomically, so a failed
or killed run leaves no record.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import methods
from methods.models import CheckpointError, check_img_size, create_backbone, load_state_dict_strict, read_checkpoint

from . import distributed, engine, preemption, records, schema
from .data import build_data, make_loader
from .schema import ConfigError  # noqa: F401  (re-exported: pipeline.ConfigError)

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


# ----------------------------------------------------------------------------------------------- validation
def validate(cfg: DictConfig, num_classes: Optional[int] = None) -> None:
    """Check the config before any data loading or output (``experiments/schema.py``): every key typed and
    range-checked, the method built on a meta-device backbone so its factory's checks run, ``model.checkpoint``
    and a left-over resume checkpoint matched against it, output folders writable. ``num_classes``: the head the
    caller builds when it is not the data's."""
    schema.validate_config(cfg, num_classes)


def resolve_device(cfg: DictConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------- building
def build_method(cfg: DictConfig, num_classes: int, init_state: Optional[dict] = None) -> methods.TokenReducer:
    """Backbone from ``cfg.model`` (timm, optional hub weights), wrapped by ``cfg.method``, with
    ``model.checkpoint`` (or ``init_state``, a plain timm state dict) loaded all-or-nothing."""
    vit = create_backbone(cfg.model.name, num_classes=num_classes, img_size=cfg.data.img_size,
                          pretrained=bool(cfg.model.pretrained), drop_path_rate=cfg.model.drop_path_rate,
                          **schema.architecture_overrides(cfg.model))
    check_img_size(cfg.data.img_size, vit.patch_embed.patch_size[0])
    params = method_params(cfg)
    method = methods.create_method(cfg.method.name, vit, **params)
    if cfg.model.checkpoint:
        load_checkpoint_into(method, cfg.method.name, cfg.model.checkpoint)
    elif init_state is not None:
        load_state_dict_strict(method.vit, init_state, "the cached dense baseline")
    return method


def method_params(cfg: DictConfig) -> dict[str, Any]:
    params = cfg.method.get("params")
    return OmegaConf.to_container(params, resolve=True) if params is not None else {}


def load_checkpoint_into(method: methods.TokenReducer, method_name: str, path: str) -> None:
    """Plain timm/DeiT weights go into ``method.vit``; a suite checkpoint of the same method (or of ``dense``)
    loads whole. Another method's checkpoint is refused: its extra modules would be silently dropped."""
    content = read_checkpoint(path)
    state = content["model"]
    saved_method = content.get("method")
    if saved_method is None:
        load_state_dict_strict(method.vit, state, f"model.checkpoint={path}")
    elif saved_method == method_name:
        load_state_dict_strict(method, state, f"model.checkpoint={path}")
    elif saved_method == "dense":
        load_state_dict_strict(method.vit, strip_prefix(state, "vit."), f"model.checkpoint={path}")
    else:
        raise CheckpointError(
            f"model.checkpoint={path} was trained with method {saved_method!r}, not {method_name!r}; use a dense "
            f"or plain timm checkpoint, or method={saved_method}"
        )


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def make_optimizer(method: torch.nn.Module, recipe: DictConfig, steps_per_epoch: int):
    groups = engine.unwrap(method).param_groups(recipe.weight_decay)
    optimizer = create_optimizer_v2(groups, opt=recipe.opt, lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=max(recipe.epochs, 1), warmup_epochs=recipe.warmup_epochs,
        min_lr=recipe.min_lr, warmup_lr=recipe.warmup_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    return optimizer, scheduler


# ---------------------------------------------------------------------------------------- training + resume
def fit(method, data, recipe: DictConfig, cfg: DictConfig, device: torch.device, checkpoint_dir: Optional[Path],
        method_name: str, teacher=None, dist: distributed.DistEnv = distributed.SINGLE) -> dict[str, Any]:
    """Train ``method`` for ``recipe.epochs``; checkpoint after every epoch and resume from one if present.

    With several tasks (``dist``) it trains in DDP (``recipe.batch_size`` per task) and only rank 0 writes. Inside
    a submitit job, the checkpoint signal is handled at the next step boundary: a mid-epoch checkpoint (step and
    running sums of the epoch, every rank's RNG state), then submitit requeues the job; the requeued run skips the
    epoch's finished batches and continues exactly where it stopped.
    """
    loader = make_loader(data.train, recipe.batch_size, True, cfg.num_workers, cfg.seed,
                         distributed=(dist.rank, dist.world_size) if dist.enabled else None)
    optimizer, scheduler = make_optimizer(method, recipe, len(loader))
    amp_dtype = amp_dtype_for(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    settings = engine.TrainSettings(clip_grad=recipe.clip_grad, label_smoothing=recipe.label_smoothing,
                                    nan_policy=cfg.train.nan_policy, amp_dtype=amp_dtype, progress=cfg.progress)
    history: list[dict[str, Any]] = []
    start_epoch, partial = 0, None
    last = checkpoint_dir / "last.pth" if checkpoint_dir else None
    if last is not None and last.exists():
        state = read_resume_checkpoint(last)
        load_state_dict_strict(method, state["model"], f"resume checkpoint {last}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"], state["history"]
        rng = rank_rng_state(state["rng"], dist)
        if rng is not None:
            set_rng_state(rng)
        if state.get("step"):  # stopped mid-epoch by the checkpoint signal
            if rng is None:
                raise CheckpointError(f"resume checkpoint {last}: saved mid-epoch by {len(state['rng'])} tasks, "
                                      f"resumed by {dist.world_size}; resume with the same number of tasks")
            partial = state
        log.info("resumed from %s at epoch %d, step %d", last, start_epoch, state.get("step", 0))
    model = distributed.wrap(method, dist, device)

    def save(epoch: int, epoch_state: Optional[engine.EpochState]) -> None:
        rng = distributed.gather_objects(get_rng_state(), dist)  # a collective: every rank calls save
        if last is None or not dist.is_main:
            return
        save_checkpoint(last, {
            "version": CHECKPOINT_VERSION, "method": method_name, "model": method.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch if epoch_state is not None else epoch + 1,
            "step": epoch_state.step if epoch_state is not None else 0,
            "epoch_state": dataclasses.asdict(epoch_state) if epoch_state is not None else None,
            "history": history, "rng": rng, "world_size": dist.world_size,
        })

    started = time.time()
    with preemption.deferred() as signal:
        for epoch in range(start_epoch, recipe.epochs):
            # Re-seed per epoch so a resumed run shuffles and augments exactly like an uninterrupted one.
            seed_everything((cfg.seed * 1000 + epoch) * dist.world_size + dist.rank)
            loader.generator.manual_seed(cfg.seed * 1000 + epoch)
            if dist.enabled:
                loader.sampler.set_epoch(epoch)
            batches, epoch_state = loader, None
            if partial is not None:
                epoch_state = engine.EpochState(**partial["epoch_state"])
                rng = rank_rng_state(partial["rng"], dist)
                batches = ResumedEpoch(loader, epoch_state.step, lambda rng=rng: set_rng_state(rng))
                partial = None

            def on_step(epoch_state: engine.EpochState, epoch: int = epoch) -> None:
                if signal.requested(dist):
                    save(epoch, epoch_state)
                    log.warning("checkpointed epoch %d at step %d on the checkpoint signal", epoch, epoch_state.step)
                    signal.hand_over(dist)

            metrics = engine.train_one_epoch(model, batches, optimizer, scheduler, epoch, device, settings,
                                             teacher=teacher, scaler=scaler, on_step=on_step, state=epoch_state)
            metrics = distributed.mean_metrics(metrics, dist)
            history.append({"epoch": epoch, **metrics})
            log.info("epoch %d: %s", epoch, json.dumps({k: round(v, 5) for k, v in metrics.items()}))
            save(epoch, None)
    return {"epochs": recipe.epochs, "history": history, "wall_time_s": time.time() - started}


class ResumedEpoch:
    """``loader`` for the rest of a partly done epoch: draws (and drops) its first ``steps`` batches, so data order
    and augmentation randomness match the interrupted epoch, then restores the RNG state saved at that step.
    ``len()`` stays the full epoch's (the scheduler counts updates from it)."""

    def __init__(self, loader, steps: int, restore) -> None:
        self.loader, self.steps, self.restore = loader, steps, restore

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        for _ in range(self.steps):
            next(batches)
        self.restore()
        return batches


def rank_rng_state(saved, dist: distributed.DistEnv) -> Optional[dict[str, Any]]:
    """This rank's RNG state from a checkpoint's ``rng`` (one dict, or a list with one per rank); ``None`` when
    it was saved by another number of tasks."""
    if isinstance(saved, dict):
        return saved if dist.world_size == 1 else None
    return saved[dist.rank] if len(saved) == dist.world_size else None


def amp_dtype_for(cfg: DictConfig, device: torch.device) -> Optional[torch.dtype]:
    if not cfg.train.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def get_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, I/O error); the message names the file. The previous
    checkpoint at that path, if any, is intact."""


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Temp file + rename: a crash or a full disk mid-save leaves the previous checkpoint intact. A failed write
    raises :class:`CheckpointSaveError` naming the file, and leaves no temp file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)  # a full disk: OSError, or RuntimeError from torch's zip writer
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, (OSError, RuntimeError)):
            kept = "the previous checkpoint there is intact" if path.exists() else "no earlier checkpoint there"
            message = f"could not save checkpoint {path} ({type(error).__name__}: {error}); {kept}{free_space(path)}"
            code = getattr(error, "errno", None)
            raise (CheckpointSaveError(code, message) if code else CheckpointSaveError(message)) from error
        raise


def free_space(path: Path) -> str:
    """``"; N MB free on that disk"`` for an error message (torch reports a full disk only as a bad zip offset)."""
    try:
        return f"; {shutil.disk_usage(path.parent).free / 1e6:.1f} MB free on that disk"
    except OSError:
        return ""


def read_resume_checkpoint(path: Path) -> dict[str, Any]:
    """The content of a resume checkpoint (``save_checkpoint``'s payload in ``fit``). An unreadable or incomplete
    file is a :class:`CheckpointError` naming it and how to start over, never a silent fresh start."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: RNG states need pickle
    except Exception as error:  # noqa: BLE001 - a damaged zip or pickle raises many types
        raise CheckpointError(f"resume checkpoint {path} is corrupt or unreadable ({type(error).__name__}: "
                              f"{error}). {start_over_hint(path)}") from error
    required = ("model", "optimizer", "scheduler", "epoch", "history", "rng")
    missing = [key for key in required if key not in state] if isinstance(state, dict) else list(required)
    if missing:
        raise CheckpointError(f"resume checkpoint {path} is incomplete (missing {missing}). {start_over_hint(path)}")
    return state


def start_over_hint(path: Path) -> str:
    return (f"It holds this run's progress (paths.state_dir); to start the run over, delete it (rm {path}), "
            "or restore an intact copy to resume")


def clear_resume_state(folder: Path) -> None:
    (folder / "last.pth").unlink(missing_ok=True)
    for stale in folder.glob(".last.pth.*.tmp"):  # left by a run killed mid-save (save_checkpoint's temp files)
        stale.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def content_digest(content: Any, length: int = 16) -> str:
    """A short, stable hash of JSON-able ``content`` (keys sorted): the identity behind run, baseline and curve
    keys."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:length]


def run_key(cfg: DictConfig) -> str:
    """Identity of a run for resuming: the config minus paths, launcher and cosmetic keys. Re-running the same
    command (after a kill, or a SLURM requeue) finds the same resume folder."""
    content = OmegaConf.to_container(cfg, resolve=False)
    for key in ("paths", "hydra", "progress", "num_workers", "launcher"):
        content.pop(key, None)
    return f"{cfg.method.name}_{cfg.model.get('short_name', cfg.model.name)}_s{cfg.seed}_{content_digest(content)}"


# ---------------------------------------------------------------------------------------- cached baseline
def baseline_key(cfg: DictConfig, architecture: dict[str, tuple], world_size: int = 1) -> str:
    """Hash of everything that determines the dense baseline's weights, including the parameter shapes, so
    a changed model definition never reuses a stale cache. A DDP-trained baseline (``world_size`` > 1, batch size
    per task) is another baseline."""
    parts = {
        "model": {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "checkpoint"},
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "recipe": OmegaConf.to_container(cfg.baseline, resolve=True),
        "seed": cfg.seed,
        "architecture": sorted((name, list(shape)) for name, shape in architecture.items()),
    }
    if world_size > 1:
        parts["world_size"] = world_size
    return f"{cfg.model.name}_{cfg.data.name}_s{cfg.seed}_{content_digest(parts, 12)}"


def ensure_baseline(cfg: DictConfig, data, device: torch.device,
                    dist: distributed.DistEnv = distributed.SINGLE) -> tuple[Path, bool]:
    """Path of the cached dense baseline for this config, training it first if absent. Returns (path, reused).

    Jobs running at once (a sweep's cells share baselines) take turns on a lock file beside the cache entry: the
    first trains it, the others then reuse it. In DDP, rank 0 holds the lock and decides; all ranks train.
    """
    baseline_cfg = copy.deepcopy(cfg)
    OmegaConf.update(baseline_cfg, "method", {"name": "dense", "finetune": False, "params": {}}, merge=False)
    OmegaConf.update(baseline_cfg, "model.checkpoint", None)
    seed_everything(cfg.seed)
    dense = build_method(baseline_cfg, data.num_classes)
    shapes = {name: tuple(value.shape) for name, value in dense.state_dict().items()}
    path = Path(cfg.paths.cache_dir) / f"{baseline_key(cfg, shapes, dist.world_size)}.pth"
    with baseline_lock(path, dist):
        if distributed.broadcast_object(path.exists(), dist):
            return path, True
        log.info("training the dense baseline (%d epochs); it is cached at %s", cfg.baseline.epochs, path)
        dense = dense.to(device)
        work_dir = path.parent / f".{path.stem}.work"
        summary = fit(dense, data, cfg.baseline, cfg, device, work_dir, "dense", dist=dist)
        if dist.is_main:
            save_checkpoint(path, {"version": CHECKPOINT_VERSION, "method": "dense", "model": dense.state_dict(),
                                   "train": summary})
            clear_resume_state(work_dir)
        distributed.barrier(dist)
    return path, False


@contextlib.contextmanager
def baseline_lock(path: Path, dist: distributed.DistEnv = distributed.SINGLE):
    """Exclusive ``flock`` on ``.<name>.lock`` beside ``path`` (rank 0 only), held while the block runs."""
    if not dist.is_main:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.stem}.lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another job training the same dense baseline (%s)", path.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------ the run
@dataclasses.dataclass
class Session:
    """A built (and, if asked, fine-tuned) method with everything evaluation and recording need."""

    cfg: DictConfig
    dist: distributed.DistEnv
    device: torch.device
    data: Any
    method: methods.TokenReducer
    weights: str  # where the weights came from: checkpoint:PATH, pretrained:timm, baseline:FILE, random
    weights_file: Optional[Path]  # the file behind them, if any
    train_summary: dict[str, Any]
    trained: bool
    resume_dir: Optional[Path]
    run_dir: Path


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate, build, train, evaluate, measure and write one results record; returns the record."""
    start_time = records.now_iso()
    validate(cfg)
    session = prepare(cfg)
    result, tokens = evaluate_session(session, session.method)
    if not session.dist.is_main:  # rank 0 measures and writes the record
        distributed.teardown(session.dist)
        return {"metrics": result.metrics, "tokens": tokens, "path": None, "rank": session.dist.rank}
    record = write_session_record(session, session.method, result, tokens, start_time)
    if session.trained:
        clear_resume_state(session.resume_dir)  # finished: a new run of this config starts afresh
    distributed.teardown(session.dist)
    return record


def prepare(cfg: DictConfig, train: Optional[bool] = None) -> Session:
    """Set up the process (threads, device, DDP), load the data, resolve the weights, build the method and
    fine-tune it when ``train`` (default: ``experiment.train``, null meaning ``method.finetune``) says so.
    ``cfg`` must have passed :func:`validate`."""
    run_dir = Path(cfg.paths.run_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # inside SLURM tasks distributed.setup() then uses the task's CPUs
    device = resolve_device(cfg)
    dist, device = distributed.setup(device)  # a multi-task job: DDP, one task per GPU; else single process
    seed_everything(cfg.seed)
    data = build_data(cfg)

    init_state, init, weights_file = None, "random", None
    if cfg.model.checkpoint:
        init, weights_file = f"checkpoint:{cfg.model.checkpoint}", Path(cfg.model.checkpoint)
    elif cfg.model.pretrained:
        init = "pretrained:timm"
    elif cfg.baseline.enabled:
        weights_file, reused = ensure_baseline(cfg, data, device, dist)
        init_state = strip_prefix(read_checkpoint(weights_file)["model"], "vit.")
        init = f"baseline:{weights_file.name}" + (" (cached)" if reused else " (trained now)")
    seed_everything(cfg.seed)
    method = build_method(cfg, data.num_classes, init_state).to(device)
    log.info("method %s on %s (%s), weights from %s", cfg.method.name, cfg.model.name, cfg.data.name, init)

    if train is None:
        train = cfg.experiment.train if cfg.experiment.train is not None else cfg.method.finetune
    trained = bool(train) and cfg.train.epochs > 0
    train_summary: dict[str, Any] = {"epochs": 0, "history": [], "wall_time_s": 0.0}
    resume_dir = None
    if trained:
        teacher = None
        if method.needs_teacher:
            teacher = methods.create_method("dense", copy.deepcopy(method.vit)).to(device).eval()
            teacher.requires_grad_(False)
        resume_dir = Path(cfg.paths.state_dir) / run_key(cfg)
        train_summary = fit(method, data, cfg.train, cfg, device, resume_dir, cfg.method.name, teacher, dist)
        if dist.is_main:
            weights_file = run_dir / "checkpoints" / "final.pth"
            save_checkpoint(weights_file, {
                "version": CHECKPOINT_VERSION, "method": cfg.method.name, "model": method.state_dict(),
                "method_params": method_params(cfg)})
    train_summary["init"] = init
    return Session(cfg, dist, device, data, method, init, weights_file, train_summary, trained, resume_dir, run_dir)


def evaluate_session(session: Session, method: methods.TokenReducer):
    """Evaluate ``method`` on the session's validation split (all ranks); returns the engine's result and the
    record's token summary."""
    cfg, dist, device = session.cfg, session.dist, session.device
    if dist.enabled:  # each rank evaluates whole batches; merged in order, the metrics are single-process ones
        eval_loader = distributed.eval_loader(session.data.val, cfg.eval.batch_size, cfg.num_workers, dist)
    else:
        eval_loader = make_loader(session.data.val, cfg.eval.batch_size, False, cfg.num_workers, cfg.seed)
    result = engine.evaluate(method, eval_loader, device, amp_dtype_for(cfg, device), cfg.eval.map_images,
                             progress=cfg.progress,
                             merge=(lambda parts: distributed.merge_batches(parts, dist)) if dist.enabled else None)
    grid = tuple(method.vit.patch_embed.grid_size)
    tokens = engine.token_summary(result, method.depth, grid, cfg.eval.map_images)
    log.info("top-1 %.2f%%, top-5 %.2f%%, tokens per block %s", result.metrics["top1"], result.metrics["top5"],
             [round(v, 1) for v in tokens["attn_mean"]])
    return result, tokens


def write_session_record(session: Session, method: methods.TokenReducer, result, tokens, start_time: str,
                         cfg: Optional[DictConfig] = None, kind: str = "run",
                         extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Measure ``method`` and write its record (rank 0 only); ``cfg`` (default: the session's) is the config
    the record carries, ``extra`` adds top-level entries. Returns the record with its ``path``."""
    from . import measure  # the measurement layer is optional at import time for lightweight tools

    cfg = cfg if cfg is not None else session.cfg
    costs = measure.measure_for_record(method, result, cfg, session.device, dataset=session.data.val)
    record = make_record(cfg, method, result.metrics, tokens, costs, session.train_summary, start_time,
                         session.run_dir, kind)
    record.update(extra or {})
    path = records.write_record(Path(cfg.paths.results_dir), record)
    log.info("results record: %s", path)
    record["path"] = str(path)
    return record


def make_record(cfg, method, metrics, tokens, costs, train_summary, start_time, run_dir,
                kind: str = "run") -> dict[str, Any]:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {
        "schema_version": records.SCHEMA_VERSION,
        "record_id": records.new_record_id(cfg.method.name, str(cfg.model.get("short_name", cfg.model.name)), cfg.seed),
        "kind": kind,
        "status": "complete",
        "method": cfg.method.name,
        "method_params": resolved["method"].get("params") or {},
        "model": cfg.model.get("short_name", cfg.model.name),
        "architecture": cfg.model.name,
        "data": cfg.data.name,
        "seed": cfg.seed,
        "metrics": metrics,
        "params": sum(p.numel() for p in method.parameters()),
        "tokens": tokens,
        "flops": costs.get("flops"),
        "throughput": costs.get("throughput"),
        "train": train_summary,
        "config": resolved,
        "provenance": records.provenance(start_time, str(run_dir)),
    }
