"""ToMe: matching and size-weighted merging, CLS protection, r clamping, counts on DeiT-S, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods import backbone, create_method, method_spec, resolved_params
from methods.tokens import (BipartiteMatch, bipartite_soft_matching, clamp_merge_count, merge_index,
                            merge_wavg)
from conftest import make_tiny_vit



def tome_reference(vit, image, schedule, prop_attn=True):
    """ToMe for one image with Python lists and loops (keeps ToMe's order: unmerged A, then B)."""
    x = backbone.embed(vit, image[None])[0]
    size = torch.ones(x.shape[0])
    for index, block in enumerate(vit.blocks):
        bias = size.log()[None, None, None, :] if prop_attn else None
        y, heads = backbone.attn_residual(block, x[None], lambda attn, h: backbone.softmax_attention(attn, h, bias))
        y, keys = y[0], F.normalize(heads.k[0].mean(dim=0), dim=-1)
        count = y.shape[0]
        r = min(schedule[index], (count - 1) // 2)
        if r > 0:
            a_set, b_set = list(range(0, count, 2)), list(range(1, count, 2))
            best = {}
            for i in a_set[1:]:  # position 0 is CLS: never merged
                sims = [(keys[i] @ keys[j]).item() for j in b_set]
                top = max(range(len(b_set)), key=lambda t: sims[t])
                best[i] = (sims[top], b_set[top])
            merged = sorted(best, key=lambda i: -best[i][0])[:r]
            total = {j: size[j] * y[j] for j in range(count)}
            mass = {j: size[j].clone() for j in range(count)}
            for i in merged:
                total[best[i][1]] = total[best[i][1]] + size[i] * y[i]
                mass[best[i][1]] = mass[best[i][1]] + size[i]
            order = [i for i in a_set if i not in merged] + b_set
            y = torch.stack([total[j] / mass[j] for j in order])
            size = torch.stack([mass[j] for j in order])
        x = backbone.mlp_residual(block, y[None])[0]
    return backbone.head(vit, x[None])[0]


def random_match(batch=2, tokens=9, r=3, seed=0):
    torch.manual_seed(seed)
    return bipartite_soft_matching(torch.randn(batch, tokens, 4), r)


def test_merging_identical_tokens_keeps_them_and_adds_sizes():
    match = random_match()
    x = torch.randn(2, 1, 6).expand(-1, 9, -1)
    size = torch.rand(2, 9, 1) + 0.5
    merged, new_size = merge_wavg(x, size, match)
    assert merged.shape == (2, 6, 6)
    torch.testing.assert_close(merged, x[:, :6])
    torch.testing.assert_close(new_size.sum(dim=1), size.sum(dim=1))


def test_merge_preserves_size_weighted_mean():
    match = random_match()
    x, size = torch.randn(2, 9, 6), torch.rand(2, 9, 1) + 0.5
    merged, new_size = merge_wavg(x, size, match)
    mean = lambda t, s: (t * s).sum(dim=1) / s.sum(dim=1)  # noqa: E731
    torch.testing.assert_close(mean(merged, new_size), mean(x, size))
    # Only merged B tokens change; an unmerged token is copied as it is.
    untouched = [j for j in range(4) if j not in match.dst[0, :, 0].tolist()]
    torch.testing.assert_close(merged[0, 2 + torch.tensor(untouched)], x[0, 1 + 2 * torch.tensor(untouched)])


def test_cls_is_never_merged():
    metric = torch.randn(1, 9, 4)
    metric[:, 0] = metric[:, 1]  # CLS (in A) is identical to a B token: the best edge of all if unprotected
    match = bipartite_soft_matching(metric, clamp_merge_count(100, 9))
    assert match.src.shape == (1, 4, 1) and match.r == 4 and 0 not in match.src[0, :, 0].tolist()
    assert match.unmerged[0, 0] == 0  # CLS stays first
    unprotected = bipartite_soft_matching(metric, 4, protect_cls=False)
    assert 0 in unprotected.src[0, :, 0].tolist()  # the test would notice a missing protection


def test_merge_index_follows_the_tokens():
    match = BipartiteMatch(unmerged=torch.tensor([[[0], [2]]]), src=torch.tensor([[[1]]]), dst=torch.tensor([[[0]]]))
    surviving, removed = merge_index(torch.tensor([[10, 11, 12, 13, 14]])[..., None], match)
    assert surviving[..., 0].tolist() == [[10, 14, 11, 13]] and removed[..., 0].tolist() == [[12]]


def test_matching_has_no_gradient():
    metric = torch.randn(1, 9, 4, requires_grad=True)
    match = bipartite_soft_matching(metric, 3)
    assert not match.src.requires_grad and not match.dst.requires_grad


@pytest.mark.parametrize("prop_attn", [True, False])
def test_matches_reference(tiny_vit, images, prop_attn):
    method = create_method("tome", tiny_vit, r=[3, 2, 4], prop_attn=prop_attn).eval()
    with torch.no_grad():
        out = method(images)
        expected = torch.stack([tome_reference(tiny_vit, image, [3, 2, 4, 0], prop_attn) for image in images])
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert out.token_counts[0].tolist() == [[17, 14], [14, 12], [12, 8], [8, 8]]
    assert torch.bincount(out.patch_depth[0], minlength=5).tolist() == [0, 3, 2, 4, 7]
    assert out.state.size.sum(dim=1).tolist() == [17.0] * 4 and (out.state.size[:, 0] == 1).all()


def test_r_is_clamped(tiny_vit, images):
    with torch.no_grad():
        out = create_method("tome", tiny_vit, r=100).eval()(images)
    assert out.token_counts[0].tolist() == [[17, 9], [9, 5], [5, 3], [3, 2]]
    assert (out.state.size[:, 0] == 1).all()  # CLS kept to itself


def test_deit_small_counts(deit_small):
    def counts(**params):
        with torch.no_grad():
            out = create_method("tome", deit_small, **params).eval()(torch.randn(1, 3, 224, 224))
        return out.token_counts[0, :, 0].tolist(), out.token_counts[0, :, 1].tolist(), out.patch_depth[0]

    attn, mlp, depth = counts()  # default r = 13
    assert attn == [197 - 13 * i for i in range(12)] and mlp == [184 - 13 * i for i in range(12)]
    attn, mlp, depth = counts(r=8)
    assert attn == [197, 189, 181, 173, 165, 157, 149, 141, 133, 125, 117, 109] and mlp[-1] == 101
    assert torch.bincount(depth, minlength=13).tolist() == [0] + [8] * 11 + [108]
    attn, mlp, _ = counts(r=60)  # clamped from block 2 on: (N - 1) // 2
    assert attn == [197, 137, 77, 39, 20, 11, 6, 4, 3, 2, 2, 2]
    assert mlp == [137, 77, 39, 20, 11, 6, 4, 3, 2, 2, 2, 2]


def test_extra_macs_count_matching_in_merging_blocks(tiny_vit, images):
    method = create_method("tome", tiny_vit, r=[3, 0, 4]).eval()
    with torch.no_grad():
        out = method(images)
    assert out.token_counts[0].tolist() == [[17, 14], [14, 14], [14, 10], [10, 10]]
    expected = (9 * 8 + 7 * 7) * 32  # |A| * |B| * C in blocks 0 and 2
    assert method.extra_macs(out.token_counts).tolist() == [expected] * 4


def test_r_can_be_swept_at_inference(tiny_vit, images):
    method = create_method("tome", tiny_vit, r=0).eval()
    method.r = 2
    with torch.no_grad():
        assert method(images).token_counts[0, :, 1].tolist() == [15, 13, 11, 9]


@pytest.mark.parametrize("r, fragment", [
    ([1, 1, 1, 1, 1], "5 entries but the model has 4 blocks"),
])
def test_bad_r(tiny_vit, r, fragment):
    with pytest.raises(ValueError) as error:
        create_method("tome", tiny_vit, r=r)
    message = str(error.value)
    assert "method.params.r" in message and fragment in message and "at most 4" in message


def test_registered_defaults_build_the_default_method():
    """What the harness builds by default: the registered defaults (no fine-tuning for this method)."""
    assert method_spec("tome").finetune is False
    method = create_method("tome", make_tiny_vit(depth=12), **resolved_params("tome", {}))
    assert method.r == [13] * 12 and method.prop_attn is True
