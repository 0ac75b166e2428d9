"""ATS: the sampler on hand-built scores, training (masked) = inference (ragged), batch invariance, counts by hand
on a tiny model, FLOPs, bad input."""
from __future__ import annotations

import pytest
import torch

from methods import backbone, create_method
from methods.ats import inverse_transform_sample, parse_budget
from conftest import assert_batch_invariant, make_tiny_vit


def test_sampler_on_scores_worked_out_by_hand():
    # Scores 1,2,3,4 (sum 10): sorted CDF 0.1,0.3,0.6,1.0 -> min-max 0, 2/9, 5/9, 1; c0 = 2/9.
    # Four points on [2/9, 1]: 2/9, 13/27, 20/27, 1 -> nearest 2/9, 5/9 (|13/27-5/9| = 2/27 < 7/27), 5/9, 1.
    # Kept: the tokens of score 2, 3, 4; the least significant one never is.
    scores = torch.tensor([[3.0, 1.0, 4.0, 2.0]])
    keep = inverse_transform_sample(scores, torch.ones_like(scores, dtype=torch.bool), samples=4)
    assert keep.tolist() == [[True, False, True, True]]
    # Two points: 2/9 and 1 -> only the tokens of scores 2 and 4.
    keep = inverse_transform_sample(scores, torch.ones_like(scores, dtype=torch.bool), samples=2)
    assert keep.tolist() == [[False, False, True, True]]


def test_sampler_dominant_token_collapses_samples():
    # One dominant score: sorted CDF 0.01, 0.02, 0.03, 1 -> min-max 0, 1/99, 2/99, 1; c0 = 1/99. Ten points
    # y_s = 1/99 + (98/99) s/9: s = 0 picks 1/99, s = 1..4 (0.12..0.45) are nearer 2/99 than 1, s >= 5 pick 1.
    scores = torch.tensor([[1.0, 1.0, 1.0, 97.0]])
    keep = inverse_transform_sample(scores, torch.ones_like(scores, dtype=torch.bool), samples=10)
    # Equal scores keep their positional order (stable sort): position 0 is the minimum (cbar 0), never sampled.
    assert keep.tolist() == [[False, True, True, True]]
    assert keep.sum() == 3


def test_sampler_ignores_absent_tokens_and_degenerate_rows():
    scores = torch.tensor([[3.0, 100.0, 1.0, 4.0, 2.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, False, True, True, True], [True, False, False, False, False]])
    keep = inverse_transform_sample(scores, valid, samples=4)
    assert keep.tolist() == [[True, False, False, True, True], [True, False, False, False, False]]


def test_sampler_with_hand_built_attention_and_values():
    """Significance = sum over heads of the CLS attention row x the value norm; then the sampler."""
    method = create_method("ats", make_tiny_vit(embed_dim=4, num_heads=2, img_size=16, patch_size=8, depth=4),
                           locations=[0])
    # 2 heads; CLS attention rows over CLS + 4 patches, and value vectors (2 per head, concatenated: C = 4).
    attn = torch.tensor([[[0.2, 0.1, 0.2, 0.3, 0.2], [0.2, 0.3, 0.2, 0.1, 0.2]]])  # [1, heads, N]
    values = torch.tensor([[[9.0, 0, 0, 0], [3.0, 4.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 2.0], [1.0, 0, 0, 0]]])
    scores = method._significance(attn.transpose(1, 2), values)[:, 1:]
    # sum_h A[0, j] = 0.4, 0.4, 0.4, 0.4 for j = 1..4; norms 5, 1, 2, 1 -> scores 2.0, 0.4, 0.8, 0.4
    torch.testing.assert_close(scores, torch.tensor([[2.0, 0.4, 0.8, 0.4]]))
    # sorted 0.4(j2), 0.4(j4), 0.8(j3), 2.0(j1): CDF /3.6 -> 1/9, 2/9, 4/9, 1 -> min-max 0, 1/8, 3/8, 1; c0 = 1/8.
    # 3 points: 1/8, 9/16, 1 -> nearest 1/8 (j4), 3/8 (|9/16-3/8| = 3/16 < 7/16: j3), 1 (j1).
    keep = inverse_transform_sample(scores, torch.ones_like(scores, dtype=torch.bool), samples=3)
    assert keep.tolist() == [[True, False, True, True]]


def peaked_vit():
    """The tiny test ViT with sharper attention (QKV weights x 6), so that significance is uneven and the
    per-image counts differ; at random init attention is nearly uniform and every image keeps the same."""
    vit = make_tiny_vit()
    with torch.no_grad():
        for block in vit.blocks:
            block.attn.qkv.weight.mul_(6.0)
    return vit


@pytest.mark.parametrize("params", [{}, {"locations": [1, 2, 3], "budget": 8}, {"locations": [0, 2], "budget": 0.6}])
def test_training_and_inference_paths_agree(params):
    method = create_method("ats", peaked_vit(), **params)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ragged = method.eval()(images)
        masked = method.train()(images)
    method.eval()
    torch.testing.assert_close(masked.logits, ragged.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(masked.token_counts, ragged.token_counts)
    assert torch.equal(masked.patch_depth, ragged.patch_depth)


def test_counts_vary_per_image_and_are_batch_invariant():
    method = create_method("ats", peaked_vit(), locations=[1, 2, 3]).eval()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = method(images)
    assert out.token_counts[:, :, 1].unique(dim=0).shape[0] > 1  # adaptive: not every image keeps the same
    assert_batch_invariant(method, images)


def reference_counts(vit, image, locations, samples):
    """One image written out step by step: per block, the tokens attention saw and the MLP ran on."""
    x = backbone.embed(vit, image[None])
    counts = []
    for index, block in enumerate(vit.blocks):
        heads = backbone.project_qkv(block.attn, block.norm1(x))
        y = x + block.ls1(backbone.project_out(block.attn, backbone.softmax_attention(block.attn, heads)))
        seen = x.shape[1]
        if index in locations:
            row = (torch.einsum("hd,hnd->hn", heads.q[0, :, 0], heads.k[0]) * block.attn.scale).softmax(-1)
            norms = heads.v[0].transpose(0, 1).reshape(seen, -1).norm(dim=-1)
            s = [(row[:, j].sum() * norms[j]).item() for j in range(1, seen)]
            total = sum(s)
            ranked = sorted(range(len(s)), key=lambda j: s[j])
            cdf, run = [], 0.0
            for j in ranked:
                run += s[j] / total
                cdf.append(run)
            cbar = [(c - cdf[0]) / (cdf[-1] - cdf[0]) for c in cdf]
            c0 = min(c for c in cbar if c > 0)
            picks = set()
            for t in range(samples):
                y_t = c0 + (1 - c0) * t / (samples - 1)
                picks.add(ranked[min(range(len(cbar)), key=lambda m: abs(y_t - cbar[m]))])
            y = torch.cat([y[:, :1], y[:, [1 + j for j in sorted(picks)]]], dim=1)
        counts.append((seen, y.shape[1]))
        x = backbone.mlp_residual(block, y)
    return counts


@pytest.mark.parametrize("budget,samples", [(None, 16), (8, 7)])
def test_counts_match_a_step_by_step_reference(budget, samples):
    vit = peaked_vit()
    method = create_method("ats", vit, locations=[1, 3], budget=budget).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = method(images)
        for i in range(3):
            assert out.token_counts[i].tolist() == [list(c) for c in reference_counts(vit, images[i], [1, 3],
                                                                                      samples)]


def test_patch_depth_and_extra_macs():
    method = create_method("ats", make_tiny_vit(), locations=[1, 3], budget=8).eval()
    with torch.no_grad():
        out = method(torch.randn(2, 3, 32, 32))
    counts = out.token_counts
    # A patch left at block 1 was seen by blocks 0 and 1: depth 2; patches kept at block 1 but dropped at 3 have 4.
    for b in range(2):
        assert (out.patch_depth[b] == 2).sum() == 17 - counts[b, 1, 1]
        assert (out.patch_depth[b] == 4).sum() == counts[b, 1, 1] - 1  # dropped at block 3, or kept to the end
    expected = 2 * 32 * (counts[:, 1, 0] + counts[:, 3, 0]).double()
    torch.testing.assert_close(method.extra_macs(counts), expected)


def test_default_budget_is_the_input_patches_and_one_equals_it():
    assert parse_budget(None, 197, 9) == [196] * 9
    assert parse_budget(1.0, 197, 9) == parse_budget(197, 197, 9)
    assert parse_budget([8, 0.5], 197, 2) == [7, 97]  # round(98.5) = 98 tokens (round half to even), 97 points


@pytest.mark.parametrize("params,needle", [
    ({"budget": 18}, "outside [8, 17]"),
    ({"budget": 0.3}, "K=5 tokens"),
    ({"budget": [8, 9, 10]}, "3 entries for 1 ATS locations"),
    ({"locations": [4]}, "outside the valid block range"),
    ({"locations": None}, "set method.params.locations"),
])
def test_bad_input_is_refused_with_the_key_and_range(params, needle):
    params = {"locations": [3], **params}
    with pytest.raises(ValueError, match="method.params") as info:
        create_method("ats", make_tiny_vit(depth=4 if params["locations"] is not None else 3), **params)
    assert needle in str(info.value)
