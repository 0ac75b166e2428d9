"""Structured config validation: every key of a run's config typed and range-checked before anything runs.

``validate_config(cfg)`` is what ``pipeline.validate`` does, at the top of ``pipeline.run`` (before any data is
loaded or anything is written), in ``measure.py`` and, through ``experiments.launch``, for every cell of a sweep
before a job is submitted. It owns:

- the schema: one dataclass per section (``RunConfig``, ``Recipe``/``TrainRecipe``/``BaselineRecipe``,
  ``EvalConfig``, ``PathsConfig``, ``ModelConfig``, ``DigitsData``/``ImageFolderData``, ``LauncherRanges``),
  whose annotations give each key's type and whose field metadata (``spec``) its range or choices;
- method parameters typed from the registered factory's signature annotations, then range-checked by the
  factory itself: the method is built on a meta-device backbone (no memory, no weights, milliseconds), so every
  check the methods make runs here;
- checks across keys and files: image size against the patch size, ``model.pretrained`` against timm's weights,
  ``model.checkpoint`` (readable, head against the classes, every key and shape against the model), a resume
  checkpoint left by an earlier attempt of this run, writable output folders, and ``hydra.launcher`` ranges.

Every error names the key, the bad value and the valid range or choices: :class:`ConfigError` for config
values, ``DataError`` for data folders and ``CheckpointError`` for checkpoint files (all ``ValueError``).
The ``measure:`` section belongs to ``experiments.measure.check_config``, which is called from here.
Top-level keys this module does not know are left to their owners.
"""
from __future__ import annotations

import inspect
import math
import tempfile
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf

import methods
from methods.models import CheckpointError, check_img_size, create_backbone, load_state_dict_strict, read_checkpoint

from .data import DataError, _check_split

DIGITS_CLASSES = 10  # experiments.data.build_digits: the ten digits
OPTIMIZERS = ("adamw", "adam", "sgd", "momentum", "lamb")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key, the value and the valid choices."""


# ------------------------------------------------------------------------------------------ field specs
@dataclass(frozen=True)
class Range:
    """A numeric range; ``None`` bounds are open-ended. ``gt``/``lt`` exclude the bound, ``ge``/``le`` include it."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def __contains__(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def text(self) -> str:
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = (self.le, "]") if self.le is not None else (self.lt, ")") if self.lt is not None else None
        if low and high:
            return f"in {low[0]}{_num(low[1])}, {_num(high[0])}{high[1]}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {_num(low[1])}"
        if high:
            return f"{'<=' if high[1] == ']' else '<'} {_num(high[0])}"
        return "any value"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def spec(ge=None, gt=None, le=None, lt=None, choices: Sequence[str] = (), casefold: bool = False):
    """A schema field: its range (numbers) or its choices (strings, compared case-insensitively if ``casefold``)."""
    rng = Range(ge, gt, le, lt) if any(v is not None for v in (ge, gt, le, lt)) else None
    return field(metadata={"range": rng, "choices": tuple(choices), "casefold": casefold})


# ------------------------------------------------------------------------------------------------ schema
@dataclass
class ExperimentConfig:
    train: Optional[bool]  # null: the method's default (method.finetune)


@dataclass
class Recipe:
    """Keys shared by ``train`` (the method's fine-tune) and ``baseline`` (the dense baseline)."""

    epochs: int = spec(ge=0)
    batch_size: int = spec(ge=1)
    opt: str = spec(choices=OPTIMIZERS, casefold=True)
    lr: float = spec(gt=0)
    min_lr: float = spec(ge=0)
    warmup_lr: float = spec(ge=0)
    warmup_epochs: int = spec(ge=0)
    weight_decay: float = spec(ge=0)
    clip_grad: Optional[float] = spec(ge=0)  # null or 0: no clipping
    label_smoothing: float = spec(ge=0, lt=1)


@dataclass
class TrainRecipe(Recipe):
    amp: bool = spec()
    nan_policy: Literal["stop", "skip_step"] = spec()


@dataclass
class BaselineRecipe(Recipe):
    enabled: bool = spec()


@dataclass
class EvalConfig:
    batch_size: int = spec(ge=1)
    map_images: int = spec(ge=0)


@dataclass
class PathsConfig:
    results_dir: str
    cache_dir: str
    state_dir: str
    run_dir: Optional[str]  # Hydra's output dir; None when it cannot be resolved outside a Hydra app


@dataclass
class ModelConfig:
    name: str
    short_name: str
    pretrained: bool
    checkpoint: Optional[str]
    drop_path_rate: float = spec(ge=0, lt=1)


# Architecture overrides a model section may add (``+model.depth=2``); passed to ``timm.create_model``.
ARCHITECTURE_KEYS: dict[str, tuple[type, Range]] = {
    "depth": (int, Range(ge=1)),
    "embed_dim": (int, Range(ge=1)),
    "num_heads": (int, Range(ge=1)),
    "mlp_ratio": (float, Range(gt=0)),
}


@dataclass
class DigitsData:
    name: str
    img_size: int = spec(ge=1)
    val_fraction: float = spec(gt=0, lt=1)
    split_seed: int = spec(ge=0)
    augment_shift: int = spec(ge=0)


@dataclass
class ImageFolderData:
    name: str
    root: Optional[str]
    train_split: str
    val_split: str
    img_size: int = spec(ge=1)
    num_classes: Optional[int] = spec(ge=1)
    crop_pct: float = spec(gt=0, le=1)
    auto_augment: Optional[str] = spec()
    reprob: float = spec(ge=0, le=1)
    mean: list[float] = spec()
    std: list[float] = spec(gt=0)


DATA_SCHEMAS = {"digits": DigitsData, "imagefolder": ImageFolderData}


@dataclass
class RunConfig:
    """The top level. ``model`` (architecture overrides), ``method`` (by the registry), ``data`` (by
    ``data.name``) and ``measure`` (by its owner) are checked separately."""

    seed: int = spec(ge=0)
    device: Literal["auto", "cpu", "cuda"] = spec()
    num_workers: int = spec(ge=0)
    threads: Optional[int] = spec(ge=1)
    progress: bool = spec()
    experiment: ExperimentConfig = spec()
    train: TrainRecipe = spec()
    baseline: BaselineRecipe = spec()
    eval: EvalConfig = spec()
    paths: PathsConfig = spec()


@dataclass
class LauncherRanges:
    """``hydra.launcher`` keys of hydra-submitit-launcher with a range (its structured config types them)."""

    timeout_min: Optional[int] = spec(ge=1)
    nodes: Optional[int] = spec(ge=1)
    tasks_per_node: Optional[int] = spec(ge=1)
    gpus_per_node: Optional[int] = spec(ge=0)
    cpus_per_task: Optional[int] = spec(ge=1)
    cpus_per_gpu: Optional[int] = spec(ge=1)
    gpus_per_task: Optional[int] = spec(ge=1)
    mem_gb: Optional[int] = spec(gt=0)
    array_parallelism: Optional[int] = spec(ge=1)
    max_num_timeout: Optional[int] = spec(ge=0)
    signal_delay_s: Optional[int] = spec(ge=0)


# ------------------------------------------------------------------------------------------ type checks
def describe(tp: Any) -> str:
    """Words for a type annotation, as the error messages use them."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is Union:
        return " or ".join(describe(a) for a in args)
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        inner = describe(args[0]) if args else "values"
        return f"a list of {_plural(inner)}"
    if origin in (dict, Mapping) or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _plural(words: str) -> str:
    for one, many in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings"),
                      ("true or false", "booleans")):
        words = words.replace(one, many)
    return words


def matches(value: Any, tp: Any) -> bool:
    """Whether a plain config value (from ``OmegaConf.to_container``) fits the annotation ``tp``."""
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is Literal:
        return value in args
    if origin is Union:
        return any(matches(value, arm) for arm in args)
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = args[:1]
        return not args or all(matches(item, args[0]) for item in value)
    if origin in (dict, Mapping) or tp is dict:
        return isinstance(value, dict)
    return True  # an annotation this checker does not model (a class): the factory checks it


def check_value(key: str, value: Any, tp: Any, rng: Optional[Range] = None, choices: Sequence[str] = (),
                casefold: bool = False) -> Any:
    """Check one value against its annotation, range and choices; raise :class:`ConfigError` naming the key."""
    if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
        raise ConfigError(f"{key}={value!r} unknown; valid: {', '.join(map(str, typing.get_args(tp)))}")
    if not matches(value, tp):
        raise ConfigError(f"{key}={value!r} is not {describe(tp)}"
                          + (f"; valid: {describe(tp)} {rng.text()}" if rng else ""))
    numbers = value if isinstance(value, (list, tuple)) else [value]
    for number in numbers:
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigError(f"{key}={value!r} must be a finite number" + (f" {rng.text()}" if rng else ""))
        if rng is not None and isinstance(number, (int, float)) and not isinstance(number, bool) \
                and number not in rng:
            raise ConfigError(f"{key}={value!r} must be {rng.text()}")
    if choices and value is not None:
        given = value.lower() if casefold else value
        if given not in choices:
            raise ConfigError(f"{key}={value!r} unknown; valid: {', '.join(choices)}")
    return value


def check_section(key: str, values: Any, schema: type) -> dict[str, Any]:
    """Check a mapping against a schema dataclass: no missing keys, no unknown keys, every
    value typed and in range; nested dataclasses recurse. Returns the checked values."""
    if not isinstance(values, dict):
        raise ConfigError(f"{key}={values!r} is not a mapping; valid: a section with keys "
                          f"{', '.join(f.name for f in fields(schema))}")
    hints = typing.get_type_hints(schema)
    names = [f.name for f in fields(schema)]
    missing = [n for n in names if n not in values]
    if missing:
        raise ConfigError(f"{key}: missing key(s) {missing}; the section needs {', '.join(names)}")
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {unknown}; valid: {', '.join(names)}")
    checked = {}
    for item in fields(schema):
        full = f"{key}.{item.name}" if key else item.name
        tp = hints[item.name]
        if is_dataclass(tp):
            checked[item.name] = check_section(full, values[item.name], tp)
            continue
        meta = item.metadata
        checked[item.name] = check_value(full, values[item.name], tp, meta.get("range"), meta.get("choices", ()),
                                         meta.get("casefold", False))
    return checked


# -------------------------------------------------------------------------------------------- validation
@dataclass
class Checked:
    """What validation established: the checked plain config and the method built on a meta-device backbone."""

    config: dict[str, Any]
    num_classes: int
    method: Any  # methods.TokenReducer on the meta device


def plain(cfg: DictConfig, key: str) -> Any:
    """``cfg.<key>`` as plain Python, interpolations resolved; an unresolvable one is a :class:`ConfigError`."""
    try:
        node = OmegaConf.select(cfg, key, throw_on_missing=True)
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except Exception as error:  # omegaconf raises several types for missing values and bad interpolations
        raise ConfigError(f"{key}: cannot be resolved: {error}") from error


def validate_config(cfg: DictConfig, num_classes: Optional[int] = None) -> Checked:
    """Check ``cfg`` completely, in the order a run would use it; raise on the first problem.

    ``num_classes``: the classifier size the run builds, when it is not the data's. ``measure.py`` builds a
    ``measure.num_classes`` head, so a checkpoint with that head is accepted too when ``num_classes`` is not given.
    """
    top = {item.name: plain(cfg, item.name) for item in fields(RunConfig) if item.name != "paths"}
    top["paths"] = paths_section(cfg)
    checked = check_section("", top, RunConfig)
    checked["data"] = check_data(plain(cfg, "data"))
    checked["model"] = check_model(plain(cfg, "model"))
    checked["method"] = check_method_section(plain(cfg, "method"))
    if checked["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is available; use device=cpu or device=auto")
    check_measure(cfg)
    check_launcher()

    classes = num_classes or data_classes(checked["data"])
    method = build_on_meta(checked, classes)
    model = checked["model"]
    if model["pretrained"] and not model["checkpoint"]:
        check_pretrained(model["name"])
    if model["checkpoint"]:
        content = read_checkpoint(model["checkpoint"])
        rows = head_rows(content["model"])
        if rows is not None and rows != classes:
            measure_classes = plain(cfg, "measure.num_classes") if num_classes is None and "measure" in cfg else None
            if rows != measure_classes:
                raise CheckpointError(
                    f"model.checkpoint={model['checkpoint']} has a {rows}-class head but data.name="
                    f"{checked['data']['name']} has {classes} classes; valid: a checkpoint with a {classes}-class "
                    "head (fine-tuned on this data), or a backbone checkpoint without 'head.*' keys")
            classes, method = rows, build_on_meta(checked, rows)
        check_checkpoint_keys(method, checked["method"]["name"], content, f"model.checkpoint={model['checkpoint']}")
    check_paths(cfg, checked, method)
    return Checked(checked, classes, method)


def paths_section(cfg: DictConfig) -> dict[str, Any]:
    section = cfg.get("paths")
    if not isinstance(section, DictConfig):
        raise ConfigError(f"paths={section!r} is not a mapping; valid: a section with keys "
                          f"{', '.join(f.name for f in fields(PathsConfig))}")
    values = {}
    for key in section:
        if key == "run_dir":  # ${hydra:runtime.output_dir}: only inside a Hydra app
            values[key] = OmegaConf.select(cfg, "paths.run_dir", throw_on_resolution_failure=False)
        else:
            values[key] = plain(cfg, f"paths.{key}")
    for key in ("results_dir", "cache_dir", "state_dir"):
        if isinstance(values.get(key), str) and not values[key].strip():
            raise ConfigError(f"paths.{key}='' is empty; valid: a folder path")
    return values


def check_data(values: Any) -> dict[str, Any]:
    name = values.get("name") if isinstance(values, dict) else None
    if name not in DATA_SCHEMAS:
        raise DataError(f"data.name={name!r} unknown; valid: {', '.join(DATA_SCHEMAS)}")
    checked = check_section("data", values, DATA_SCHEMAS[name])
    if name == "digits" and checked["augment_shift"] >= checked["img_size"]:
        raise ConfigError(f"data.augment_shift={checked['augment_shift']} must be < data.img_size "
                          f"({checked['img_size']})")
    if name == "imagefolder":
        for key in ("mean", "std"):
            if len(checked[key]) != 3:
                raise ConfigError(f"data.{key}={checked[key]} must have 3 entries (one per RGB channel)")
    return checked


def check_model(values: Any) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ConfigError(f"model={values!r} is not a mapping")
    base = {k: v for k, v in values.items() if k not in ARCHITECTURE_KEYS}
    known = [f.name for f in fields(ModelConfig)]
    unknown = sorted(set(base) - set(known))
    if unknown:
        raise ConfigError(f"model: unknown key(s) {unknown}; valid: {', '.join(known)}, or the architecture "
                          f"overrides {', '.join(ARCHITECTURE_KEYS)}")
    checked = check_section("model", base, ModelConfig)
    import timm  # noqa: PLC0415

    if not timm.is_model(checked["name"]):
        raise ConfigError(f"model.name: unknown timm model {checked['name']!r}; e.g. deit_tiny_patch16_224, "
                          f"deit_small_patch16_224, deit_digits_patch4_32")
    for key, (tp, rng) in ARCHITECTURE_KEYS.items():
        if key in values:
            checked[key] = check_value(f"model.{key}", values[key], tp, rng)
    return checked


def architecture_overrides(model: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` keys that go to ``timm.create_model`` as architecture arguments (``+model.depth=2``)."""
    return {key: model[key] for key in ARCHITECTURE_KEYS if model.get(key) is not None}


def check_method_section(values: Any) -> dict[str, Any]:
    """``method.name`` against the registry, ``method.finetune``, and each parameter against the factory's
    signature annotations (its ranges are checked when the method is built)."""
    if not isinstance(values, dict):
        raise ConfigError(f"method={values!r} is not a mapping; valid: a section with name, finetune, params")
    name = values.get("name")
    if name not in methods.list_methods():
        raise ConfigError(f"method.name={name!r} unknown; valid choices: {', '.join(methods.list_methods())}")
    unknown = sorted(set(values) - {"name", "finetune", "params", "tradeoff_values"})
    if unknown:
        raise ConfigError(f"method: unknown key(s) {unknown}; valid: name, finetune, params, tradeoff_values")
    check_value("method.finetune", values.get("finetune"), bool)
    params = values.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"method.params={params!r} is not a mapping of parameter names to values")
    valid = methods.method_parameters(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(f"method.params: unknown key(s) {unknown} for {name!r}; valid: {', '.join(valid)}")
    hints = factory_hints(name)
    for key, value in params.items():
        tp = hints.get(key, valid[key].annotation)
        if isinstance(tp, str):  # an annotation that could not be resolved: leave it to the factory
            continue
        check_value(f"method.params.{key}", value, tp)
    return {"name": name, "finetune": values.get("finetune"), "params": params,
            "tradeoff_values": check_tradeoff_values(name, values.get("tradeoff_values"), hints)}


def check_tradeoff_values(name: str, grid: Any, hints: dict[str, Any]) -> Optional[list]:
    """``method.tradeoff_values``: null, or a non-empty list of distinct values of the method's inference knob
    (each typed like the knob; their ranges are checked by ``experiments.tradeoff``, which builds each point)."""
    if grid is None:
        return None
    knob = methods.inference_knob(name)
    if knob is None:
        knobs = ", ".join(f"{m} ({k})" for m, k in methods.methods_with_knob().items())
        raise ConfigError(f"method.tradeoff_values={grid!r}: method {name!r} has no inference knob; valid: null, "
                          f"or a list for one of {knobs}")
    if not isinstance(grid, list) or not grid:
        raise ConfigError(f"method.tradeoff_values={grid!r} must be a non-empty list of {knob} values")
    tp = hints.get(knob, methods.method_parameters(name)[knob].annotation)
    for index, value in enumerate(grid):
        if value is None:
            raise ConfigError(f"method.tradeoff_values[{index}]=None: every point needs a value of {knob}")
        if not isinstance(tp, str):
            check_value(f"method.tradeoff_values[{index}]", value, tp)
    if len({_value_identity(v) for v in grid}) < len(grid):
        raise ConfigError(f"method.tradeoff_values={grid!r} repeats a value; valid: distinct values")
    return grid


def _value_identity(value: Any) -> str:
    """Equal values compare equal across int/float (``1`` and ``1.0`` are one point)."""
    return repr(float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)


def factory_hints(name: str) -> dict[str, Any]:
    """The factory's resolved annotations (its module uses ``from __future__ import annotations``)."""
    factory = methods.registry.get_factory(name)
    try:
        return typing.get_type_hints(factory)
    except Exception:  # noqa: BLE001 - an unresolvable forward reference: fall back to the raw strings
        return {}


def data_classes(data: dict[str, Any]) -> int:
    """The class count the run's head will have, without loading any image."""
    if data["name"] == "digits":
        return DIGITS_CLASSES
    if not data["root"]:
        raise DataError("data.root is not set; pass data.root=/path/to/imagenet (with train/ and val/ folders)")
    root = Path(data["root"]).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist or is not a folder")
    train_dir = _check_split(root, data["train_split"])
    _check_split(root, data["val_split"])
    found = sum(1 for p in train_dir.iterdir() if p.is_dir())
    if data["num_classes"] and data["num_classes"] != found:
        raise DataError(f"data.num_classes={data['num_classes']} but {train_dir} has {found} class folders")
    return found


def build_on_meta(checked: dict[str, Any], num_classes: int):
    """Build backbone and method on the meta device: every check of timm and of the method's factory runs, no
    memory is allocated and no weights are loaded. Factory errors become :class:`ConfigError`."""
    model, method = checked["model"], checked["method"]
    img_size = checked["data"]["img_size"]
    with torch.device("meta"):
        try:
            vit = create_backbone(model["name"], num_classes=num_classes, img_size=img_size, pretrained=False,
                                  drop_path_rate=model["drop_path_rate"], **architecture_overrides(model))
        except (ValueError, TypeError, AssertionError, RuntimeError) as error:
            raise ConfigError(f"model: cannot build {model['name']} with "
                              f"{ {k: v for k, v in model.items() if k not in ('short_name', 'checkpoint')} } "
                              f"at data.img_size={img_size}: {error}") from error
        try:
            check_img_size(img_size, vit.patch_embed.patch_size[0])
        except ValueError as error:
            raise ConfigError(str(error)) from error
        try:
            return methods.create_method(method["name"], vit, **method["params"])
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{error}" if "method.params" in str(error)
                              else f"method {method['name']!r} with params {method['params']}: {error}") from error


def check_pretrained(name: str) -> None:
    from timm.models import get_pretrained_cfg  # noqa: PLC0415

    pretrained = get_pretrained_cfg(name)
    if pretrained is None or not (pretrained.hf_hub_id or pretrained.url or pretrained.file):
        raise ConfigError(f"model.pretrained=true but timm has no pretrained weights for {name!r}; use "
                          "model.pretrained=false (the suite trains and caches a dense baseline) or "
                          "model.checkpoint=PATH")


def head_rows(state: Mapping[str, Any]) -> Optional[int]:
    """Classes of a checkpoint's classifier (``head.weight`` of timm, ``vit.head.weight`` of a suite method)."""
    head = state.get("head.weight", state.get("vit.head.weight"))
    return int(head.shape[0]) if isinstance(head, torch.Tensor) and head.dim() == 2 else None


def check_checkpoint_keys(method, method_name: str, content: dict[str, Any], source: str) -> None:
    """Every key and shape of a read checkpoint against the (meta) model it will be loaded into, with the dispatch
    of ``pipeline.load_checkpoint_into``: plain timm weights and dense checkpoints go into ``method.vit``, a
    checkpoint of the same method into the whole method, another method's is refused."""
    state, saved_method = content["model"], content.get("method")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying into meta parameters is a no-op; only the checks matter
        if saved_method is None:
            load_state_dict_strict(method.vit, state, source)
        elif saved_method == method_name:
            load_state_dict_strict(method, state, source)
        elif saved_method == "dense":
            load_state_dict_strict(method.vit, {k.removeprefix("vit."): v for k, v in state.items()}, source)
        else:
            raise CheckpointError(f"{source} was trained with method {saved_method!r}, not {method_name!r}; use a "
                                  f"dense or plain timm checkpoint, or method={saved_method}")


def check_measure(cfg: DictConfig) -> None:
    """The ``measure:`` section, by its owner (``experiments.measure``)."""
    if "measure" not in cfg:
        return
    from . import measure  # noqa: PLC0415 - the measurement layer imports pipeline, which imports this module

    measure.check_config(cfg)


def check_launcher() -> None:
    """``hydra.launcher`` ranges (hydra-submitit-launcher's structured config already types them). Only inside a
    Hydra app; ``experiments.launch`` validates every cell with its launcher before submitting."""
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

    if not HydraConfig.initialized():
        return
    launcher = HydraConfig.get().get("launcher")
    if launcher is None:
        return
    values = OmegaConf.to_container(launcher, resolve=False)
    hints = typing.get_type_hints(LauncherRanges)
    for item in fields(LauncherRanges):
        if item.name in values:
            check_value(f"hydra.launcher.{item.name}", values[item.name], hints[item.name], item.metadata["range"])
    timeout, delay = values.get("timeout_min"), values.get("signal_delay_s")
    if isinstance(timeout, int) and isinstance(delay, int) and delay >= timeout * 60:
        raise ConfigError(f"hydra.launcher.signal_delay_s={delay} must be < hydra.launcher.timeout_min * 60 "
                          f"({timeout * 60}); the checkpoint signal would come before the job starts")


def will_train(checked: dict[str, Any]) -> bool:
    chosen = checked["experiment"]["train"]
    return (chosen if chosen is not None else checked["method"]["finetune"]) and checked["train"]["epochs"] > 0


def uses_baseline(checked: dict[str, Any]) -> bool:
    model = checked["model"]
    return not model["checkpoint"] and not model["pretrained"] and checked["baseline"]["enabled"]


def check_paths(cfg: DictConfig, checked: dict[str, Any], method) -> None:
    paths = checked["paths"]
    check_writable(Path(paths["results_dir"]), "paths.results_dir")
    if will_train(checked):
        check_writable(Path(paths["state_dir"]), "paths.state_dir")
        if paths["run_dir"]:
            check_writable(Path(paths["run_dir"]), "paths.run_dir")
        check_resume_state(cfg, checked, method)
    if uses_baseline(checked):
        check_writable(Path(paths["cache_dir"]), "paths.cache_dir")


def check_writable(folder: Path, key: str) -> None:
    """``folder`` exists and takes files, or can be created: probed in its nearest existing ancestor, leaving
    nothing behind."""
    folder = folder.expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={folder} is not writable: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"{key}={folder} is not writable: {error}") from error


def check_resume_state(cfg: DictConfig, checked: dict[str, Any], method) -> None:
    """A resume checkpoint left by an earlier attempt of this run must be usable (readable, and every key and
    shape of the method): a clear error naming the file and how to start over, never a silent fresh start or a
    half-loaded model."""
    from . import pipeline  # noqa: PLC0415 - pipeline imports this module

    last = Path(checked["paths"]["state_dir"]) / pipeline.run_key(cfg) / "last.pth"
    if not last.exists():
        return
    state = pipeline.read_resume_checkpoint(last)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_state_dict_strict(method, state["model"], f"resume checkpoint {last}")
    except CheckpointError as error:
        raise CheckpointError(f"{error}. {pipeline.start_over_hint(last)}") from error
