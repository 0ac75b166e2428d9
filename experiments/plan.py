"""``validate(cfg)``: check a composed config completely, before any data is loaded or anything is written, and
return the :class:`RunPlan` that the rest of the harness consumes, so no decision is made twice.

OmegaConf has typed every key at composition (``experiments.config``); here come the checks that need the
registry, timm or files, in the order a run meets them:

- the ranges and cross-key rules of every section (``config.check_ranges``), ``hydra.launcher`` ranges;
- ``method.name`` against the registry and each parameter against its factory's signature: type, range and
  choices (``methods.params.check_value``: pydantic, strict), the trade-off grid, and a knob set or swept while
  another parameter fixes its compute (``experiments/method_checks.py``); then the method is built on a meta-device backbone (no memory, no weights, milliseconds), so every check of
  timm and of the factory runs too;
- the data's startup check (``experiments/data/registry.py``: a folder scan); a run that reads no training
  sample (it does not train and its weights are not the dense baseline) may lack the train split folder;
- ``model.pretrained`` against timm's weights, ``model.checkpoint`` (readable, head against the classes, every
  key and shape against the model), a resume checkpoint left by an earlier attempt, writable output folders.

Every error names the key, the bad value and the valid range or choices: ``ConfigError`` for config values,
``DataError`` for data folders, ``CheckpointError`` for checkpoint files (all ``ValueError``).
"""
from __future__ import annotations

import functools
import os
import tempfile
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

import methods
from methods import ragged_attention
from methods.models import CheckpointError, load_state_dict_strict, read_checkpoint
from methods.params import ModelSettingError, ParamError

from experiments import identity, shipped
from experiments.baseline import baseline_key
from experiments.build import create_vit, resolve_device
from experiments.train.checkpoints import load_weights, read_resume_checkpoint, start_over_hint
from experiments.method_checks import (check_grid, check_knob_not_fixed, check_method_params,  # noqa: F401
                                       check_type)
from experiments.config import ConfigError, RunConfig, check_ranges
from experiments.data.registry import check_data, count_classes, data_spec
from experiments.cluster.launcher_ranges import check_launcher


@dataclass(frozen=True)
class WeightSource:
    """Where the weights come from: ``checkpoint`` (``path``), ``pretrained`` (timm's hub), ``baseline`` (the
    cached dense baseline, trained if absent) or ``random``."""

    kind: str
    path: Optional[Path] = None

    @property
    def label(self) -> str:
        return {"checkpoint": f"checkpoint:{self.path}", "pretrained": "pretrained:timm"}.get(self.kind, self.kind)


@dataclass
class RunPlan:
    """A validated run: the typed config and every decision taken from it."""

    cfg: DictConfig  # the composed config, as records carry it
    config: RunConfig  # the same, typed and checked
    method_name: str
    method_params: dict[str, Any]  # as given: what the factory is called with
    recorded_params: dict[str, Any]  # with the factory's defaults applied: what records store
    weights: WeightSource
    trains: bool
    num_classes: int
    run_key: str
    resume_dir: Optional[Path]  # paths.state_dir/<run key> when the run trains
    meta_method: methods.TokenReducer  # built on the meta device
    tradeoff_values: Optional[list]  # method.tradeoff_values, else the method's registered grid
    data_scan: Any = None  # the data's startup check result (a folder scan), which build_data reads; None: none ran

    @functools.cached_property
    def data_files(self) -> Optional[str]:
        """The digest of the scanned data files for the record identity (``FolderScan.content_digest``: a stat of
        every file), computed once per plan however many records it writes; ``None`` for generated data."""
        digest = getattr(self.data_scan, "content_digest", None)
        return digest() if digest is not None else None


def validate(cfg: DictConfig, num_classes: Optional[int] = None, train: Optional[bool] = None,
             needs_train: Optional[bool] = None) -> RunPlan:
    """Check ``cfg`` and return its plan; raise on the first problem. ``num_classes``: the head the caller builds
    when it is not the data's (``measure.py``); ``train`` overrides ``experiment.train``; ``needs_train``: whether
    the caller reads the data's training split (default: when the run trains or its weights are the dense
    baseline, which may be trained), else a folder option may lack its train folder."""
    config = typed_config(cfg)
    check_ranges(config)
    check_launcher()
    check_device(config)
    spec = methods.method_spec(config.method.name) if config.method.name in methods.list_methods() else None
    if spec is None:
        raise ConfigError(f"method.name={config.method.name!r} unknown; valid choices: "
                          f"{', '.join(methods.list_methods())}")
    params = check_method_params(spec.name, config.method.params)
    check_grid(spec.name, config.method.tradeoff_values)
    check_knob_not_fixed(spec.name, params, config.method.tradeoff_values)
    check_model_name(config.model.name)

    weights = weight_source(config)
    chosen = train if train is not None else config.experiment.train
    trains = bool(chosen if chosen is not None else
                  (config.method.finetune if config.method.finetune is not None else spec.finetune))
    trains = trains and config.train.epochs > 0
    if needs_train is None:
        needs_train = trains or weights.kind == "baseline"
    scan = None if num_classes else check_data(config.data, needs_train)
    classes = num_classes or count_classes(config.data, scan)
    meta = build_on_meta(config, spec.name, params, classes)
    check_data_fits_model(config, meta.vit)
    if config.model.pretrained and not config.model.checkpoint:
        check_pretrained(config.model.name)
    if config.model.checkpoint:
        classes, meta = check_checkpoint(config, spec.name, params, classes, meta, explicit_classes=num_classes)

    missing = meta.missing_state(None) if weights.kind != "checkpoint" else None
    if missing:  # a checkpoint was checked by load_weights; other weights hold the backbone alone
        raise ConfigError(f"{missing} (weights: {weights.label})")
    key = identity.run_key(cfg)
    resume_dir = Path(config.paths.state_dir) / key if trains else None
    check_paths(config, weights, resume_dir, meta)
    grid = config.method.tradeoff_values
    plan = RunPlan(cfg, config, spec.name, params, methods.resolved_params(spec.name, params), weights, trains,
                   classes, key, resume_dir, meta, list(grid) if grid is not None else
                   (list(spec.tradeoff_values) if spec.tradeoff_values is not None else None), scan)
    if weights.kind == "baseline":
        # a shipped baseline listed for this run's key must be intact (experiments/shipped.py): a changed or
        # missing file is refused now, naming both hashes, not after the data is loaded
        shipped.verified(config.paths.baselines_dir, baseline_key(plan))
    return plan


# ------------------------------------------------------------------------------------------------ sections
def check_device(config: RunConfig) -> None:
    """The device and the dtypes timed on it exist here (measurements are never silently taken elsewhere)."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is available; use device=cpu or device=auto")
    try:
        ragged_attention.resolve_backend(config.eval.ragged_backend, resolve_device(config.device))
    except ValueError as error:
        raise ConfigError(f"eval.{error}") from None
    dtypes = config.measure.dtypes or []
    if config.measure.throughput and config.device != "cpu" and torch.cuda.is_available() and "bf16" in dtypes \
            and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"measure.dtypes={dtypes}: bf16 is not supported by {torch.cuda.get_device_name()}; "
                          "valid here: fp32, fp16")


def typed_config(cfg: DictConfig) -> RunConfig:
    """``cfg`` as a :class:`RunConfig` instance (interpolations resolved). A config that did not come through
    Hydra's typed composition (e.g. rebuilt from a plain container) is typed here, with the same errors."""
    missing = [item.name for item in fields(RunConfig) if item.name not in cfg]
    if missing:
        raise ConfigError(f"config: missing section(s) {missing}; valid: a config composed from "
                          "experiments/conf/config.yaml")
    data = data_spec(OmegaConf.select(cfg, "data.name"))  # an unknown name is refused, naming the valid ones
    values = {item.name: OmegaConf.to_container(cfg[item.name], resolve=False) if OmegaConf.is_config(cfg[item.name])
              else cfg[item.name] for item in fields(RunConfig)}
    # ${hydra:runtime.output_dir} resolves only inside a Hydra app; outside one the run has no run dir
    values["paths"]["run_dir"] = OmegaConf.select(cfg, "paths.run_dir", throw_on_resolution_failure=False)
    schema = OmegaConf.structured(RunConfig)
    schema.data = OmegaConf.structured(data.config)
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, values))
    except ConfigKeyError as error:  # a key added with +key=value that the schema does not have
        section, _, key = (error.full_key or "").rpartition(".")
        valid = list(OmegaConf.select(schema, section).keys()) if section else list(schema.keys())
        raise ConfigError(f"{section or 'config'}: unknown key(s) {[key]}; valid: {', '.join(valid)}") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{getattr(error, 'full_key', None) or 'config'}: {error.msg}") from error


def check_model_name(name: str) -> None:
    import timm  # noqa: PLC0415

    if not timm.is_model(name):
        raise ConfigError(f"model.name: unknown timm model {name!r}; e.g. deit_tiny_patch16_224, "
                          f"deit_small_patch16_224, deit_digits_patch4_32")


# --------------------------------------------------------------------------------------- models and weights
def build_on_meta(config: RunConfig, name: str, params: dict[str, Any], num_classes: int) -> methods.TokenReducer:
    """Backbone and method on the meta device: every check of timm and of the factory runs, nothing is allocated.
    Their errors become :class:`ConfigError`: a :class:`ModelSettingError` or :class:`ParamError` as it is (it
    names its key), anything else with the model or the method it came from."""
    with torch.device("meta"):
        try:
            vit = create_vit(config, num_classes)
        except ModelSettingError as error:
            raise ConfigError(str(error)) from error
        except (ValueError, TypeError, AssertionError, RuntimeError, OverflowError) as error:
            raise _model_error(config, error) from error
        try:
            return methods.create_method(name, vit, **params)
        except ParamError as error:
            raise ConfigError(str(error)) from error
        except (ValueError, TypeError) as error:
            raise ConfigError(f"method {name!r} with params {params}: {error}") from error


def check_data_fits_model(config: RunConfig, vit) -> None:
    """Clips for a video model (its ``num_frames``), images for an image model."""
    model_frames = getattr(vit.patch_embed, "num_frames", None)
    data_frames = getattr(config.data, "num_frames", None)
    if model_frames is None and data_frames is None:
        return
    if model_frames is None:
        raise ConfigError(f"data={config.data.name} (data.num_frames={data_frames}) is video data, but "
                          f"model.name={config.model.name} is an image model; valid: a video model, e.g. "
                          "model=vit_video_digits or model=vit_video_small")
    if data_frames is None:
        raise ConfigError(f"model.name={config.model.name} is a video model ({model_frames} frames per clip), but "
                          f"data={config.data.name} gives images; valid: video data, e.g. data=moving_digits "
                          "(embedded) or data=videofolder data.root=...")
    if int(data_frames) != int(model_frames):
        raise ConfigError(f"data.num_frames={data_frames} but the model takes clips of model.num_frames="
                          f"{model_frames}; valid: data.num_frames={model_frames}, or set model.num_frames (the "
                          "data follows it)")


def _model_error(config: RunConfig, error: Exception) -> ConfigError:
    model = {k: v for k, v in vars(config.model).items() if k not in ("short_name", "checkpoint") and v is not None}
    return ConfigError(f"model: cannot build {config.model.name} with {model} at data.img_size="
                       f"{config.data.img_size}: {error}")


def check_pretrained(name: str) -> None:
    from timm.models import get_pretrained_cfg  # noqa: PLC0415

    pretrained = get_pretrained_cfg(name)
    if pretrained is None or not (pretrained.hf_hub_id or pretrained.url or pretrained.file):
        raise ConfigError(f"model.pretrained=true but timm has no pretrained weights for {name!r}; use "
                          "model.pretrained=false (the suite trains and caches a dense baseline) or "
                          "model.checkpoint=PATH")


def head_rows(state: dict[str, Any]) -> Optional[int]:
    """Classes of a checkpoint's classifier (``head.weight`` of timm, also under a DDP ``module.`` prefix, or
    ``vit.head.weight`` of a suite method)."""
    head = state.get("head.weight", state.get("vit.head.weight", state.get("module.head.weight")))
    return int(head.shape[0]) if isinstance(head, torch.Tensor) and head.dim() == 2 else None


def check_checkpoint(config: RunConfig, name: str, params: dict[str, Any], classes: int, meta: methods.TokenReducer,
                     explicit_classes: Optional[int]) -> tuple[int, methods.TokenReducer]:
    """``model.checkpoint`` against the model it will load into; returns the class count and the meta method
    (rebuilt with the checkpoint's head when ``measure.num_classes`` asks for it)."""
    path = config.model.checkpoint
    content = read_checkpoint(path)
    rows = head_rows(content["model"])
    if rows is not None and rows != classes:
        if explicit_classes is not None or rows != config.measure.num_classes:
            raise CheckpointError(
                f"model.checkpoint={path} has a {rows}-class head but data.name={config.data.name} has {classes} "
                f"classes; valid: a checkpoint with a {classes}-class head (fine-tuned on this data), or a "
                "backbone checkpoint without 'head.*' keys")
        classes, meta = rows, build_on_meta(config, name, params, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying into meta parameters is a no-op; only the checks matter
        load_weights(meta, name, content, f"model.checkpoint={path}")
    return classes, meta


def weight_source(config: RunConfig) -> WeightSource:
    model = config.model
    if model.checkpoint:
        return WeightSource("checkpoint", Path(model.checkpoint))
    if model.pretrained:
        return WeightSource("pretrained")
    return WeightSource("baseline" if config.baseline.enabled else "random")


# ------------------------------------------------------------------------------------------------- folders
def check_paths(config: RunConfig, weights: WeightSource, resume_dir: Optional[Path], meta) -> None:
    paths = config.paths
    check_writable(Path(paths.results_dir), "paths.results_dir")
    if resume_dir is not None:
        check_writable(Path(paths.state_dir), "paths.state_dir")
        if not paths.run_dir:  # the fine-tuned checkpoint goes there
            raise ConfigError("paths.run_dir=null: a run that trains needs a run folder; valid: a folder path "
                              "(Hydra sets it to its output dir)")
        check_writable(Path(paths.run_dir), "paths.run_dir")
        check_resume_state(resume_dir / "last.pth", meta)
    if weights.kind == "baseline":
        check_writable(Path(paths.cache_dir), "paths.cache_dir")


def check_writable(folder: Path, key: str) -> None:
    """``folder`` exists and takes files, or can be created: probed in its nearest existing ancestor, leaving
    nothing behind."""
    folder = folder.expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link (or a link loop): nothing can be created through it
            raise ConfigError(f"{key}={folder} is not writable: {existing} is a symlink to "
                              f"{os.readlink(existing)}, which does not exist; valid: a folder, or a link to one")
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={folder} is not writable: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"{key}={folder} is not writable: {error}") from error


def check_resume_state(last: Path, meta) -> None:
    """A resume checkpoint left by an earlier attempt must be usable (readable, every key and shape of the
    method): a clear error naming the file and how to start over, never a silent fresh start."""
    if not last.exists():
        return
    state = read_resume_checkpoint(last)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_state_dict_strict(meta, state["model"], f"resume checkpoint {last}")
    except CheckpointError as error:
        raise CheckpointError(f"{error}. {start_over_hint(last)}") from error
