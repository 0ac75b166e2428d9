"""Library use, as the README shows it: wrap a plain timm DeiT with a method in one call, outside the harness."""
import timm
import torch

import methods
from methods.models import create_backbone


def test_tome_wraps_a_timm_deit_in_one_call():
    """The README's example: ToMe r=13 on DeiT-S (random weights, no download). Per-block counts by hand: the
    attention of block l runs on 197 - 13 l tokens and its MLP on 13 fewer; r=0 gives timm's own forward; and
    the logits equal those of the method the harness builds (its backbone factory, resolved parameters) on the
    same weights."""
    torch.manual_seed(0)
    vit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    images = torch.randn(2, 3, 224, 224)
    tome = methods.create_method("tome", vit, r=13).eval()
    with torch.inference_mode():
        out = tome(images)
        expected_dense = vit(images)
        tome.r = 0
        unmerged = tome(images).logits
        tome.r = 13
    attn = [197 - 13 * block for block in range(12)]
    assert out.token_counts[:, :, 0].tolist() == [attn] * 2
    assert out.token_counts[:, :, 1].tolist() == [[n - 13 for n in attn]] * 2
    assert out.logits.shape == (2, 1000) and out.patch_depth.shape == (2, 196)
    torch.testing.assert_close(unmerged, expected_dense, atol=1e-5, rtol=1e-5)

    harness_vit = create_backbone("deit_small_patch16_224", num_classes=1000)
    harness_vit.load_state_dict(vit.state_dict())
    harness = methods.create_method("tome", harness_vit, **methods.resolved_params("tome", {"r": 13})).eval()
    with torch.inference_mode():
        torch.testing.assert_close(harness(images).logits, out.logits, atol=0, rtol=0)
    assert set(tome.state_dict()) == {f"vit.{key}" for key in vit.state_dict()}  # timm's keys, nothing added
