"""patchmerger: a stage worked out by hand (softmax over the tokens, layer-normalised or raw tokens mixed, the
scaled switch), uniform logits give the mean token, the stage against the formula step by step, the official
initialisation (nearly one-hot unscaled), depths, counts on DeiT-S, extra MACs by hand,
gradients and parameter groups, dtypes, bad input (directly and through the harness). Batch invariance and train
= eval: tests/test_method_contract.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from experiments.config import ConfigError
from methods import backbone, create_method
from methods.patchmerger import PatchMergerStage
from conftest import assert_own_modules_at_full_lr
from test_schema import assert_refused_at_startup, no_data  # noqa: F401  (no_data is a fixture)

# Two tokens of width 2. LayerNorm of a 2-vector (u, v), u < v, is (-1, 1) * s with s = 1 / sqrt(1 + 1e-5) (LN's
# eps), so LN(1, 3) = (-s, s) and LN(4, 2) = (s, -s). The values below ignore s (a 5e-6 effect; atol 1e-4).
X = torch.tensor([[[1.0, 3.0], [4.0, 2.0]]])
A = math.log(3.0) / 2


def hand_stage(first_query, scaled_attention=False, mix_normalized=True) -> PatchMergerStage:
    stage = PatchMergerStage(outputs=2, width=2, scaled_attention=scaled_attention, mix_normalized=mix_normalized)
    with torch.no_grad():
        stage.queries.copy_(torch.tensor([first_query, [0.0, 0.0]]))
    return stage


@pytest.mark.parametrize("scaled", [False, True])
def test_a_stage_by_hand_softmax_over_the_tokens(scaled):
    # Query 0 = (a, 0) with a = ln(3) / 2: logits -a (token 0) and +a (token 1); softmax over the TOKENS gives
    # e^-a / (e^-a + e^a) = 1 / (1 + 3) = 1/4 and 3/4. Scaled by C^-0.5 = 1/sqrt(2), the query (sqrt(2) a, 0)
    # gives the same logits. Query 1 = 0: equal logits, the mean.
    # Layer-normalised (official): out_0 = 0.25 * (-1, 1) + 0.75 * (1, -1) = (0.5, -0.5), out_1 = (0, 0).
    # (A softmax over the queries instead: token 0 weights 1/(1 + sqrt(3)) = 0.37 / 0.63, token 1 0.63 / 0.37,
    # out_0 = 0.37 * (-1, 1) + 0.63 * (1, -1) = (0.27, -0.27).)
    query = [math.sqrt(2) * A, 0.0] if scaled else [A, 0.0]
    out, mix = hand_stage(query, scaled_attention=scaled)(X)
    torch.testing.assert_close(mix[0], torch.tensor([[0.25, 0.75], [0.5, 0.5]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[0], torch.tensor([[0.5, -0.5], [0.0, 0.0]]), atol=1e-4, rtol=0)
    # mix_normalized=false: the same weights on the raw tokens, 0.25 * (1, 3) + 0.75 * (4, 2) = (3.25, 2.25)
    out, _ = hand_stage(query, scaled_attention=scaled, mix_normalized=False)(X)
    torch.testing.assert_close(out[0], torch.tensor([[3.25, 2.25], [2.5, 2.5]]), atol=1e-4, rtol=0)


def test_unscaled_query_with_the_scaled_switch_by_hand():
    # Query (a, 0) scaled by 1/sqrt(2): logits -+b, b = a / sqrt(2) = 0.3884; weights 1 / (1 + e^{2b}) = 0.3150
    # and 0.6850; out_0 = (0.6850 - 0.3150) * (1, -1) = (0.3700, -0.3700).
    out, _ = hand_stage([A, 0.0], scaled_attention=True)(X)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.3700, -0.3700]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mix_normalized", [True, False])
def test_uniform_logits_give_the_mean_token(mix_normalized):
    torch.manual_seed(0)
    stage = PatchMergerStage(outputs=3, width=6, scaled_attention=False, mix_normalized=mix_normalized)
    with torch.no_grad():
        stage.queries.zero_()
    x = torch.randn(2, 5, 6) * 3 + 1
    out, mix = stage(x)
    torch.testing.assert_close(mix, torch.full((2, 3, 5), 0.2))
    source = F.layer_norm(x, (6,)) if mix_normalized else x
    torch.testing.assert_close(out, source.mean(dim=1, keepdim=True).expand(-1, 3, -1))


def block_input(vit, images, location):
    x = backbone.embed(vit, images)
    for block in vit.blocks[:location]:
        x = backbone.mlp_residual(block, backbone.attn_residual(block, x)[0])
    return x


@pytest.mark.parametrize("scaled,mix_normalized", [(False, True), (True, True), (False, False)])
def test_a_stage_in_the_model_is_the_formula_step_by_step(tiny_vit, images, scaled, mix_normalized):
    method = create_method("patchmerger", tiny_vit, keep_rate=0.5, locations=[2], scaled_attention=scaled,
                           mix_normalized=mix_normalized).eval()
    stage = method.reducers[0]
    assert stage.queries.shape == (8, 32)
    with torch.no_grad():
        stage.norm.weight.uniform_(0.5, 1.5)  # a LayerNorm affine that is not the identity
        stage.norm.bias.normal_(0, 0.3)
        out = method(images)
        x = block_input(tiny_vit, images, 2)[:, 1:]  # [B, 16, 32]
        y = F.layer_norm(x, (32,), stage.norm.weight, stage.norm.bias, 1e-5)
        logits = torch.einsum("kc,bpc->bkp", stage.queries, y) * (32 ** -0.5 if scaled else 1.0)
        weights = logits.softmax(dim=-1)  # over the 16 tokens, for each of the 8 queries
        expected = weights @ (y if mix_normalized else x)
        reduced = method.reduce(0, x, None)
    torch.testing.assert_close(reduced.tokens, expected)
    assert reduced.identity is None
    assert out.patch_depth.eq(2).all()  # mixtures: every patch leaves at the stage in block 2
    assert out.token_counts[0].tolist() == [[17, 17], [17, 17], [9, 9], [9, 9]]


def test_the_switch_changes_the_output_not_the_parameters(tiny_vit, images):
    official = create_method("patchmerger", tiny_vit, keep_rate=0.5, locations=[1, 2]).eval()
    raw = create_method("patchmerger", tiny_vit, keep_rate=0.5, locations=[1, 2], mix_normalized=False).eval()
    raw.load_state_dict(official.state_dict())  # same keys and shapes: checkpoints load across the switch
    with torch.no_grad():
        assert not torch.allclose(official(images).logits, raw(images).logits, atol=1e-3)


def test_official_initialisation_and_deit_small_counts(deit_small):
    torch.manual_seed(0)
    method = create_method("patchmerger", deit_small).eval()
    # int(196 * 0.7) = 137, int(196 * 0.49) = 96, int(196 * 0.343) = 67 queries of width 384
    assert [tuple(r.queries.shape) for r in method.reducers] == [(137, 384), (96, 384), (67, 384)]
    for stage in method.reducers:  # randn queries, untouched by timm's _init_weights; LayerNorm ones and zeros
        assert stage.queries.std().item() == pytest.approx(1.0, rel=0.05)
        assert stage.queries.mean().abs().item() < 0.02
        assert stage.norm.weight.eq(1).all() and stage.norm.bias.eq(0).all() and stage.scale == 1.0
    with torch.no_grad():
        out = method(torch.randn(1, 3, 224, 224))
        x = torch.randn(1, 196, 384)
        _, unscaled = method.reducers[0](x)
        scaled = create_method("patchmerger", deit_small, scaled_attention=True).reducers[0]
        assert scaled.scale == 384 ** -0.5
        scaled.queries.copy_(method.reducers[0].queries)
        _, softer = scaled(x)
    expected = [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    assert out.token_counts[0, :, 0].tolist() == expected and out.token_counts[0, :, 1].tolist() == expected
    assert out.patch_depth.eq(3).all()  # mixtures from the first stage on: every patch leaves at block 3
    # logits of std ~sqrt(384) ~ 20 unscaled: each query nearly picks one token (its largest weight is 0.9 on
    # average here); scaled, std ~1: a soft mix over the 196 tokens
    top, soft_top = unscaled.max(dim=-1).values, softer.max(dim=-1).values
    assert top.mean() > 0.8 and (top > 0.5).float().mean() > 0.9 and soft_top.mean() < 0.2


def test_extra_macs_by_hand(tiny_vit, images):
    # Stages at blocks 1 and 2 on 16 patches, rate 0.5: 16 -> 8 -> 4, width 32. Logits and mix, K * P * C each:
    # 2 * (8 * 16 * 32 + 4 * 8 * 32) = 2 * (4096 + 1024) = 10240, whatever the switches.
    for params in ({}, {"scaled_attention": True, "mix_normalized": False}):
        method = create_method("patchmerger", tiny_vit, keep_rate=0.5, locations=[1, 2], **params)
        with torch.no_grad():
            counts = method.eval()(images).token_counts
        assert method.extra_macs(counts).tolist() == [10240] * 4


@pytest.mark.parametrize("mix_normalized", [True, False])
def test_gradients_reach_the_queries_and_the_norm(tiny_vit, images, mix_normalized):
    method = create_method("patchmerger", tiny_vit, keep_rate=0.5, locations=[1, 2], scaled_attention=True,
                           mix_normalized=mix_normalized).train()
    method(images).logits.pow(2).sum().backward()
    for stage in method.reducers:
        for param in (stage.queries, stage.norm.weight, stage.norm.bias):
            assert param.grad is not None and param.grad.abs().sum() > 0
    assert tiny_vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_param_groups_put_the_stages_at_full_lr(tiny_vit, scale):
    method = create_method("patchmerger", tiny_vit, locations=[1, 2], backbone_lr_scale=scale)
    # per stage: the queries, LN weight and bias
    groups, _ = assert_own_modules_at_full_lr(method, scale, 2 * 3)
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for stage in method.reducers:  # as the official optim.py: the 2-D queries decay, the LayerNorm does not
        assert id(stage.queries) in decay and not {id(stage.norm.weight), id(stage.norm.bias)} & decay


@pytest.mark.parametrize("params,needle", [
    ({"patch_counts": [4, 8]}, r"patch_counts=\[4, 8\] is not 2 non-increasing integers in \[1, 16\]"),
    ({"locations": [2, 1]}, r"locations=\[2, 1\] must be strictly increasing"),
])
def test_bad_input_is_refused_with_the_key_and_range(tiny_vit, params, needle):
    with pytest.raises(ValueError, match=r"method\.params\." + needle):
        create_method("patchmerger", tiny_vit, **{"locations": [1, 2], **params})


@pytest.mark.parametrize("override,needle", [
    ("method.params.mix_normalized=maybe", r"method\.params\.mix_normalized='maybe' must be true or false"),
    ("method.params.keep_rate=0.01", r"method\.params\.keep_rate=0\.01 leaves fewer than 1 patch token"),
])
def test_bad_input_through_the_harness_writes_nothing(tmp_path, no_data, override, needle):  # noqa: F811
    assert_refused_at_startup(tmp_path, ["method=patchmerger", override], ConfigError, needle)
