"""Config validation (``experiments/config.py`` types and ranges, ``experiments/plan.py`` the rest): every bad input
fails at startup, before any data is loaded and
before anything is written, with an error naming the key, the bad value and the valid range or choices.

``BAD_INPUTS`` is the catalogue: one row per distinct bad input, each run through ``pipeline.run`` with data
loading booby-trapped (it fails the test if reached) and the output folders compared before and after.
"""
import copy
import re
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

import methods
from experiments import build, config
from methods.models import create_backbone
from conftest import CONF, compose_config, run_config, write_png_folder
from experiments import pipeline, plan
from experiments.config import DataError
from experiments.data.digits import DigitsData
from experiments.config import ConfigError
from methods.models import CheckpointError



pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(tmp_path, *overrides, hydra=False):
    return run_config(tmp_path, "baseline.epochs=1", "train.epochs=1", *overrides, hydra=hydra)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def no_data(monkeypatch):
    """Data loading fails the test: a bad input must be refused before it."""
    def refuse(cfg):
        raise AssertionError("data loading started: the bad input was not caught by validation")

    monkeypatch.setattr(pipeline, "build_data", refuse)


def assert_refused_at_startup(tmp_path, overrides, error, message):
    before = files_under(tmp_path)
    with pytest.raises(error) as raised:
        pipeline.run(make_cfg(tmp_path, *overrides))
    # a composition error carries OmegaConf's words (key, value, type) in its cause
    text = " ".join(str(e) for e in (raised.value, raised.value.__cause__) if e is not None)
    assert re.search(message, text, re.DOTALL), f"{message!r} not in {text!r}"
    assert files_under(tmp_path) == before, "a refused run wrote something"


ADAVIT = ["method=adavit"]
COMPOSE = ConfigCompositionException  # a mistyped value: OmegaConf refuses it while Hydra composes
DEPTH = r"\[0, 11\]"
B = pytest.param

# (overrides, error, message) -- one row per distinct bad input.
BAD_INPUTS = [
    # ---- method parameters: the signature's ranges, choices and types (every parameter of every method:
    # tests/test_method_params.py); here one of each kind, run through the harness ----
    B(["method=evit", "method.params.keep_rate=0"], ConfigError,
      r"^method\.params\.keep_rate=0 must be in \(0, 1\]$", id="evit-keep_rate-zero"),
    B([*ADAVIT, "method.params.prior=strict"], ConfigError,
      r"^method\.params\.prior='strict' unknown; valid: correct, official$", id="adavit-unknown-prior"),
    B(["method=evit", "method.params.keep_rate=high"], ConfigError,
      r"^method\.params\.keep_rate='high' must be a number in \(0, 1\]$", id="type-keep_rate-string"),
    B(["method=dynamicvit", "method.params.kl_weight=nan"], ConfigError,
      r"^method\.params\.kl_weight=nan must be in \[0, 1000000\]$", id="type-loss-weight-nan"),
    B(["method=kmedoids", "method.params.iterations=1000000000"], ConfigError,
      r"^method\.params\.iterations=1000000000 must be in \[1, 100\]$", id="kmedoids-iterations-unbounded"),
    # ---- method parameters: against the model and across parameters (raised by the methods, on a meta-device
    # backbone) ----
    B(["method=evit", "method.params.locations=[3,6,12]"], ConfigError,
      rf"method\.params\.locations=\[3, 6, 12\]: \[12\] outside the valid block range {DEPTH}",
      id="evit-locations-out-of-range"),
    B(["method=evit", "method.params.locations=[6,3,9]"], ConfigError,
      r"method\.params\.locations=\[6, 3, 9\] must be strictly increasing", id="evit-locations-not-increasing"),
    B(["method=dynamicvit", "method.params.locations=[3,6,20]"], ConfigError,
      r"method\.params\.locations=\[3, 6, 20\]: \[20\] outside the valid block range \[1, 11\]",
      id="dynamicvit-locations-out-of-range"),
    B(["method=dynamicvit", "method.params.locations=[3,3,9]"], ConfigError,
      r"method\.params\.locations=\[3, 3, 9\] must be strictly increasing", id="dynamicvit-locations-not-increasing"),
    B(["method=tome", "method.params.r=[1,2,3,4,5,6,7,8,9,10,11,12,13]"], ConfigError,
      r"method\.params\.r has 13 entries but the model has 12 blocks", id="tome-r-list-longer-than-depth"),
    B(["method=topk", "method.params.token_counts=[65,65,65,65,65,65,65,65,65,65,65,65,65]"], ConfigError,
      r"method\.params\.token_counts has 13 entries but the model has 12 blocks",
      id="topk-token_counts-longer-than-depth"),
    B(["method=topk", "method.params.token_counts=[65,40,50]"], ConfigError,
      r"method\.params\.token_counts=\[65, 40, 50\] increases at block", id="topk-token_counts-increasing"),
    B(["method=random", "method.params.token_counts=[60,40]"], ConfigError,
      r"method\.params\.token_counts=\[60, 40\] starts at 60", id="random-token_counts-not-starting-full"),
    B([*ADAVIT, "method.params.target_depth=13"], ConfigError,
      r"method\.params\.target_depth=13 is outside \[1, 12\] \(the model's depth\)",
      id="adavit-target-depth-beyond-model"),
    B([*ADAVIT, "model=deit_base", "data.img_size=224"], ConfigError,
      r"method\.params\.gate_scale=null but architecture 'deit_base_patch16_224' has no default gate constants",
      id="adavit-no-gate-defaults-for-model"),
    B(["+model.depth=2", "method=evit"], ConfigError,
      r"method\.params\.locations=\[3, 6, 9\]: \[3, 6, 9\] outside the valid block range \[0, 1\]",
      id="locations-beyond-overridden-depth"),
    B(["method=evit", "+method.params.keeprate=0.5"], ConfigError,
      r"method\.params: unknown key\(s\) \['keeprate'\] for 'evit'; valid: keep_rate, locations, fuse",
      id="method-param-typo"),
    B(["method.name=nope"], ConfigError,
      r"method\.name='nope' unknown; valid choices: adavit, ats, dense", id="method-unknown"),
    B(["method.finetune=sometimes"], COMPOSE, r"Value 'sometimes' is not a valid bool.*full_key: method\.finetune",
      id="method-finetune-type"),
    # ---- recipes ----
    B(["train.epochs=-1"], ConfigError, r"train\.epochs=-1 must be in \[0, \d+\]", id="train-epochs-negative"),
    B(["baseline.epochs=-3"], ConfigError, r"baseline\.epochs=-3 must be in \[0, \d+\]", id="baseline-epochs-negative"),
    B(["train.epochs=abc"], COMPOSE,
      r"Value 'abc' of type 'str' could not be converted to Integer.*full_key: train\.epochs", id="type-train-epochs-string"),
    B(["train.epochs=2.5"], COMPOSE,
      r"Value '2\.5' of type 'float' could not be converted to Integer.*full_key: train\.epochs", id="type-train-epochs-float"),
    B(["train.lr=-0.1"], ConfigError, r"train\.lr=-0\.1 must be > 0", id="train-lr-negative"),
    B(["train.lr=0"], ConfigError, r"train\.lr=0\.0 must be > 0", id="train-lr-zero"),
    B(["baseline.lr=-1e-3"], ConfigError, r"baseline\.lr=-0\.001 must be > 0", id="baseline-lr-negative"),
    B(["train.lr=fast"], COMPOSE,
      r"Value 'fast' of type 'str' could not be converted to Float.*full_key: train\.lr", id="type-train-lr-string"),
    B(["train.lr=inf"], ConfigError, r"train\.lr=inf must be a finite number > 0", id="train-lr-inf"),
    B(["train.opt=adamx"], ConfigError,
      r"train\.opt='adamx' unknown; valid: adamw, adam, sgd, momentum, lamb", id="train-optimizer-unknown"),
    B(["baseline.opt=rmsprop"], ConfigError,
      r"baseline\.opt='rmsprop' unknown; valid: adamw", id="baseline-optimizer-unknown"),
    B(["train.batch_size=0"], ConfigError, r"train\.batch_size=0 must be in \[1, \d+\]", id="train-batch-size-zero"),
    B(["train.min_lr=-1e-5"], ConfigError, r"train\.min_lr=-1e-05 must be >= 0", id="train-min-lr-negative"),
    B(["train.warmup_epochs=-1"], ConfigError, r"train\.warmup_epochs=-1 must be in \[0, \d+\]", id="train-warmup-negative"),
    B(["train.weight_decay=-0.05"], ConfigError,
      r"train\.weight_decay=-0\.05 must be >= 0", id="train-weight-decay-negative"),
    B(["train.clip_grad=-1"], ConfigError, r"train\.clip_grad=-1\.0 must be >= 0", id="train-clip-grad-negative"),
    B(["train.label_smoothing=1.0"], ConfigError,
      r"train\.label_smoothing=1\.0 must be in \[0, 1\)", id="train-label-smoothing-1"),
    B(["train.nan_policy=ignore"], ConfigError,
      r"train\.nan_policy='ignore' unknown; valid: stop, skip_step", id="train-nan-policy-unknown"),
    B(["train.amp=maybe"], COMPOSE, r"Value 'maybe' is not a valid bool.*full_key: train\.amp", id="type-train-amp"),
    B(["baseline.enabled=yes_please"], COMPOSE, r"Value 'yes_please' is not a valid bool.*full_key: baseline\.enabled",
      id="type-baseline-enabled"),
    B(["+train.lrr=0.1"], ConfigError,
      r"train: unknown key\(s\) \['lrr'\]; valid: epochs, batch_size", id="train-unknown-key"),
    # ---- top level, eval ----
    B(["seed=-1"], ConfigError, r"seed=-1 must be in \[0, \d+\]", id="seed-negative"),
    B(["seed=abc"], COMPOSE, r"Value 'abc' of type 'str' could not be converted to Integer.*full_key: seed",
      id="type-seed-string"),
    B(["device=gpu"], ConfigError, r"device='gpu' unknown; valid: auto, cpu, cuda", id="device-unknown"),
    B(["num_workers=-2"], ConfigError, r"num_workers=-2 must be in \[0, \d+\]", id="num-workers-negative"),
    B(["progress=loud"], COMPOSE, r"Value 'loud' is not a valid bool.*full_key: progress", id="type-progress"),
    B(["experiment.train=sometimes"], COMPOSE, r"Value 'sometimes' is not a valid bool.*full_key: experiment\.train",
      id="type-experiment-train"),
    B(["eval.batch_size=0"], ConfigError, r"eval\.batch_size=0 must be in \[1, \d+\]", id="eval-batch-size-zero"),
    B(["eval.map_images=-1"], ConfigError, r"eval\.map_images=-1 must be in \[0, \d+\]", id="eval-map-images-negative"),
    # ---- model ----
    B(["model.name=deit_nope"], ConfigError, r"model\.name: unknown timm model 'deit_nope'", id="model-unknown"),
    B(["model.drop_path_rate=1.5"], ConfigError,
      r"model\.drop_path_rate=1\.5 must be in \[0, 1\)", id="model-drop-path-above-1"),
    B(["model.pretrained=yes_please"], COMPOSE, r"Value 'yes_please' is not a valid bool.*full_key: model\.pretrained",
      id="type-model-pretrained"),
    B(["model.pretrained=true"], ConfigError,
      r"model\.pretrained=true but timm has no pretrained weights for 'deit_digits_patch4_32'",
      id="model-pretrained-without-weights"),
    B(["+model.depth=0"], ConfigError, r"model\.depth=0 must be in \[1, 1000\]", id="model-depth-zero"),
    B(["+model.mlp_ratio=1e308"], ConfigError, r"^model\.mlp_ratio=1e\+308 must be in \(0, 64\]$",
      id="model-mlp_ratio-overflowing"),
    B(["+model.num_heads=3"], ConfigError,
      r"model: cannot build deit_digits_patch4_32 .*", id="model-heads-not-dividing-width"),
    B(["+model.widht=3"], ConfigError,
      r"model: unknown key\(s\) \['widht'\]; valid: name, short_name, img_size, pretrained, checkpoint",
      id="model-unknown-key"),
    # ---- data ----
    B(["data.name=nope"], DataError, r"data\.name='nope' unknown; valid: digit_scenes, digits, imagefolder", id="data-unknown"),
    B(["data.img_size=30"], ConfigError,
      r"data\.img_size=30 is not a positive multiple of the patch size 4", id="img-size-not-divisible-by-patch"),
    B(["model=deit_small", "data.img_size=100"], ConfigError,
      r"data\.img_size=100 is not a positive multiple of the patch size 16", id="img-size-not-divisible-by-patch-16"),
    B(["data.img_size=0"], ConfigError, r"data\.img_size=0 must be in \[1, 16384\]", id="img-size-zero"),
    B(["data.img_size=big"], COMPOSE,
      r"Value 'big' of type 'str' could not be converted to Integer.*full_key: data\.img_size", id="type-img-size-string"),
    B(["data.val_fraction=1.0"], ConfigError, r"data\.val_fraction=1\.0 must be in \(0, 1\)", id="val-fraction-1"),
    B(["data.augment_shift=-1"], ConfigError, r"data\.augment_shift=-1 must be in \[0, \d+\]", id="augment-shift-negative"),
    B(["data.augment_shift=40"], ConfigError,
      r"data\.augment_shift=40 must be < data\.img_size \(32\)", id="augment-shift-beyond-image"),
    B(["data=imagefolder", "data.root=/does/not/exist"], DataError,
      r"data\.root=/does/not/exist does not exist", id="imagefolder-root-missing"),
    B(["data=imagefolder"], DataError, r"data\.root is not set", id="imagefolder-root-unset"),
    B(["data=imagefolder", "data.reprob=2"], ConfigError,
      r"data\.reprob=2\.0 must be in \[0, 1\]", id="imagefolder-reprob-above-1"),
    B(["data=imagefolder", "data.std=[0.2,0,0.2]"], ConfigError,
      r"data\.std=\[0\.2, 0\.0, 0\.2\] must be > 0", id="imagefolder-std-zero"),
    B(["data=imagefolder", "data.mean=[0.5,0.5]"], ConfigError,
      r"data\.mean=\[0\.5, 0\.5\] must have 3 entries", id="imagefolder-mean-two-channels"),
    B(["data=imagefolder", "data.crop_pct=0"], ConfigError,
      r"data\.crop_pct=0\.0 must be in \[0\.25, 1\]", id="imagefolder-crop-zero"),
    # ---- paths ----
    B(["paths.results_dir="], ConfigError, r"paths\.results_dir='' is empty", id="results-dir-empty"),
    # ---- model.checkpoint files ----
    B(["model.checkpoint=/no/such.pth"], CheckpointError,
      r"model\.checkpoint: file not found: /no/such\.pth", id="checkpoint-missing"),
    # ---- measure (owned by experiments.measure, called at startup) ----
    B(["measure.batch_sizes=[1,0]"], ConfigError,
      r"measure\.batch_sizes=\[1, 0\] must be in \[1, \d+\]", id="measure-batch-size-zero"),
    B(["measure.dtypes=[fp8]"], ConfigError, r"measure\.dtypes=\['fp8'\]: unknown dtype", id="measure-dtype-unknown"),
    B(["measure.images=0"], ConfigError, r"measure\.images=0 must be in \[1, \d+\]", id="measure-images-zero"),
    B(["measure.repeats=-1"], ConfigError,
      r"measure\.repeats=-1 must be in \[1, \d+\]", id="measure-repeats-negative"),
]


@pytest.mark.parametrize("overrides, error, message", BAD_INPUTS)
def test_bad_input_is_refused_at_startup(tmp_path, no_data, overrides, error, message):
    assert_refused_at_startup(tmp_path, overrides, error, message)


def test_bad_inputs_are_distinct():
    ids = [row.id for row in BAD_INPUTS]
    assert len(ids) == len(set(ids))
    assert len({tuple(row.values[0]) for row in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_refused(tmp_path, no_data):
    assert_refused_at_startup(tmp_path, ["device=cuda"], ConfigError, r"device=cuda but no CUDA GPU is available")


# ------------------------------------------------------------------------------------ files and folders
def save_weights(tmp_path, name="w.pth", num_classes=10, depth=2, **content):
    torch.manual_seed(0)
    vit = create_backbone("deit_digits_patch4_32", num_classes=num_classes, depth=depth)
    path = tmp_path / "inputs" / name
    path.parent.mkdir(exist_ok=True)
    torch.save({"model": vit.state_dict(), **content}, path)
    return path


def test_checkpoint_with_another_class_count_is_refused_before_data(tmp_path, no_data):
    path = save_weights(tmp_path, num_classes=7)
    assert_refused_at_startup(tmp_path, ["+model.depth=2", f"model.checkpoint={path}"], CheckpointError,
                              r"has a 7-class head but data\.name=digits has 10 classes; valid: a checkpoint with a "
                              r"10-class head")


def test_checkpoint_of_another_depth_names_the_missing_keys(tmp_path, no_data):
    path = save_weights(tmp_path, depth=2)
    assert_refused_at_startup(tmp_path, ["+model.depth=3", f"model.checkpoint={path}"], CheckpointError,
                              r"does not match the model: missing keys: blocks\.2\.")


def test_checkpoint_of_another_method_is_refused(tmp_path, no_data):
    torch.manual_seed(0)
    vit = create_backbone("deit_digits_patch4_32", num_classes=10, depth=2)
    trained = methods.create_method("dynamicvit", vit, locations=[1])
    path = tmp_path / "inputs" / "dyn.pth"
    path.parent.mkdir()
    torch.save({"method": "dynamicvit", "model": trained.state_dict()}, path)
    assert_refused_at_startup(tmp_path, ["+model.depth=2", "method=evit", "method.params.locations=[1]",
                                         f"model.checkpoint={path}"], CheckpointError,
                              r"was trained with method 'dynamicvit', not 'evit'")


def test_checkpoint_that_is_not_a_state_dict_is_refused(tmp_path, no_data):
    path = tmp_path / "inputs" / "list.pth"
    path.parent.mkdir()
    torch.save([1, 2, 3], path)
    assert_refused_at_startup(tmp_path, [f"model.checkpoint={path}"], CheckpointError,
                              r"holds a list, not a state dict")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_model_checkpoint_is_refused_before_data(tmp_path, no_data, damage):
    path = save_weights(tmp_path)
    data = path.read_bytes()
    path.write_bytes({"garbage": b"PK\x03\x04 not a checkpoint", "truncated": data[: len(data) // 2],
                      "empty": b""}[damage])
    assert_refused_at_startup(tmp_path, ["+model.depth=2", f"model.checkpoint={path}"], CheckpointError,
                              r"model\.checkpoint: cannot read .*w\.pth")


def test_valid_checkpoint_passes_validation(tmp_path):
    path = save_weights(tmp_path)
    checked = plan.validate(make_cfg(tmp_path, "+model.depth=2", f"model.checkpoint={path}"))
    assert checked.num_classes == 10 and checked.meta_method.depth == 2
    assert checked.weights == plan.WeightSource("checkpoint", path) and not checked.trains


def test_imagefolder_num_classes_mismatching_folders_is_refused(tmp_path, no_data):
    write_png_folder(tmp_path / "inputs", per_class=2, size=16)
    assert_refused_at_startup(tmp_path, ["data=imagefolder", f"data.root={tmp_path}/inputs", "data.img_size=32",
                                         "data.num_classes=3"], DataError,
                              r"data\.num_classes=3 but .*train has 2 class folders")


def test_imagefolder_classes_mismatching_checkpoint_head_is_refused(tmp_path, no_data):
    write_png_folder(tmp_path / "inputs", per_class=2, size=16)
    path = save_weights(tmp_path, num_classes=10)
    assert_refused_at_startup(tmp_path, ["data=imagefolder", f"data.root={tmp_path}/inputs", "data.img_size=32",
                                         "+model.depth=2", f"model.checkpoint={path}"], CheckpointError,
                              r"has a 10-class head but data\.name=imagefolder has 2 classes")


def test_measure_num_classes_head_is_accepted_for_measure_runs(tmp_path):
    """measure.py builds a ``measure.num_classes`` head: a checkpoint with that head passes its validation."""
    path = save_weights(tmp_path, num_classes=7)
    cfg = make_cfg(tmp_path, "+model.depth=2", f"model.checkpoint={path}", "measure.num_classes=7")
    assert plan.validate(cfg).num_classes == 7
    with pytest.raises(CheckpointError, match="7-class head"):
        plan.validate(cfg, num_classes=10)


@pytest.mark.parametrize("key", ["results_dir", "state_dir", "cache_dir"])
def test_unwritable_output_folder_is_refused(tmp_path, no_data, key):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_refused_at_startup(tmp_path, [f"paths.{key}={blocker}/sub", "experiment.train=true"], ConfigError,
                              rf"paths\.{key}={blocker}/sub is not writable: {blocker} is a file")


def test_read_only_results_dir_is_refused(tmp_path, no_data, monkeypatch):
    """A folder that refuses new files (read-only mount, quota): the probe's OSError is reported."""
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    assert_refused_at_startup(tmp_path, [], ConfigError, r"paths\.results_dir=.* is not writable: .*Read-only")


def test_validation_creates_nothing(tmp_path):
    pipeline.validate(make_cfg(tmp_path, "method=dynamicvit", "experiment.train=true"))
    assert files_under(tmp_path) == set()


# ----------------------------------------------------------------------------------------- launcher keys
def validate_in_hydra(tmp_path, *overrides):
    """Validate as a sweep cell is validated: HydraConfig set (so ``hydra.launcher`` is visible)."""
    cfg = make_cfg(tmp_path, *overrides, hydra=True)
    task = copy.deepcopy(cfg)
    with open_dict(task):
        del task["hydra"]
    instance = HydraConfig.instance()
    saved = instance.cfg
    try:
        instance.set_config(cfg)
        pipeline.validate(task)
    finally:
        instance.cfg = saved


@pytest.mark.parametrize("overrides, message", [
    (["hydra.launcher.timeout_min=0"], r"hydra\.launcher\.timeout_min=0 must be >= 1"),
    (["hydra.launcher.tasks_per_node=0"], r"hydra\.launcher\.tasks_per_node=0 must be >= 1"),
    (["hydra.launcher.gpus_per_node=-1"], r"hydra\.launcher\.gpus_per_node=-1 must be >= 0"),
    (["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=120"],
     r"hydra\.launcher\.signal_delay_s=120 must be < hydra\.launcher\.timeout_min \* 60 \(60\)"),
], ids=["timeout-zero", "tasks-zero", "gpus-negative", "signal-after-timeout"])
def test_bad_launcher_values_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_in_hydra(tmp_path, "launcher=slurm", *overrides)


def test_launcher_defaults_pass(tmp_path):
    validate_in_hydra(tmp_path, "launcher=slurm")
    validate_in_hydra(tmp_path, "launcher=local")


# ------------------------------------------------------------------------------------------ good configs
def method_options():
    return sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


@pytest.mark.parametrize("method", method_options())
@pytest.mark.parametrize("model", ["deit_digits", "deit_small"])
def test_every_shipped_method_config_validates(tmp_path, method, model):
    checked = plan.validate(make_cfg(tmp_path, f"method={method}", f"model={model}", "experiment.train=true"))
    assert checked.meta_method.depth == 12 and checked.trains
    assert next(checked.meta_method.parameters()).device.type == "meta"
    assert checked.recorded_params == methods.resolved_params(method, {})


def test_method_params_are_typed_by_the_factory_signature():
    assert plan.check_method_params("tome", {"r": [1, 2]}) == {"r": [1, 2]}
    assert plan.check_method_params("tome", {"r": 3}) == {"r": 3}
    for bad in (True, "3", [1, "a"]):
        with pytest.raises(ConfigError, match=r"method\.params\.r="):
            plan.check_method_params("tome", {"r": bad})


def test_architecture_override_reaches_the_built_model(tmp_path):
    checked = plan.validate(make_cfg(tmp_path, "+model.depth=2"))
    assert checked.meta_method.depth == 2
    assert len(build.build_method(checked).vit.blocks) == 2


def test_the_plan_decides_training_once(tmp_path):
    """``experiment.train`` null means the method's registered default; epochs 0 never train."""
    assert plan.validate(make_cfg(tmp_path, "method=adavit")).trains  # registered finetune=True
    assert not plan.validate(make_cfg(tmp_path, "method=evit")).trains  # off the shelf
    assert plan.validate(make_cfg(tmp_path, "method=evit", "experiment.train=true")).trains
    assert not plan.validate(make_cfg(tmp_path, "method=adavit", "method.finetune=false")).trains
    assert not plan.validate(make_cfg(tmp_path, "method=adavit", "train.epochs=0")).trains
    checked = plan.validate(make_cfg(tmp_path, "method=adavit"))
    assert checked.resume_dir == tmp_path / "state" / checked.run_key


# -------------------------------------------------------------------------------------------- unit level
def test_rule_text():
    assert config.Rule(ge=0).text() == ">= 0"
    assert config.Rule(gt=0, le=1).text() == "in (0, 1]"
    assert config.Rule(ge=0, lt=1).text() == "in [0, 1)"
    assert config.Rule(gt=0, le=1).admits(0.5) and not config.Rule(gt=0, le=1).admits(0)


def test_config_yaml_only_chooses(tmp_path):
    """The defaults live in the dataclasses: a composed config equals the schema's own defaults, except where a
    model config brings its recipe (the default deit_scenes: only the baseline's epochs, lr and warm-up)."""
    cfg = compose_config("model=deit_digits")
    schema = OmegaConf.structured(config.RunConfig)
    for section in ("train", "baseline", "eval", "experiment", "measure"):
        assert OmegaConf.to_container(cfg[section]) == OmegaConf.to_container(schema[section]), section
    scenes = compose_config()
    changed = {key for key, value in OmegaConf.to_container(scenes.baseline).items() if value != schema.baseline[key]}
    assert changed == {"epochs", "lr", "warmup_epochs"}
    for section in ("train", "eval", "experiment", "measure"):
        assert OmegaConf.to_container(scenes[section]) == OmegaConf.to_container(schema[section]), section
    assert OmegaConf.to_container(cfg.data, resolve=True) == {**OmegaConf.to_container(
        OmegaConf.structured(DigitsData), resolve=False), "img_size": 32}
