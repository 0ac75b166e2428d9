"""Video backbones (methods/video.py): tubelet tokens and their grid, position tables, every method's counts on a
3-D grid by hand, A-ViT's halting on identical frames, VideoMAE weights, and the harness's video checks."""
import math

import pytest
import torch
import timm

import methods
from methods import video
from methods.models import CheckpointError


def video_vit(**kwargs):
    """The embedded video model at 32 px (a 4x4x4 grid, 64 patch tokens: the hand counts below), or as given."""
    torch.manual_seed(0)
    return timm.create_model("vit_video_digits", num_classes=10, **{"img_size": 32, **kwargs}).eval()


# ------------------------------------------------------------------------------------------- tubelet tokens
@pytest.mark.parametrize("frames, tubelet, size, patch, grid", [
    (8, 2, 24, 8, (4, 3, 3)),      # the embedded model
    (8, 2, 32, 8, (4, 4, 4)),      # the hand-count model below
    (6, 2, 40, 8, (3, 5, 5)),      # odd time and space sides
    (9, 3, 24, 8, (3, 3, 3)),      # odd frame count, tubelet 3
    (5, 1, 16, 8, (5, 2, 2)),      # tubelet 1: one frame per token
])
def test_tubelet_grid_and_token_count(frames, tubelet, size, patch, grid):
    vit = video_vit(num_frames=frames, tubelet_size=tubelet, img_size=size, patch_size=patch)
    embed = vit.patch_embed
    assert embed.grid_size == grid and embed.num_patches == math.prod(grid)
    assert vit.pos_embed.shape == (1, math.prod(grid) + 1, 64)
    assert embed.input_size == (3, frames, size, size)
    clips = torch.randn(2, 3, frames, size, size)
    assert embed(clips).shape == (2, math.prod(grid), 64)
    assert vit(clips).shape == (2, 10)


def test_tokens_are_in_time_row_column_order():
    vit = video_vit()
    embed = vit.patch_embed
    clip = torch.zeros(1, 3, 8, 32, 32)
    clip[:, :, 4:6, 8:16, 24:32] = 1.0  # frames 4-5 (time slot 2), rows 8-15 (row 1), columns 24-31 (column 3)
    with torch.no_grad():
        tokens = embed(clip) - embed(torch.zeros_like(clip))
    changed = tokens.abs().sum(-1)[0].nonzero().flatten().tolist()
    assert changed == [2 * 16 + 1 * 4 + 3]


@pytest.mark.parametrize("kwargs, key", [
    (dict(num_frames=7), "model.num_frames=7"),
    (dict(num_frames=8, tubelet_size=3), "model.num_frames=8"),
    (dict(img_size=36), "data.img_size=36"),
    (dict(pos_init="learned"), "model.pos_init='learned'"),
])
def test_incompatible_shapes_are_refused_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace("(", r"\(").replace(".", r"\.")):
        timm.create_model("vit_video_digits", **{"img_size": 32, **kwargs})


def test_a_clip_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"clips \[B, 3, 8, 32, 32\]"):
        video_vit()(torch.randn(2, 3, 32, 32))


def test_sincos3d_table_by_hand():
    table = video.sincos3d_pos_embed((2, 3, 4), 64)  # time 16 channels, rows 24, columns 24
    assert table.shape == (24, 64)
    # token 0 is (0, 0, 0): sin 0 = 0 and cos 0 = 1 in every part
    assert torch.equal(table[0], torch.tensor(([0.0] * 8 + [1.0] * 8) + ([0.0] * 12 + [1.0] * 12) * 2))
    # token 13 is (1, 0, 1): time 1 in the first part, column 1 in the last, row 0 in between
    t, row, col = table[13, :16], table[13, 16:40], table[13, 40:]
    assert t[0] == pytest.approx(math.sin(1.0)) and t[8] == pytest.approx(math.cos(1.0))
    assert t[1] == pytest.approx(math.sin(1.0 / 10000 ** (1 / 8)))
    assert torch.equal(row, table[0, 16:40])
    assert col[0] == pytest.approx(math.sin(1.0)) and col[12] == pytest.approx(math.cos(1.0))
    assert len({tuple(r.tolist()) for r in table}) == 24  # every token distinct


def test_videomae_table_by_hand():
    table = video.videomae_pos_embed(5, 6)
    # angle i / 10000^(2 floor(j/2) / 6): sine on even channels, cosine on odd ones
    assert table[3, 0] == pytest.approx(math.sin(3.0)) and table[3, 1] == pytest.approx(math.cos(3.0))
    assert table[3, 4] == pytest.approx(math.sin(3.0 / 10000 ** (4 / 6)))
    vit = video_vit(pos_init="videomae")
    assert torch.allclose(vit.pos_embed[0, 1:], video.videomae_pos_embed(64, 64))
    assert torch.equal(vit.pos_embed[0, 0], torch.zeros(64))


def test_the_small_model_has_videomae_vit_s_layout():
    with torch.device("meta"):
        vit = timm.create_model("vit_video_small_patch16_224")
    assert vit.patch_embed.grid_size == (8, 14, 14) and vit.patch_embed.num_patches == 1568
    assert vit.embed_dim == 384 and len(vit.blocks) == 12 and vit.blocks[0].attn.num_heads == 6


# ----------------------------------------------------------------------------- every method on a 3-D grid
# 64 patch tokens (4x4x4) + CLS, keep_rate 0.7 at blocks 3/6/9, counted by hand from each method's rule:
STAGED = [65] * 3 + [45] * 3 + [32] * 3 + [22] * 3  # int(64 * 0.7^k) = 44, 31, 21 patches, from the block on
PRUNED_MLP = [65] * 3 + [45] * 3 + [32] * 3 + [22] * 3  # the same counts, from the MLP of blocks 3/6/9 on
HAND_COUNTS = {
    "dense": ([65] * 12, [65] * 12),
    # cumulative floor int(64 * 0.7^k) + CLS, removed before the block (the staged engine, DynamicViT)
    **{name: (STAGED, STAGED) for name in ("dynamicvit", "kmedoids", "dpcknn", "sit", "patchmerger", "sinkhorn")},
    # the same counts between attention and MLP (top-k's dynamicvit schedule, random)
    "topk": ([65] * 4 + [45] * 3 + [32] * 3 + [22] * 2, PRUNED_MLP),
    "random": ([65] * 4 + [45] * 3 + [32] * 3 + [22] * 2, PRUNED_MLP),
    # EViT: ceil(0.7 * (N - 1)) kept + fused token + CLS: 45+2 = 47, ceil(0.7*46)=33 -> 35, ceil(0.7*34)=24 -> 26
    "evit": ([65] * 4 + [47] * 3 + [35] * 3 + [26] * 2, [65] * 3 + [47] * 3 + [35] * 3 + [26] * 3),
    # ToMe r=13, at most (N - 1) // 2 merges: 65 52 39 26, then 26 -> 14 (12), 14 -> 8, 8 -> 5, 5 -> 3, 3 -> 2
    "tome": ([65, 52, 39, 26, 14, 8, 5, 3, 2, 2, 2, 2], [52, 39, 26, 14, 8, 5, 3, 2, 2, 2, 2, 2]),
}


@pytest.mark.parametrize("name", sorted(HAND_COUNTS))
def test_fixed_count_methods_by_hand_on_the_video_grid(name):
    params = {"keep_rate": 0.7} if "keep_rate" in methods.method_parameters(name) else {}
    if name == "tome":
        params = {"r": 13}
    method = methods.create_method(name, video_vit(), **params).eval()
    clips = torch.randn(3, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = method(clips)
    attn, mlp = HAND_COUNTS[name]
    for image in range(3):
        assert out.token_counts[image, :, 0].tolist() == attn
        assert out.token_counts[image, :, 1].tolist() == mlp
    assert out.patch_depth.shape == (3, 64)


def identical_token_model():
    """No position embedding and a constant clip: every patch token is the same vector."""
    vit = video_vit()
    with torch.no_grad():
        vit.pos_embed.zero_()
    return vit, torch.full((2, 3, 8, 32, 32), 0.3)


@pytest.mark.parametrize("center, attn", [
    (-100.0, [65] + [0] * 11),  # h = 1 after block 1: every token halts there, CLS with them, the image stops
    (100.0, [65] * 12),         # h = 0 until the last block forces it: nothing halts early
])
def test_adavit_counts_by_hand_at_the_gate_extremes(center, attn):
    method = methods.create_method("adavit", video_vit(), gate_scale=5.0, gate_center=center).eval()
    with torch.no_grad():
        out = method(torch.randn(2, 3, 8, 32, 32))
    assert out.token_counts[:, :, 0].tolist() == [attn, attn]
    assert out.patch_depth.unique().tolist() == [1 if center < 0 else 12]


def test_ats_drops_one_token_per_block_when_all_tokens_are_equal():
    # Equal tokens give equal significance, so with P patches the normalised CDF is cbar_k = k / (P - 1) and
    # c0 = 1 / (P - 1). The M = 64 points c0 + (1 - c0) s / 63 step by less than 1 / (P - 1), so they hit
    # every k in 1 .. P - 1 and never k = 0 (cbar 0 < c0): each ATS block (3 .. 11) keeps P - 1 patches.
    vit, clips = identical_token_model()
    method = methods.create_method("ats", vit).eval()
    with torch.no_grad():
        out = method(clips)
    assert out.token_counts[:, :, 0].tolist() == [[65] * 4 + list(range(64, 56, -1))] * 2
    assert out.token_counts[:, :, 1].tolist() == [[65] * 3 + list(range(64, 55, -1))] * 2


def test_heuristic_refuses_a_space_time_grid_saying_why():
    with pytest.raises(ValueError, match=r"3-D, 4 x 4 x 4 \(time x rows x columns\)"):
        methods.create_method("heuristic", video_vit())


# ------------------------------------------------------------------------- A-ViT on a clip of equal frames
def test_adavit_halts_each_time_slot_as_the_first_when_time_is_not_embedded():
    """What the mechanism guarantees on a clip whose frames are all identical: attention and the MLP are
    permutation-equivariant, so two tokens with the same content and the same position embedding halt at the
    same block. With the time part of the position table made equal across time slots, every later slot's
    token therefore halts exactly when its first-frame counterpart does (never later, never earlier).

    With a position table that encodes time (the default sincos3d, and any learned one), tokens of different
    time slots differ, and the mechanism promises no order between them; the report measures what a trained
    model does (``analysis/video.py``)."""
    vit = video_vit()
    with torch.no_grad():  # one spatial table for all four time slots
        spatial = vit.pos_embed[0, 1:17].clone()
        vit.pos_embed[0, 1:] = spatial.repeat(4, 1)
    method = methods.create_method("adavit", vit, gate_scale=5.0, gate_center=2.0).eval()
    frame = torch.randn(2, 3, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = method(frame.expand(-1, -1, 8, -1, -1).contiguous())
    depth = out.patch_depth.view(2, 4, 16)
    assert depth.min() < depth.max()  # the setting halts tokens at different blocks (the check is not vacuous)
    assert torch.equal(depth, depth[:, :1].expand_as(depth))


# ------------------------------------------------------------------------------------- VideoMAE checkpoints
def videomae_state_of(vit, pretrain: bool = False):
    """A state dict in VideoMAE's layout holding ``vit``'s weights (the inverse of the documented mapping)."""
    state = {}
    for key, value in vit.state_dict().items():
        if key in ("cls_token", "pos_embed"):
            continue  # VideoMAE has no CLS token and a fixed, unsaved position table
        if key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            state[key.replace("qkv.bias", "q_bias")], state[key.replace("qkv.bias", "v_bias")] = q, v
        elif key.startswith("norm."):
            state["fc_norm." + key[5:]] = value
        else:
            state[key] = value
    if pretrain:
        state = {f"encoder.{k}": v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
        state["encoder.norm.weight"], state["encoder.norm.bias"] = vit.norm.weight, vit.norm.bias
        state.update({"decoder.blocks.0.mlp.fc1.weight": torch.zeros(3, 3), "mask_token": torch.zeros(1, 1, 64),
                      "encoder_to_decoder.weight": torch.zeros(32, 64)})
    return state


def zero_key_bias(vit):
    with torch.no_grad():
        for block in vit.blocks:
            block.attn.qkv.bias[64:128] = 0.0  # VideoMAE's attention has no key bias
    return vit


@pytest.mark.parametrize("pretrain", [False, True])
def test_videomae_weights_map_onto_timm_keys(pretrain):
    source = zero_key_bias(video_vit(pos_init="videomae"))
    target = video_vit(pos_init="videomae")
    mapped, kept = video.videomae_to_timm(videomae_state_of(source, pretrain), target, "test")
    assert set(kept) == ({"cls_token", "pos_embed", "head.weight", "head.bias"} if pretrain
                         else {"cls_token", "pos_embed"})
    target.load_state_dict(mapped)
    own = {"cls_token", "pos_embed"} | ({"head.weight", "head.bias"} if pretrain else set())
    for key, value in source.state_dict().items():
        if key not in own:
            assert torch.equal(target.state_dict()[key], value), key
    with torch.no_grad():  # the same CLS start: then the two models agree
        target.cls_token.copy_(source.cls_token)
        if not pretrain:
            clips = torch.randn(2, 3, 8, 32, 32)
            assert torch.allclose(target(clips), source(clips), atol=1e-5)


def test_videomae_weights_of_another_width_are_refused_naming_keys():
    wide = timm.create_model("vit_video_digits", embed_dim=96, num_heads=2, img_size=32)
    with pytest.raises(ValueError, match=r"shape mismatches: .*blocks\.0\..*\(96"):
        video.videomae_to_timm(videomae_state_of(wide), video_vit(), "model.checkpoint=x.pth")


def test_videomae_checkpoint_loads_through_model_checkpoint(tmp_path):
    from test_pipeline import make_cfg
    from conftest import build_for

    source = zero_key_bias(video_vit(img_size=24))  # the harness's model=vit_video_digits
    path = tmp_path / "videomae_vit_digits.pth"
    torch.save({"module": videomae_state_of(source)}, path)  # VideoMAE saves under "model" or "module"
    cfg = make_cfg(tmp_path, "model=vit_video_digits", "data=moving_digits", f"model.checkpoint={path}")
    method = build_for(cfg)
    assert torch.equal(method.vit.blocks[3].mlp.fc1.weight, source.blocks[3].mlp.fc1.weight)
    assert torch.equal(method.vit.norm.weight, source.norm.weight)
    broken = videomae_state_of(source)
    broken["blocks.0.mlp.fc1.weight"] = torch.zeros(5, 5)
    torch.save({"model": broken}, path)
    with pytest.raises(Exception, match=r"blocks\.0\.mlp\.fc1\.weight \(5, 5\)"):
        build_for(make_cfg(tmp_path, "model=vit_video_digits", "data=moving_digits", f"model.checkpoint={path}"))
    assert issubclass(CheckpointError, ValueError)
