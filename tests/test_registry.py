"""The method registry: names, parameters, errors listing the valid choices; every method fits the interface."""
import pytest
import timm
import torch

import methods
from methods.base import MethodOutput
from conftest import make_tiny_vit


def test_unknown_method_lists_valid_choices():
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*dense"):
        methods.create_method("nope", make_tiny_vit())


def test_unknown_parameter_is_named():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['bogus'\] for method 'dense'"):
        methods.create_method("dense", make_tiny_vit(), bogus=1)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        methods.register_method("dense")(lambda vit: None)


def test_inference_knobs_are_declared_factory_parameters():
    assert methods.methods_with_knob() == {
        "adavit": "inference_gate_shift", "dynamicvit": "inference_keep_rate", "evit": "keep_rate",
        "random": "keep_rate", "tome": "r", "topk": "keep_rate"}
    assert methods.inference_knob("dense") is None
    with pytest.raises(ValueError, match=r"unknown method 'nope'"):
        methods.inference_knob("nope")
    with pytest.raises(ValueError, match=r"method 'knobby': inference knob 'rate' is not a factory parameter"):
        methods.register_method("knobby", inference_knob="rate")(lambda vit, keep=0.5: None)
    assert "knobby" not in methods.list_methods()


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
