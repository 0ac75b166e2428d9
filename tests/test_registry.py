"""The method registry: discovery, metadata, resolved parameters, errors listing the valid choices; every method
fits the interface; the yaml files and the README tables carry nothing that drifts from the registry."""
import json
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import yaml

import methods
from methods import registry
from methods.registry import FAMILIES, register_method
from methods.base import MethodOutput
from conftest import make_tiny_vit

ROOT = Path(__file__).resolve().parents[1]
METHOD_CONF = ROOT / "experiments" / "conf" / "method"


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in a test vanish after it."""
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))


def test_unknown_method_lists_valid_choices():
    valid = ", ".join(methods.list_methods())
    for call in (lambda: methods.create_method("nope", make_tiny_vit()), lambda: methods.method_spec("nope"),
                 lambda: methods.inference_knob("nope"), lambda: methods.resolved_params("nope", {})):
        with pytest.raises(ValueError) as error:
            call()
        assert str(error.value) == f"unknown method 'nope'; valid choices: {valid}"


def test_unknown_parameter_is_named():
    message = r"unknown parameter\(s\) \['bogus'\] for method 'dense'; valid: \(none\)"
    with pytest.raises(ValueError, match=message):
        methods.create_method("dense", make_tiny_vit(), bogus=1)
    with pytest.raises(ValueError, match=message):
        methods.resolved_params("dense", {"bogus": 1})


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="method 'dense' is registered twice"):
        methods.register_method("dense")(lambda vit: None)


@pytest.mark.parametrize("kwargs, message", [
    ({"inference_knob": "rate"}, "method 'knobby': inference knob 'rate' is not a factory parameter"),
    ({"tradeoff_values": [0.5]}, "method 'knobby': tradeoff_values=[0.5] given without an inference knob"),
    ({"inference_knob": "keep", "tradeoff_values": []},
     "method 'knobby': tradeoff_values=[] must be a non-empty list of keep values"),
    ({"inference_knob": "keep", "tradeoff_values": [0.5, 0.5]},
     "method 'knobby': tradeoff_values=[0.5, 0.5] repeats a value"),
    ({"finetune": "yes"}, "method 'knobby': finetune='yes' must be true or false"),
    ({"stronger": {"rate": 0.2}}, "method 'knobby': stronger names ['rate'], which are not factory parameters"),
    ({"stronger": 0.2}, "method 'knobby': stronger=0.2 must be a mapping of parameter -> value"),
    ({"bench_settings": {"deit_small": ({}, {"vit": 1})}},
     "method 'knobby': bench_settings['deit_small'] names ['vit'], which are not factory parameters"),
    ({"bench_settings": {"deit_small": {"keep": 0.2}}},
     "method 'knobby': bench_settings['deit_small']={'keep': 0.2} must be a (default, stronger) pair of "
     "parameter mappings"),
])
def test_bad_registrations_are_refused(scratch_registry, kwargs, message):
    with pytest.raises(ValueError) as error:
        methods.register_method("knobby", **kwargs)(lambda vit, keep=0.5: None)
    assert str(error.value) == message
    assert "knobby" not in methods.list_methods()


def test_a_registration_carries_its_metadata(scratch_registry):
    def build(vit, keep=0.5, blocks=(1, 2)):
        """Keeps what it keeps.

        Longer text that is not the summary."""

    methods.register_method("knobby", family="pruning", inference_knob="keep", finetune=True,
                            tradeoff_values=[0.25, 0.5], stronger={"keep": 0.25},
                            bench_settings={"deit_tiny": ({"keep": 0.9}, {"keep": 0.8})})(build)
    assert methods.method_spec("knobby") == methods.MethodSpec(
        name="knobby", factory=build, inference_knob="keep", finetune=True, tradeoff_values=(0.25, 0.5),
        summary="Keeps what it keeps.", family="pruning", stronger={"keep": 0.25},
        bench_settings={"deit_tiny": ({"keep": 0.9}, {"keep": 0.8})})
    assert methods.bench_settings("knobby", "deit_small") == [{}, {"keep": 0.25}]
    assert methods.bench_settings("knobby", "deit_tiny") == [{"keep": 0.9}, {"keep": 0.8}]
    assert methods.bench_settings("knobby") == [{}, {"keep": 0.25}]  # trained weights: no backbone pair
    assert methods.methods_with_knob()["knobby"] == "keep"
    assert methods.resolved_params("knobby", {"keep": 0.75}) == {"keep": 0.75, "blocks": [1, 2]}
    methods.register_method("plain", summary="Given summary.")(lambda vit: None)
    assert methods.method_spec("plain").summary == "Given summary."
    assert methods.method_spec("plain").inference_knob is None and methods.method_spec("plain").finetune is False


def test_knobs_and_grids_are_declared_factory_parameters():
    """Derived from the registry: a knob is a factory parameter, a grid belongs to a knob, and every grid
    point builds the method (here on the embedded model, where every default fits)."""
    assert methods.inference_knob("dense") is None and methods.method_spec("dense").tradeoff_values is None
    knobs = methods.methods_with_knob()
    assert knobs and set(knobs) < set(methods.list_methods())
    for name, knob in knobs.items():
        assert knob in methods.method_parameters(name)
        grid = methods.method_spec(name).tradeoff_values
        assert grid, name
        for value in grid:
            methods.create_method(name, timm.create_model("deit_digits_patch4_32"), **{knob: value})


@pytest.mark.parametrize("name", methods.list_methods())
def test_resolved_params_apply_the_given_ones_over_the_signature_defaults(name):
    defaults = {key: p.default for key, p in methods.method_parameters(name).items()}
    resolved = methods.resolved_params(name, {})
    assert list(resolved) == list(defaults)
    json.dumps(resolved)  # JSON-able
    for key, value in resolved.items():
        default = defaults[key]
        assert value == (list(default) if isinstance(default, tuple) else default), key
    if defaults:
        key = next(iter(defaults))
        assert methods.resolved_params(name, {key: "given"})[key] == "given"


def test_resolved_params_take_config_containers():
    from omegaconf import OmegaConf

    given = OmegaConf.create({"r": [4, 4, 2], "prop_attn": False})
    assert methods.resolved_params("tome", given) == {"r": [4, 4, 2], "prop_attn": False, "threshold": None}
    assert type(methods.resolved_params("tome", given)["r"]) is list


def test_resolved_params_refuse_values_that_are_not_json():
    with pytest.raises(ValueError, match=r"method\.params\.r=\{1\} is a set, not a JSON value"):
        methods.resolved_params("tome", {"r": {1}})


def test_a_new_module_in_the_package_is_discovered(scratch_registry, tmp_path, monkeypatch):
    """A method is one new file: discovery imports it from the package path, no import list names it."""
    (tmp_path / "throwaway_method.py").write_text(textwrap.dedent('''
        """A throwaway method for the discovery test."""
        from methods.dense import Dense
        from methods.registry import register_method


        @register_method("throwaway", inference_knob="level", tradeoff_values=[1, 2])
        def build_throwaway(vit, level: int = 1):
            """Throwaway: the dense model under another name."""
            return Dense(vit)
        '''))
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path)])
    try:
        assert "throwaway_method" in methods.discover()
        assert "throwaway" in methods.list_methods()
        assert methods.method_spec("throwaway").summary == "Throwaway: the dense model under another name."
        out = methods.create_method("throwaway", make_tiny_vit(), level=2).eval()(torch.zeros(1, 3, 32, 32))
        assert isinstance(out, MethodOutput) and out.token_counts.shape == (1, 4, 2)
    finally:
        sys.modules.pop("methods.throwaway_method", None)


def test_every_method_declares_its_family():
    """The report groups methods by family; an undeclared one would land in no comparison."""
    families = {name: methods.method_spec(name).family for name in methods.list_methods()}
    assert all(family in FAMILIES for family in families.values()), families
    assert families["topk"] == "pruning" and families["tome"] == "merging" and families["adavit"] == "halting"


def test_an_unknown_family_is_refused(scratch_registry):
    with pytest.raises(ValueError, match=r"family='pooling' is not one of: none, pruning, merging, clustering"):
        register_method("throwaway", family="pooling")(lambda vit: None)


def test_adaptive_methods_declare_their_fixed_count_counterpart():
    """What adaptivity buys (analysis/adaptivity.py) compares an adaptive method's curve with its counterpart's;
    the pairing is declared at registration and reaches the record's method_info, never a name list."""
    assert methods.method_spec("adavit").counterpart == "topk" and methods.method_spec("ats").counterpart == "evit"
    assert methods.method_spec("topk").counterpart is None
    assert methods.registered_info("ats") == {"family": "pruning", "counterpart": "evit"}
    assert methods.registered_info("evit") == {"family": "pruning"}  # a fixed-count method carries none
    methods.check_counterparts()  # every declared one is a registered fixed-count method with a knob


@pytest.mark.parametrize("kwargs, message", [
    ({"counterpart": "knobby", "inference_knob": "keep"}, "counterpart='knobby' must name another method"),
    ({"counterpart": "topk"}, "needs an inference knob"),
])
def test_a_bad_counterpart_is_refused(scratch_registry, kwargs, message):
    with pytest.raises(ValueError, match=message):
        register_method("knobby", **kwargs)(lambda vit, keep=0.5: None)
    register_method("knobby", inference_knob="keep", counterpart="dense")(lambda vit, keep=0.5: None)
    with pytest.raises(ValueError, match=r"method 'knobby': counterpart='dense' is not a registered fixed-count "
                                         r"method with an inference knob; valid: .*topk"):
        methods.check_counterparts()


@pytest.mark.parametrize("name", methods.list_methods())
def test_every_method_keeps_timm_keys_and_reports_counts(name, images):
    vit = timm.create_model("deit_digits_patch4_32").eval()  # 64 patches, 12 blocks: every default fits
    timm_keys = set(vit.state_dict())
    method = methods.create_method(name, vit).eval()
    own = {k[len("vit."):] for k in method.state_dict() if k.startswith("vit.")}
    assert own == timm_keys
    with torch.no_grad():
        out = method(images)
    assert isinstance(out, MethodOutput)
    assert out.logits.shape == (4, 10) and torch.isfinite(out.logits).all()
    assert out.token_counts.shape == (4, 12, 2) and out.token_counts.dtype == torch.long
    assert (out.token_counts <= 65).all() and (out.token_counts >= 1).all()
    assert out.patch_depth.shape == (4, 64)
    assert (out.patch_depth >= 0).all() and (out.patch_depth <= 12).all()
    for counts in method.alt_token_counts(images, out).values():
        assert counts.shape == out.token_counts.shape and (counts >= out.token_counts).all()
    json.dumps(method.record_info())


@pytest.mark.parametrize("name", methods.list_methods())
def test_every_method_has_a_yaml_that_copies_no_default(name):
    """The yaml names the method and holds only what a sweep needs: no finetune, no grid, no default values."""
    config = yaml.safe_load((METHOD_CONF / f"{name}.yaml").read_text())
    assert set(config) <= {"defaults", "name", "params"}, sorted(config)
    assert config.get("name", name) == name
    defaults = methods.resolved_params(name, {})
    for key, value in (config.get("params") or {}).items():
        assert key in defaults and value != defaults[key], f"{name}.yaml copies the default {key}={value!r}"


def committed_methods() -> list[str]:
    """The registered methods whose module git tracks: the README documents those. A method module that is not
    committed yet (a throwaway, or one in progress) is left out, so the README tests pass while it exists;
    once committed, its rows are expected (the failure prints them). Outside a git checkout: skipped."""
    import subprocess

    try:
        tracked = subprocess.run(["git", "ls-files", "methods"], cwd=ROOT, capture_output=True, text=True,
                                 check=True, timeout=60).stdout.split()
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"not a git checkout, cannot tell committed methods apart: {error}")
    from methods.catalog import module_file

    return [name for name in methods.list_methods() if module_file(name) in tracked]


@pytest.mark.parametrize("heading, generate", [("## One checkpoint, many compute levels", "tradeoff_table"),
                                               ("## Methods", "methods_table")])
def test_readme_method_tables_are_generated_from_the_registry(heading, generate):
    """The README's method tables are ``methods/catalog.py``'s output for the committed methods (see
    :func:`committed_methods`: an uncommitted method module present does not fail this test). On failure,
    paste the expected table (printed below) into the README's section ``heading``."""
    from methods import catalog

    table = getattr(catalog, generate)(committed_methods())
    section = (ROOT / "README.md").read_text().split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    assert table in section, f"README drifted from the registry; expected under {heading!r}:\n{table}"


def test_every_committed_method_is_in_the_readme_tables():
    """The check above cannot pass on an empty list: the committed methods include the shipped ones, each in
    both tables, and a table lists a method only when it is committed."""
    from methods import catalog

    committed = committed_methods()
    assert {"dense", "tome", "adavit"} <= set(committed)
    text = (ROOT / "README.md").read_text()
    for name in committed:
        assert f"| `{name}` |" in text and f"`{name}`" in catalog.methods_table(committed)
    assert "zz_not_there" not in catalog.tradeoff_table(committed)
    one = catalog.methods_table(["topk"])
    assert one.count("\n") == 3 and "`random`" not in one  # header, rule and one row


def test_the_default_setting_is_the_backbones_where_one_is_registered():
    """Records keep ``method_defaults``: ToMe's registered r for the 65-token embedded model, else the factory's."""
    assert methods.default_params("tome", "deit_scenes") == {"r": 4, "prop_attn": True, "threshold": None}
    assert methods.default_params("tome", "deit_small") == methods.resolved_params("tome", {})
    assert methods.default_params("evit", "deit_scenes") == methods.resolved_params("evit", {})
