"""heuristic: the official radius schedules worked out by hand (L1 and L-inf on DeiT-S's 14 x 14 grid, the
not-contiguous closest-count rule and its ties), physical removal equal to the official masked attention, depths,
the ignored keep rate, the min_radius fallback and start-0 quirks, the backbone's gradients, zero extra MACs,
parameter groups, bad input (directly and through the harness). Batch invariance, train = eval and registration:
tests/test_method_contract.py."""
from __future__ import annotations

import pytest
import torch

from experiments.config import ConfigError
from methods import create_method
from methods.heuristic import centre_distances
from conftest import make_tiny_vit
from test_schema import assert_refused_at_startup, no_data  # noqa: F401  (no_data is a fixture)

# DeiT-S, 14 x 14: coordinates linspace(-7, 7, 14), |c_i| = |i - 6.5| * 14/13, so an L1 distance is
# (a + b) * 14/13 with a, b in {0.5, 1.5, ..., 6.5}: s = a + b in 1..13, 4 * (pairs with that sum) patches each.
# Patches with s <= S: S = 1: 4, 2: 12, 3: 24, 4: 40, 5: 60, 6: 84, 7: 112, 8: 136, 9: 156, 10: 172, 11: 184.
# Contiguous, locations 3..9: radii linspace(14, 1, 9) = 14, 12.375, 10.75, 9.125, 7.5, 5.875, 4.25, 2.625, 1
# padded in front with 2 x 14: blocks 3..9 take 12.375 ... 2.625, i.e. s <= 11.49, 9.98, 8.47, 6.96, 5.45,
# 3.95, 2.44 (radius * 13/14): 184, 156, 136, 84, 60, 24, 12 patches.
L1_DEIT = [184, 156, 136, 84, 60, 24, 12]


def counts_per_block(out):
    assert torch.equal(out.token_counts[..., 0], out.token_counts[..., 1])  # attention and MLP alike
    return out.token_counts[0, :, 0].tolist()


def test_contiguous_l1_on_deit_small_is_the_official_schedule(deit_small):
    method = create_method("heuristic", deit_small).eval()
    assert method.locations == [3, 4, 5, 6, 7, 8, 9] and method.patch_counts == L1_DEIT
    assert method.radii == [12.375, 10.75, 9.125, 7.5, 5.875, 4.25, 2.625]
    with torch.no_grad():
        out = method(torch.randn(1, 3, 224, 224))
    assert counts_per_block(out) == [197] * 3 + [c + 1 for c in L1_DEIT] + [13] * 2  # 10, 11 keep block 9's
    # the patches leave where the count drops: 12 at block 3, 28 at 4, 20 at 5, 52, 24, 36, 12; 12 stay
    depth = out.patch_depth[0]
    assert torch.bincount(depth, minlength=13)[3:].tolist() == [12, 28, 20, 52, 24, 36, 12, 0, 0, 12]
    # the 12 left: a + b <= 2, i.e. the central 2 x 2 and the 8 patches beside it (rows/cols 5-8)
    centre = {(r, c) for r in range(14) for c in range(14) if abs(r - 6.5) + abs(c - 6.5) <= 2}
    assert {(int(i) // 14, int(i) % 14) for i in torch.nonzero(depth == 12).squeeze(1)} == centre


def test_contiguous_linf_on_deit_small_by_hand(deit_small):
    # L-inf = max(a, b) * 14/13 in {0.54, 1.62, 2.69, 3.77, 4.85, 5.92, 7}: squares of 4, 16, 36, 64, 100, 144, 196.
    # Radii linspace(7, 1, 9) entries 1..7 = 6.25, 5.5, 4.75, 4, 3.25, 2.5, 1.75 -> <= 5.92, 4.85, 3.77, 3.77,
    # 2.69, 1.62, 1.62.
    method = create_method("heuristic", deit_small, pattern="linf")
    assert method.radii == [6.25, 5.5, 4.75, 4.0, 3.25, 2.5, 1.75]
    assert method.patch_counts == [144, 100, 64, 64, 36, 16, 16]


def test_not_contiguous_takes_the_closest_count_at_the_locations(deit_small):
    # Targets int(196 * 0.7^(i+1)) = 137, 96, 67. In float32 some L1 rings of equal distance split in the last
    # bit (as in the official code), so the grid has 16 distinct distances instead of the 13 of exact arithmetic.
    z = centre_distances(14, "l1")
    within = [int((z <= d).sum()) for d in torch.unique(z)]
    assert within == [4, 12, 24, 40, 60, 68, 84, 92, 112, 136, 156, 164, 172, 184, 192, 196]
    # closest: 137 -> 136 (1 off), 96 -> 92 (4 off; 112 is 16 off), 67 -> 68 (1 off; 60 is 7 off)
    method = create_method("heuristic", deit_small, contiguous=False).eval()
    assert method.locations == [3, 6, 9] and method.patch_counts == [136, 92, 68]
    with torch.no_grad():
        out = method(torch.randn(1, 3, 224, 224))
    assert counts_per_block(out) == [197] * 3 + [137] * 3 + [93] * 3 + [69] * 3


def test_not_contiguous_ties_go_to_the_smaller_radius():
    # Embedded 8 x 8 grid: L1 rings hold 4, 12, 24, 40, 52, 60, 64 patches. Rate 0.5: targets 32, 16, 8.
    # 32 is 8 from both 24 and 40 -> 24; 16 -> 12 (4 off); 8 is 4 from both 4 and 12 -> 4.
    vit = make_tiny_vit(depth=12, img_size=32, patch_size=4)
    method = create_method("heuristic", vit, contiguous=False, keep_rate=0.5)
    assert method.patch_counts == [24, 12, 4]


def masked_reference(vit, images, masks):
    """The official mechanics: every token stays; from each block in ``masks`` on, attention is masked to the
    kept patches (and CLS) on both queries and keys with -finfo.max. Returns the logits."""
    x = vit._pos_embed(vit.patch_embed(images))
    mask = None
    for index, block in enumerate(vit.blocks):
        if index in masks:
            mask = torch.cat([torch.ones(1, dtype=torch.bool), masks[index]])
        h = block.norm1(x)
        batch, count, width = h.shape
        heads = block.attn.num_heads
        q, k, v = block.attn.qkv(h).reshape(batch, count, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        dots = (q @ k.transpose(-2, -1)) * block.attn.scale
        if mask is not None:
            dots = dots.masked_fill(~(mask[:, None] & mask[None, :]), -torch.finfo(dots.dtype).max)
        x = x + block.attn.proj((dots.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, count, width))
        x = x + block.mlp(block.norm2(x))
    return vit.forward_head(vit.norm(x))


# 4 x 4 grid: coordinates -2, -2/3, 2/3, 2; L1 distances 4/3 (centre 2 x 2), 8/3 (the 8 edge patches), 4 (corners).
CORNERS = torch.ones(16, dtype=torch.bool).index_fill(0, torch.tensor([0, 3, 12, 15]), False)
CENTRE = torch.zeros(16, dtype=torch.bool).index_fill(0, torch.tensor([5, 6, 9, 10]), True)


@pytest.mark.parametrize("depth,params,masks", [
    # locations 1, 2: radii linspace(4, 1, 4) entries 1, 2 = 3, 2 -> corners go at block 1, the edge at block 2
    (4, {"locations": [1, 2]}, {1: CORNERS, 2: CENTRE}),
    # defaults: linspace(4, 1, 9) entries 1..7 = 3.625, 3.25, 2.875 (no corners), 2.5, 2.125, 1.75, 1.375 (centre)
    (12, {}, {3: CORNERS, 4: CORNERS, 5: CORNERS, 6: CENTRE, 7: CENTRE, 8: CENTRE, 9: CENTRE}),
    # not contiguous, rate 0.75 at 1, 3: targets 12, 9 -> 12 (exact), 12 (3 off; 4 is 5 off)
    (4, {"contiguous": False, "keep_rate": 0.75, "locations": [1, 3]}, {1: CORNERS, 3: CORNERS}),
])
def test_physical_removal_equals_the_official_masked_attention(images, depth, params, masks):
    vit = make_tiny_vit(depth=depth)
    method = create_method("heuristic", vit, **params).eval()
    with torch.no_grad():
        out = method(images)
        reference = masked_reference(vit, images, masks)
    torch.testing.assert_close(out.logits, reference, atol=1e-5, rtol=1e-5)
    assert method.patch_counts == [int(masks[b].sum()) for b in method.locations]


def test_patch_depths_on_the_tiny_grid(tiny_vit, images):
    with torch.no_grad():
        out = create_method("heuristic", tiny_vit, locations=[1, 2]).eval()(images)
    # corners leave at block 1 (block 0 saw them), the edge ring at block 2, the centre stays for all 4 blocks
    expected = [[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]]
    assert out.patch_depth.tolist() == [sum(expected, [])] * 4
    assert counts_per_block(out) == [17, 13, 5, 5]


def test_contiguous_mode_ignores_the_keep_rate_and_not_contiguous_uses_it(tiny_vit, images):
    with torch.no_grad():
        low = create_method("heuristic", tiny_vit, keep_rate=0.3, locations=[1, 2]).eval()(images)
        high = create_method("heuristic", tiny_vit, keep_rate=0.9, locations=[1, 2]).eval()(images)
    assert torch.equal(low.logits, high.logits) and torch.equal(low.token_counts, high.token_counts)
    # not contiguous, locations 1, 2 on 16 patches: 0.9 -> targets 14, 12 -> 12, 12; 0.3 -> 4, 1 -> 4, 4
    assert create_method("heuristic", tiny_vit, contiguous=False, keep_rate=0.9, locations=[1, 2]).patch_counts \
        == [12, 12]
    assert create_method("heuristic", tiny_vit, contiguous=False, keep_rate=0.3, locations=[1, 2]).patch_counts \
        == [4, 4]


def test_min_radius_sets_the_end_of_the_schedule_and_zero_is_the_centre_patch(tiny_vit):
    # locations 1, 3: linspace(4, m, 5) entries 1..3. m = 1: 3.25, 2.5, 1.75 -> 12, 4, 4 patches;
    # m = 3: 3.75, 3.5, 3.25 -> 12, 12, 12.
    assert create_method("heuristic", tiny_vit, locations=[1, 3]).patch_counts == [12, 4, 4]
    assert create_method("heuristic", tiny_vit, locations=[1, 3], min_radius=3.0).patch_counts == [12, 12, 12]
    assert create_method("heuristic", tiny_vit, locations=[1, 3], min_radius=9.0).patch_counts == [16, 16, 16]
    # official fallback: 0 means the distance of patch [2, 2], 4/3: linspace(4, 4/3, 5) = 4, 10/3, 8/3, 2, 4/3.
    # Entry 2 equals the edge ring's distance 8/3, in float32 too: "<=" keeps the ring (12, not 4).
    zero = create_method("heuristic", tiny_vit, locations=[1, 3], min_radius=0.0)
    edge = float(centre_distances(4, "l1")[1])
    assert zero.radii == pytest.approx([10 / 3, 8 / 3, 2.0]) and zero.radii[1] == edge
    assert zero.patch_counts == [12, 12, 4]


def test_a_start_at_block_zero_has_no_front_padding(tiny_vit):
    # locations 0, 2: linspace(4, 1, 5) = 4, 3.25, 2.5, 1.75, 1 taken from entry 0: block 0 keeps all 16
    method = create_method("heuristic", tiny_vit, locations=[0, 2])
    assert method.locations == [0, 1, 2] and method.radii == [4.0, 3.25, 2.5]
    assert method.patch_counts == [16, 12, 4]


def test_the_backbone_learns_through_the_last_block(images):
    # batch invariance and train = eval: tests/test_method_contract.py
    vit = make_tiny_vit(depth=12)
    method = create_method("heuristic", vit, pattern="l2").train()
    trained = method(images)
    trained.logits.pow(2).sum().backward()
    assert vit.patch_embed.proj.weight.grad.abs().sum() > 0 and vit.blocks[11].mlp.fc2.weight.grad.abs().sum() > 0


def test_no_extra_macs_and_every_parameter_at_full_lr(tiny_vit, images):
    method = create_method("heuristic", tiny_vit, locations=[1, 2]).eval()
    with torch.no_grad():
        counts = method(images).token_counts
    assert method.extra_macs(counts).tolist() == [0.0] * 4  # a fixed gather, no matmul
    groups = method.param_groups(weight_decay=0.05)
    grouped = sorted(id(p) for g in groups for p in g["params"])
    assert grouped == sorted(id(p) for p in method.parameters()) and len(method.reducers) == 0
    assert {g["lr_scale"] for g in groups} == {1.0}
    assert set(method.state_dict()) == {f"vit.{k}" for k in tiny_vit.state_dict()}  # nothing of its own saved


@pytest.mark.parametrize("params,needle", [
    ({"locations": [2, 1]}, r"locations=\[2, 1\] must be strictly increasing"),
    ({"locations": [1, 4]}, r"locations=\[1, 4\]: \[4\] outside the valid block range \[0, 3\]"),
    # not contiguous: int(16 * 0.2^2) = 0 patches at stage 2
    ({"contiguous": False, "keep_rate": 0.2}, r"keep_rate=0\.2 leaves fewer than 1 patch token .*\[0\.2500, 1\]"),
    # locations 1, 3, m = 0.1: linspace(4, 0.1, 5) entry 3 = 1.075 < 4/3; the bound solves
    # 4 + 3 (m - 4) / 4 = 4/3: m = 4 - (8/3)(4/3) = 0.4444 -> 0.4445
    ({"locations": [1, 3], "min_radius": 0.1},
     r"min_radius=0\.1 leaves no patch token at block 3: its radius 1\.075 .*valid: 0 .* or a min_radius >= 0\.4445"),
])
def test_bad_input_is_refused_with_the_key_and_range(tiny_vit, params, needle):
    with pytest.raises(ValueError, match=r"method\.params\." + needle):
        create_method("heuristic", tiny_vit, **{"locations": [1, 2], **params})


def test_the_smallest_valid_min_radius_keeps_the_centre(tiny_vit):
    assert create_method("heuristic", tiny_vit, locations=[1, 3], min_radius=0.4445).patch_counts == [12, 4, 4]


def test_a_non_square_or_non_2d_grid_is_refused():
    with pytest.raises(ValueError, match=r"square 2-D patch grid.*4 x 6.*data\.img_size"):
        create_method("heuristic", make_tiny_vit(img_size=(32, 48)), locations=[1, 2])
    vit = make_tiny_vit()
    vit.patch_embed.grid_size = (2, 2, 4)  # as a 3-D (video) patch embedding would have it
    with pytest.raises(ValueError, match=r"square 2-D image grid.*3-D, 2 x 2 x 4 \(time x rows x columns\)"):
        create_method("heuristic", vit, locations=[1, 2])


def test_a_changed_input_size_is_refused(images):
    vit = make_tiny_vit(dynamic_img_size=True)
    method = create_method("heuristic", vit, locations=[1, 2]).eval()
    with pytest.raises(ValueError, match=r"built for 16 patches, but stage 0 got 36"):
        method(torch.randn(1, 3, 48, 48))


def test_bad_min_radius_through_the_harness_writes_nothing(tmp_path, no_data):  # noqa: F811
    # the harness's model: 8 x 8, L1 distances (a + b) * 8/7, a, b in {0.5, ..., 3.5}; blocks 3..9 with
    # m = 0.1: block 9 takes linspace(8, 0.1, 9) entry 7 = 1.0875 < 8/7; bound 8 - (48/7)(8/7) = 0.1633
    assert_refused_at_startup(tmp_path, ["method=heuristic", "method.params.min_radius=0.1"], ConfigError,
                              r"method\.params\.min_radius=0\.1 leaves no patch token at block 9.*>= 0\.1633")
