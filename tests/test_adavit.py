"""A-ViT (``adavit``): halting rules by value, masked vs removal equivalence, batching, losses, config errors."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import make_tiny_vit
from methods import MethodOutput, create_method
from methods.adavit import GATE_DEFAULTS, AdaViT, AdaViTState, HaltingTrace


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# Hand example: per-token halting scores that stay constant over the blocks (channel 0 never changes).
HAND_SCORES = [0.5, 0.3, 0.995, 0.2, 0.7]  # CLS, then the four patches


def hand_model(**params):
    """Depth 3, five tokens, blocks that only add their fc2 bias: the residual stream is known exactly.

    Channel 0 of token k is logit(HAND_SCORES[k]) at every block (gate 1/0 makes h = sigmoid(x0)), and
    channel 1 counts the blocks a token has run, so the CLS mix is checkable by value.
    """
    vit = make_tiny_vit(depth=3, embed_dim=8, num_heads=2, patch_size=16)
    with torch.no_grad():
        for p in vit.parameters():
            p.zero_()
        for norm in [vit.norm] + [m for b in vit.blocks for m in (b.norm1, b.norm2)]:
            norm.weight.fill_(1.0)
        vit.head.weight.copy_(torch.arange(80, dtype=torch.float32).reshape(10, 8) / 40 - 1)
        for k, score in enumerate(HAND_SCORES):
            vit.pos_embed[0, k, 0] = logit(score)
        for block in vit.blocks:
            block.mlp.fc2.bias[1] = 1.0
    return create_method("adavit", vit, gate_scale=1.0, gate_center=0.0, **params)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hand_computed_halting(mode):
    model = hand_model()
    model.train(mode == "train")
    images = torch.zeros(1, 3, 32, 32)
    out = model(images)
    # Accumulation: CLS 0.5+0.5=1.0 > 0.99 at block 2; 0.3 and 0.2 never reach it before the forced block 3;
    # 0.995 halts at block 1; 0.7+0.7 at block 2.
    official_depth = [2, 3, 1, 3, 2]
    executed_depth = [2, 2, 1, 2, 2]  # the image stops when its CLS halts, at block 2
    assert out.state.halting_depth[0].tolist() == executed_depth
    assert out.patch_depth[0].tolist() == executed_depth[1:]
    assert out.token_counts[0].tolist() == [[5, 5], [4, 4], [0, 0]]
    assert model.alt_token_counts(images, out)["official"][0].tolist() == [[5, 5], [4, 4], [2, 2]]
    # CLS mix: 0.5 * x_1 + r * x_2 with r = 1 - 0.5; channel 1 holds the block number.
    cls_out = torch.zeros(8)
    cls_out[1] = 0.5 * 1 + 0.5 * 2
    assert torch.allclose(out.state.cls_output[0], cls_out, atol=1e-6)
    vit = model.vit
    assert torch.allclose(out.logits, vit.head(vit.norm(cls_out))[None], atol=1e-5)
    if mode == "train":
        assert out.state.trace.halting_depth_official[0].tolist() == official_depth
        remainders = [1 - 0.5, 1 - 0.3 - 0.3, 1.0, 1 - 0.2 - 0.2, 1 - 0.7]
        rho = torch.tensor([n + r for n, r in zip(official_depth, remainders)])  # 2.5 3.4 2.0 3.6 2.3
        assert torch.allclose(out.state.trace.rho[0], rho, atol=1e-5)
        terms = model.loss_terms(out, torch.zeros(1, dtype=torch.long))
        assert terms["ponder"].item() == pytest.approx(5e-4 * 13.8 / 5, rel=1e-5)


def mixed_model(attn_group=None, fused=True):
    """Random tiny model whose gate constants give CLS depths that differ between images."""
    vit = make_tiny_vit(depth=6, seed=0)
    with torch.no_grad():
        vit.cls_token[..., 0] = 0.0
    for block in vit.blocks:
        block.attn.fused_attn = fused
    return create_method("adavit", vit, gate_scale=3.0, gate_center=1.5, attn_group=attn_group).eval()


def mixed_images(count=6):
    torch.manual_seed(1)
    return torch.randn(count, 3, 32, 32) * 2


@pytest.mark.parametrize("attn_group, fused", [(1, True), (2, True), (0, True), (2, False)])
def test_removal_equals_masked_on_mixed_depths(attn_group, fused):
    model, images = mixed_model(attn_group, fused), mixed_images()
    with torch.no_grad():
        masked, removed = model.forward_masked(images), model(images)
    depth = masked.state.halting_depth
    official = masked.state.trace.halting_depth_official
    assert len(set(depth[:, 0].tolist())) > 1, "CLS depths should differ between images"
    assert len(set(depth.flatten().tolist())) >= 4, "token depths should be mixed"
    assert (official > depth).any(), "some tokens should outlive their CLS"
    assert (depth[:, 1:] < depth[:, :1]).any(), "some patches should halt before their CLS"
    assert torch.allclose(removed.logits, masked.logits, atol=1e-4)
    assert torch.equal(removed.state.halting_depth, depth)
    assert torch.equal(removed.patch_depth, masked.patch_depth)
    assert torch.equal(removed.token_counts, masked.token_counts)
    official_counts = model.alt_token_counts(images, removed)["official"]
    assert torch.equal(official_counts, model.alt_token_counts(images, masked)["official"])
    assert (removed.token_counts.sum(dim=(1, 2)) < official_counts.sum(dim=(1, 2))).any()


def test_batch_invariance():
    model, images = mixed_model(), mixed_images()
    with torch.no_grad():
        whole = model(images)
        order = torch.tensor([3, 0, 5, 1, 4, 2])
        permuted = model(images[order])
        alone = [model(images[i : i + 1]) for i in range(len(images))]
    assert torch.allclose(permuted.logits, whole.logits[order], atol=1e-5)
    assert torch.equal(permuted.state.halting_depth, whole.state.halting_depth[order])
    for i, out in enumerate(alone):
        assert torch.allclose(out.logits[0], whole.logits[i], atol=1e-5)
        assert torch.equal(out.state.halting_depth[0], whole.state.halting_depth[i])
        assert torch.equal(out.token_counts[0], whole.token_counts[i])


def test_all_tokens_halt_at_block_one_gives_no_nan():
    vit = make_tiny_vit(depth=4)
    model = create_method("adavit", vit, gate_scale=1.0, gate_center=-50.0)  # h ~ 1 everywhere
    images = mixed_images(3)
    model.train()
    out = model(images)
    assert (out.state.trace.halting_depth_official == 1).all()
    terms = model.loss_terms(out, torch.zeros(3, dtype=torch.long))
    loss = F.cross_entropy(out.logits, torch.zeros(3, dtype=torch.long)) + sum(terms.values())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        removed, masked = model(images), model.forward_masked(images)
    for o in (removed, masked):
        assert torch.isfinite(o.logits).all()
        assert o.token_counts[:, 0, 0].tolist() == [17] * 3 and (o.token_counts[:, 1:] == 0).all()
    assert torch.allclose(removed.logits, masked.logits, atol=1e-4)


def hand_distribution_output():
    """Two images, three tokens, four blocks; image 0 token 2 halts after block 2."""
    scores = torch.tensor([
        [[0.9, 0.1, 0.2], [0.9, 0.3, 0.6], [0.9, 0.5, 0.1], [0.9, 0.4, 0.3]],
        [[0.1, 0.2, 0.1], [0.3, 0.2, 0.2], [0.5, 0.4, 0.3], [0.7, 0.6, 0.5]],
    ])
    ran = torch.ones(2, 4, 3, dtype=torch.bool)
    ran[0, 2:, 2] = False
    rho = torch.tensor([[1.5, 4.25, 2.5], [3.0, 4.0, 3.5]])
    trace = HaltingTrace(rho, scores, ran, halting_depth_official=torch.zeros(2, 3, dtype=torch.long))
    state = AdaViTState(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 8), trace=trace)
    return MethodOutput(torch.zeros(2, 10), torch.zeros(2, 4, 2), torch.zeros(2, 2), state=state)


def test_loss_values_both_prior_modes():
    vit = make_tiny_vit(depth=4)
    out = hand_distribution_output()
    targets = torch.zeros(2, dtype=torch.long)
    ponder = 5e-4 * (1.5 + 4.25 + 2.5 + 3.0 + 4.0 + 3.5) / 6

    correct = create_method("adavit", vit, gate_scale=1.0, gate_center=0.0, target_depth=3.0, target_std=1.0)
    terms = correct.loss_terms(out, targets)
    # Patch tokens only, halted tokens count 0: block means over (0.1, 0.2, 0.2, 0.1), (0.3, 0.6, 0.2, 0.2),
    # (0.5, 0, 0.4, 0.3), (0.4, 0, 0.6, 0.5).
    observed = [0.6 / 4, 1.3 / 4, 1.2 / 4, 1.5 / 4]
    q = [v / sum(observed) for v in observed]
    gauss = [math.exp(-0.5 * (d - 3.0) ** 2) for d in (1, 2, 3, 4)]
    p = [v / sum(gauss) for v in gauss]
    kl = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))
    assert terms["ponder"].item() == pytest.approx(ponder, rel=1e-5)
    assert terms["prior"].item() == pytest.approx(1e-3 * kl, rel=1e-4)

    official = create_method("adavit", vit, gate_scale=1.0, gate_center=0.0, target_depth=3.0, target_std=1.0,
                             prior="official")
    terms = official.loss_terms(out, targets)
    # Image 0 dropped, all tokens incl. CLS: (0.1+0.2+0.1)/3, (0.3+0.2+0.2)/3, (0.5+0.4+0.3)/3, (0.7+0.6+0.5)/3.
    observed = [0.4, 0.7, 1.2, 1.8]
    q = [min(max(v / sum(observed), 0.01), 0.99) for v in observed]
    pdf = [math.exp(-0.5 * (i - 3.0) ** 2) / math.sqrt(2 * math.pi) for i in (0, 1, 2, 3)]
    p = [v * 0.98 / sum(pdf[:3]) for v in pdf]  # not normalised: the first 3 entries sum to 0.98
    kl = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)) / 4  # KL(target||obs), batchmean
    assert sum(p) > 1.5
    assert terms["ponder"].item() == pytest.approx(ponder, rel=1e-5)
    assert terms["prior"].item() == pytest.approx(1e-3 * max(kl, 0.0), rel=1e-4)
    assert kl > 0


def test_plain_deit_weights_load_without_new_parameters():
    vit = make_tiny_vit(depth=4)
    plain = make_tiny_vit(depth=4, seed=3).state_dict()
    model = create_method("adavit", vit, gate_scale=10.0, gate_center=30.0)
    assert set(model.state_dict()) == {f"vit.{k}" for k in plain}
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in plain.values())
    model.vit.load_state_dict(plain, strict=True)
    model.load_state_dict({f"vit.{k}": v for k, v in plain.items()}, strict=True)
    assert torch.equal(model.vit.pos_embed, plain["pos_embed"])


def test_gate_defaults_by_architecture():
    embedded = timm.create_model("deit_digits_patch4_32", num_classes=10)
    model = create_method("adavit", embedded)
    assert (model.gate_scale, model.gate_center) == GATE_DEFAULTS["deit_digits_patch4_32"]
    tiny = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=16)
    assert (create_method("adavit", tiny).gate_center, create_method("adavit", tiny, gate_center=5.0).gate_center) \
        == (30.0, 5.0)
    with pytest.raises(ValueError, match=r"method\.params\.gate_scale=null.*set method\.params\.gate_scale"):
        create_method("adavit", make_tiny_vit())


@pytest.mark.parametrize("key, value, valid", [
    ("target_depth", 13.0, "[1, 4] (the model's depth)"), ("target_depth", 4.5, "[1, 4] (the model's depth)"),
])
def test_bad_configs_name_the_key(key, value, valid):
    """Against the model's depth; the signature's ranges are tests/test_method_params.py's."""
    params = {"gate_scale": 10.0, "gate_center": 30.0, key: value}
    with pytest.raises(ValueError) as error:
        create_method("adavit", make_tiny_vit(depth=4), **params)
    message = str(error.value)
    assert f"method.params.{key}={value!r}" in message and valid in message


def test_gradients_reach_every_block_and_the_halting_score():
    model = create_method("adavit", make_tiny_vit(depth=4, seed=0), gate_scale=3.0, gate_center=1.5).train()
    scores = []
    score_fn = model.halting_score

    def spy(x, block):
        h = score_fn(x, block)
        h.retain_grad()
        scores.append(h)
        return h

    model.halting_score = spy
    images, targets = mixed_images(4), torch.arange(4)
    out = model(images)
    depth = out.state.trace.halting_depth_official
    assert len(set(depth.flatten().tolist())) >= 3
    terms = model.loss_terms(out, targets)
    (F.cross_entropy(out.logits, targets) + terms["ponder"] + terms["prior"]).backward()
    for index, block in enumerate(model.vit.blocks):
        for name, p in block.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for blocks.{index}.{name}"
    assert len(scores) == 4 and all(h.grad is not None and h.grad.abs().sum() > 0 for h in scores)

    # The ponder cost alone depends on the weights only through the halting scores.
    model.zero_grad()
    scores.clear()
    out = model(images)
    model.loss_terms(out, targets)["ponder"].backward()
    assert all(h.grad.abs().sum() > 0 for h in scores[:-1])  # the last block's score is forced to 1
    assert all(p.grad.abs().sum() > 0 for p in model.vit.blocks[0].parameters())


def test_inference_gate_shift_trades_compute_after_training_only():
    """The post-training knob: raising the gate centre at inference makes tokens halt later (values computed
    once on this fixed model and checked by value); the training path ignores the shift."""
    vit = make_tiny_vit(depth=6)
    torch.manual_seed(3)
    images = torch.randn(8, 3, 32, 32)
    method = create_method("adavit", vit, gate_scale=1.0, gate_center=0.0).eval()
    mean_tokens, mean_depth = [], []
    for shift in (0.0, 1.0, 2.0, 3.0):
        method.inference_gate_shift = shift
        with torch.no_grad():
            out = method(images)
        mean_tokens.append(out.token_counts.double().mean().item())
        mean_depth.append(out.patch_depth.double().mean().item())
    assert mean_tokens == pytest.approx([5.666667, 10.291667, 16.25, 16.979167], abs=1e-5)
    assert mean_depth == pytest.approx([2.0, 3.609375, 5.71875, 5.9921875])
    x = torch.randn(2, 17, 32)
    method.train()
    method.inference_gate_shift = 0.0
    unshifted = method.halting_score(x, 0)
    method.inference_gate_shift = 3.0
    torch.testing.assert_close(method.halting_score(x, 0), unshifted)


def test_halting_head_starts_as_channel0_then_learns():
    """``halting=head``: one Linear(C, 1) per block, initialised to read channel 0, so a fresh model gives the
    channel-0 model's logits and depths exactly (both paths); its parameters train and are checkpointed."""
    images = mixed_images(4)
    channel0 = create_method("adavit", make_tiny_vit(depth=4, seed=0), gate_scale=3.0, gate_center=1.5)
    head = create_method("adavit", make_tiny_vit(depth=4, seed=0), gate_scale=3.0, gate_center=1.5,
                         halting="head")
    extra = {k for k in head.state_dict() if not k.startswith("vit.")}
    assert extra == {f"halting_heads.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    assert sum(p.numel() for p in head.parameters()) - sum(p.numel() for p in channel0.parameters()) == 4 * 33
    for mode in ("train", "eval"):
        a, b = getattr(channel0, mode)()(images), getattr(head, mode)()(images)
        torch.testing.assert_close(b.logits, a.logits)
        assert torch.equal(b.state.halting_depth, a.state.halting_depth)
    assert len(set(a.state.halting_depth.flatten().tolist())) >= 3  # the check above sees mixed depths

    head.train()
    out = head(images)
    terms = head.loss_terms(out, torch.arange(4))
    (F.cross_entropy(out.logits, torch.arange(4)) + terms["ponder"]).backward()
    assert all(h.weight.grad.abs().sum() > 0 for h in head.halting_heads[:-1])  # the last score is forced
    with torch.no_grad():  # a head that reads channel 1 instead halts differently
        for h in head.halting_heads:
            h.weight.zero_()
            h.weight[0, 1] = 1.0
    assert not torch.equal(head.eval()(images).state.halting_depth, a.state.halting_depth)
    with pytest.raises(RuntimeError, match="halting_heads"):
        channel0.load_state_dict(head.state_dict())
    counts = torch.tensor([[[17, 17], [9, 9], [4, 4], [1, 1]]])  # a head costs C = 32 MACs per token and block
    assert head.extra_macs(counts).item() == 32 * (17 + 9 + 4 + 1) and channel0.extra_macs(counts).item() == 0


def test_record_info_holds_the_prior_target_of_each_mode():
    """By value, depth 4, target N(3, 1): ``correct`` is the normalised Gaussian over 1-based blocks 1..4;
    ``official`` the pdf at 0-based indices 0..3, scaled so that its first int(3) entries sum to 0.98."""
    gauss = [math.exp(-0.5 * (d - 3.0) ** 2) for d in (1, 2, 3, 4)]
    correct = [g / sum(gauss) for g in gauss]
    pdf = [math.exp(-0.5 * (i - 3.0) ** 2) / math.sqrt(2 * math.pi) for i in (0, 1, 2, 3)]
    official = [p * 0.98 / sum(pdf[:3]) for p in pdf]
    for mode, expected in (("correct", correct), ("official", official)):
        method = create_method("adavit", make_tiny_vit(depth=4), gate_scale=1.0, gate_center=0.0,
                               target_depth=3.0, target_std=1.0, prior=mode)
        info = method.record_info()
        assert set(info) == {"prior_target"} and info["prior_target"] == pytest.approx(expected, rel=1e-12)
    assert sum(correct) == pytest.approx(1.0) and sum(official) > 1.5  # the official target is not normalised


def test_eval_output_does_not_hold_the_batch_and_its_official_counts_come_from_the_hook():
    """No forward runs when the output is read, and the output keeps no reference to the images: the official
    counts of an eval output are the hook's explicit job, from the images it is given again."""
    import gc
    import weakref

    model, images = mixed_model(), mixed_images()
    with torch.no_grad():
        expected = model.alt_token_counts(images, model.forward_masked(images))["official"]
        probe = images.clone()
        alive = weakref.ref(probe)
        out = model(probe)
    del probe
    gc.collect()
    assert alive() is None
    assert out.state.rerun.any() and out.state.official_counts is None
    calls = []
    model.forward_masked = lambda batch: calls.append(len(batch)) or AdaViT.forward_masked(model, batch)
    assert torch.equal(model.alt_token_counts(images, out)["official"], expected)
    assert calls == [int(out.state.rerun.sum())]  # one masked pass, over the images cut short only


def test_evaluation_reports_the_official_counts_of_every_image():
    """``engine.evaluate`` asks the hook batch by batch: its ``alt_token_counts`` equal the masked path's
    official counts on the whole set, and exceed the executed counts where an image stopped early."""
    from experiments.train import engine

    model, images = mixed_model(), mixed_images()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(6, dtype=torch.long)),
                                         batch_size=4)
    result = engine.evaluate(model, loader, torch.device("cpu"), progress=False)
    with torch.no_grad():
        official = model.forward_masked(images).state.official_counts
    assert set(result.alt_token_counts) == {"official"}
    assert torch.equal(result.alt_token_counts["official"], official)
    assert (result.alt_token_counts["official"].sum(dim=(1, 2)) > result.token_counts.sum(dim=(1, 2))).any()
