"""topk and random: which tokens they keep, counts (schedules and explicit lists), seeds, bad input."""
from __future__ import annotations

import pytest
import torch

from methods import backbone, create_method, method_spec, resolved_params
from conftest import make_tiny_vit



def run(name, vit, images, **params):
    with torch.no_grad():
        return create_method(name, vit, **params).eval()(images)


def test_topk_drops_the_lowest_cls_attention(tiny_vit, images):
    out = run("topk", tiny_vit, images, keep_rate=0.5, locations=[1])
    with torch.no_grad():
        x = backbone.embed(tiny_vit, images)
        x = backbone.mlp_residual(tiny_vit.blocks[0], backbone.attn_residual(tiny_vit.blocks[0], x)[0])
        heads = backbone.attn_residual(tiny_vit.blocks[1], x)[1]
        cls_attn = backbone.cls_attention(tiny_vit.blocks[1].attn, heads)[:, 1:]
    lowest = cls_attn.argsort(dim=1)[:, :8]
    expected = torch.full((4, 16), 4).scatter(1, lowest, 2)  # dropped inside block 1: seen by blocks 0 and 1
    assert torch.equal(out.patch_depth, expected)
    assert out.token_counts[0].tolist() == [[17, 17], [17, 9], [9, 9], [9, 9]]


def test_topk_with_evit_schedule_equals_evit_without_fusion(tiny_vit, images):
    params = dict(keep_rate=0.6, locations=[0, 2])
    topk = run("topk", tiny_vit, images, schedule="evit", **params)
    evit = run("evit", tiny_vit, images, fuse=False, **params)
    assert torch.equal(topk.logits, evit.logits)
    assert torch.equal(topk.token_counts, evit.token_counts) and torch.equal(topk.patch_depth, evit.patch_depth)


def test_explicit_counts_reproduce_the_schedule(tiny_vit, images):
    scheduled = run("topk", tiny_vit, images, keep_rate=0.7, locations=[1, 2])  # floor(16 * .7), floor(16 * .49)
    assert scheduled.token_counts[0, :, 0].tolist() == [17, 17, 12, 8]
    explicit = run("topk", tiny_vit, images, token_counts=[17, 17, 12, 8])
    assert torch.equal(explicit.logits, scheduled.logits)
    assert torch.equal(explicit.token_counts, scheduled.token_counts)
    short = run("topk", tiny_vit, images, token_counts=[17, 17, 12])  # padded with its last entry
    assert short.token_counts[0].tolist() == [[17, 17], [17, 12], [12, 12], [12, 12]]


def test_deit_small_counts(deit_small):
    image = torch.randn(1, 3, 224, 224)
    out = run("topk", deit_small, image)  # defaults: 0.7 at 3/6/9, DynamicViT's floor(196 * 0.7 ** s)
    assert out.token_counts[0, :, 0].tolist() == [197] * 4 + [138] * 3 + [97] * 3 + [68] * 2
    assert out.token_counts[0, :, 1].tolist() == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    assert torch.bincount(out.patch_depth[0], minlength=13)[[4, 7, 10, 12]].tolist() == [59, 41, 29, 67]
    out = run("topk", deit_small, image, schedule="evit")
    assert out.token_counts[0, :, 1].tolist() == [197] * 3 + [139] * 3 + [98] * 3 + [69] * 3
    counts = [197, 197, 197, 180, 160, 160, 140, 120, 120, 100]
    out = run("topk", deit_small, image, token_counts=counts)
    assert out.token_counts[0, :, 0].tolist() == counts + [100, 100]
    assert out.token_counts[0, :, 1].tolist() == counts[1:] + [100, 100, 100]
    random = run("random", deit_small, image)
    assert torch.equal(random.token_counts, run("topk", deit_small, image).token_counts)


def test_random_is_reproducible_and_seeded(tiny_vit, images):
    params = dict(keep_rate=0.5, locations=[1, 2])
    first, again = run("random", tiny_vit, images, **params), run("random", tiny_vit, images, **params)
    assert torch.equal(first.logits, again.logits) and torch.equal(first.patch_depth, again.patch_depth)
    other = run("random", tiny_vit, images, seed=1, **params)
    assert not torch.equal(first.patch_depth, other.patch_depth)
    topk = run("topk", tiny_vit, images, **params)
    assert torch.equal(first.token_counts, topk.token_counts)
    assert not torch.equal(first.patch_depth, topk.patch_depth)


def test_random_eval_subsets_repeat_and_train_subsets_vary(tiny_vit, images):
    method = create_method("random", tiny_vit, keep_rate=0.5, locations=[1]).eval()
    with torch.no_grad():
        assert torch.equal(method(images).patch_depth, method(images).patch_depth)
        method.train()
        first, second = method(images).patch_depth, method(images).patch_depth
    assert not torch.equal(first, second)  # the training generator runs on
    assert not all(torch.equal(first[0], row) for row in first[1:])  # each image draws its own subset


@pytest.mark.parametrize("params, key, fragment", [
    ({"locations": [1, 1]}, "method.params.locations", "strictly increasing"),
    ({"locations": [5]}, "method.params.locations", "[0, 3]"),
    ({"token_counts": [17, 17, 12, 8, 8]}, "method.params.token_counts", "5 entries but the model has 4 blocks"),
    ({"token_counts": [17, 12, 14]}, "method.params.token_counts", "increases at block(s) [2]"),
    ({"token_counts": [16, 12]}, "method.params.token_counts", "first equal to 17"),
    ({"keep_rate": 0.2}, "method.params.keep_rate", "removes every patch token: after 2 pruning stage(s), "
                                                    "floor(16 x 0.2^2) = 0; valid: a rate in [0.2500, 1]"),
])
def test_bad_input(tiny_vit, params, key, fragment):
    """Checks against the model (depth, tokens) and across parameters; the signature's ranges are
    tests/test_method_params.py's."""
    with pytest.raises(ValueError) as error:
        create_method("topk", tiny_vit, **{"locations": [1, 2], **params})
    message = str(error.value)
    value = next(iter(params.values()))
    assert key in message and fragment in message
    assert repr(value) in message or (isinstance(value, list) and str(len(value)) in message)


def test_the_smallest_valid_keep_rate_keeps_one_patch(tiny_vit, images):
    """floor(16 x 0.25^2) = 1 patch after the second stage; EViT's ceil schedule never reaches 0."""
    counts = create_method("topk", tiny_vit, keep_rate=0.25, locations=[1, 2]).eval()(images).token_counts
    assert counts[0, :, 1].tolist() == [17, 5, 2, 2]
    create_method("topk", tiny_vit, keep_rate=0.01, locations=[1, 2], schedule="evit")


@pytest.mark.parametrize("name", ["topk", "random"])
def test_registered_defaults_build_the_default_method(name):
    """What the harness builds by default: the registered defaults (no fine-tuning for these methods)."""
    assert method_spec(name).finetune is False
    method = create_method(name, make_tiny_vit(depth=12), **resolved_params(name, {}))
    assert (method.keep_rate, method.locations, method.schedule, method.token_counts) == (
        0.7, [3, 6, 9], "dynamicvit", None)
