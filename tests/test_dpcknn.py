"""dpcknn: density, distance to the denser and centres of hand-built points, the weighted merge, identities and
depths, keep rate 1 (every token its own cluster), counts on DeiT-S, extra MACs by hand,
gradients and parameter groups, the deterministic noise, bad input (directly and through the harness).
Batch invariance, repeatability and train = eval: tests/test_method_contract.py."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from experiments.config import ConfigError
from methods import backbone, create_method
from methods.dpcknn import dpc_knn_centres, merge_clusters
from conftest import assert_own_modules_at_full_lr, make_tiny_vit
from test_schema import assert_refused_at_startup, no_data  # noqa: F401  (no_data is a fixture)

# Five 1-D points, C = 1 (so D = |x_i - x_j| / sqrt(1)), k_neighbors = 2 (the point itself and its nearest):
#   x = 0, 1, 3, 10, 11
#   nearest distances: 0 -> (0, 1), 1 -> (0, 1), 3 -> (0, 2), 10 -> (0, 1), 11 -> (0, 1)
#   mean of squares:   0.5,         0.5,         2.0,         0.5,          0.5
#   rho = exp(-.):     e^-.5,       e^-.5,       e^-2,        e^-.5,        e^-.5
# Noise (given by hand, to break the ties) 1e-3, 2e-3, 0, 0, 3e-3: density order 11 > 1 > 0 > 10 > 3.
#   delta: x=11 is the densest -> max D = 11; x=1: denser {11} -> 10; x=0: denser {11, 1} -> min(11, 1) = 1;
#          x=10: denser {11, 1, 0} -> min(1, 9, 10) = 1; x=3: all denser -> min(3, 2, 7, 8) = 2.
#   rho * delta: 6.705, 6.085, 0.6075, 0.6065, 0.2707 for x = 11, 1, 0, 10, 3.
POINTS = torch.tensor([0.0, 1.0, 3.0, 10.0, 11.0])[None, :, None]
NOISE = torch.tensor([1e-3, 2e-3, 0.0, 0.0, 3e-3])
E5, E2 = math.exp(-0.5), math.exp(-2.0)


def test_density_and_distance_to_the_denser_by_hand():
    clusters = dpc_knn_centres(POINTS, k=2, k_neighbors=2, noise=NOISE)
    torch.testing.assert_close(clusters.density[0], torch.tensor([E5 + 1e-3, E5 + 2e-3, E2, E5, E5 + 3e-3]))
    torch.testing.assert_close(clusters.delta[0], torch.tensor([1.0, 10.0, 2.0, 1.0, 11.0]))
    # Centres: the two largest rho * delta, x = 11 (position 4) then x = 1 (position 1). Nearest centre:
    # 0 -> x=1 (1 vs 11), 3 -> x=1 (2 vs 8), 10 -> x=11 (1 vs 9); the centres join themselves.
    assert clusters.centres.tolist() == [[4, 1]]
    assert clusters.assignment.tolist() == [[1, 1, 1, 0, 0]]
    # A third centre: x = 0 (0.6075 > 0.6065 of x = 10); x = 3 stays with x = 1 (2 vs 3 to x = 0, 8 to x = 11).
    three = dpc_knn_centres(POINTS, k=3, k_neighbors=2, noise=NOISE)
    assert three.centres.tolist() == [[4, 1, 0]] and three.assignment.tolist() == [[2, 1, 1, 0, 0]]


def test_distances_are_scaled_by_the_root_of_the_width():
    # The points (x, x) in 2-D are sqrt(2) |x_i - x_j| apart; divided by sqrt(C = 2) that is the 1-D geometry.
    flat = dpc_knn_centres(POINTS, k=2, k_neighbors=2, noise=NOISE)
    plane = dpc_knn_centres(POINTS.expand(-1, -1, 2), k=2, k_neighbors=2, noise=NOISE)
    torch.testing.assert_close(plane.density, flat.density)
    torch.testing.assert_close(plane.delta, flat.delta)
    assert torch.equal(plane.centres, flat.centres) and torch.equal(plane.assignment, flat.assignment)


def test_the_densest_token_gets_the_largest_distance_of_the_whole_matrix():
    # x = 0, 4, 5, 6, 20, k_neighbors = 2: mean squares 16/2, 1/2, 1/2, 1/2, 196/2; noise makes x = 5 the
    # densest, then x = 4. x = 5's own farthest point is 15 away, but its delta is max D = 20 (0 to 20).
    # delta of the rest: x=4 -> 1 (x=5); x=6 -> min(1, 2) = 1; x=0 -> min(4, 5, 6) = 4; x=20 -> 14 (x=6).
    points = torch.tensor([0.0, 4.0, 5.0, 6.0, 20.0])[None, :, None]
    clusters = dpc_knn_centres(points, k=2, k_neighbors=2, noise=torch.tensor([0.0, 5e-4, 1e-3, 0.0, 0.0]))
    torch.testing.assert_close(clusters.delta[0], torch.tensor([4.0, 1.0, 20.0, 1.0, 14.0]))
    # rho * delta: e^-8 * 4 = 0.0013, 0.6070, 12.15, 0.6065, ~4e-42 -> centres x = 5, then x = 4 (its noise).
    assert clusters.centres.tolist() == [[2, 1]]


def test_every_centre_joins_itself_even_behind_its_twin():
    # x = 0, 0, 5 and k = P = 3: all are centres. Tokens 0 and 1 are 0 apart, so the nearest-centre rule alone
    # would send both to whichever twin comes first among the centres and leave the other's cluster empty.
    points = torch.tensor([0.0, 0.0, 5.0])[None, :, None]
    clusters = dpc_knn_centres(points, k=3, k_neighbors=1, noise=torch.tensor([0.0, 1e-3, 0.0]))
    centres, assignment = clusters.centres[0], clusters.assignment[0]
    assert sorted(centres.tolist()) == [0, 1, 2]
    assert centres[assignment].tolist() == [0, 1, 2]  # each token is the centre of its own cluster


def test_merge_is_the_weighted_mean_of_each_cluster():
    weights = torch.tensor([[1.0, 2.0, 1.0, 1.0, 3.0]])
    merged = merge_clusters(POINTS, torch.tensor([[1, 1, 1, 0, 0]]), weights, k=2)
    # cluster 0 = {10, 11} with weights 1, 3: (10 + 33) / (4 + 1e-6); cluster 1 = {0, 1, 3}, 1, 2, 1: 5 / (4 + 1e-6)
    torch.testing.assert_close(merged, torch.tensor([[[43 / (4 + 1e-6)], [5 / (4 + 1e-6)]]]))
    # the 1e-6 in the denominator: a lone token of weight 1e-6 comes out as 10 * 1e-6 / (1e-6 + 1e-6) = 5
    tiny = merge_clusters(POINTS, torch.tensor([[1, 1, 1, 0, 1]]), torch.tensor([[1.0, 1.0, 1.0, 1e-6, 1.0]]), k=2)
    torch.testing.assert_close(tiny[0, 0], torch.tensor([5.0]))


def block_input(vit, images, location):
    x = backbone.embed(vit, images)
    for block in vit.blocks[:location]:
        x = backbone.mlp_residual(block, backbone.attn_residual(block, x)[0])
    return x


def test_a_stage_merges_with_exp_score_weights_and_centres_keep_their_depth(tiny_vit, images):
    method = create_method("dpcknn", tiny_vit, keep_rate=0.5, locations=[2]).eval()
    head = method.reducers[0]
    with torch.no_grad():
        head.weight.normal_(std=0.3)  # weights far from 1, so the weighting shows
        head.bias.fill_(0.2)
        out = method(images)
        patches = block_input(tiny_vit, images, 2)[:, 1:]
        clusters = dpc_knn_centres(patches, k=8, k_neighbors=5, noise=method.noise[0, :16])
        weights = (patches @ head.weight[0] + 0.2).exp()  # omega = exp(score(x)), computed independently
        one_hot = nn.functional.one_hot(clusters.assignment, 8).float()  # [B, P, K]
        expected = (one_hot * weights[:, :, None]).transpose(1, 2) @ patches / (
            (one_hot * weights[:, :, None]).sum(dim=1)[:, :, None] + 1e-6)
        reduced = method.reduce(0, patches, None)
    torch.testing.assert_close(reduced.tokens, expected)
    assert torch.equal(reduced.identity, clusters.centres)
    assert weights.std() > 0.1  # the weights are not all alike
    # centres go on (all 4 blocks); the other patches were seen by blocks 0 and 1 only
    assert torch.equal(out.patch_depth, torch.full((4, 16), 2).scatter(1, clusters.centres, 4))
    assert out.token_counts[0].tolist() == [[17, 17], [17, 17], [9, 9], [9, 9]]


def test_equal_weight_merges_the_plain_mean_and_learns_nothing(tiny_vit, images):
    method = create_method("dpcknn", tiny_vit, keep_rate=0.5, locations=[2], equal_weight=True).eval()
    assert len(method.reducers) == 0 and not any(n.startswith("reducers") for n, _ in method.named_parameters())
    with torch.no_grad():
        patches = block_input(tiny_vit, images, 2)[:, 1:]
        clusters = dpc_knn_centres(patches, k=8, k_neighbors=5, noise=method.noise[0, :16])
        reduced = method.reduce(0, patches, None)
    sizes = torch.bincount(clusters.assignment[0], minlength=8).float()
    members = clusters.assignment[0] == 3
    torch.testing.assert_close(reduced.tokens[0, 3], patches[0, members].sum(0) / (sizes[3] + 1e-6))


def test_keep_rate_one_makes_every_token_its_own_cluster(tiny_vit, images):
    method = create_method("dpcknn", tiny_vit, keep_rate=1.0, locations=[1, 2, 3]).eval()
    with torch.no_grad():
        out = method(images)
        dense = tiny_vit(images)
    # K = P: each token is a centre and its own cluster, x * w / (w + 1e-6), permuted (attention does not see
    # the order): the dense result up to ~1e-6 relative, and every patch stays to the end.
    torch.testing.assert_close(out.logits, dense, atol=1e-4, rtol=1e-4)
    assert out.patch_depth.eq(4).all()
    assert out.token_counts[0].tolist() == [[17, 17]] * 4


def test_deit_small_counts_and_depths(deit_small):
    with torch.no_grad():
        out = create_method("dpcknn", deit_small).eval()(torch.randn(1, 3, 224, 224))
    # int(196 * 0.7) = 137, int(196 * 0.49) = 96, int(196 * 0.343) = 67 patches, from the start of 3, 6, 9
    expected = [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    assert out.token_counts[0, :, 0].tolist() == expected and out.token_counts[0, :, 1].tolist() == expected
    # 196 - 137 = 59 non-centres leave at 3, 137 - 96 = 41 at 6, 96 - 67 = 29 at 9; 67 centres stay to 12
    assert torch.bincount(out.patch_depth[0], minlength=13)[[3, 6, 9, 12]].tolist() == [59, 41, 29, 67]


def test_the_noise_is_fixed_small_and_not_checkpointed(tiny_vit):
    first = create_method("dpcknn", tiny_vit, locations=[1, 2])
    second = create_method("dpcknn", make_tiny_vit(seed=5), keep_rate=0.4, locations=[1, 2])
    assert first.noise.shape == (2, 16) and torch.equal(first.noise, second.noise)  # seeded, not global RNG
    assert 0 <= first.noise.min() and first.noise.max() < 1e-6 and first.noise.std() > 0
    assert "noise" not in first.state_dict()
    # the knob: a checkpoint at one keep rate loads strictly into another (the score heads do not change shape)
    second.load_state_dict(first.state_dict(), strict=True)


def test_extra_macs_by_hand(tiny_vit, images):
    # Stages at blocks 1 and 2 on 16 patches, rate 0.5: 16 -> 8 -> 4 patches, width 32.
    # distances 16^2 * 32 + 8^2 * 32 = 10240; score head and merge 16 * 32 each, then 8 * 32 each.
    for equal_weight, expected in ((False, 10240 + 2 * (16 * 32 + 8 * 32)),  # 11776
                                   (True, 10240 + 16 * 32 + 8 * 32)):  # 11008: no score head
        method = create_method("dpcknn", tiny_vit, keep_rate=0.5, locations=[1, 2], equal_weight=equal_weight)
        with torch.no_grad():
            counts = method.eval()(images).token_counts
        assert method.extra_macs(counts).tolist() == [expected] * 4


def test_gradients_reach_the_score_heads(tiny_vit, images):
    method = create_method("dpcknn", tiny_vit, keep_rate=0.5, locations=[1, 2]).train()
    method(images).logits.pow(2).sum().backward()
    for head in method.reducers:
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
        assert head.bias.grad is not None and head.bias.grad.abs() > 0


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_param_groups_put_the_score_heads_at_full_lr(tiny_vit, scale):
    method = create_method("dpcknn", tiny_vit, locations=[1, 2], backbone_lr_scale=scale)
    assert_own_modules_at_full_lr(method, scale, 4)  # two heads, weight and bias each


@pytest.mark.parametrize("params,needle", [
    # locations 1, 2, rate 0.5 on 16 patches: 16 and 8 tokens enter the stages
    ({"k_neighbors": 9}, r"k_neighbors=9 is not an integer in \[1, 8\] .*\[16, 8\]"),
    ({"locations": [1, 4]}, r"locations=\[1, 4\]: \[4\] outside the valid block range \[0, 3\]"),
    ({"patch_counts": [8, 9]}, r"patch_counts=\[8, 9\] is not 2 non-increasing integers in \[1, 16\]"),
])
def test_bad_input_is_refused_with_the_key_and_range(tiny_vit, params, needle):
    with pytest.raises(ValueError, match=r"method\.params\." + needle):
        create_method("dpcknn", tiny_vit, **{"keep_rate": 0.5, "locations": [1, 2], **params})
    create_method("dpcknn", tiny_vit, keep_rate=0.5, locations=[1, 2], k_neighbors=8)  # the bound itself is fine


def test_bad_k_neighbors_through_the_harness_writes_nothing(tmp_path, no_data):  # noqa: F811
    # the harness's model: 64 patches, rate 0.7 at 3/6/9 -> 64, 44, 31 enter the stages
    assert_refused_at_startup(tmp_path, ["method=dpcknn", "method.params.k_neighbors=999"], ConfigError,
                              r"method\.params\.k_neighbors=999 is not an integer in \[1, 31\]")
