"""One layer of method-parameter checks (``methods/params.py``): ranges and choices live in each factory's signature
and the plan refuses a value outside them at startup, in one line naming the key, the value and what is valid.

The contract test walks the registry: for every method and every constrained parameter of its signature it derives
values just outside the range (and an unknown choice, a non-finite number, a wrong type) from the annotation and
runs each through ``experiments.plan.validate`` on a composed config; the boundary itself must pass the signature
check, so the derived bounds are the real ones. Checks that span parameters or need the model are listed by hand.
"""
from __future__ import annotations

import math
import types
import typing
from collections.abc import Sequence as AbcSequence
from pathlib import Path
from typing import Annotated, Literal, Union

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import methods
from experiments import plan
from experiments.config import ConfigError
from methods.params import ModelSettingError, ParamError
from methods.sinkhorn import sinkhorn_plan

CONF = Path(__file__).resolve().parents[1] / "experiments" / "conf"

pytestmark = pytest.mark.usefixtures("one_thread")


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["measure.throughput=false", *overrides])


# ------------------------------------------------------------------------- values derived from the annotation
def bounds(annotation) -> dict[str, float]:
    extra = typing.get_args(annotation)[1:]
    return {name: getattr(item, name) for field in extra for item in getattr(field, "metadata", [field])
            for name in ("gt", "ge", "lt", "le", "min_length", "max_length") if getattr(item, name, None) is not None}


def members(annotation) -> list:
    """The alternatives of a union (``Optional`` included), without ``None``."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) if arg is not type(None) for m in members(arg)]
    return [annotation]


def outside(annotation) -> tuple[list, list]:
    """``(bad, boundary)``: values just outside ``annotation``'s range or choices, and the bounds themselves."""
    bad, edge = [], []
    for member in members(annotation):
        base = typing.get_args(member)[0] if typing.get_origin(member) is Annotated else member
        limits = bounds(member) if typing.get_origin(member) is Annotated else {}
        if typing.get_origin(member) is Literal:
            bad.append("not_a_choice")
            edge.extend(typing.get_args(member))
        elif base is bool:
            bad.append(1)  # strict: 1 is not true
        elif base in (int, float):
            step = (lambda v, d: v + d) if base is int else (lambda v, d: math.nextafter(v, d * math.inf))
            for name, direction, inside in (("gt", -1, False), ("ge", -1, True), ("lt", 1, False), ("le", 1, True)):
                if name in limits:
                    value = base(limits[name])
                    bad.append(step(value, direction) if inside else value)
                    if inside:
                        edge.append(value)
            if base is float:
                bad.extend([math.inf, math.nan])
        elif typing.get_origin(base) in (list, tuple, AbcSequence):
            inner_bad, inner_edge = outside(typing.get_args(base)[0])
            bad.extend([value] for value in inner_bad)
            if limits.get("min_length", 0) >= 1:
                bad.append([])
            if inner_edge and "max_length" in limits:
                bad.append([inner_edge[0]] * (limits["max_length"] + 1))
    return bad, edge


def annotations(name: str) -> dict:
    return typing.get_type_hints(methods.method_spec(name).factory, include_extras=True)


def is_constrained(annotation) -> bool:
    """Every parameter but a bare list: a bare ``int`` is here too and yields no case, which fails
    :func:`test_every_constrained_parameter_has_cases` (every count needs bounds)."""
    return any(typing.get_origin(m) in (Annotated, Literal) or m in (bool, int, float) for m in members(annotation))


CASES = [pytest.param(name, key, value, id=f"{name}-{key}-{value!r:.40}")
         for name in methods.list_methods() for key in methods.method_parameters(name)
         for value in outside(annotations(name)[key])[0] if is_constrained(annotations(name)[key])]


def test_every_constrained_parameter_has_cases():
    """The derivation covers every parameter that is a number, a choice or a flag (an empty derivation would make
    the contract vacuous, and a bare ``int`` has no bound to derive from)."""
    covered = {(case.values[0], case.values[1]) for case in CASES}
    constrained = {(name, key) for name in methods.list_methods()
                   for key, annotation in annotations(name).items() if key in methods.method_parameters(name)
                   and is_constrained(annotation)}
    assert constrained and covered == constrained
    assert {("kmedoids", "iterations"), ("adavit", "prior"), ("adavit", "gate_center")} <= covered


@pytest.fixture(scope="module")
def configs():
    return {name: compose_cfg(f"method={name}") for name in methods.list_methods()}


@pytest.mark.parametrize("name, key, value", CASES)
def test_a_value_outside_the_signature_is_refused_naming_the_key(configs, name, key, value):
    cfg = configs[name].copy()
    with open_dict(cfg):
        cfg.method.params[key] = value
    with pytest.raises(ConfigError) as error:
        plan.validate(cfg)
    message = str(error.value)
    assert f"method.params.{key}={value!r}" in message and "\n" not in message, message
    assert "valid" in message or "must be" in message


@pytest.mark.parametrize("name", methods.list_methods())
def test_the_bounds_themselves_pass_the_signature(name):
    for key, annotation in annotations(name).items():
        for value in outside(annotation)[1]:
            plan.check_method_params(name, {key: value})


def test_the_message_is_derived_from_the_constraint():
    def refusal(name, **params):
        with pytest.raises(ConfigError) as error:
            plan.check_method_params(name, params)
        return str(error.value)

    assert refusal("evit", keep_rate=1.5) == "method.params.keep_rate=1.5 must be in (0, 1]"
    assert refusal("adavit", prior="x") == "method.params.prior='x' unknown; valid: correct, official"
    assert refusal("kmedoids", iterations=10 ** 9) == "method.params.iterations=1000000000 must be in [1, 100]"
    assert refusal("sinkhorn", epsilon=1e-300) == "method.params.epsilon=1e-300 must be in [1e-12, 1e+12]"
    assert refusal("evit", keep_rate="high") == "method.params.keep_rate='high' must be a number in (0, 1]"
    assert refusal("evit", locations=[3, 6.5]) == \
        "method.params.locations=[3, 6.5] must be a list of 1 to 1000 integers in [0, 999]"
    assert refusal("dynamicvit", inference_keep_rate=0) == \
        "method.params.inference_keep_rate=0 must be null or a number in (0, 1]"


def test_a_library_call_is_refused_by_the_same_signature(tiny_vit):
    """``methods.create_method`` runs the same check before the factory: a value outside the signature is a
    ``ParamError`` naming the key, and values inside it (an int where a float is asked for) build."""
    with pytest.raises(ParamError, match=r"^method\.params\.iterations=1000000000 must be in \[1, 100\]$"):
        methods.create_method("kmedoids", tiny_vit, locations=[1, 2, 3], iterations=10 ** 9)
    with pytest.raises(ParamError, match=r"^method\.params\.prior='paper' unknown; valid: correct, official$"):
        methods.create_method("adavit", tiny_vit, gate_scale=10.0, gate_center=30.0, prior="paper")
    assert methods.create_method("sinkhorn", tiny_vit, locations=[1, 2], epsilon=2).epsilon == 2.0


# ----------------------------------------------------------------------------- the startup refusals of issue 27
@pytest.mark.parametrize("overrides, key", [
    (["method=kmedoids", "method.params.iterations=1000000000"], "method.params.iterations=1000000000"),
    (["method=sinkhorn", "method.params.iterations=1000000000"], "method.params.iterations=1000000000"),
    (["method=sinkhorn", "method.params.epsilon=1e-300"], "method.params.epsilon=1e-300"),
    (["+model.mlp_ratio=1e308"], "model.mlp_ratio=1e+308"),
    (["+model.depth=100000"], "model.depth=100000"),
    (["+model.embed_dim=1000000000"], "model.embed_dim=1000000000"),
    (["+model.num_heads=1000000000"], "model.num_heads=1000000000"),
    (["model.img_size=1000000"], "model.img_size=1000000"),
])
def test_unbounded_settings_are_refused_at_startup(overrides, key):
    with pytest.raises(ConfigError, match=r"^" + key.replace(".", r"\.").replace("+", r"\+") + " must be"):
        plan.validate(compose_cfg(*overrides))


def test_the_smallest_epsilon_keeps_the_sinkhorn_plan_finite():
    """At the bound (1e-12) the plan and its gradient are finite on saturated scores; far below it they are not
    (why the bound exists)."""
    scores = torch.ones(2, 64, 44, requires_grad=True)
    for iterations in (1, 3, 100):
        transport = sinkhorn_plan(scores, iterations, 1e-12)
        transport.sum().backward()
        assert torch.isfinite(transport).all() and torch.isfinite(scores.grad).all()
        scores.grad = None
    assert not torch.isfinite(sinkhorn_plan(torch.ones(2, 64, 44), 3, 1e-300)).all()


# ---------------------------------------------------------- checks that span parameters or need the model
@pytest.mark.parametrize("overrides, message", [
    (["method=evit", "method.params.locations=[3,6,12]"],
     r"method\.params\.locations=\[3, 6, 12\]: \[12\] outside the valid block range \[0, 11\]"),
    (["method=evit", "method.params.locations=[6,3,9]"], r"method\.params\.locations=\[6, 3, 9\] must be strictly"),
    (["method=dynamicvit", "method.params.locations=[0,6,9]"],
     r"method\.params\.locations=\[0, 6, 9\]: \[0\] outside the valid block range \[1, 11\]"),
    (["method=kmedoids", "method.params.locations=[0,6,9]"], r"method\.params\.locations=\[0, 6, 9\]: \[0\] outside"),
    (["+model.depth=2", "method=evit"], r"method\.params\.locations=\[3, 6, 9\]: \[3, 6, 9\] outside"),
    (["method=topk", "method.params.keep_rate=0.1"], r"method\.params\.keep_rate=0\.1 removes every patch token"),
    (["method=dynamicvit", "method.params.inference_keep_rate=0.1"],
     r"method\.params\.inference_keep_rate=0\.1 removes every patch token"),
    (["method=sit", "method.params.keep_rate=0.1"], r"method\.params\.keep_rate=0\.1 leaves fewer than 1 patch"),
    (["method=sit", "method.params.patch_counts=[9,9]"], r"method\.params\.patch_counts=\[9, 9\] has 2 entries for 3"),
    (["method=kmedoids", "method.params.patch_counts=[8,9,4]"], r"method\.params\.patch_counts=\[8, 9, 4\] is not 3 "
                                                                r"non-increasing integers in \[1, 64\]"),
    (["method=kmedoids", "method.params.patch_counts=[65,9,4]"], r"method\.params\.patch_counts=\[65, 9, 4\] is not"),
    (["method=dpcknn", "method.params.k_neighbors=9999"], r"method\.params\.k_neighbors=9999 is not an integer in "
                                                          r"\[1, 31\]"),
    (["method=tome", "method.params.r=[1,2,3,4,5,6,7,8,9,10,11,12,13]"],
     r"method\.params\.r has 13 entries but the model has 12 blocks"),
    (["method=topk", "method.params.token_counts=[65,40,50]"], r"method\.params\.token_counts=\[65, 40, 50\] increases"),
    (["method=random", "method.params.token_counts=[60,40]"], r"method\.params\.token_counts=\[60, 40\] starts at 60"),
    (["method=topk", "method.params.token_counts=[65,65,65,65,65,65,65,65,65,65,65,65,65]"],
     r"method\.params\.token_counts has 13 entries but the model has 12 blocks"),
    (["method=ats", "method.params.budget=100"], r"method\.params\.budget=100 gives K=100 tokens, outside \[8, 65\]"),
    (["method=ats", "method.params.budget=[8,9]"], r"method\.params\.budget=\[8, 9\] has 2 entries for 9 ATS"),
    (["method=ats", "method.params.budget=0.1"], r"method\.params\.budget=0\.1 gives K=6 tokens"),
    (["method=ats", "+model.depth=3"], r"method\.params\.locations=null places ATS at blocks 3\.\.2"),
    (["method=adavit", "method.params.target_depth=13"], r"method\.params\.target_depth=13 is outside \[1, 12\]"),
    # the Gaussian prior around block 8 of 12: below a width of 0.49 blocks its tails are 0 in fp32 (log -inf)
    (["method=adavit", "method.params.target_std=0.3"], r"method\.params\.target_std=0\.3 is too narrow: .*valid: "
                                                        r"target_std >= 0\.49 \(or prior_weight=0\)"),
    (["method=adavit", "model=deit_base", "data.img_size=224"],
     r"method\.params\.gate_scale=null but architecture 'deit_base_patch16_224' has no default gate constants"),
    (["method=heuristic", "method.params.min_radius=0.1"], r"method\.params\.min_radius=0\.1 leaves no patch token"),
])
def test_cross_parameter_and_model_checks_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        plan.validate(compose_cfg(*overrides))
    assert isinstance(error.value.__cause__, ParamError), "the plan tells a parameter error by its type"


def test_model_setting_errors_are_told_by_type():
    with pytest.raises(ConfigError, match=r"^data\.img_size=33 is not a positive multiple of the patch size 4$") \
            as error:
        plan.validate(compose_cfg("data.img_size=33"))
    assert isinstance(error.value.__cause__, ModelSettingError)


def test_a_method_error_of_another_type_names_the_method():
    """A ``ValueError`` that is not a :class:`ParamError` (here: the heuristic's 2-D grid rule on a video model)
    is reported with the method and its parameters, since its text need not name a key."""
    with pytest.raises(ConfigError, match=r"^method 'heuristic' with params \{.*\}: heuristic is defined on a square"):
        plan.validate(compose_cfg("method=heuristic", "model=vit_video_digits", "data=moving_digits"))
