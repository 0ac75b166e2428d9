"""The shared backbone pieces reproduce timm's forward, fused and unfused, and reject unsupported models."""
import pytest
import torch
import timm
from timm.models.vision_transformer import VisionTransformer

import methods
from methods import backbone
from conftest import make_tiny_vit


@pytest.mark.parametrize("fused", [True, False])
def test_dense_equals_timm_forward(fused, images):
    vit = make_tiny_vit()
    for block in vit.blocks:
        block.attn.fused_attn = fused
    dense = methods.create_method("dense", vit).eval()
    with torch.no_grad():
        expected = vit(images)
        out = dense(images)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert out.token_counts.shape == (4, 4, 2)
    assert (out.token_counts == 17).all()
    assert (out.patch_depth == 4).all()


def test_fused_and_manual_attention_agree_with_key_bias(images):
    vit = make_tiny_vit()
    x = backbone.embed(vit, images)
    bias = torch.zeros(4, 1, 1, x.shape[1])
    bias[:, ..., 5:9] = -1000.0
    attn = vit.blocks[0].attn
    heads = backbone.project_qkv(attn, x)
    attn.fused_attn = True
    fused = backbone.softmax_attention(attn, heads, key_bias=bias)
    attn.fused_attn = False
    manual = backbone.softmax_attention(attn, heads, key_bias=bias)
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-5)
    # A key masked with -1000 receives (numerically) no CLS attention; the row sums to 1.
    cls_attn = backbone.cls_attention(attn, heads, key_bias=bias)
    assert cls_attn.shape == (4, 17) and cls_attn[:, 5:9].max() < 1e-30
    torch.testing.assert_close(cls_attn.sum(-1), torch.ones(4))


@pytest.mark.parametrize("fused", [True, False])
def test_a_boolean_key_mask_equals_attention_without_the_masked_keys(fused, images):
    """Padding masked as keys changes nothing for the real tokens (the packed A-ViT path relies on it)."""
    vit = make_tiny_vit()
    attn = vit.blocks[0].attn
    attn.fused_attn = fused
    x = backbone.embed(vit, images)
    keep = torch.arange(x.shape[1]) < 11
    masked = backbone.softmax_attention(attn, backbone.project_qkv(attn, x), key_mask=keep[None, None, None, :])
    short = backbone.softmax_attention(attn, backbone.project_qkv(attn, x[:, :11]))
    torch.testing.assert_close(masked[:, :, :11], short, atol=1e-6, rtol=1e-5)


def test_attn_residual_runs_the_given_mixing_step(images):
    """The attention half with the default step is timm's; a different step (here: uniform attention over
    the keys) is used as given, and the returned heads are those of norm1(x)."""
    vit = make_tiny_vit()
    block = vit.blocks[0]
    x = backbone.embed(vit, images)
    out, heads = backbone.attn_residual(block, x)
    torch.testing.assert_close(out, x + block.ls1(block.attn(block.norm1(x))), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(heads.k, backbone.project_qkv(block.attn, block.norm1(x)).k)
    uniform, _ = backbone.attn_residual(block, x, lambda attn, h: h.v.mean(dim=2, keepdim=True).expand_as(h.v))
    v_mean = heads.v.mean(dim=2, keepdim=True).expand_as(heads.v)
    torch.testing.assert_close(uniform, x + backbone.project_out(block.attn, v_mean))


def test_policy_attention_with_all_ones_equals_plain_attention(images):
    vit = make_tiny_vit()
    x = backbone.embed(vit, images)
    attn = vit.blocks[1].attn
    heads = backbone.project_qkv(attn, x)
    plain = backbone.softmax_attention(attn, heads)
    policy = backbone.policy_attention(attn, heads, torch.ones(4, x.shape[1]))
    torch.testing.assert_close(policy, plain, atol=1e-5, rtol=1e-4)


def test_policy_attention_ignores_dropped_keys(images):
    """Changing a dropped key token's content must not change other tokens' outputs."""
    vit = make_tiny_vit()
    x = backbone.embed(vit, images)
    policy = torch.ones(4, x.shape[1])
    policy[:, 3] = 0
    attn = vit.blocks[0].attn
    a = backbone.policy_attention(attn, backbone.project_qkv(attn, x), policy)
    x2 = x.clone()
    x2[:, 3] += 5.0
    b = backbone.policy_attention(attn, backbone.project_qkv(attn, x2), policy)
    keep = [i for i in range(x.shape[1]) if i != 3]
    torch.testing.assert_close(a[:, :, keep], b[:, :, keep], atol=1e-4, rtol=1e-4)


def test_unsupported_models_are_rejected():
    with pytest.raises(ValueError, match="CLS token"):
        backbone.check_supported(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                                   class_token=False, global_pool="avg"))
    with pytest.raises(TypeError, match="VisionTransformer"):
        backbone.check_supported(torch.nn.Linear(2, 2))


def test_embedded_model_is_registered_with_timm():
    vit = timm.create_model("deit_digits_patch4_32")
    assert vit.patch_embed.num_patches == 64 and len(vit.blocks) == 12 and vit.num_classes == 10
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("deit_digits_patch4_32", pretrained=True)
