"""EViT: fusion, handling of the fused token at later stages, counts on DeiT-S, bad input.
Batch invariance and gradients: tests/test_method_contract.py."""
from __future__ import annotations

import math

import pytest
import torch

from methods import backbone, create_method, method_spec, resolved_params
from methods.tokens import fuse_tokens
from conftest import make_tiny_vit



def evit_reference(vit, image, keep_rate, locations, fuse):
    """EViT for one image written with Python lists: every non-CLS token, fused ones included, competes."""
    x = backbone.embed(vit, image[None])[0]
    for index, block in enumerate(vit.blocks):
        y, heads = backbone.attn_residual(block, x[None])
        y, weight = y[0], backbone.cls_attention(block.attn, heads)[0]
        if index in locations:
            others = y.shape[0] - 1
            keep = math.ceil(keep_rate * others)
            ranked = sorted(range(1, others + 1), key=lambda j: -weight[j].item())
            kept, dropped = ranked[:keep], ranked[keep:]
            rows = [y[0]] + [y[j] for j in kept]
            if fuse and dropped:
                rows.append(sum(weight[j] * y[j] for j in dropped))
            y = torch.stack(rows)
        x = backbone.mlp_residual(block, y[None])[0]
    return backbone.head(vit, x[None])[0]


@torch.no_grad()
def deit_counts(vit, **params):
    out = create_method("evit", vit, **params).eval()(torch.randn(1, 3, 224, 224))
    return out.token_counts[0, :, 0].tolist(), out.token_counts[0, :, 1].tolist(), out.patch_depth[0]


def test_fuse_tokens_is_the_weighted_sum():
    tokens, weights = torch.randn(2, 5, 3), torch.rand(2, 5)
    expected = torch.stack([sum(weights[b, i] * tokens[b, i] for i in range(5)) for b in range(2)])[:, None]
    torch.testing.assert_close(fuse_tokens(tokens, weights), expected)


def test_fused_token_equals_attention_weighted_sum_of_dropped_tokens(tiny_vit):
    method = create_method("evit", tiny_vit, keep_rate=0.6, locations=[1], fuse=True).eval()
    torch.manual_seed(2)
    x = torch.randn(3, 17, 32)
    ids = (torch.arange(17) - 1).remainder(17).expand(3, -1)  # patch ids; CLS -> 16 (no patch)
    cls_attn = torch.rand(3, 17)  # deliberately not summing to 1: the weights must be used as they are
    out, new_ids, dropped = method._prune(x, cls_attn, ids[:, 1:], ids[:, :1], keep=10)  # non-CLS ids, CLS's
    assert out.shape == (3, 12, 32) and dropped.shape == (3, 6) and new_ids.shape == (3, 11)
    assert new_ids[:, -1].tolist() == [16] * 3  # the fused token stands for no patch
    for b in range(3):
        ranked = sorted(range(1, 17), key=lambda j: -cls_attn[b, j].item())
        expected = sum(cls_attn[b, j] * x[b, j] for j in ranked[10:])
        torch.testing.assert_close(out[b, -1], expected)
        torch.testing.assert_close(out[b, 1:11], x[b, ranked[:10]])
        assert sorted(dropped[b].tolist()) == sorted(j - 1 for j in ranked[10:])  # original patch ids


@pytest.mark.parametrize("fuse", [True, False])
def test_matches_reference_including_fused_token_at_later_stages(tiny_vit, images, fuse):
    method = create_method("evit", tiny_vit, keep_rate=0.6, locations=[1, 2], fuse=fuse).eval()
    with torch.no_grad():
        out = method(images)
        expected = torch.stack([evit_reference(tiny_vit, image, 0.6, [1, 2], fuse) for image in images])
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    # 16 patches -> keep 10 (+ fused) -> keep ceil(0.6 * 11) = 7 of 11 with the fused token, 6 of 10 without.
    mlp = [17, 12, 9, 9] if fuse else [17, 11, 7, 7]
    assert out.token_counts[:, :, 1].tolist() == [mlp] * 4
    assert out.token_counts[:, :, 0].tolist() == [[17] + mlp[:3]] * 4


def test_keep_rate_one_is_dense(tiny_vit, images):
    with torch.no_grad():
        out = create_method("evit", tiny_vit, keep_rate=1.0, locations=[1, 2]).eval()(images)
        dense = create_method("dense", tiny_vit).eval()(images)
    torch.testing.assert_close(out.logits, dense.logits)
    assert (out.token_counts == 17).all() and (out.patch_depth == 4).all()


def test_deit_small_counts(deit_small):
    attn, mlp, depth = deit_counts(deit_small)  # defaults: keep 0.7 at 3/6/9, fused
    assert attn == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2
    assert mlp == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3
    assert (depth == 4).sum() == 58 and set(depth.tolist()) <= {4, 7, 10, 12}
    attn, mlp, depth = deit_counts(deit_small, fuse=False)
    assert attn == [197] * 4 + [139] * 3 + [98] * 3 + [69] * 2
    assert mlp == [197] * 3 + [139] * 3 + [98] * 3 + [69] * 3
    assert torch.bincount(depth, minlength=13)[[4, 7, 10, 12]].tolist() == [58, 41, 29, 68]
    attn, mlp, _ = deit_counts(deit_small, keep_rate=0.5, locations=[2, 4])
    assert attn == [197] * 3 + [100] * 2 + [52] * 7
    assert mlp == [197] * 2 + [100] * 2 + [52] * 8


@pytest.mark.parametrize("params, key, fragment", [
    ({"locations": [2, 1]}, "method.params.locations", "strictly increasing"),
    ({"locations": [1, 4]}, "method.params.locations", "[0, 3]"),
])
def test_bad_input(tiny_vit, params, key, fragment):
    """Checks against the model (its depth); the signature's ranges are tests/test_method_params.py's."""
    with pytest.raises(ValueError) as error:
        create_method("evit", tiny_vit, **{"locations": [1, 2], **params})
    message = str(error.value)
    assert key in message and fragment in message and repr(next(iter(params.values()))) in message


def test_registered_defaults_build_the_default_method():
    """What the harness builds by default: the registered defaults (no fine-tuning for this method)."""
    assert method_spec("evit").finetune is False
    method = create_method("evit", make_tiny_vit(depth=12), **resolved_params("evit", {}))
    assert (method.keep_rate, method.locations, method.fuse) == (0.7, [3, 6, 9], True)
