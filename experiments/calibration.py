"""Calibrating a method from data (threshold ToMe's thresholds, DToMe): check, run, write the weights with them.

``experiments/calibrate.py`` runs :func:`run`. Every check runs before any image is read and before anything is
written (``experiments/refusal.py``): the run config as ``run.py`` checks it (``experiments.plan``), the
``calibration`` section's ranges, that the method as configured can calibrate (``TokenReducer.calibration_error``:
ToMe with ``r >= 1`` somewhere and no ``threshold``), the output folder, and that the split holds images.

Output: a suite checkpoint (``torch.save``, the format ``run.py`` writes after training) at ``calibration.out``
(default ``<run dir>/checkpoints/calibrated.pth``): ``{"version", "method", "model", "method_params",
"calibration"}``. ``model`` is the calibrated method's state dict: the backbone's weights as loaded and the
calibrated thresholds (``thresholds``, with ``calibration_r`` and ``calibration_images``), so the thresholds
travel with the weights they were calibrated on; ``method_params`` the parameters that load it
(``threshold: calibrated``); ``calibration`` what it was calibrated on (the source weights and their sha256, the
split, images, batch size, seed, the target ``r`` and the thresholds). Evaluating it::

    python -m experiments.run method=tome method.params.threshold=calibrated model.checkpoint=<calibrated.pth>

The evaluation's record carries ``method_params.threshold = "calibrated"`` and, in ``method_info``, the
thresholds, the calibration's ``r`` and image count.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf

import methods
from methods.params import ParamError

from experiments import pipeline
from experiments.config import MAX_BATCH, MAX_IMAGES, ConfigError, RunConfig, check_ranges, spec
from experiments.data.loaders import make_loader
from experiments.plan import RunPlan, check_writable, validate
from experiments.train.checkpoints import CHECKPOINT_VERSION, save_checkpoint

log = logging.getLogger(__name__)

DEFAULT_OUT = "checkpoints/calibrated.pth"  # under the run folder


@dataclass
class CalibrationConfig:
    """The ``calibration`` section of ``conf/calibrate.yaml`` (not part of run records)."""

    images: int = spec(1024, ge=1, le=MAX_IMAGES)  # at most this many images of the split (fewer if it has fewer)
    batch_size: int = spec(64, ge=1, le=MAX_BATCH)  # images per calibration batch (DyMU: 64 per GPU)
    split: str = spec("train", choices=("train", "val"))  # DyMU calibrates on training images
    out: Optional[str] = spec(None, path=True)  # null: <run dir>/checkpoints/calibrated.pth


@dataclass
class CalibrateConfig(RunConfig):
    """``conf/calibrate.yaml``'s schema: a run config plus the ``calibration`` section."""

    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


def typed_calibration(cfg: DictConfig) -> CalibrationConfig:
    section = cfg.get("calibration") if "calibration" in cfg else {}
    calibration = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CalibrationConfig), section))
    check_ranges(calibration, "calibration")
    return calibration


def output_path(calibration: CalibrationConfig, plan: RunPlan) -> Path:
    if calibration.out:
        return Path(calibration.out).expanduser()
    if not plan.config.paths.run_dir:
        raise ConfigError("calibration.out=null and paths.run_dir=null: nowhere to write the calibrated weights; "
                          "valid: calibration.out=PATH.pth")
    return Path(plan.config.paths.run_dir) / DEFAULT_OUT


def validate_calibration(cfg: DictConfig) -> tuple[RunPlan, CalibrationConfig, Path]:
    """Every check that needs no image; raises ``ConfigError`` (one line) on the first problem."""
    calibration = typed_calibration(cfg)
    plan = validate(cfg, train=False, needs_train=calibration.split == "train")
    error = plan.meta_method.calibration_error()
    if error:
        raise ConfigError(f"method={plan.method_name}: {error}")
    out = output_path(calibration, plan)
    if out.suffix not in (".pth", ".pt"):
        raise ConfigError(f"calibration.out={out}: valid: a .pth or .pt file (a torch.save suite checkpoint)")
    check_writable(out.parent, "calibration.out")
    return plan, calibration, out


def batches(dataset, calibration: CalibrationConfig, plan: RunPlan, device: torch.device) -> Iterator[torch.Tensor]:
    """The split's images in seeded shuffled order, ``calibration.batch_size`` at a time, ``images`` in all. The
    training split's random transforms draw from torch's generator, seeded here with the run's seed (and the
    caller's generator restored after), so the images depend on the seed alone, not on what the process did
    before: a trade-off sweep's every point calibrates on what ``calibrate.py`` would."""
    loader = make_loader(dataset, calibration.batch_size, True, plan.config.num_workers, plan.config.seed)
    left = calibration.images
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.config.seed)
        for images, _ in itertools.takewhile(lambda _: left > 0, loader):
            images = images[:left]
            left -= images.shape[0]
            yield images.to(device)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate, load weights and data, calibrate, write the calibrated checkpoint; returns the summary line."""
    plan, calibration, out = validate_calibration(cfg)
    session = pipeline.prepare(plan)
    try:
        dataset = getattr(session.data, calibration.split)
        if len(dataset) == 0:
            raise ConfigError(f"calibration.split={calibration.split}: data={plan.config.data.name} has no "
                              f"{calibration.split} images; calibration needs at least one")
        method = session.method.eval()
        try:
            calibrated, params = method.calibrate(batches(dataset, calibration, plan, session.device))
        except ParamError as error:
            raise ConfigError(str(error)) from None
        info = calibrated.record_info()
        facts = {"source": session.weights, "source_sha256": session.start_sha256, "data": plan.config.data.name,
                 "split": calibration.split, "batch_size": calibration.batch_size, "seed": plan.config.seed,
                 "method_params": plan.recorded_params, **info}
        save_checkpoint(out, {"version": CHECKPOINT_VERSION, "method": plan.method_name,
                              "model": {k: v.cpu() for k, v in calibrated.state_dict().items()},
                              "method_params": methods.resolved_params(plan.method_name, params),
                              "calibration": facts})
    finally:
        session.release()
    log.info("calibrated checkpoint: %s", out)
    defaults = methods.resolved_params(plan.method_name, {})
    overrides = " ".join(f"method.params.{key}={str(value).lower() if isinstance(value, bool) else value}"
                         for key, value in params.items() if value != defaults.get(key))
    return {"checkpoint": str(out), "thresholds": info.get("thresholds"), "images": info.get("calibration_images"),
            "evaluate": f"python -m experiments.run method={plan.method_name} {overrides} model.checkpoint={out}"}
