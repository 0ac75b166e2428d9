"""LTMP: the batched ragged inference against a step-by-step reference of the official inference model, training
(masked, straight-through) = inference, batch invariance, counts by hand, the budget loss by value, the
threshold-only recipe, the official checkpoint layout, host syncs and bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from conftest import assert_batch_invariant, make_tiny_vit
from experiments.train.checkpoints import load_checkpoint_file
from methods import backbone, create_method, ragged_attention
from methods.ltmp import budget_ratio
from methods.models import CheckpointError
from methods.params import ParamError
from sync_counter import count_syncs

pytestmark = pytest.mark.usefixtures("one_thread")
VARIED = dict(merge_threshold=0.5, prune_threshold=0.05)  # on the tiny model: counts differ between images


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32) * 2


def build(depth=12, **params):
    return create_method("ltmp", make_tiny_vit(depth=depth), **params).eval()


@torch.no_grad()
def reference(method, image):
    """One image through the official inference model's steps (``lt_mergeprune_inference.py``), written out:
    batch size 1, plain boolean indexing; returns the logits and the per-block (attention, MLP) counts."""
    x = backbone.embed(method.vit, image)
    size = torch.ones(1, x.shape[1], 1)
    counts = []
    for index, block in enumerate(method.vit.blocks):
        merge_at, prune_at = (t.item() for t in method.thresholds(index))
        attn, tokens = block.attn, x.shape[1]
        heads = backbone.project_qkv(attn, block.norm1(x))
        probs = ((heads.q * attn.scale) @ heads.k.transpose(-2, -1) + size.log()[:, None, None, :, 0]).softmax(-1)
        x = x + backbone.project_out(attn, probs @ heads.v)
        importance = probs.mean(dim=(1, 2))[0]
        importance[0] = math.inf
        metric = F.normalize(heads.k.mean(dim=1)[0], dim=-1)
        scores = metric[::2] @ metric[1::2].T
        scores[0] = -math.inf
        if tokens == 1:  # CLS alone: no B token to merge into (the official model would fail here)
            scores = torch.full((1, 1), -math.inf)
        best, partner = scores.max(dim=-1)
        merged = best > merge_at
        total, weight = x[0] * size[0], size[0]
        src, dst, src_size, dst_size = total[::2], total[1::2].clone(), weight[::2], weight[1::2].clone()
        src_imp, dst_imp = importance[::2], importance[1::2].clone()
        for a in merged.nonzero()[:, 0].tolist():
            dst[partner[a]] += src[a]
            dst_size[partner[a]] += src_size[a]
            dst_imp[partner[a]] = max(dst_imp[partner[a]], src_imp[a])
        total = torch.cat([src[~merged], dst])
        weight = torch.cat([src_size[~merged], dst_size])
        keep = torch.cat([src_imp[~merged], dst_imp]) > prune_at
        x, size = (total[keep] / weight[keep])[None], weight[keep][None]
        counts.append([tokens, x.shape[1]])
        x = backbone.mlp_residual(block, x)
    return backbone.head(method.vit, x)[0], counts


@pytest.mark.parametrize("params", [VARIED, dict(VARIED, threshold_scale=0.7), {}])
def test_batched_inference_matches_the_step_by_step_reference(params, images):
    method = build(**params)
    with torch.no_grad():
        out = method(images)
    for i in range(len(images)):
        logits, counts = reference(method, images[i:i + 1])
        torch.testing.assert_close(out.logits[i], logits, atol=1e-5, rtol=1e-5)
        assert out.token_counts[i].tolist() == counts
    if params:
        assert len({str(c) for c in out.token_counts.tolist()}) > 1  # the counts differ per image


def test_training_path_computes_what_inference_computes(images):
    method = build(**VARIED)
    with torch.no_grad():
        evaluated = method(images)
        trained = method.train()(images)
    torch.testing.assert_close(trained.logits, evaluated.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(trained.token_counts, evaluated.token_counts)
    assert torch.equal(trained.patch_depth, evaluated.patch_depth)
    torch.testing.assert_close(trained.state.keep, evaluated.state.keep)


def test_batch_invariant(images):
    assert_batch_invariant(build(**VARIED), images)


def test_counts_and_depths_by_hand(images):
    # threshold_scale 0: prune threshold 0 (every attention weight is > 0), merge threshold 1: the dense model
    dense = build(**VARIED, threshold_scale=0.0)
    with torch.no_grad():
        out = dense(images)
        plain = create_method("dense", make_tiny_vit(depth=12)).eval()(images)
    assert out.token_counts.eq(17).all() and out.patch_depth.eq(12).all()
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=1e-5)
    # prune threshold 1: a token's mean attention received is below 1, so block 0 keeps CLS alone
    pruned = build(prune_threshold=1.0, merge_threshold=1.0)
    with torch.no_grad():
        out = pruned(images)
    assert out.token_counts[:, 0].tolist() == [[17, 1]] * 4 and out.token_counts[:, 1:].eq(1).all()
    assert out.patch_depth.eq(1).all()
    # matching: ceil(17/2) * floor(17/2) * C in block 0, nothing on one token (C = 32)
    assert pruned.extra_macs(out.token_counts).tolist() == [9 * 8 * 32] * 4


def test_budget_loss_equals_the_formula_by_value():
    # n = 4 tokens, d = 2, masks 0.5 then 0.25: block 1 (2*4*4 + 16*2 + 4*.5*4*4) / (6*4*4 + 16*2) = 96/128,
    # block 2 (2*.5*4*4 + 2^2*2 + 4*.25*4*4) / 128 = 40/128; mean 0.53125
    ratio = budget_ratio(torch.tensor([0.5, 0.25]), tokens=4, dim=2)
    assert ratio.item() == pytest.approx(0.53125)
    method = build(depth=2, reduction_target=0.75, flops_weight=10.0)
    keep = torch.tensor([[0.5, 0.25], [0.5, 0.25]])
    out = type("Out", (), {"state": type("State", (), {"keep": keep})()})()
    n, d = 17, 32
    expected = sum((2 * b * n * d ** 2 + (b * n) ** 2 * d + 4 * k * n * d ** 2) / (6 * n * d ** 2 + n ** 2 * d)
                   for b, k in ((1.0, 0.5), (0.5, 0.25))) / 2
    assert method.loss_terms(out, None)["flops"].item() == pytest.approx(10 * (expected - 0.75) ** 2, rel=1e-6)


def test_default_recipe_trains_the_thresholds_only(images):
    method = build(**VARIED).train()
    groups = method.param_groups(weight_decay=0.05)
    assert [(g["lr"], g["weight_decay"], g["momentum"], len(g["params"])) for g in groups] == \
        [(5e-3, 0.0, 0.0, 12), (5e-6, 0.0, 0.0, 12)]
    optimizer = create_optimizer_v2(groups, opt="sgd", lr=1.0)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    out = method(images)
    loss = F.cross_entropy(out.logits, torch.zeros(4, dtype=torch.long)) + sum(method.loss_terms(out, None).values())
    loss.backward()
    for key, param in method.named_parameters():
        assert (param.grad is not None) == ("thresholds" in key), key
    # (a block whose images are down to CLS has no edge to merge: its merge threshold may get exactly 0)
    assert any(p.grad.abs().sum() > 0 for p in method.merge_thresholds) and \
        any(p.grad.abs().sum() > 0 for p in method.prune_thresholds)
    optimizer.step()
    method.after_optimizer_step()
    after = method.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vit."))
    assert any(not torch.equal(before[k], after[k]) for k in before if "thresholds" in k)
    with torch.no_grad():
        method.merge_thresholds[0].fill_(1.7)
        method.prune_thresholds[0].fill_(-0.2)
    method.after_optimizer_step()  # the official clamp to [0, 1]
    assert method.merge_thresholds[0].item() == 1.0 and method.prune_thresholds[0].item() == 0.0
    both = create_method("ltmp", make_tiny_vit(depth=12), train_backbone=True)
    assert sum(len(g["params"]) for g in both.param_groups(0.05)) == len(list(both.parameters()))


def test_one_host_sync_per_compaction_check(images, monkeypatch):
    monkeypatch.setattr(ragged_attention, "SIZES_ON_HOST", ())  # the CUDA code path
    method = build(**VARIED)
    with torch.no_grad():
        out, counts = count_syncs(method, images)
    checks = int((out.token_counts[..., 0].sum(dim=0) > len(images)).sum())
    assert dict(counts) == {"tolist": checks}


# ------------------------------------------------------------------------------------ official checkpoints
def official_file(tmp_path, method, seed=0):
    """A checkpoint as the official ``tools/train.py`` (timm's CheckpointSaver) saves it: timm's keys at the top
    level plus ``blocks.{i}.merge_masker.threshold`` / ``prune_masker.threshold`` ``[1]``, random values."""
    generator = torch.Generator().manual_seed(seed)
    state = {key[len("vit."):]: torch.randn(value.shape, generator=generator) * 0.2
             for key, value in method.state_dict().items() if key.startswith("vit.")}
    for i in range(method.depth):
        state[f"blocks.{i}.merge_masker.threshold"] = torch.rand(1, generator=generator) * 0.4 + 0.5
        state[f"blocks.{i}.prune_masker.threshold"] = torch.rand(1, generator=generator) * 0.05
    path = tmp_path / "ltmp.pth.tar"
    torch.save({"epoch": 0, "arch": "ltmp_deit_small_patch16_224", "state_dict": state, "version": 2}, path)
    return path, state


def test_official_layout_loads_and_gives_our_layout_logits(tmp_path, images):
    through_official = build()
    path, state = official_file(tmp_path, through_official)
    load_checkpoint_file(through_official, "ltmp", str(path))
    ours = {}
    for key, value in state.items():
        parts = key.split(".")
        ours[f"{parts[2].split('_')[0]}_thresholds.{parts[1]}" if "masker" in key else f"vit.{key}"] = value
    through_ours = build()
    through_ours.load_state_dict(ours, strict=True)
    with torch.no_grad():
        assert torch.equal(through_official(images).logits, through_ours(images).logits)
        assert through_official(images).token_counts.min() < 17
    with pytest.raises(CheckpointError, match=r"official ltmp checkpoint.*method=tome.*valid: method=ltmp"):
        load_checkpoint_file(create_method("tome", make_tiny_vit(depth=12)), "tome", str(path))


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("params, needle", [
    (dict(merge_threshold=1.5), r"method.params.merge_threshold=1.5.*1\]"),
    (dict(prune_threshold=-0.1), r"method.params.prune_threshold=-0.1"),
    (dict(reduction_target=0.05), r"method.params.reduction_target=0.05 .*every token; valid: \(0.0"),
    (dict(threshold_scale=-1.0), r"method.params.threshold_scale=-1.0"),
])
def test_bad_input_is_refused_with_the_key_and_range(params, needle):
    with pytest.raises(ParamError, match=needle):
        create_method("ltmp", make_tiny_vit(depth=12), **params)


def test_a_checkpoint_with_thresholds_outside_their_range_is_refused():
    method = build()
    state = method.state_dict()
    state["prune_thresholds.3"] = torch.tensor([1.5])
    with pytest.raises(CheckpointError, match=r"prune_thresholds.3=\[1.5\] .*\[0, 1\]"):
        method.load_state_dict(state)


def test_mapping_round_trips_and_names_every_official_key(tmp_path):
    """Every official key (timm's backbone keys, ``blocks.{i}.{merge,prune}_masker.threshold``) maps to one of
    ours and back, and our state has no key the official file lacks."""
    from methods import official

    layout = official.layouts()["ltmp"]
    method = build()
    _, state = official_file(tmp_path, method)
    ours = official.to_ours(layout, state)
    assert ours.keys() == method.state_dict().keys()
    assert official.to_official(layout, ours).keys() == state.keys()
    assert all(torch.equal(official.to_official(layout, ours)[key], value) for key, value in state.items())
    assert ours["merge_thresholds.3"].item() == state["blocks.3.merge_masker.threshold"].item()


def test_the_official_files_ema_copy_is_not_the_one_loaded(tmp_path, images):
    """timm's CheckpointSaver (the official ``tools/train.py``) writes ``state_dict`` and, with EMA on,
    ``state_dict_ema``: the model weights (``state_dict``) are loaded."""
    method = build()
    path, state = official_file(tmp_path, method)
    content = torch.load(path, weights_only=False)
    content["state_dict_ema"] = {key: value + 0.05 for key, value in state.items()}
    torch.save(content, path)
    loaded, plain = build(), build()
    load_checkpoint_file(loaded, "ltmp", str(path))
    plain_path = tmp_path / "plain.pth.tar"
    torch.save({"state_dict": state}, plain_path)
    load_checkpoint_file(plain, "ltmp", str(plain_path))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in plain.state_dict().items())
    assert loaded.merge_thresholds[0].item() == state["blocks.0.merge_masker.threshold"].item()


def files_under(folder):
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("overrides, message", [
    pytest.param(["method.params.merge_threshold=1.5"], r"method\.params\.merge_threshold=1\.5.*1\]", id="above-1"),
    pytest.param(["method.params.prune_threshold=-0.1"], r"method\.params\.prune_threshold=-0\.1.*0", id="below-0"),
    pytest.param(["method.params.reduction_target=0.01"],
                 r"method\.params\.reduction_target=0\.01 .*remove every token; valid: \(0\.\d+, 1\]", id="no-token"),
    pytest.param(["method=tome", "model.checkpoint=LTMP"], r"official ltmp checkpoint.*valid: method=ltmp",
                 id="ltmp-file-as-tome"),
])
def test_bad_runs_are_refused_naming_the_key_with_nothing_written(tmp_path, overrides, message):
    """Issue 29's bad input through a run (``pipeline.run``): a clear error naming the key and the valid range,
    raised before anything is written."""
    from conftest import run_config
    from experiments import pipeline
    from methods.models import create_backbone

    source = tmp_path / "source"
    source.mkdir()
    ltmp = create_method("ltmp", create_backbone("deit_digits_patch4_32", num_classes=10))
    path, _ = official_file(source, ltmp)
    out = tmp_path / "out"
    overrides = [o.replace("LTMP", str(path)) for o in overrides]
    method = [] if any(o.startswith("method=") for o in overrides) else ["method=ltmp"]
    with pytest.raises(ValueError, match=message):
        pipeline.run(run_config(out, *method, "baseline.enabled=false", *overrides))
    assert not out.exists() or files_under(out) == set()
