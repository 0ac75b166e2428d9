"""DynamicViT: masked training equals pruned inference, per-block counts on DeiT-S, losses and groups by value."""
from __future__ import annotations

import dataclasses
import math

import pytest
import timm
import torch
from timm.scheduler import CosineLRScheduler

from methods import create_method, method_spec, resolved_params
from methods.base import MethodOutput
from methods.dynamicvit import DynamicViT, DynamicViTState
from tests.conftest import make_tiny_vit



def tiny_dynamicvit(**params) -> DynamicViT:
    """Tiny ViT (4 blocks, 16 patches); pruning before blocks 1, 2, 3 keeps 11, 7, 5 patches at rate 0.7."""
    params.setdefault("locations", [1, 2, 3])
    return create_method("dynamicvit", make_tiny_vit(), **params)


def topk_hook(model: DynamicViT):
    """Replaces the Gumbel draw by the top-k keep scores among the still-kept patches (what eval keeps)."""

    def sample(stage, log_probs, prev_keep):
        score = log_probs[..., 0].masked_fill(prev_keep[..., 0] < 0.5, float("-inf"))
        index = score.topk(model.keep_counts[stage], dim=1).indices
        return torch.zeros_like(prev_keep).scatter(1, index.unsqueeze(-1), 1.0)

    return sample


def test_masked_training_equals_pruned_inference(images, monkeypatch):
    model = tiny_dynamicvit()
    with torch.no_grad():
        # Freshly initialised predictors score all patches within float noise of each other, so top-k near
        # ties could flip between the two passes; spread the scores as a trained predictor would.
        torch.manual_seed(2)
        for layer in model.predictors.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(std=1.0 / layer.in_features ** 0.5)
        pruned = model.eval()(images)
        dense = create_method("dense", model.vit)(images)
        monkeypatch.setattr(model, "_sample_keep", topk_hook(model))
        masked = model.train()(images)

    assert not torch.allclose(pruned.logits, dense.logits, atol=1e-3)  # pruning changes the output
    torch.testing.assert_close(masked.logits, pruned.logits, atol=1e-4, rtol=0)
    assert torch.equal(masked.patch_depth, pruned.patch_depth)
    # The surviving final tokens agree too, wherever eval placed them.
    index = pruned.state.patch_index
    kept_masked = masked.final_tokens[:, 1:].gather(1, index[..., None].expand(-1, -1, 32))
    torch.testing.assert_close(kept_masked, pruned.final_tokens[:, 1:], atol=1e-4, rtol=0)
    torch.testing.assert_close(masked.state.keep_ratio, pruned.state.keep_ratio)


def test_gumbel_policy_is_hard_nested_and_trains_the_predictor(images):
    model = tiny_dynamicvit().train()
    torch.manual_seed(0)
    out = model(images)
    keep = out.state.final_keep
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    ratios = out.state.keep_ratio
    assert (ratios[:, 1:] <= ratios[:, :-1]).all()  # each stage only drops more
    # Training reports the deployed (inference) counts; patch depth follows the sampled decisions.
    expected = torch.tensor([17, 12, 8, 6])
    assert torch.equal(out.token_counts, expected[None, :, None].expand(4, 4, 2))
    assert torch.equal((out.patch_depth == 4).sum(1), keep.sum(1).long())
    loss = sum(model.loss_terms(out, None).values())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.predictors[0].parameters())


@pytest.mark.parametrize(
    "params, counts",
    [
        ({}, [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3),
        ({"keep_rate": 0.8}, [197] * 3 + [157] * 3 + [126] * 3 + [101] * 3),
        ({"keep_rate": 0.5, "locations": [1, 4, 7, 10]}, [197] + [99] * 3 + [50] * 3 + [25] * 3 + [13] * 2),
    ],
)
def test_block_counts_on_deit_small(params, counts):
    vit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    model = create_method("dynamicvit", vit, **params).eval()
    seen = {"attn": [], "mlp": []}
    for block in vit.blocks:  # count the tokens the blocks actually ran on
        block.norm1.register_forward_hook(lambda m, i, o: seen["attn"].append(o.shape[1]))
        block.norm2.register_forward_hook(lambda m, i, o: seen["mlp"].append(o.shape[1]))
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert seen["attn"] == counts and seen["mlp"] == counts
    assert out.token_counts[0, :, 0].tolist() == counts and out.token_counts[0, :, 1].tolist() == counts
    # Each patch's depth is the block it was dropped before (12 if never dropped).
    depths = out.patch_depth[0].bincount(minlength=13)
    for loc in model.locations:
        assert depths[loc] == counts[loc - 1] - counts[loc]
    assert depths[12] == counts[-1] - 1
    per_token = 384 * 384 + 384 * 192 + 192 * 96  # C^2 + C^2/2 + C^2/8
    expected_macs = sum(counts[loc - 1] - 1 for loc in model.locations) * per_token
    assert model.extra_macs(out.token_counts).tolist() == [expected_macs]
    if not params:
        assert expected_macs == (196 + 137 + 96) * 239616


def test_inference_keep_rate_changes_counts_not_targets(images):
    model = tiny_dynamicvit(keep_rate=0.7, inference_keep_rate=0.5).eval()
    assert model.keep_counts == [8, 4, 2]
    assert model.ratio_targets == pytest.approx([0.7, 0.49, 0.343])
    with torch.no_grad():
        out = model(images)
    assert out.token_counts[0, :, 0].tolist() == [17, 9, 5, 3]


def test_loss_terms_by_value():
    model = tiny_dynamicvit(locations=[1, 2])  # ratio targets 0.7, 0.49
    student_tokens = torch.zeros(2, 3, 2)  # CLS + 2 final patch tokens, width 2
    teacher_tokens = torch.zeros(2, 5, 2)  # CLS + 4 patches
    teacher_tokens[0, 1:] = torch.tensor([[100.0, 100.0], [50.0, 50.0], [1.0, 2.0], [70.0, 70.0]])
    teacher_tokens[1, 1:] = torch.tensor([[80.0, 80.0], [3.0, 0.0], [90.0, 90.0], [0.0, 1.0]])
    state = DynamicViTState(
        keep_ratio=torch.tensor([[0.5, 0.3], [0.9, 0.6]]),
        patch_index=torch.tensor([[2, 0], [1, 3]]),  # student token -> original patch
        final_keep=torch.tensor([[1.0, 0.0], [1.0, 1.0]]),  # (image 0, patch 0) was masked
    )
    out = MethodOutput(torch.zeros(2, 2), torch.zeros(2, 4, 2, dtype=torch.long), torch.zeros(2, 4),
                       final_tokens=student_tokens, state=state)
    teacher = MethodOutput(torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]]), out.token_counts, out.patch_depth,
                           final_tokens=teacher_tokens)
    terms = model.loss_terms(out, torch.zeros(2, dtype=torch.long), teacher)
    assert set(terms) == {"ratio", "kl", "token_mse"}
    # ratio: 2.0 * mean(0.2^2, 0.19^2, 0.2^2, 0.11^2)
    assert terms["ratio"].item() == pytest.approx(2.0 * (0.04 + 0.0361 + 0.04 + 0.0121) / 4)
    # KL(teacher || student): image 0 is 0.75*ln(1.5) + 0.25*ln(0.5), image 1 is 0; batch mean; weight 0.5
    assert terms["kl"].item() == pytest.approx(0.5 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2)
    # token MSE over the 3 kept tokens x 2 channels: (1 + 4 + 9 + 0 + 0 + 1) / 6; weight 0.5
    assert terms["token_mse"].item() == pytest.approx(0.5 * 15 / 6)
    assert set(model.loss_terms(out, None, None)) == {"ratio"}


def test_loss_terms_in_eval_mode_use_the_fixed_counts(images):
    model = tiny_dynamicvit().eval()
    with torch.no_grad():
        out = model(images)
        teacher = create_method("dense", make_tiny_vit())(images)
        terms = model.loss_terms(out, None, teacher)
        agreeing = model.loss_terms(out, None, dataclasses.replace(teacher, logits=out.logits))
    expected = 2.0 * ((11 / 16 - 0.7) ** 2 + (7 / 16 - 0.49) ** 2 + (5 / 16 - 0.343) ** 2) / 3
    assert terms["ratio"].item() == pytest.approx(expected)
    # KL(teacher || student) by value: 0.5 * mean over images of sum_c p_t (log p_t - log p_s)
    p_t, log_s = teacher.logits.softmax(-1).double(), out.logits.log_softmax(-1).double()
    kl = (p_t * (p_t.log() - log_s)).sum(-1).mean().item()
    assert kl > 1e-4 and terms["kl"].item() == pytest.approx(0.5 * kl, rel=1e-4)
    assert terms["token_mse"].item() > 0
    assert agreeing["kl"].item() == 0.0  # a teacher that agrees with the student adds nothing
    assert agreeing["token_mse"].item() == terms["token_mse"].item()


@pytest.mark.parametrize("scale", [0.01, 0.1])
def test_param_groups_scale_the_backbone_lr(scale):
    model = tiny_dynamicvit(backbone_lr_scale=scale)
    groups = model.param_groups(weight_decay=0.05)
    predictor_ids = {id(p) for p in model.predictors.parameters()}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    for group in groups:
        is_predictor = {id(p) in predictor_ids for p in group["params"]}
        assert len(is_predictor) == 1
        assert group["lr_scale"] == (1.0 if is_predictor.pop() else scale)
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}
    # timm's schedulers multiply each group's lr by its lr_scale.
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    CosineLRScheduler(optimizer, t_initial=10).step(0)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx(sorted({1e-3 * scale, 1e-3}))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"locations": [0, 2]}, "method.params.locations=[0, 2]: [0] outside the valid block range [1, 3] of this "
                                "4-block model"),
        ({"locations": [2, 4]}, "method.params.locations=[2, 4]: [4] outside the valid block range [1, 3] of this "
                                "4-block model"),
        ({"locations": [2, 2]}, "method.params.locations=[2, 2] must be strictly increasing (valid: indices in "
                                "[1, 3])"),
        ({"locations": [3, 1]}, "method.params.locations=[3, 1] must be strictly increasing (valid: indices in "
                                "[1, 3])"),
    ],
)
def test_bad_params_name_the_key(params, message):
    with pytest.raises(ValueError) as error:
        tiny_dynamicvit(**params)
    assert str(error.value) == message


def test_a_rate_that_keeps_no_patch_is_refused_naming_the_knob():
    """16 patches, three stages: floor(16 x 0.3^3) = 0; the smallest valid rate is (1/16)^(1/3) = 0.397."""
    with pytest.raises(ValueError, match=r"method\.params\.inference_keep_rate=0\.3 removes every patch token: "
                                         r"after 3 pruning stage\(s\), floor\(16 x 0\.3\^3\) = 0; valid: a rate "
                                         r"in \[0\.3969, 1\]"):
        tiny_dynamicvit(inference_keep_rate=0.3)
    with pytest.raises(ValueError, match=r"method\.params\.keep_rate=0\.3 removes every patch token"):
        tiny_dynamicvit(keep_rate=0.3)  # keep_rate is also the eval rate when inference_keep_rate is null
    assert tiny_dynamicvit(keep_rate=0.3, inference_keep_rate=0.4).keep_counts == [6, 2, 1]


def test_registered_defaults():
    """Defaults, finetune and the trade-off grid come from the registry (the yaml copies none of them)."""
    spec = method_spec("dynamicvit")
    assert spec.finetune is True and spec.inference_knob == "inference_keep_rate"
    assert spec.tradeoff_values == (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert resolved_params("dynamicvit", {}) == {
        "keep_rate": 0.7, "locations": [3, 6, 9], "ratio_weight": 2.0, "kl_weight": 0.5, "token_mse_weight": 0.5,
        "backbone_lr_scale": 0.01, "inference_keep_rate": None}
