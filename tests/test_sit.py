"""sit: a stage worked out by hand (softmax over the tokens, the raw tokens mixed, the learned scale), uniform
logits give the mean token, the stage against the formula step by step, the official initialisation, depths,
counts on DeiT-S, extra MACs by hand, gradients and parameter groups, dtypes, bad input (directly and through
the harness). Batch invariance and train = eval: tests/test_method_contract.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from experiments.config import ConfigError
from methods import backbone, create_method
from methods.sit import TokenSlimming
from conftest import assert_own_modules_at_full_lr
from test_schema import assert_refused_at_startup, no_data  # noqa: F401  (no_data is a fixture)

# Two tokens of width 2. LayerNorm of a 2-vector (u, v), u < v, is (-1, 1) * s with s = 1 / sqrt(1 + 1e-5) (LN's
# eps), so LN(1, 3) = (-s, s) and LN(4, 2) = (s, -s). The values below ignore s (a 5e-6 effect; atol 1e-4).
X = torch.tensor([[[1.0, 3.0], [4.0, 2.0]]])


def hand_stage(scale: float) -> TokenSlimming:
    """Hidden width int(2 * 0.5) = 1: h = LN(x)[1], i.e. s for token 0 and -s for token 1. Output 0's logit is
    ln(3) * GELU(h), output 1's is 0."""
    stage = TokenSlimming(width=2, outputs=2)
    with torch.no_grad():
        stage.mlp[1].weight.copy_(torch.tensor([[0.0, 1.0]]))
        stage.mlp[1].bias.zero_()
        stage.mlp[3].weight.copy_(torch.tensor([[math.log(3.0)], [0.0]]))
        stage.mlp[3].bias.zero_()
        stage.scale.fill_(scale)
    return stage


def test_a_stage_by_hand_softmax_over_the_tokens_of_raw_tokens():
    # GELU(1) - GELU(-1) = Phi(1) + Phi(-1) = 1, so output 0's logits differ by ln(3) between token 0 and token 1:
    # softmax over the tokens gives 3/4, 1/4 and out_0 = 0.75 * (1, 3) + 0.25 * (4, 2) = (1.75, 2.75), a mixture
    # of the RAW tokens (the LayerNorm only shapes the weights). Output 1 has equal logits: the mean (2.5, 2.5).
    # (A softmax over the outputs instead: logits 0.92 and -0.17 against 0 give token 0 the weights 0.72 / 0.28,
    # token 1 0.46 / 0.54, and out_0 = 0.72 * (1, 3) + 0.46 * (4, 2) = (2.54, 3.06).)
    out, mix = hand_stage(1.0)(X)
    torch.testing.assert_close(mix[0], torch.tensor([[0.75, 0.5], [0.25, 0.5]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[0], torch.tensor([[1.75, 2.75], [2.5, 2.5]]), atol=1e-4, rtol=0)
    # the learned scale multiplies the logits: 2 * ln(3) = ln(9), weights 0.9 / 0.1: (0.9 + 0.4, 2.7 + 0.2)
    out, mix = hand_stage(2.0)(X)
    torch.testing.assert_close(out[0], torch.tensor([[1.3, 2.9], [2.5, 2.5]]), atol=1e-4, rtol=0)


def test_uniform_logits_give_the_mean_raw_token():
    torch.manual_seed(0)
    stage = TokenSlimming(width=6, outputs=3)
    with torch.no_grad():
        stage.mlp[3].weight.zero_()
        stage.mlp[3].bias.copy_(torch.tensor([0.3, -1.2, 5.0]))  # constant over the tokens, any value per output
    x = torch.randn(2, 5, 6) * 3 + 1
    out, mix = stage(x)
    torch.testing.assert_close(mix, torch.full((2, 5, 3), 0.2))
    torch.testing.assert_close(out, x.mean(dim=1, keepdim=True).expand(-1, 3, -1))


def block_input(vit, images, location):
    x = backbone.embed(vit, images)
    for block in vit.blocks[:location]:
        x = backbone.mlp_residual(block, backbone.attn_residual(block, x)[0])
    return x


def test_a_stage_in_the_model_is_the_formula_step_by_step(tiny_vit, images):
    method = create_method("sit", tiny_vit, keep_rate=0.5, locations=[2]).eval()
    stage = method.reducers[0]
    with torch.no_grad():
        stage.scale.fill_(7.0)  # away from the near-uniform initial mix, so the check has teeth
        stage.mlp[3].weight.normal_()
        out = method(images)
        x = block_input(tiny_vit, images, 2)[:, 1:]  # [B, 16, 32]
        norm, first, second = stage.mlp[0], stage.mlp[1], stage.mlp[3]
        hidden = F.gelu(F.linear(F.layer_norm(x, (32,), norm.weight, norm.bias, norm.eps), first.weight, first.bias))
        logits = F.linear(hidden, second.weight, second.bias) * 7.0  # [B, 16 tokens, 8 outputs]
        weights = logits.softmax(dim=1)  # over the tokens
        expected = torch.einsum("bpk,bpc->bkc", weights, x)
        reduced = method.reduce(0, x, None)
    assert weights.max() > 0.5  # a real mixture, not the mean
    torch.testing.assert_close(reduced.tokens, expected)
    assert reduced.identity is None
    assert out.patch_depth.eq(2).all()  # mixtures: every patch leaves at the stage in block 2
    assert out.token_counts[0].tolist() == [[17, 17], [17, 17], [9, 9], [9, 9]]


def test_official_initialisation_and_deit_small_counts(deit_small):
    method = create_method("sit", deit_small).eval()
    # int(196 * 0.7) = 137, int(196 * 0.49) = 96, int(196 * 0.343) = 67 outputs; hidden int(384 * 0.5) = 192
    assert [tuple(r.mlp[3].weight.shape) for r in method.reducers] == [(137, 192), (96, 192), (67, 192)]
    for stage in method.reducers:
        assert tuple(stage.mlp[1].weight.shape) == (192, 384) and stage.scale.shape == (1, 1, 1)
        assert stage.scale.item() == 1.0
        for layer in (stage.mlp[1], stage.mlp[3]):  # timm's _init_weights: trunc_normal(std=0.02), bias 0
            assert layer.weight.std().item() == pytest.approx(0.02, rel=0.05) and layer.bias.eq(0).all()
        assert stage.mlp[0].weight.eq(1).all() and stage.mlp[0].bias.eq(0).all()
    with torch.no_grad():
        out = method(torch.randn(1, 3, 224, 224))
        # small initial weights: the mix starts near uniform, every output close to the mean token
        mix = method.reducers[0].mixing(torch.randn(1, 196, 384))
    expected = [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    assert out.token_counts[0, :, 0].tolist() == expected and out.token_counts[0, :, 1].tolist() == expected
    assert out.patch_depth.eq(3).all()  # mixtures from the first stage on: every patch leaves at block 3
    assert (mix * 196 - 1).abs().max() < 0.5


def test_extra_macs_by_hand(tiny_vit, images):
    # Stages at blocks 1 and 2 on 16 patches, rate 0.5: 16 -> 8 -> 4, width C = 32, hidden H = 16.
    # Stage 1 (P 16, K 8): P*C*H + P*H*K + K*P*C = 8192 + 2048 + 4096 = 14336.
    # Stage 2 (P 8, K 4): 4096 + 512 + 1024 = 5632. Total 19968.
    method = create_method("sit", tiny_vit, keep_rate=0.5, locations=[1, 2])
    with torch.no_grad():
        counts = method.eval()(images).token_counts
    assert method.extra_macs(counts).tolist() == [19968] * 4


def test_gradients_reach_the_mlp_and_the_scale(tiny_vit, images):
    method = create_method("sit", tiny_vit, keep_rate=0.5, locations=[1, 2]).train()
    method(images).logits.pow(2).sum().backward()
    for stage in method.reducers:
        for param in (stage.mlp[0].weight, stage.mlp[1].weight, stage.mlp[3].weight, stage.scale):
            assert param.grad is not None and param.grad.abs().sum() > 0
    assert tiny_vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_param_groups_put_the_stages_at_full_lr(tiny_vit, scale):
    method = create_method("sit", tiny_vit, locations=[1, 2], backbone_lr_scale=scale)
    # per stage: LN weight and bias, two linears' weights and biases, the scale
    groups, _ = assert_own_modules_at_full_lr(method, scale, 2 * 7)
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    stage = method.reducers[0]
    # as the official optim.py: the 3-D scale and the matrices decay; biases and the LayerNorm do not
    assert {id(stage.scale), id(stage.mlp[1].weight), id(stage.mlp[3].weight)} <= decay
    assert not {id(stage.mlp[0].weight), id(stage.mlp[0].bias), id(stage.mlp[1].bias)} & decay


@pytest.mark.parametrize("params,needle", [
    ({"keep_rate": 0.1}, r"keep_rate=0\.1 leaves fewer than 1 patch token .* valid: a rate in \[0\.2500, 1\]"),
    ({"patch_counts": [8]}, r"patch_counts=\[8\] has 1 entries for 2 locations; valid: 2 non-increasing"),
    ({"patch_counts": [4, 8]}, r"patch_counts=\[4, 8\] is not 2 non-increasing integers in \[1, 16\]"),
    ({"patch_counts": [17, 8]}, r"patch_counts=\[17, 8\] is not 2 non-increasing integers in \[1, 16\]"),
    ({"locations": [1, 4]}, r"locations=\[1, 4\]: \[4\] outside the valid block range \[0, 3\]"),
])
def test_bad_input_is_refused_with_the_key_and_range(tiny_vit, params, needle):
    with pytest.raises(ValueError, match=r"method\.params\." + needle):
        create_method("sit", tiny_vit, **{"locations": [1, 2], **params})
    method = create_method("sit", tiny_vit, locations=[1, 2], patch_counts=[8, 8])  # explicit counts are fine
    assert [r.mlp[3].out_features for r in method.reducers] == [8, 8]


@pytest.mark.parametrize("override,needle", [
    ("method.params.keep_rate=1.5", r"method\.params\.keep_rate=1\.5 must be in \(0, 1\]"),
    ("method.params.patch_counts=[9,9]", r"method\.params\.patch_counts=\[9, 9\] has 2 entries for 3 locations"),
])
def test_bad_input_through_the_harness_writes_nothing(tmp_path, no_data, override, needle):  # noqa: F811
    assert_refused_at_startup(tmp_path, ["method=sit", override], ConfigError, needle)
