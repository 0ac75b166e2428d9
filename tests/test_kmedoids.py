"""kmedoids: the medoids of hand-built points under both update rules, the attention weights it reads, counts and
depths on DeiT-S, extra MACs by hand, bad input. Batch invariance and train = eval: tests/test_method_contract.py."""
from __future__ import annotations

import pytest
import torch

from methods import backbone, create_method
from methods.kmedoids import kmedoids

# Six 1-D points, two groups; weights w. D_ij = |x_i - x_j|, row sums S_i = sum_j D_ij:
#   x = 0, 1, 2, 10, 11, 30  ->  S = 54, 50, 48, 48, 50, 126;  w = 1, 5, 1, 1, 4, 2.
POINTS = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0, 30.0])[None, :, None]
WEIGHTS = torch.tensor([[1.0, 5.0, 1.0, 1.0, 4.0, 2.0]])


def test_official_update_sums_over_all_tokens():
    # Start: the two largest weights, tokens 1 (x=1) and 4 (x=11). Assignment: {0, 1, 2} -> token 1,
    # {3, 4, 5} -> token 4 (30 is 19 from 11, 29 from 1). Official cost w_i * S_i = 54, 250, 48, 48, 200, 252:
    # cluster {0, 1, 2} -> token 2 (48), cluster {3, 4, 5} -> token 3 (48). Reassigning to x = 2 and x = 10 gives
    # the same clusters, so rounds 2 and 3 change nothing.
    assert kmedoids(POINTS, WEIGHTS, k=2, iterations=3).tolist() == [[2, 3]]
    assert kmedoids(POINTS, WEIGHTS, k=2, iterations=1).tolist() == [[2, 3]]


def test_member_update_sums_over_the_cluster():
    # Member cost w_i * sum_{j in cluster} D_ij: {0,1,2}: 1*3, 5*2, 1*3 -> tie, the first (token 0);
    # {3,4,5}: 1*21, 4*20, 2*39 -> token 3. Reassigning to x = 0 and x = 10 keeps the clusters.
    assert kmedoids(POINTS, WEIGHTS, k=2, iterations=3, medoid_cost="members").tolist() == [[0, 3]]


def test_an_empty_cluster_keeps_its_medoid():
    points = torch.tensor([0.0, 0.0, 5.0])[None, :, None]  # tokens 0 and 1 are the same point
    weights = torch.tensor([[3.0, 2.0, 1.0]])
    # Start at tokens 0 and 1; every token is nearest to token 0 first (ties: the first medoid), so cluster 2
    # is empty and keeps token 1; cluster 1 = {0, 1, 2}, costs 3*5, 2*5, 1*10 -> token 1 (10 vs 10: the first).
    assert kmedoids(points, weights, k=2, iterations=1).tolist() == [[1, 1]]


def previous_block_weights(vit, images, location):
    """Column sums of the attention of block ``location - 1`` over heads and queries, for the patch keys."""
    x = backbone.embed(vit, images)
    for block in vit.blocks[:location - 1]:
        x = backbone.mlp_residual(block, backbone.attn_residual(block, x)[0])
    block = vit.blocks[location - 1]
    heads = backbone.project_qkv(block.attn, block.norm1(x))
    probs = ((heads.q * block.attn.scale) @ heads.k.transpose(-2, -1)).softmax(dim=-1)
    return probs.sum(dim=(1, 2))[:, 1:], x


def test_medoids_come_from_the_previous_blocks_attention(tiny_vit, images):
    method = create_method("kmedoids", tiny_vit, keep_rate=0.5, locations=[2]).eval()
    with torch.no_grad():
        out = method(images)
        weights, x = previous_block_weights(tiny_vit, images, 2)
        block = tiny_vit.blocks[1]
        x = backbone.mlp_residual(block, backbone.attn_residual(block, x)[0])  # the input of block 2
        medoids = kmedoids(x[:, 1:], weights, k=8, iterations=3)
    expected = torch.full((4, 16), 2).scatter(1, medoids, 4)  # non-medoids seen by blocks 0 and 1 only
    assert torch.equal(out.patch_depth, expected)
    assert out.token_counts[0].tolist() == [[17, 17], [17, 17], [9, 9], [9, 9]]


def test_deit_small_counts_and_depths(deit_small):
    with torch.no_grad():
        out = create_method("kmedoids", deit_small).eval()(torch.randn(1, 3, 224, 224))
    # int(196 * 0.7) = 137, int(196 * 0.49) = 96, int(196 * 0.343) = 67 patches, from the start of 3, 6, 9
    expected = [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    assert out.token_counts[0, :, 0].tolist() == expected and out.token_counts[0, :, 1].tolist() == expected
    assert torch.bincount(out.patch_depth[0], minlength=13)[[3, 6, 9, 12]].tolist() == [59, 41, 29, 67]


def test_extra_macs_by_hand(tiny_vit, images):
    # Stages at blocks 1 and 2 on 16 patches, rate 0.5: 16 -> 8 -> 4 patches, width 32.
    for cost, expected in (("all_tokens", 16 ** 2 * 32 + 8 ** 2 * 32),  # distances only: 10240
                           ("members", 10240 + 3 * (16 ** 2 * 8 + 8 ** 2 * 4))):  # + member sums: 17152
        method = create_method("kmedoids", tiny_vit, keep_rate=0.5, locations=[1, 2], medoid_cost=cost).eval()
        with torch.no_grad():
            counts = method(images).token_counts
        assert method.extra_macs(counts).tolist() == [expected] * 4


@pytest.mark.parametrize("params,needle", [
    ({"keep_rate": 0.2, "locations": [1, 2, 3]}, r"keep_rate=0\.2 leaves fewer than 1 .*\[0\.3969, 1\]"),
    ({"locations": [0, 2]}, r"locations=\[0, 2\]: \[0\] outside the valid block range \[1, 3\]"),
    ({"patch_counts": [8, 9, 4]}, r"patch_counts=\[8, 9, 4\] is not 3 non-increasing integers in \[1, 16\]"),
])
def test_bad_input_is_refused_with_the_key_and_range(tiny_vit, params, needle):
    with pytest.raises(ValueError, match=needle):
        create_method("kmedoids", tiny_vit, **{"locations": [1, 2, 3], **params})
