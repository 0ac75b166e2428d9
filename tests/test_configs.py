"""Hydra config composition: every group option composes, the structured schema (experiments/config.py) types every
key at composition, and typos give Hydra's error listing the options."""

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

import methods
from conftest import CONF, compose_config
from experiments import config
from experiments.cost import timing_conditions


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(overrides=()):
    return compose_config(*overrides)


def test_defaults_are_the_embedded_model_and_data():
    cfg = compose_cfg()
    assert cfg.model.name == "deit_digits_patch4_32" and cfg.data.name == "digit_scenes" and cfg.method.name == "dense"
    assert cfg.model.short_name == "deit_scenes" and cfg.baseline.epochs == 60 and cfg.baseline.warmup_epochs == 5
    digits = compose_cfg(["model=deit_digits"])  # the upsampled digits stay one option away
    assert digits.data.name == "digits" and digits.baseline.epochs == 15


@pytest.mark.parametrize("group", ["method", "model", "data", "launcher"])
def test_every_group_option_composes(group):
    assert options(group), f"no options in {group}/"
    for option in options(group):
        cfg = compose_cfg([f"{group}={option}"])
        OmegaConf.to_container(cfg, resolve=False)
        if group == "method":
            assert cfg.method.name == option


def test_method_configs_match_the_registry():
    assert options("method") == methods.list_methods()
    for name in options("method"):
        cfg = compose_cfg([f"method={name}"])
        params = OmegaConf.to_container(cfg.method.params)
        # the yaml extends the factory's signature: every parameter present, defaults written once (the factory)
        assert params == methods.resolved_params(name, {}), name
        assert cfg.method.finetune is None and cfg.method.tradeoff_values is None  # null: the registered default


@pytest.mark.parametrize("name", methods.list_methods())
def test_every_method_passes_the_plan_on_the_default_model(name, tmp_path):
    """The whole pre-run check (the method built on the meta device included) accepts every method's defaults on
    the embedded benchmark: a factory that needs real values (``.item()``) fails here, not in a user's run."""
    from conftest import run_paths
    from experiments.plan import validate

    plan = validate(compose_config(*run_paths(tmp_path), f"method={name}"))
    assert plan.method_name == name


@pytest.mark.parametrize("model, size", [("deit_digits", 32), ("deit_tiny", 224), ("deit_small", 224),
                                         ("deit_base", 224)])
def test_data_follows_the_models_native_resolution(model, size):
    assert compose_cfg([f"model={model}"]).data.img_size == size
    assert compose_cfg([f"model={model}", "data.img_size=64"]).data.img_size == 64
    assert compose_cfg([f"model={model}", "data=imagefolder"]).data.img_size == size


@pytest.mark.parametrize("override, key, words", [
    ("seed=abc", "seed", "could not be converted to Integer"),
    ("train.lr=fast", "train.lr", "could not be converted to Float"),
    ("progress=loud", "progress", "is not a valid bool"),
    ("data.img_size=big", "data.img_size", "could not be converted to Integer"),
    ("measure.batch_sizes=[1,x]", "measure.batch_sizes", "could not be converted to Integer"),
])
def test_types_are_enforced_at_composition(override, key, words):
    """OmegaConf refuses a mistyped value while Hydra composes, naming the full key and the value."""
    with pytest.raises(ConfigCompositionException) as error:
        compose_cfg([override])
    message = str(error.value) + str(error.value.__cause__)
    assert words in message and f"full_key: {key}" in message, message


def test_measure_dtypes_are_the_throughput_harness_dtypes():
    assert set(config.DTYPES) == set(timing_conditions.DTYPES)


def test_unknown_group_option_lists_valid_options():
    with pytest.raises(MissingConfigException) as error:
        compose_cfg(["method=adavitt"])
    message = str(error.value)
    assert "adavitt" in message and "dense" in message


def test_typo_in_key_is_refused():
    with pytest.raises(ConfigCompositionException, match="trian"):
        compose_cfg(["trian.epochs=3"])
