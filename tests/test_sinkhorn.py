"""sinkhorn: the transport plan's marginals, the official 3 rounds against a step-by-step reference and a case by
hand, the stage's wiring (cosine scores, sum of normalised tokens), the in-place re-normalisation of the centres
(also under inference mode, repeatable), depths, counts on DeiT-S, extra MACs by hand,
gradients and parameter groups, bad input (directly and through the harness). Batch invariance and train = eval:
tests/test_method_contract.py."""
from __future__ import annotations

import math

import pytest
import torch

from experiments.config import ConfigError
from methods import backbone, create_method
from methods.sinkhorn import sinkhorn_plan
from conftest import assert_own_modules_at_full_lr
from test_schema import assert_refused_at_startup, no_data  # noqa: F401  (no_data is a fixture)


def reference_plan(scores, iterations, epsilon, balanced=False):
    """The official formulas, one number at a time in plain Python: ``scores`` is N rows (tokens) of K values
    (centres); returns the plan as K rows of N values. ``balanced``: row marginals ``N / K`` times the official
    ones, so that both marginals total ``N / (K + N)``."""
    n, k = len(scores), len(scores[0])
    z = [[scores[j][i] / epsilon for j in range(n)] for i in range(k)]  # Z = scores^T / eps, K x N
    log_mu = log_nu = -math.log(k + n)
    if balanced:
        log_mu += math.log(n / k)
    u, v = [0.0] * k, [0.0] * n

    def lse(values):
        top = max(values)
        return top + math.log(sum(math.exp(x - top) for x in values))

    for _ in range(iterations):
        u = [log_mu - lse([z[i][j] + v[j] for j in range(n)]) for i in range(k)]
        v = [log_nu - lse([z[i][j] + u[i] for i in range(k)]) for j in range(n)]
    return [[math.exp(z[i][j] + u[i] + v[j] + math.log(k + n)) for j in range(n)] for i in range(k)]


SCORES = [[0.5, -0.2], [0.1, 0.9], [-0.3, 0.4]]  # 3 tokens x 2 centres (cosines)


@pytest.mark.parametrize("epsilon", [1.0, 0.5])
def test_official_three_rounds_match_the_step_by_step_reference(epsilon):
    plan = sinkhorn_plan(torch.tensor([SCORES]), iterations=3, epsilon=epsilon)
    assert plan.shape == (1, 2, 3)
    torch.testing.assert_close(plan[0], torch.tensor(reference_plan(SCORES, 3, epsilon)), atol=1e-6, rtol=1e-5)
    # after 3 rounds the columns already sum to 1 (the last step is v's), the rows not yet to N / K = 1.5
    torch.testing.assert_close(plan[0].sum(0), torch.ones(3))
    assert (plan[0].sum(1) - 1.5).abs().max() > 1e-4  # 1.5002 and 1.4998 at epsilon 1


def test_the_inconsistent_marginals_change_nothing():
    # Official mu totals K / (K + N), nu N / (K + N). Scaling mu by N / K shifts every u by log(N / K), which
    # the next v step takes back (v is shifted by -log(N / K)), so each round's plan is the same.
    for iterations in (1, 3):
        plan = sinkhorn_plan(torch.tensor([SCORES]), iterations=iterations, epsilon=1.0)
        balanced = reference_plan(SCORES, iterations, 1.0, balanced=True)
        torch.testing.assert_close(plan[0], torch.tensor(balanced), atol=1e-6, rtol=1e-5)


def test_constant_scores_give_the_uniform_plan_by_hand():
    # Z = c everywhere, K = 2, N = 4, L = log(6). Round 1: u = -L - (c + log 4); v = -L - (c + u + log 2)
    # = log(4 / 2). P = exp(c + u + v + L) = exp(-log 4 + log 2) = 1/2 = 1 / K, a fixed point: every round gives it.
    for iterations in (1, 3):
        plan = sinkhorn_plan(torch.full((1, 4, 2), 0.3), iterations=iterations, epsilon=1.0)
        torch.testing.assert_close(plan, torch.full((1, 2, 4), 0.5))


def test_many_rounds_reach_the_marginals_the_code_really_has():
    # mu: K entries, nu: N entries, all 1 / (K + N). Their totals differ unless K = N, so the plan (times K + N)
    # converges to columns of 1 (exact after each v step) and rows of N / K, the balanced split.
    torch.manual_seed(0)
    scores = torch.rand(2, 6, 3) * 2 - 1  # N = 6 tokens, K = 3 centres
    plan = sinkhorn_plan(scores, iterations=200, epsilon=1.0)
    torch.testing.assert_close(plan.sum(dim=1), torch.ones(2, 6), atol=1e-4, rtol=0)
    torch.testing.assert_close(plan.sum(dim=2), torch.full((2, 3), 2.0), atol=1e-4, rtol=0)
    square = sinkhorn_plan(torch.rand(2, 4, 4) * 2 - 1, iterations=200, epsilon=0.5)  # K = N: both are 1
    torch.testing.assert_close(square.sum(dim=1), torch.ones(2, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(square.sum(dim=2), torch.ones(2, 4), atol=1e-4, rtol=0)


def block_input(vit, images, location):
    x = backbone.embed(vit, images)
    for block in vit.blocks[:location]:
        x = backbone.mlp_residual(block, backbone.attn_residual(block, x)[0])
    return x


def test_a_stage_mixes_normalised_tokens_by_the_plan_of_cosine_scores(tiny_vit, images):
    method = create_method("sinkhorn", tiny_vit, keep_rate=0.5, locations=[2], iterations=3).eval()
    centres = method.reducers[0].centres
    assert centres.shape == (8, 32) and (centres.norm(dim=-1) - 1).abs().max() > 0.5  # randn, not yet unit
    with torch.no_grad():
        unit_centres = centres / centres.norm(dim=-1, keepdim=True)
        out = method(images)
        assert torch.allclose(centres.norm(dim=-1), torch.ones(8), atol=1e-6)  # re-normalised in place
        torch.testing.assert_close(centres, unit_centres)
        patches = block_input(tiny_vit, images, 2)[:, 1:]
        unit = patches / patches.norm(dim=-1, keepdim=True)
        cosine = unit @ unit_centres.t()  # [B, N, K]
        expected = sinkhorn_plan(cosine, 3, 1.0) @ unit
        reduced = method.reduce(0, patches, None)
    torch.testing.assert_close(reduced.tokens, expected)
    assert reduced.identity is None
    assert out.patch_depth.eq(2).all()  # mixtures: every patch leaves at the stage in block 2
    assert out.token_counts[0].tolist() == [[17, 17], [17, 17], [9, 9], [9, 9]]


def test_centres_stepped_off_the_sphere_are_put_back_and_evaluation_repeats(tiny_vit, images):
    method = create_method("sinkhorn", tiny_vit, keep_rate=0.5, locations=[1, 3]).eval()
    with torch.inference_mode():
        first = method(images)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    with torch.inference_mode():
        again = method(images)
    assert torch.equal(again.logits, first.logits)  # a normalised model's forward is a pure function
    assert all(torch.equal(state[k], v) for k, v in method.state_dict().items())  # and edits nothing
    with torch.no_grad():
        method.reducers[1].centres.mul_(3.0)  # an optimizer step that left the sphere (norm 3)
    with torch.no_grad():
        stepped = method(images)
    torch.testing.assert_close(method.reducers[1].centres.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(stepped.logits, first.logits)  # only the direction counts


def test_deit_small_counts_and_depths(deit_small):
    method = create_method("sinkhorn", deit_small).eval()
    assert [tuple(r.centres.shape) for r in method.reducers] == [(137, 384), (96, 384), (67, 384)]
    with torch.no_grad():
        out = method(torch.randn(1, 3, 224, 224))
    # int(196 * 0.7) = 137, int(196 * 0.49) = 96, int(196 * 0.343) = 67 patches, from the start of 3, 6, 9
    expected = [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    assert out.token_counts[0, :, 0].tolist() == expected and out.token_counts[0, :, 1].tolist() == expected
    assert out.patch_depth.eq(3).all()  # mixtures from the first stage on: every patch leaves at block 3


def test_extra_macs_by_hand(tiny_vit, images):
    # Stages at blocks 1 and 2 on 16 patches, rate 0.5: 16 -> 8 -> 4, width 32. Scores and output, K * N * C
    # each: 2 * (8 * 16 * 32 + 4 * 8 * 32) = 10240, whatever the rounds (log-sum-exps are not counted).
    for iterations in (1, 5):
        method = create_method("sinkhorn", tiny_vit, keep_rate=0.5, locations=[1, 2], iterations=iterations)
        with torch.no_grad():
            counts = method.eval()(images).token_counts
        assert method.extra_macs(counts).tolist() == [10240] * 4


def test_gradients_reach_the_centres(tiny_vit, images):
    method = create_method("sinkhorn", tiny_vit, keep_rate=0.5, locations=[1, 2]).train()
    method(images).logits.pow(2).sum().backward()
    for stage in method.reducers:
        assert stage.centres.grad is not None and stage.centres.grad.abs().sum() > 0
    assert tiny_vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_param_groups_put_the_centres_at_full_lr(tiny_vit, scale):
    method = create_method("sinkhorn", tiny_vit, locations=[1, 2], backbone_lr_scale=scale)
    groups, own = assert_own_modules_at_full_lr(method, scale, 2)
    # the centres are 2-D, so they decay, as timm's grouping does for every matrix
    assert {g["weight_decay"] for g in groups if id(g["params"][0]) in own} == {0.05}




@pytest.mark.parametrize("override,needle", [
    ("method.params.iterations=0", r"method\.params\.iterations=0 must be in \[1, 100\]"),
    ("method.params.epsilon=0", r"method\.params\.epsilon=0 must be in \[1e-12, 1e\+12\]"),
])
def test_bad_input_through_the_harness_writes_nothing(tmp_path, no_data, override, needle):  # noqa: F811
    assert_refused_at_startup(tmp_path, ["method=sinkhorn", override], ConfigError, needle)
