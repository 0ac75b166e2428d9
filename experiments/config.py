"""The run configuration as typed dataclasses: one source of truth for every key, its default, type and range.

Each section is a dataclass filed in Hydra's ``ConfigStore`` by ``experiments/config_store.py`` (the
structured-config schema pattern), so OmegaConf enforces the types while Hydra composes: ``seed=abc`` or
``+train.lrr=0.1`` fail before any of our code runs, with OmegaConf's message naming the full key and the value. The YAML files under ``conf/`` only choose
options and override values; the defaults live here and in the method factories' signatures (each registered
method gets a ``method/<name>_defaults`` node built from its signature, which its YAML extends).

Ranges and choices sit next to their fields (``spec``), and rules across keys in a section's ``check`` method;
:func:`check_ranges` walks a typed config and raises :class:`ConfigError` naming the full key, the value and the
valid range or choices. Everything that needs torch, timm or files (method parameters, the model, checkpoints,
output folders) is checked by ``experiments.plan``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from omegaconf import II, MISSING

from experiments.cost.compiled import BACKENDS as COMPILE_BACKENDS
from methods.ragged_attention import BACKENDS as RAGGED_BACKENDS

OPTIMIZERS = ("adamw", "adam", "sgd", "momentum", "lamb")
DTYPES = ("fp32", "bf16", "fp16")

# Upper bounds that make a value fail here, at startup, instead of after training: seeds go to numpy and
# scikit-learn (32-bit), counts and batch sizes to C longs and allocators, a timing run must end.
MAX_SEED = 2 ** 32 - 1
MAX_COUNT = 10 ** 6
MAX_BATCH = 2 ** 16
MAX_IMAGES = 10 ** 7
MAX_THREADS = 1024
MAX_TIME_S = 600.0  # measure.min_time_s: one timed run lasts at least this long
# model.* architecture overrides: every one sizes a weight tensor or a block loop in timm. 16384 px is 16x
# the largest published ViT input; 1000 blocks, width 65536 and an MLP 64x wider than the tokens are far past
# any published ViT (ViT-22B: 48 blocks, width 6144, ratio 4) and keep int(embed_dim * mlp_ratio) a C long.
MAX_IMG_SIZE = 16384
MAX_DEPTH = 1000
MAX_WIDTH = 2 ** 16
MAX_MLP_RATIO = 64.0
MIN_CROP_PCT = 0.25  # data.crop_pct: the eval resize is img_size / crop_pct, at most 4x the input size


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key, the value and the valid choices."""


class DataError(ValueError):
    """Bad data configuration or unusable data on disk."""


# ------------------------------------------------------------------------------------- the declarative layer
@dataclass(frozen=True)
class Rule:
    """A field's range (numbers, or every entry of a list of numbers) or its choices (strings)."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    choices: tuple = ()
    casefold: bool = False
    path: bool = False  # a file or folder path: an empty string is refused (it would silently mean "unset")

    def text(self) -> str:
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {low[1:]}"
        if high:
            return f"{'<=' if high[-1] == ']' else '<'} {high[:-1]}"
        return "any value"

    def admits(self, number: float) -> bool:
        return ((self.ge is None or number >= self.ge) and (self.gt is None or number > self.gt)
                and (self.le is None or number <= self.le) and (self.lt is None or number < self.lt))

    def check(self, key: str, value: Any) -> None:
        if value is None:
            return
        if self.path:
            if isinstance(value, str) and not value.strip():
                raise ConfigError(f"{key}={value!r} is empty (an unset shell variable?); valid: a path, or leave "
                                  f"{key} unset (null)")
            return
        if self.choices:
            given = value.lower() if self.casefold and isinstance(value, str) else value
            if given not in self.choices:
                raise ConfigError(f"{key}={value!r} unknown; valid: {', '.join(map(str, self.choices))}")
            return
        bounded = any(b is not None for b in (self.ge, self.gt, self.le, self.lt))
        for number in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                raise ConfigError(f"{key}={value!r} must be a finite number" + (f" {self.text()}" if bounded else ""))
            if bounded and isinstance(number, (int, float)) and not self.admits(number):
                raise ConfigError(f"{key}={value!r} must be {self.text()}")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def spec(default: Any = MISSING, **rule: Any) -> Any:
    """A field with its default and its :class:`Rule` (``ge``/``gt``/``le``/``lt`` or ``choices``)."""
    metadata = {"rule": Rule(**{**rule, "choices": tuple(rule.get("choices", ()))})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check_ranges(node: Any, key: str = "") -> None:
    """Check every field of the typed config ``node`` (nested sections included) against its rule, then the
    section's own ``check(key)`` for rules across its keys."""
    for item in fields(node):
        value = getattr(node, item.name)
        full = f"{key}.{item.name}" if key else item.name
        if is_dataclass(value):
            check_ranges(value, full)
        elif "rule" in item.metadata:
            item.metadata["rule"].check(full, value)
    if hasattr(node, "check"):
        node.check(key)


# ----------------------------------------------------------------------------------------------- sections
@dataclass
class ExperimentConfig:
    train: Optional[bool] = None  # null: the method's default (its registered ``finetune``); true/false forces it


@dataclass
class Recipe:
    """Keys shared by ``train`` (the method's fine-tune) and ``baseline`` (the dense baseline)."""

    epochs: int = spec(4, ge=0, le=MAX_COUNT)
    batch_size: int = spec(64, ge=1, le=MAX_BATCH)
    opt: str = spec("adamw", choices=OPTIMIZERS, casefold=True)
    lr: float = spec(5.0e-4, gt=0)
    min_lr: float = spec(1.0e-5, ge=0)
    warmup_lr: float = spec(1.0e-6, ge=0)
    warmup_epochs: int = spec(0, ge=0, le=MAX_COUNT)
    weight_decay: float = spec(0.05, ge=0)
    clip_grad: Optional[float] = spec(1.0, ge=0)  # null or 0: no clipping
    label_smoothing: float = spec(0.1, ge=0, lt=1)


@dataclass
class TrainRecipe(Recipe):
    """The fine-tune recipe of the method run."""

    amp: bool = True  # autocast on CUDA only (bf16 where supported)
    nan_policy: str = spec("stop", choices=("stop", "skip_step"))


@dataclass
class BaselineRecipe(Recipe):
    """The dense baseline, trained and cached when neither a checkpoint nor pretrained weights are given (these
    defaults reach ~96% top-1 on digits in ~2 CPU minutes)."""

    enabled: bool = True
    epochs: int = spec(15, ge=0, le=MAX_COUNT)
    batch_size: int = spec(32, ge=1, le=MAX_BATCH)
    lr: float = spec(2.0e-3, gt=0)
    warmup_epochs: int = spec(1, ge=0, le=MAX_COUNT)


@dataclass
class EvalConfig:
    """Inference: evaluation batches, depth maps, and how methods with per-image counts execute."""

    batch_size: int = spec(256, ge=1, le=MAX_BATCH)
    # eval images whose per-patch depth maps and thumbnails go into the record
    map_images: int = spec(8, ge=0, le=MAX_COUNT)
    # attention backend of the ragged-token runtime (methods/ragged_attention.py): auto = varlen on CUDA, else padded
    ragged_backend: str = spec("auto", choices=RAGGED_BACKENDS)


@dataclass
class PathsConfig:
    results_dir: str = "results"
    cache_dir: str = ".cache/baselines"
    # the shipped dense baselines (experiments/shipped.py): used, hash-checked, when the manifest lists the run's
    # baseline key; null: never (always the cache, training where it lacks one)
    baselines_dir: Optional[str] = spec("results/baselines", path=True)
    state_dir: str = "outputs/resume"  # per-config resume checkpoints, kept until the run's record is written
    run_dir: Optional[str] = II("hydra:runtime.output_dir")  # null outside a Hydra app

    def check(self, key: str) -> None:
        for name in ("results_dir", "cache_dir", "state_dir"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{key}.{name}='' is empty; valid: a folder path")


@dataclass
class ModelConfig:
    """A timm model; architecture keys left null keep the model's own values."""

    name: str = MISSING
    short_name: str = MISSING
    # the model's native input size; data.img_size follows it by default (at most MAX_IMG_SIZE)
    img_size: int = spec(MISSING, ge=1, le=MAX_IMG_SIZE)
    pretrained: bool = False  # timm's hub weights (clusters with internet access)
    # a local timm/DeiT .pth or .safetensors, or a checkpoint of this suite
    checkpoint: Optional[str] = spec(None, path=True)
    drop_path_rate: float = spec(0.1, ge=0, lt=1)
    # video models (methods/video.py): frames per clip, a multiple of the tubelet depth; null for image models
    num_frames: Optional[int] = spec(None, ge=1, le=MAX_COUNT)
    # video models: the position table's start, sincos3d or videomae (methods/video.py); null: the model's
    pos_init: Optional[str] = spec(None, choices=("sincos3d", "videomae"))
    # architecture overrides, bounded so that timm's allocations stay finite (see MAX_DEPTH and below)
    depth: Optional[int] = spec(None, ge=1, le=MAX_DEPTH)
    embed_dim: Optional[int] = spec(None, ge=1, le=MAX_WIDTH)
    num_heads: Optional[int] = spec(None, ge=1, le=MAX_WIDTH)
    mlp_ratio: Optional[float] = spec(None, gt=0, le=MAX_MLP_RATIO)

    def architecture(self) -> dict[str, Any]:
        """The keys that go to ``timm.create_model`` as architecture arguments."""
        keys = ("num_frames", "pos_init", "depth", "embed_dim", "num_heads", "mlp_ratio")
        return {key: getattr(self, key) for key in keys if getattr(self, key) is not None}


@dataclass
class DataConfig:
    """The base of every dataset's config. Each dataset's own config lives in its module in ``experiments/data/``
    next to its builder, and is registered with it (``experiments/data/registry.py``); the folder and video bases
    below are shared by several of them."""

    name: str = MISSING
    img_size: int = spec(II("model.img_size"), ge=1, le=MAX_IMG_SIZE)  # the model's native size unless overridden

    def check(self, key: str) -> None:
        """Nothing across this base's keys; ``plan.typed_config`` types the section by its registered config."""


@dataclass
class FolderLayout:
    """Keys shared by the folder options: ``root/<train_split>/<class>/*`` and ``root/<val_split>/<class>/*``,
    their class count, the eval crop and the normalisation."""

    root: Optional[str] = spec(None, path=True)
    train_split: str = "train"
    val_split: str = "val"
    num_classes: Optional[int] = spec(None, ge=1)  # null: the number of class folders
    crop_pct: float = spec(0.875, ge=MIN_CROP_PCT, le=1)
    mean: List[float] = spec([0.485, 0.456, 0.406])
    std: List[float] = spec([0.229, 0.224, 0.225], gt=0)

    def check_layout(self, key: str) -> None:
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"{key}.{name}={getattr(self, name)} must have 3 entries (one per RGB channel)")


@dataclass
class VideoData(DataConfig):
    """Clips ``[3, num_frames, img_size, img_size]`` for a video model (``model.num_frames`` set)."""

    num_frames: Optional[int] = spec(II("model.num_frames"), ge=1, le=MAX_COUNT)  # the model's unless overridden

    def check(self, key: str) -> None:
        super().check(key)
        if self.num_frames is None:
            raise ConfigError(f"{key}={self.name} is video data, but the model is an image model "
                              f"({key}.num_frames=null follows model.num_frames); valid: a video model, e.g. "
                              "model=vit_video_digits (embedded) or model=vit_video_small")


@dataclass
class MethodConfig:
    """A registered method; ``params`` are checked against its factory's signature by ``experiments.plan``."""

    name: str = MISSING
    finetune: Optional[bool] = None  # null: the method's registered default
    params: Dict[str, Any] = field(default_factory=dict)
    tradeoff_values: Optional[List[Any]] = None  # experiments/tradeoff.py grid; null: the registered default


@dataclass
class MeasureConfig:
    """Cost measurement (``run.py`` after evaluation, and ``experiments/measure.py``)."""

    flops: bool = True  # analytic per-image FLOPs from token counts (1 multiply-add = 1 FLOP)
    fvcore_images: int = spec(0, ge=0, le=MAX_COUNT)  # > 0: also cross-check analytic vs fvcore (a jit trace per image)
    throughput: bool = True  # false skips timing
    images: int = spec(64, ge=1, le=MAX_IMAGES)  # measure.py: validation images whose per-image FLOPs are averaged
    num_classes: Optional[int] = spec(None, ge=1)  # measure.py: classifier size; null = the data's
    batch_sizes: Optional[List[int]] = spec(None, ge=1, le=MAX_BATCH)  # null: GPU [1, 64, 256], CPU [1, 32]
    dtypes: Optional[List[str]] = None  # null: GPU [fp32, bf16], CPU [fp32]
    warmup: int = spec(10, ge=0, le=MAX_COUNT)  # untimed forwards per model and condition (protocol: >= 10)
    repeats: int = spec(5, ge=1, le=MAX_COUNT)  # timed runs per model, dense and method alternating; the median is kept
    min_time_s: float = spec(0.05, ge=0, le=MAX_TIME_S)  # each timed run repeats the forward until it lasts this long
    # true: torch.compile every timed model (dense the same way); compilation is excluded and reported (compile_s,
    # recompiles); both: eager and compiled models alternate in the same repeats, two entries per batch size
    compile: Any = spec(False, choices=(False, True, "both"))
    compile_backend: str = spec("inductor", choices=COMPILE_BACKENDS)
    # the timing pool: every batch size cycles through these first validation images, whose FLOPs it divides by
    timing_images: int = spec(64, ge=1, le=MAX_IMAGES)
    # also time the dense wrapper against timm (harness check, within 2%); a table needs it once, in its dense row
    wrapper_check: bool = True
    fused_attn: Optional[bool] = None  # null: as built; true/false forces it on every block while timing
    threads: Optional[int] = spec(None, ge=1, le=MAX_THREADS)  # CPU threads while timing; null = torch's default
    record: bool = True  # measure.py: write a results record (kind "measure")

    def check(self, key: str) -> None:
        if self.batch_sizes is not None and not self.batch_sizes:
            raise ConfigError(f"{key}.batch_sizes=[]: empty; valid: positive integers, e.g. [1, 32]")
        if self.dtypes is not None:
            bad = [d for d in self.dtypes if d not in DTYPES]
            if bad or not self.dtypes:
                raise ConfigError(f"{key}.dtypes={self.dtypes}: unknown dtype(s) {bad or '(empty list)'}; valid: "
                                  f"{', '.join(DTYPES)}")


@dataclass
class RunConfig:
    """The top level of one run: method x model x data, recipes, evaluation, measurement and paths."""

    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = MISSING  # typed by the chosen dataset's registered config (experiments/data/registry.py)
    seed: int = spec(0, ge=0, le=MAX_SEED)
    device: str = spec("auto", choices=("auto", "cpu", "cuda"))
    num_workers: int = spec(0, ge=0, le=MAX_THREADS)  # data loader workers
    # torch CPU threads (null: torch's); tiny matmuls run faster on 1
    threads: Optional[int] = spec(1, ge=1, le=MAX_THREADS)
    progress: bool = True  # tqdm bars
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    baseline: BaselineRecipe = field(default_factory=BaselineRecipe)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
