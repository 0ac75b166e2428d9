"""Official checkpoint layouts of ATS and TokenReduction's learned methods (``methods/ats.py``,
``methods/tokenreduction_layout.py`` and the method modules): files built here in the key layout the official
code saves (names and shapes written out by hand from the official constructors, values random) load through
``model.checkpoint`` and compute what the same values compute through our own keys.

The official names, read off the official modules (JoakimHaurum/TokenReduction ``models/*.py``,
adaptivetokensampling/ATS ``libs/models/transformers/*.py``): every model saves timm's DeiT keys at the top level;
TokenReduction adds ``cluster_layers.{s}.*`` per location: SiT's ``TokenSlimmingModule`` ``weight.{0,1,3}``
(LayerNorm C, Linear C->int(C/2), Linear int(C/2)->K) and ``scale`` [1, 1, 1]; ``PatchMerger`` ``queries`` [K, C]
and ``norm``; ``Sinkhorn`` ``v`` [K, C]; DPC-KNN's ``CTM`` ``score`` (Linear C->1); K-Medoids nothing. ATS adds
``blocks.{i}.attn.out_zero_mask`` [1, C] (zeros) in each ATS block."""
from __future__ import annotations

import argparse

import pytest
import torch

from experiments.train.checkpoints import load_checkpoint_file
from methods import official
from methods.models import CheckpointError
from test_official_checkpoints import build, logits, official_deit_shapes, random_state, save
from test_schema import assert_refused_at_startup, no_data  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

COUNTS = (44, 31, 21)  # int(64 * 0.7 ** (i + 1)) on the 64-patch digits model
ATS_BLOCKS = range(3, 12)
# our name of each official part within cluster_layers.{s} -> reducers.{s}, written out independently
OUR_PART = {"sit": {"weight.0": "mlp.0", "weight.1": "mlp.1", "weight.3": "mlp.3", "scale": "scale"},
            "patchmerger": {"queries": "queries", "norm": "norm"}, "sinkhorn": {"v": "centres"},
            "dpcknn": {"score": ""}, "kmedoids": {}}
TOKEN_REDUCTION = sorted(OUR_PART)
OPTIONS = {"sinkhorn": dict(cluster_iters=3, sinkhorn_eps=1.0), "dpcknn": dict(k_neighbors=5, equal_weight=False),
           "kmedoids": dict(cluster_iters=3, equal_weight=False)}


def cluster_shapes(method: str, dim=64, counts=COUNTS) -> dict[str, tuple]:
    shapes: dict[str, tuple] = {}
    for s, k in enumerate(counts):
        part = {"sit": {"weight.0.weight": (dim,), "weight.0.bias": (dim,), "weight.1.weight": (dim // 2, dim),
                        "weight.1.bias": (dim // 2,), "weight.3.weight": (k, dim // 2), "weight.3.bias": (k,),
                        "scale": (1, 1, 1)},
                "patchmerger": {"queries": (k, dim), "norm.weight": (dim,), "norm.bias": (dim,)},
                "sinkhorn": {"v": (k, dim)}, "dpcknn": {"score.weight": (1, dim), "score.bias": (1,)},
                "kmedoids": {}}[method]
        shapes.update({f"cluster_layers.{s}.{name}": shape for name, shape in part.items()})
    return shapes


def official_state(method: str, dim=64, seed=0, counts=COUNTS) -> dict[str, torch.Tensor]:
    state = random_state({**official_deit_shapes(dim), **(cluster_shapes(method, dim, counts)
                                                          if method != "ats" else {})}, seed)
    if method == "ats":
        state.update({f"blocks.{i}.attn.out_zero_mask": torch.zeros(1, dim) for i in ATS_BLOCKS})
    return state


def as_ours(method: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ours = {}
    for key, value in state.items():
        if key.endswith("attn.out_zero_mask"):
            continue
        if key.startswith("cluster_layers."):
            _, stage, rest = key.split(".", 2)
            part, leaf = rest.rsplit(".", 1) if rest.count(".") else (rest, None)
            mapped = OUR_PART[method][part]
            tail = ".".join(p for p in (mapped, leaf) if p)
            ours[f"reducers.{stage}.{tail}"] = value
        else:
            ours[f"vit.{key}"] = value
    return ours


def train_py_checkpoint(method: str, state, ema=None, ema_best=False, **args) -> dict:
    """What TokenReduction's ``train.py`` saves as ``best_checkpoint.pth``."""
    options = dict(model=f"{method}_small_patch16_224", reduction_loc=[3, 6, 9], keep_rate=[0.7],
                   **OPTIONS.get(method, {}))
    return {"model": state, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {}, "epoch": 29,
            "model_ema": state if ema is None else ema, "scaler": None,
            "args": argparse.Namespace(**{**options, **args}), "ema_best": ema_best}


def ats_checkpoint(state) -> dict:
    """What ATS's ``save_checkpoint`` (SlowFast's) writes."""
    return {"epoch": 4, "model_state": state, "optimizer_state": {"state": {}, "param_groups": []},
            "cfg": "VIT:\n  ATS_BLOCKS: [3, 4, 5, 6, 7, 8, 9, 10, 11]\n  DROP_TOKENS: true\n"}


def official_file(method: str, state) -> dict:
    return ats_checkpoint(state) if method == "ats" else train_py_checkpoint(method, state)


# ------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("name", ["ats", *TOKEN_REDUCTION])
def test_official_layout_gives_the_logits_of_the_same_values_in_our_layout(tmp_path, name):
    state = official_state(name)
    through_official = build(name)
    load_checkpoint_file(through_official, name, str(save(tmp_path, official_file(name, state))))
    through_ours = build(name)
    through_ours.load_state_dict(as_ours(name, state), strict=True)
    for key, value in as_ours(name, state).items():
        assert torch.equal(through_official.state_dict()[key], value), key
    assert torch.allclose(logits(through_official), logits(through_ours), atol=1e-6)
    assert not torch.allclose(logits(through_official), logits(build(name)), atol=1e-3)


@pytest.mark.parametrize("name", ["ats", *TOKEN_REDUCTION])
def test_mapping_round_trips_and_names_every_official_weight(name):
    layout = official.layouts()[name]
    ours = build(name).state_dict()
    weights = {k for k in official_state(name) if layout.fixed(k) is None}
    assert set(official.to_official(layout, ours)) == weights
    assert official.to_ours(layout, official_state(name)).keys() == ours.keys()
    assert all(layout.fixed(k) == 0.0 for k in set(official_state(name)) - weights)
    assert (set(official_state(name)) - weights) == ({f"blocks.{i}.attn.out_zero_mask" for i in ATS_BLOCKS}
                                                     if name == "ats" else set())


@pytest.mark.parametrize("name, expected", [
    ("ats", {"locations": list(ATS_BLOCKS)}),
    ("sit", {"locations": [3, 6, 9], "keep_rate": 0.7}),
    ("sinkhorn", {"locations": [3, 6, 9], "keep_rate": 0.7, "iterations": 3, "epsilon": 1.0}),
    ("dpcknn", {"locations": [3, 6, 9], "keep_rate": 0.7, "k_neighbors": 5, "equal_weight": False}),
    ("kmedoids", {"locations": [3, 6, 9], "keep_rate": 0.7, "iterations": 3}),
])
def test_settings_read_from_the_file_are_the_trained_ones(name, expected):
    content = official_file(name, official_state(name))
    content = {**content, "model": content.get("model", content.get("model_state"))}
    assert official.match(content).method == name
    assert official.match(content).settings(content) == expected


def test_token_reduction_counts_given_as_a_list_become_patch_counts():
    content = train_py_checkpoint("patchmerger", official_state("patchmerger"), keep_rate=[44.0, 31.0, 21.0])
    assert official.match(content).settings(content)["patch_counts"] == list(COUNTS)


# ----------------------------------------------------------------------------------------------- wrappers
@pytest.mark.parametrize("ema_best", [True, False])
def test_token_reduction_best_checkpoint_loads_the_copy_its_ema_best_flag_names(tmp_path, ema_best):
    state, ema = official_state("sit", seed=0), official_state("sit", seed=1)
    method = build("sit")
    load_checkpoint_file(method, "sit", str(save(tmp_path, train_py_checkpoint("sit", state, ema, ema_best))))
    chosen = ema if ema_best else state  # validate.py: model_ema when ema_best, else model
    assert torch.equal(method.reducers[1].mlp[3].weight, chosen["cluster_layers.1.weight.3.weight"])


@pytest.mark.parametrize("wrap", [
    pytest.param(lambda s: s, id="bare"),
    pytest.param(lambda s: {"model": {f"module.{k}": v for k, v in s.items()}}, id="module-prefix"),
])
def test_sinkhorn_without_args_is_recognised_by_its_keys(tmp_path, wrap):
    state = official_state("sinkhorn")
    method = build("sinkhorn")
    load_checkpoint_file(method, "sinkhorn", str(save(tmp_path, wrap(state))))
    assert torch.equal(method.reducers[2].centres, state["cluster_layers.2.v"])


@pytest.mark.parametrize("wrap", [pytest.param(ats_checkpoint, id="model_state"),
                                  pytest.param(lambda s: s, id="bare")])
def test_ats_files_load_with_their_zero_masks_checked_not_loaded(tmp_path, wrap):
    state = official_state("ats")
    method = build("ats")
    load_checkpoint_file(method, "ats", str(save(tmp_path, wrap(state))))
    assert torch.equal(method.vit.blocks[7].attn.qkv.weight, state["blocks.7.attn.qkv.weight"])


def test_kmedoids_bare_state_dict_is_a_deit_checkpoint(tmp_path):
    """No K-Medoids key exists: without its args the file is the backbone's and loads like a DeiT."""
    state = official_state("kmedoids")
    assert official.match({"model": state}) is None
    method = build("kmedoids")
    load_checkpoint_file(method, "kmedoids", str(save(tmp_path, state)))
    assert torch.equal(method.vit.head.weight, state["head.weight"])


# ------------------------------------------------------------------------------ bad input, nothing written
def saved(method, state=None, **args):
    return lambda tmp_path: save(tmp_path, train_py_checkpoint(method, official_state(method) if state is None
                                                               else state, **args))


def truncated(tmp_path):
    path = saved("sit")(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def without(method, key):
    state = official_state(method)
    del state[key]
    return saved(method, state)


def ats_file(state):
    return lambda tmp_path: save(tmp_path, ats_checkpoint(state))


def ats_state(blocks=ATS_BLOCKS, mask=0.0):
    state = {k: v for k, v in official_state("ats").items() if not k.endswith("out_zero_mask")}
    state.update({f"blocks.{i}.attn.out_zero_mask": torch.full((1, 64), mask) for i in blocks})
    return state


@pytest.mark.parametrize("method, make, message", [
    pytest.param("sit", truncated, r"cannot read .*official\.pth.*valid: a torch\.save file", id="truncated"),
    pytest.param("sinkhorn", without("sinkhorn", "cluster_layers.2.v"),
                 r"missing keys: reducers\.2\.centres \[official: cluster_layers\.2\.v\]", id="missing-key"),
    pytest.param("sit", saved("patchmerger"),
                 r"an official patchmerger checkpoint .*not one of method=sit; valid: method=patchmerger",
                 id="patchmerger-as-sit"),
    pytest.param("kmedoids", ats_file(official_state("ats")),
                 r"an official ats checkpoint .*not one of method=kmedoids; valid: method=ats", id="ats-as-kmedoids"),
    pytest.param("ats", saved("kmedoids"),
                 r"an official kmedoids checkpoint .*not one of method=ats; valid: method=kmedoids",
                 id="kmedoids-as-ats"),
    pytest.param("sit", saved("sit", official_state("sit", dim=96)),
                 r"shape mismatches: .*\[official: .*\] \(96,\) vs model \(64,\)", id="another-width"),
    pytest.param("patchmerger", saved("patchmerger", official_state("patchmerger", counts=(32, 16, 8)),
                                      keep_rate=[0.5]),
                 r"args\.keep_rate=\[0\.5\] \(\[32, 16, 8\] clusters\).*valid: method\.params\.keep_rate=0\.5",
                 id="other-keep-rate"),
    pytest.param("kmedoids", saved("kmedoids", reduction_loc=[2, 5, 8]),
                 r"args\.reduction_loc=\[2, 5, 8\].*valid: method\.params\.locations=\[2, 5, 8\]",
                 id="other-locations"),
    pytest.param("kmedoids", saved("kmedoids", equal_weight=True),
                 r"args\.equal_weight=True .*not implemented here", id="kmedoids-equal-weight"),
    pytest.param("sinkhorn", saved("sinkhorn", sinkhorn_eps=0.05),
                 r"args\.sinkhorn_eps=0\.05, but method\.params\.epsilon=1; valid: method\.params\.epsilon=0\.05",
                 id="sinkhorn-other-eps"),
    pytest.param("ats", ats_file(ats_state(blocks=range(4, 12))),
                 r"ATS blocks are \[4, .*11\].*valid: method\.params\.locations=\[4, 5", id="ats-other-blocks"),
    pytest.param("ats", ats_file(ats_state(mask=0.5)),
                 r"blocks\.3\.attn\.out_zero_mask.* must hold the constant the official code fixes \(0",
                 id="ats-trained-mask"),
])
def test_bad_official_checkpoints_are_refused_at_startup(tmp_path, no_data, method, make, message):
    path = make(tmp_path)
    assert_refused_at_startup(tmp_path, [f"method={method}", f"model.checkpoint={path}"], CheckpointError, message)
