"""Hydra config composition: every group option composes, and typos give Hydra's error listing the options."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

import methods

CONF = Path(__file__).resolve().parents[1] / "experiments" / "conf"


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults_are_the_embedded_model_and_data():
    cfg = compose_cfg()
    assert cfg.model.name == "deit_digits_patch4_32" and cfg.data.name == "digits" and cfg.method.name == "dense"


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
        assert set(params) <= set(methods.method_parameters(name)), name
        assert isinstance(cfg.method.finetune, bool)


def test_unknown_group_option_lists_valid_options():
    with pytest.raises(MissingConfigException) as error:
        compose_cfg(["method=adavitt"])
    message = str(error.value)
    assert "adavitt" in message and "dense" in message


def test_typo_in_key_is_refused():
    with pytest.raises(ConfigCompositionException, match="trian"):
        compose_cfg(["trian.epochs=3"])
