"""The ragged-token runtime (``methods/ragged.py``): packing and compaction, per-image attention on every
backend that runs here against each image attended alone, backend choice and its errors, and A-ViT on it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import compose_config, make_tiny_vit, run_paths
from methods import backbone, ragged, ragged_attention
from test_adavit import mixed_images, mixed_model

FIXTURE = Path(__file__).parent / "fixtures" / "adavit_removal_reference.pt"


def ragged_batch(lengths, dim=32, tokens=None, seed=0):
    """A packed batch whose image i keeps the first ``lengths[i]`` of ``tokens`` rows, and the dense tokens."""
    torch.manual_seed(seed)
    tokens = tokens or max(lengths)
    x = torch.randn(len(lengths), tokens, dim)
    packed = ragged.Packed.pack(x)
    keep = (torch.arange(tokens)[None, :] < torch.tensor(lengths)[:, None]).flatten()
    (packed,) = packed.keep(keep)
    return packed, x


# ------------------------------------------------------------------------------------------ packing
def test_keep_drops_rows_carries_state_and_drops_empty_images():
    x = torch.arange(4 * 3 * 2, dtype=torch.float32).view(4, 3, 2)
    packed = ragged.Packed.pack(x)
    assert packed.layout.lengths.tolist() == [3, 3, 3, 3] and packed.layout.starts.tolist() == [0, 3, 6, 9]
    keep = torch.tensor([1, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 0], dtype=torch.bool)  # image 1 loses every row
    carried = torch.arange(12) * 10
    packed, carried = packed.keep(keep, carried)
    layout = packed.layout
    assert layout.images.tolist() == [0, 2, 3] and layout.lengths.tolist() == [2, 3, 1]
    assert layout.starts.tolist() == [0, 2, 5] and layout.segment.tolist() == [0, 0, 1, 1, 1, 2]
    assert layout.source.tolist() == [0, 2, 6, 7, 8, 10] and carried.tolist() == [0, 20, 60, 70, 80, 100]
    assert torch.equal(packed.x, x.reshape(12, 2)[keep])
    back = packed.unpack(fill=-1.0)
    assert torch.equal(back.reshape(12, 2)[keep], packed.x) and (back.reshape(12, 2)[~keep] == -1).all()
    same = packed.keep(torch.ones(6, dtype=torch.bool))[0]
    assert same is packed  # nothing dropped: the layout and its cached indices are kept


def test_layout_caches_are_built_once():
    packed, _ = ragged_batch([3, 1, 2])
    layout = packed.layout
    assert layout.starts is layout.starts and layout.segment is layout.segment
    assert packed.with_rows(packed.x * 2).layout is layout
    assert layout.cu_seqlens().tolist() == [0, 3, 4, 6] and layout.cu_seqlens().dtype == torch.int32


# ---------------------------------------------------------------------------------------- attention
def reference_attention(block, x, lengths):
    """Each image's attention half over its own first ``length`` tokens, one image at a time."""
    rows = []
    for image, length in enumerate(lengths):
        out, _ = backbone.attn_residual(block, x[image: image + 1, :length])
        rows.append(out[0])
    return torch.cat(rows)


BACKEND_CASES = [("padded", 0), ("padded", 1), ("padded", 2), ("padded", 8)]
if "flex" in ragged_attention.available_backends("cpu"):
    BACKEND_CASES.append(("flex", 0))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("backend, group", BACKEND_CASES)
def test_every_cpu_backend_equals_each_image_attended_alone(backend, group, fused):
    vit = make_tiny_vit(depth=1, embed_dim=32)
    block = vit.blocks[0]
    block.attn.fused_attn = fused
    lengths = [5, 1, 7, 3, 7, 2]
    packed, x = ragged_batch(lengths, tokens=7)
    with torch.no_grad():
        got = ragged_attention.attn_residual(block, packed, backend, group)
        want = reference_attention(block, x, lengths)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sync_free_one_call_padding_equals_each_image_alone():
    """The padded path that CUDA takes for fp32 (one call padded to ``tokens``, no host sync), run on CPU."""
    vit = make_tiny_vit(depth=1, embed_dim=32)
    block, attn = vit.blocks[0], vit.blocks[0].attn
    lengths = [2, 6, 1, 4]
    packed, x = ragged_batch(lengths, tokens=6)

    def attend(rows, batch, tokens, key_mask):
        heads = backbone.split_heads(attn, rows, batch, tokens, rows.dtype)
        out = backbone.softmax_attention(attn, heads, key_mask=key_mask)
        return out.transpose(1, 2).reshape(batch * tokens, attn.num_heads * attn.head_dim)

    with torch.no_grad():
        mixed = ragged_attention._padded_one_call(attend, attn.qkv(block.norm1(packed.x)), packed.layout)
        got = backbone.attn_out_residual(block, packed.x, mixed)
        want = reference_attention(block, x, lengths)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available() or "varlen" not in ragged_attention.available_backends("cuda"),
                    reason="needs a CUDA GPU and torch.nn.attention.varlen")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_varlen_backend_on_cuda_equals_padded(dtype):
    vit = make_tiny_vit(depth=1, embed_dim=64).cuda()
    block = vit.blocks[0]
    lengths = [5, 1, 7, 3]
    packed, x = ragged_batch(lengths, dim=64, tokens=7)
    packed = ragged.Packed(packed.x.cuda(), ragged.Layout(*(t.cuda() for t in (
        packed.layout.source, packed.layout.lengths, packed.layout.images)), 7, 4))
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        got = ragged_attention.attn_residual(block, packed, "varlen").float()
        want = reference_attention(block, x.cuda(), lengths).float()
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


# ------------------------------------------------------------------------------------ backend choice
def test_auto_backend_by_device():
    assert ragged_attention.resolve_backend("auto", "cpu") == "padded"
    assert ragged_attention.resolve_backend("padded", "cpu") == "padded"
    if "varlen" in ragged_attention.available_backends("cuda"):
        assert ragged_attention.resolve_backend("auto", "cuda") == "varlen"


@pytest.mark.parametrize("name, why", [("varlen", "not available on cpu"), ("fast", "unknown backend")])
def test_unavailable_backend_names_the_setting_and_the_choices(name, why):
    with pytest.raises(ValueError) as error:
        ragged_attention.resolve_backend(name, "cpu")
    message = str(error.value)
    assert f"ragged_backend={name!r}" in message and why in message
    assert "available here: auto, padded" in message


def test_backend_is_refused_before_any_work(tmp_path):
    """``eval.ragged_backend=varlen`` on CPU: a config error naming the key and the choices; nothing written."""
    from experiments.cost import measure_record
    from experiments.config import ConfigError

    cfg = compose_config(*run_paths(tmp_path), "device=cpu", "method=adavit", "eval.ragged_backend=varlen")
    with pytest.raises(ConfigError) as error:
        measure_record.measure_run(cfg)
    assert "eval.ragged_backend='varlen'" in str(error.value) and "available here: auto, padded" in str(error.value)
    assert not any(tmp_path.rglob("*.json"))


# ------------------------------------------------------------------------------------------ A-ViT on it
def test_adavit_removal_matches_the_code_before_the_runtime():
    """Halting depths, counts and reruns equal, and logits and CLS mixes within 1e-5 of, those of the removal path
    before it moved onto the runtime (``tests/fixtures/adavit_removal_reference.pt``, written at commit a9a275f on
    an AMD EPYC). Not bit for bit: fused attention's last bits differ between CPUs (an Intel Xeon differs)."""
    reference = torch.load(FIXTURE)
    assert len(reference) == 16
    for key, want in reference.items():
        group, fused, count = (part.split("=")[1] for part in key.split(","))
        model = mixed_model(None if group == "None" else int(group), fused == "True")
        with torch.no_grad():
            out = model(mixed_images(int(count)))
        got = {"logits": out.logits, "halting_depth": out.state.halting_depth, "token_counts": out.token_counts,
               "cls_output": out.state.cls_output, "rerun": out.state.rerun}
        assert set(got) == set(want), key
        for name in ("halting_depth", "token_counts", "rerun"):  # integers and flags: exact
            assert torch.equal(got[name], want[name]), f"{key}: {name} changed"
        for name in ("logits", "cls_output"):
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=f"{key}: {name} changed")


@pytest.mark.skipif("flex" not in ragged_attention.available_backends("cpu"), reason="needs FlexAttention")
def test_adavit_on_flex_equals_padded():
    model, images = mixed_model(), mixed_images(6)
    with torch.no_grad():
        padded = model(images)
        model.runtime = ragged_attention.Runtime("flex")
        flex = model(images)
    torch.testing.assert_close(flex.logits, padded.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(flex.state.halting_depth, padded.state.halting_depth)
