"""Official checkpoint layouts (``methods/official.py``): DynamicViT's, A-ViT's and EViT's files, built here in
the key layout their official code saves (names and shapes written out from the official constructors, values
random), load through ``model.checkpoint`` and compute what the same values loaded through our own keys compute.

The official keys are written by hand below (not produced by the mapping under test): DynamicViT's
``VisionTransformerDiffPruning`` (``models/dyvit.py``), A-ViT's ``act_vision_transformer.VisionTransformer``
and EViT's ``evit.EViT`` all save timm's DeiT names at the top level; DynamicViT adds
``score_predictor.{s}.in_conv.{0,1}`` and ``.out_conv.{0,2,4}``."""
from __future__ import annotations

import argparse

import pytest
import torch

import methods
from experiments.train.checkpoints import load_checkpoint_file
from methods import official
from methods.models import CheckpointError, create_backbone
from test_schema import assert_refused_at_startup, make_cfg, no_data  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "deit_digits_patch4_32"  # width 64, 12 blocks, 4 px patches on 32 px: 64 patches + CLS, 10 classes
DIGITS_GATES = dict(gate_scale=5.0, gate_center=10.0)  # A-ViT's defaults on this model (GATE_DEFAULTS)
# our name of each official predictor part (an independent statement of the mapping, read off both modules)
PREDICTOR_PARTS = {"in_conv.0": "embed.0", "in_conv.1": "embed.1", "out_conv.0": "score.0",
                   "out_conv.2": "score.2", "out_conv.4": "score.4"}


def official_deit_shapes(dim=64, depth=12, classes=10, patch=4, tokens=65) -> dict[str, tuple]:
    """The keys and shapes the official DeiT-style models save (qkv_bias=True, no pre_logits, no dist token)."""
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, tokens, dim),
              "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,), "head.weight": (classes, dim), "head.bias": (classes,)}
    for i in range(depth):
        for name, shape in {"norm1": (dim,), "norm2": (dim,), "attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim),
                            "mlp.fc1": (4 * dim, dim), "mlp.fc2": (dim, 4 * dim)}.items():
            shapes[f"blocks.{i}.{name}.weight"] = shape
            shapes[f"blocks.{i}.{name}.bias"] = (shape[0],)
    return shapes


def official_predictor_shapes(dim=64, stages=3) -> dict[str, tuple]:
    """DynamicViT's ``PredictorLG``: in_conv = LayerNorm, Linear(C, C); out_conv = Linear(C, C/2), Linear(C/2,
    C/4), Linear(C/4, 2) at indices 0, 2, 4 (GELUs and the LogSoftmax between them hold no weights)."""
    parts = {"in_conv.0": (dim, None), "in_conv.1": (dim, dim), "out_conv.0": (dim // 2, dim),
             "out_conv.2": (dim // 4, dim // 2), "out_conv.4": (2, dim // 4)}
    shapes = {}
    for s in range(stages):
        for part, (rows, cols) in parts.items():
            shapes[f"score_predictor.{s}.{part}.weight"] = (rows,) if cols is None else (rows, cols)
            shapes[f"score_predictor.{s}.{part}.bias"] = (rows,)
    return shapes


def random_state(shapes: dict[str, tuple], seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: 0.2 * torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def official_state(method: str, dim=64, seed=0, classes=10) -> dict[str, torch.Tensor]:
    shapes = official_deit_shapes(dim, classes=classes)
    if method == "dynamicvit":
        shapes.update(official_predictor_shapes(dim))
    if method == "ltmp":  # LTMP's ThresholdMasker: one [1] threshold per block for merging and one for pruning
        shapes.update({f"blocks.{i}.{kind}_masker.threshold": (1,) for i in range(12) for kind in ("merge", "prune")})
    return random_state(shapes, seed)


def as_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same values under our keys, by the hand-written correspondence above."""
    ours = {}
    for key, value in state.items():
        if key.startswith("score_predictor."):
            _, stage, part, index, leaf = key.split(".")
            ours[f"predictors.{stage}.{PREDICTOR_PARTS[part + '.' + index]}.{leaf}"] = value
        else:
            ours[f"vit.{key}"] = value
    return ours


def main_py_checkpoint(method: str, state, ema=None, **args) -> dict:
    """What the official training scripts save (DynamicViT ``utils.save_model``, A-ViT ``main_act.py``, EViT
    ``main.py``): the options as an argparse ``Namespace`` under ``args``."""
    options = {"dynamicvit": dict(base_rate=0.7, model="deit-s"), "adavit": dict(act_mode=4, **DIGITS_GATES),
               "evit": dict(base_keep_rate=0.7, fuse_token=True, drop_loc="(3, 6, 9)",
                            model="deit_small_patch16_shrink_base")}[method]
    return {"model": state, "model_ema": state if ema is None else ema, "optimizer": {"state": {}, "param_groups": []},
            "epoch": 29, "args": argparse.Namespace(**{**options, **args})}


def build(method: str, **params):
    torch.manual_seed(1)
    return methods.create_method(method, create_backbone(MODEL, num_classes=10), **params).eval()


def save(tmp_path, content, name="official.pth"):
    path = tmp_path / "inputs" / name
    path.parent.mkdir(exist_ok=True)
    torch.save(content, path)
    return path


def logits(method, seed=3):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return method(images).logits


# ------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("name", ["dynamicvit", "adavit", "evit"])
def test_official_layout_gives_the_logits_of_the_same_values_in_our_layout(tmp_path, name):
    state = official_state(name)
    path = save(tmp_path, main_py_checkpoint(name, state))
    through_official = build(name)
    load_checkpoint_file(through_official, name, str(path))
    through_ours = build(name)
    through_ours.load_state_dict(as_ours(state), strict=True)
    for key, value in as_ours(state).items():  # every official tensor landed where our key says
        assert torch.equal(through_official.state_dict()[key], value), key
    assert torch.allclose(logits(through_official), logits(through_ours), atol=1e-6)
    assert not torch.allclose(logits(through_official), logits(build(name)), atol=1e-3)  # the load did something


@pytest.mark.parametrize("name", ["dynamicvit", "adavit", "evit"])  # the others: test_official_layouts.py
def test_mapping_round_trips_and_names_every_official_key(name):
    layout = official.layouts()[name]
    ours = build(name).state_dict()
    as_official = official.to_official(layout, ours)
    assert set(as_official) == set(official_state(name))  # exactly the keys the official code saves
    assert official.to_ours(layout, as_official).keys() == ours.keys()
    back = official.to_official(layout, official.to_ours(layout, official_state(name)))
    assert back.keys() == official_state(name).keys()


def test_evit_at_another_keep_rate_loads_its_file(tmp_path):
    """EViT's keep rate is its inference knob: one checkpoint, a sweep of rates."""
    state = official_state("evit")
    method = build("evit", keep_rate=0.5)
    load_checkpoint_file(method, "evit", str(save(tmp_path, main_py_checkpoint("evit", state))))
    assert torch.equal(method.vit.cls_token, state["cls_token"])


def test_a_plain_deit_checkpoint_matches_no_official_layout():
    plain = official_deit_shapes()
    assert official.match({"model": random_state(plain)}) is None
    assert official.match({"model": random_state(plain), "args": argparse.Namespace(model="deit_tiny")}) is None


# ----------------------------------------------------------------------------------------------- wrappers
def module_prefixed(state):
    return {f"module.{key}": value for key, value in state.items()}


@pytest.mark.parametrize("wrap", [
    pytest.param(lambda s: s, id="bare"),
    pytest.param(lambda s: {"model": s}, id="model"),
    pytest.param(lambda s: {"state_dict": s}, id="state_dict"),
    pytest.param(lambda s: {"model_ema": s}, id="model_ema-only"),
    pytest.param(lambda s: {"model": module_prefixed(s)}, id="module-prefix"),
    pytest.param(lambda s: main_py_checkpoint("dynamicvit", s, ema={k: v + 1 for k, v in s.items()}),
                 id="main.py-model-and-ema"),
])
def test_dynamicvit_wrappers_load_the_model_weights(tmp_path, wrap):
    state = official_state("dynamicvit")
    path = save(tmp_path, wrap(state))
    method = build("dynamicvit")
    load_checkpoint_file(method, "dynamicvit", str(path))
    for key, value in as_ours(state).items():  # the 'model' entry, not the EMA copy, as infer.py reads it
        assert torch.equal(method.state_dict()[key], value), key


def test_adavit_main_act_checkpoint_with_a_module_prefix_loads(tmp_path):
    state = official_state("adavit")
    path = save(tmp_path, main_py_checkpoint("adavit", module_prefixed(state)))
    method = build("adavit")
    load_checkpoint_file(method, "adavit", str(path))
    assert torch.equal(method.vit.blocks[5].mlp.fc2.weight, state["blocks.5.mlp.fc2.weight"])


@pytest.mark.parametrize("name", ["adavit", "evit"])
def test_main_py_files_with_a_different_ema_copy_load_the_model_weights(tmp_path, name):
    """A-ViT's ``main_act.py`` and EViT's ``main.py`` (DeiT's) save ``model`` and ``model_ema`` side by side: the
    ``model`` entry is the one evaluated (as their evaluation reads it), not the EMA copy."""
    state = official_state(name)
    path = save(tmp_path, main_py_checkpoint(name, state, ema={k: v + 1 for k, v in state.items()}))
    method = build(name)
    load_checkpoint_file(method, name, str(path))
    for key, value in as_ours(state).items():
        assert torch.equal(method.state_dict()[key], value), key


def test_official_dynamicvit_checkpoint_runs_through_model_checkpoint(tmp_path):
    from conftest import build_for

    state = official_state("dynamicvit")
    path = save(tmp_path, main_py_checkpoint("dynamicvit", state))
    method = build_for(make_cfg(tmp_path, "method=dynamicvit", f"model.checkpoint={path}"))
    assert torch.equal(method.predictors[2].score[4].bias, state["score_predictor.2.out_conv.4.bias"])
    assert torch.equal(method.vit.head.weight, state["head.weight"])


# ------------------------------------------------------------------------------ bad input, nothing written
def truncated(tmp_path):
    path = save(tmp_path, main_py_checkpoint("dynamicvit", official_state("dynamicvit")))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def without(key):
    def make(tmp_path):
        state = official_state("dynamicvit")
        del state[key]
        return save(tmp_path, main_py_checkpoint("dynamicvit", state))
    return make


def wider(tmp_path):
    return save(tmp_path, main_py_checkpoint("dynamicvit", official_state("dynamicvit", dim=96)))


def imagenet_head_under_module_prefix(tmp_path):
    state = module_prefixed(official_state("dynamicvit", classes=1000))
    return save(tmp_path, main_py_checkpoint("dynamicvit", state))


def of_method(name, **args):
    return lambda tmp_path: save(tmp_path, main_py_checkpoint(name, official_state(name), **args))


@pytest.mark.parametrize("method, make, message", [
    pytest.param("dynamicvit", truncated, r"cannot read .*official\.pth.*valid: a torch\.save file", id="truncated"),
    pytest.param("dynamicvit", without("score_predictor.2.out_conv.4.bias"),
                 r"missing keys: predictors\.2\.score\.4\.bias \[official: score_predictor\.2\.out_conv\.4\.bias\]",
                 id="missing-predictor-key"),
    pytest.param("dynamicvit", imagenet_head_under_module_prefix,
                 r"has a 1000-class head but data\.name=digits has 10 classes", id="other-head-module-prefix"),
    pytest.param("adavit", of_method("dynamicvit"),
                 r"an official dynamicvit checkpoint .*not one of method=adavit; valid: method=dynamicvit",
                 id="dynamicvit-as-adavit"),
    pytest.param("dynamicvit", of_method("adavit"),
                 r"an official adavit checkpoint .*not one of method=dynamicvit; valid: method=adavit",
                 id="adavit-as-dynamicvit"),
    pytest.param("dynamicvit", wider,
                 r"shape mismatches: predictors\.0\.embed\.0\.bias \[official: score_predictor\.0\.in_conv\.0\.bias\] "
                 r"\(96,\) vs model \(64,\).* \(178 in all\)", id="another-width"),  # 182 keys; 4 keep their shape
    pytest.param("adavit", of_method("adavit", gate_center=30.0),
                 r"trained with args\.gate_center=30 .*but method\.params\.gate_center=10; "
                 r"valid: method\.params\.gate_center=30", id="adavit-other-gates"),
    pytest.param("adavit", of_method("evit"),
                 r"an official evit checkpoint .*not one of method=adavit; valid: method=evit", id="evit-as-adavit"),
    pytest.param("evit", of_method("evit", fuse_token=False),
                 r"trained with args\.fuse_token=False, but method\.params\.fuse=true; "
                 r"valid: method\.params\.fuse=false",
                 id="evit-without-fusion"),
    pytest.param("evit", of_method("evit", drop_loc="(2, 5, 8)"),
                 r"args\.drop_loc='\(2, 5, 8\)'.*valid: method\.params\.locations=\[2, 5, 8\]", id="evit-other-blocks"),
    pytest.param("dynamicvit", of_method("dynamicvit", base_rate=0.5),
                 r"trained at keep rate 0\.5 .*method\.params\.keep_rate=0\.7", id="dynamicvit-other-rate"),
])
def test_bad_official_checkpoints_are_refused_at_startup_naming_the_keys(tmp_path, no_data, method, make, message):
    path = make(tmp_path)
    assert_refused_at_startup(tmp_path, [f"method={method}", f"model.checkpoint={path}"], CheckpointError, message)
