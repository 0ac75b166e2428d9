"""Threshold ToMe (DToMe): calibration by hand, the merge rule, CLS, bad input, batch invariance, ragged eval vs
masked training, counts against a per-image fixed-r reference, calibrated checkpoints, host syncs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_batch_invariant, make_tiny_vit
from methods import backbone, create_method, ragged_attention
from methods.params import ParamError
from methods.tome import ToMe
from methods.tome_threshold import (BatchTopR, ThresholdToMe, UncalibratedError, above, calibrate, match_rows,
                                    merge_rows)
from sync_counter import count_syncs


def crafted_keys():
    """Two images of 5 tokens (A = positions 0, 2, 4; B = 1, 3) with B keys (1, 0) and (0, 1): the best edges of
    A tokens 2 and 4 are 0.8, 0.6 in image 0 and 0.9, 0.3 in image 1. CLS equals B token 1 (cosine 1)."""
    def image(first, second):
        return torch.tensor([[1.0, 0.0], [1.0, 0.0], first, [0.0, 1.0], second])
    return torch.stack([image([0.8, 0.6], [0.6, -0.8]), image([0.9, math.sqrt(0.19)], [0.3, -math.sqrt(0.91)])])


def rows_of(keys):
    images, tokens, _ = keys.shape
    segment = torch.arange(images).repeat_interleave(tokens)
    order = torch.arange(tokens).repeat(images)
    present = torch.ones(images * tokens, dtype=torch.bool)
    return match_rows(keys.reshape(images * tokens, -1), segment, torch.arange(images) * tokens, order, present,
                      images, tokens), segment, present


def test_matching_on_crafted_keys():
    match, _, _ = rows_of(crafted_keys())
    assert match.best[:, 0].tolist() == [-math.inf, -math.inf]  # CLS: never merges, though identical to a B
    torch.testing.assert_close(match.best[:, 1:], torch.tensor([[0.8, 0.6], [0.9, 0.3]]), atol=1e-6, rtol=0)
    assert match.partner[:, 1:].tolist() == [[0, 0], [0, 0]]


def test_calibration_threshold_by_hand():
    """r = 1 per image in a batch of 2: the batch's 2 best edges merge (0.9 in image 1, 0.8 in image 0, so
    image 1 merges one token and image 0 one), the best unmerged edge, 0.6, is the threshold."""
    match, segment, present = rows_of(crafted_keys())
    decide = BatchTopR([1], batch=2)
    merge = decide(0, match.best)
    assert merge.tolist() == [[False, True, False], [False, True, False]]
    assert decide.found[0].item() == pytest.approx(0.6, abs=1e-6)
    decide = BatchTopR([2], batch=2)  # 4 merges: every edge but CLS; none left, so the threshold is clamped to 0
    assert decide(0, match.best).sum().item() == 4 and decide.found[0].item() == 0.0
    decide = BatchTopR([1], batch=1)  # batch of 1 image per "batch": image 0 alone has best unmerged 0.6
    assert decide(0, match.best[:1]).tolist() == [[False, True, False]] and decide.found[0].item() == pytest.approx(0.6)


def test_calibration_averages_batches_and_skips_blocks_without_merges(tiny_vit, images):
    method = ThresholdToMe(tiny_vit, None, prop_attn=True)
    schedule = [2, 0, 3, 1]
    both, count = calibrate(method, schedule, [images[:2], images[2:]])
    first, _ = calibrate(method, schedule, [images[:2]])
    second, _ = calibrate(method, schedule, [images[2:]])
    assert count == 4 and both[1] == 1.0  # r = 0: never merges
    assert both == pytest.approx([(a + b) / 2 for a, b in zip(first, second)], abs=1e-6)
    assert all(0.0 <= value <= 1.0 for value in both)


def test_calibration_with_zero_images_is_refused(tiny_vit):
    method = create_method("tome", tiny_vit, r=2)
    with pytest.raises(ValueError, match="at least one image"):
        method.calibrate([])
    with pytest.raises(ValueError, match="at least one image"):
        method.calibrate([torch.zeros(0, 3, 32, 32)])
    with pytest.raises(ParamError, match="merges nothing"):
        create_method("tome", tiny_vit, r=0).calibrate([torch.zeros(1, 3, 32, 32)])
    with pytest.raises(ParamError, match="no calibration step"):
        create_method("dense", tiny_vit).calibrate([torch.zeros(1, 3, 32, 32)])
    with pytest.raises(ParamError, match="threshold is set"):
        create_method("tome", tiny_vit, threshold=0.5).calibrate([torch.zeros(1, 3, 32, 32)])


def test_merge_rows_averages_by_size_and_orders_like_tome():
    match, segment, present = rows_of(crafted_keys())
    x = torch.arange(10, dtype=torch.float32)[:, None]
    size = torch.tensor([1.0, 1, 2, 1, 1] * 2)
    merged_x, new_size, merged, order = merge_rows(x, size, match, above([0.7])(0, match.best), segment, present)
    assert merged.view(2, 5).tolist() == [[False, False, True, False, False], [False, False, True, False, False]]
    assert new_size[1].item() == 3.0 and merged_x[1].item() == pytest.approx((1 * 1 + 2 * 2) / 3)
    assert order.view(2, 5)[0].tolist() == [0, 6, 2, 8, 4]  # unmerged A (0, 2, 4) first, then B


def test_threshold_one_merges_nothing_even_identical_tokens(tiny_vit, images):
    keys = torch.ones(1, 5, 3) * 0.1234567  # every cosine rounds to about 1
    match, _, _ = rows_of(keys)
    assert not above([1.0])(0, match.best).any()
    method = create_method("tome", tiny_vit, threshold=1.0).eval()
    dense = create_method("dense", tiny_vit).eval()
    with torch.no_grad():
        out, reference = method(images), dense(images)
    assert (out.token_counts == 17).all() and (out.patch_depth == 4).all()
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-5, rtol=1e-5)
    assert method.extra_macs(out.token_counts).tolist() == [0.0] * 4


@pytest.mark.parametrize("train", [False, True])
def test_cls_is_never_merged(tiny_vit, images, train):
    method = create_method("tome", tiny_vit, threshold=0.0).train(train)  # merges every edge above 0
    with torch.no_grad():
        out = method(images)
    assert (out.state.size[:, 0] == 1).all()
    assert out.state.size.sum(dim=1).tolist() == [17.0] * 4
    assert (out.token_counts[:, -1, 1] >= 1).all()


def reference_counts(vit, image, thresholds, prop_attn=True):
    """DyMU's batch-size-1 rule with ToMe's own functions: in each block merge r_eff = the A edges above the
    threshold (``methods.tokens``' fixed-r matching); returns logits and ``[depth, 2]`` counts."""
    from methods import tokens
    x = backbone.embed(vit, image[None])
    size, counts = None, []
    for index, block in enumerate(vit.blocks):
        bias = size.log()[:, None, None, :, 0] if prop_attn and size is not None else None
        before = x.shape[1]
        x, heads = backbone.attn_residual(block, x, lambda attn, h: backbone.softmax_attention(attn, h, bias))
        metric = F.normalize(heads.k.mean(dim=1).float(), dim=-1)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
        scores[:, 0] = -math.inf
        r = int((scores.max(dim=-1).values.clamp(max=1) > thresholds[index]).sum())
        if r:
            match = tokens.bipartite_soft_matching(heads.k.mean(dim=1), r)
            size = size if size is not None else x.new_ones(1, before, 1)
            x, size = tokens.merge_wavg(x, size, match)
        counts.append([before, x.shape[1]])
        x = backbone.mlp_residual(block, x)
    return backbone.head(vit, x)[0], counts


@pytest.mark.parametrize("threshold", [0.3, [0.5, 1.0, 0.2, 0.0]])
def test_counts_match_the_batch_size_one_rule(tiny_vit, images, threshold):
    method = create_method("tome", tiny_vit, threshold=threshold).eval()
    thresholds = threshold if isinstance(threshold, list) else [threshold] * 4
    with torch.no_grad():
        out = method(images)
        for i, image in enumerate(images):
            logits, counts = reference_counts(tiny_vit, image, thresholds)
            assert out.token_counts[i].tolist() == counts
            torch.testing.assert_close(out.logits[i], logits, atol=1e-5, rtol=1e-5)
    assert len({tuple(c.flatten().tolist()) for c in out.token_counts}) > 1  # counts vary per image here


def test_counts_by_hand_on_the_tiny_model(tiny_vit, images):
    """threshold 1 in blocks 1-3 and 0 in block 0: block 0 merges every A token with a positive best edge, at most
    the 8 non-CLS A tokens of 17; later blocks keep the count."""
    method = create_method("tome", tiny_vit, threshold=[0.0, 1.0, 1.0, 1.0]).eval()
    with torch.no_grad():
        out = method(images)
        heads = backbone.project_qkv(tiny_vit.blocks[0].attn, tiny_vit.blocks[0].norm1(backbone.embed(tiny_vit, images)))
    metric = F.normalize(heads.k.mean(dim=1), dim=-1)
    positive = ((metric[:, 2::2] @ metric[:, 1::2].transpose(1, 2)).max(dim=-1).values > 0).sum(dim=1)
    for i in range(4):
        kept = 17 - int(positive[i])
        assert out.token_counts[i].tolist() == [[17, kept], [kept, kept], [kept, kept], [kept, kept]]
        assert torch.bincount(out.patch_depth[i], minlength=5).tolist() == [0, 17 - kept, 0, 0, kept - 1]


@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("backend", ["padded", "flex"])
def test_ragged_eval_equals_masked_training(tiny_vit, images, prop_attn, backend):
    if backend not in ragged_attention.available_backends("cpu"):
        pytest.skip(f"{backend} not available")
    method = create_method("tome", tiny_vit, threshold=[0.2, 0.1, 0.3, 0.0], prop_attn=prop_attn)
    method.runtime = ragged_attention.Runtime(backend)
    with torch.no_grad():
        ragged_out, masked_out = method.eval()(images), method.train()(images)
    torch.testing.assert_close(ragged_out.logits, masked_out.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(ragged_out.token_counts, masked_out.token_counts)
    assert torch.equal(ragged_out.patch_depth, masked_out.patch_depth)
    torch.testing.assert_close(ragged_out.state.size, masked_out.state.size)


@pytest.mark.parametrize("train", [False, True])
def test_batch_invariance(tiny_vit, images, train):
    assert_batch_invariant(create_method("tome", tiny_vit, threshold=0.2).train(train), images)


def test_training_path_has_gradients(tiny_vit, images):
    method = create_method("tome", tiny_vit, threshold=0.2).train()
    method(images).logits.sum().backward()
    assert tiny_vit.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("params, fragment", [
    ({"r": 4, "threshold": 0.5}, "method.params.r=4 and method.params.threshold=0.5 are exclusive"),
    ({"threshold": 1.5}, "must be"),
    ({"threshold": -0.1}, "must be"),
    ({"threshold": [0.5] * 5}, "5 entries but the model has 4 blocks"),
    ({"threshold": "abc"}, "must be"),
])
def test_bad_input(tiny_vit, params, fragment):
    with pytest.raises(ParamError) as error:
        create_method("tome", tiny_vit, **params)
    assert fragment in str(error.value)


def test_fixed_r_path_is_plain_tome(tiny_vit, images):
    plain, explicit = create_method("tome", tiny_vit, r=2), create_method("tome", tiny_vit, r=2, threshold=None)
    assert type(plain) is ToMe and type(explicit) is ToMe
    with torch.no_grad():
        assert torch.equal(plain.eval()(images).logits, explicit.eval()(images).logits)


def test_calibrated_checkpoint_roundtrip(tiny_vit, images):
    from experiments.train.checkpoints import load_weights
    from methods.models import CheckpointError

    calibrated, params = create_method("tome", tiny_vit, r=2).calibrate([images])
    assert params == {"threshold": "calibrated", "r": 2, "prop_attn": True}
    info = calibrated.record_info()
    assert info["calibration_r"] == [2] * 4 and info["calibration_images"] == 4 and info["threshold_source"] == "calibrated"
    state = {key: value.clone() for key, value in calibrated.state_dict().items()}
    fresh = create_method("tome", make_tiny_vit(seed=5), threshold="calibrated")
    with pytest.raises(UncalibratedError, match="experiments.calibrate"):
        fresh.eval()(images)
    load_weights(fresh, "tome", {"method": "tome", "model": state}, "test")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images).token_counts, calibrated.eval()(images).token_counts)
    assert fresh.record_info() == info
    backbone_only = {k[4:]: v for k, v in state.items() if k.startswith("vit.")}
    for content in ({"model": backbone_only}, {"method": "tome", "model": backbone_only},
                    {"method": "dense", "model": state}):
        with pytest.raises(CheckpointError, match="experiments.calibrate"):
            load_weights(create_method("tome", make_tiny_vit(), threshold="calibrated"), "tome", content, "test")
    # r with threshold=calibrated names the calibration's target: the same r loads, another is refused naming both
    load_weights(create_method("tome", make_tiny_vit(), r=2, threshold="calibrated"), "tome",
                 {"method": "tome", "model": state}, "test")
    with pytest.raises(CheckpointError, match=r"method\.params\.r=3 names the calibration's target, but the "
                                              r"checkpoint's thresholds were calibrated for r=2; valid: "
                                              r"method\.params\.r=2"):
        load_weights(create_method("tome", make_tiny_vit(), r=3, threshold="calibrated"), "tome",
                     {"method": "tome", "model": state}, "test")
    # explicit thresholds are parameters, not weights: a plain tome checkpoint loads
    given = create_method("tome", make_tiny_vit(), threshold=0.5)
    assert "thresholds" not in given.state_dict()


def test_extra_macs_count_matching_in_blocks_below_one(tiny_vit, images):
    method = create_method("tome", tiny_vit, threshold=[0.0, 1.0, 0.5, 1.0]).eval()
    with torch.no_grad():
        out = method(images)
    attn = out.token_counts[..., 0].double()
    expected = (torch.ceil(attn / 2) * torch.floor(attn / 2) * 32)[:, [0, 2]].sum(dim=1)
    assert method.extra_macs(out.token_counts).tolist() == expected.tolist()


def test_host_syncs_one_per_compaction(tiny_vit, images, monkeypatch):
    monkeypatch.setattr(ragged_attention, "SIZES_ON_HOST", ())
    monkeypatch.setattr(ragged_attention, "AUTO_GROUP", {})
    method = create_method("tome", tiny_vit, threshold=[0.1, 1.0, 0.2, 0.3]).eval()
    method.threshold_values()  # read once per load, not per forward
    with torch.no_grad():
        out, counts = count_syncs(method, images)
    assert dict(counts) == {"tolist": 3}  # the three merging blocks' compactions


# ------------------------------------------------------------------------------------------------ harness
def compose_calibrate(*overrides: str):
    from hydra import compose, initialize_config_dir
    from conftest import CONF
    from experiments.config_store import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="calibrate", overrides=list(overrides))


def test_plan_refuses_calibrated_without_a_checkpoint(tmp_path):
    from conftest import run_config
    from experiments.config import ConfigError
    from experiments.plan import validate

    with pytest.raises(ConfigError, match=r"threshold=calibrated .*experiments\.calibrate"):
        validate(run_config(tmp_path, "method=tome", "method.params.threshold=calibrated", "baseline.enabled=false"))
    with pytest.raises(ConfigError, match=r"method\.params\.r=4 sets method\.params\.r, but "
                                          r"method\.params\.threshold=0\.9 fixes"):
        validate(run_config(tmp_path, "method=tome", "method.params.threshold=0.9", "method.params.r=4"))
    assert validate(run_config(tmp_path, "method=tome", "method.params.threshold=0.9")).recorded_params == \
        {"r": 13, "prop_attn": True, "threshold": 0.9}


@pytest.mark.parametrize("overrides, fragment", [
    (["calibration.images=0"], "calibration.images=0 must be in [1,"),
    (["method.params.threshold=0.9"], "calibration computes the thresholds for a target"),
    (["method.params.r=0"], "merges nothing"),
    (["method=dense"], "no calibration step"),
])
def test_calibration_refusals_before_work(tmp_path, overrides, fragment):
    from conftest import run_paths
    from experiments.calibration import validate_calibration
    from experiments.config import ConfigError

    cfg = compose_calibrate(*run_paths(tmp_path), "baseline.enabled=false", f"calibration.out={tmp_path}/c.pth",
                            *overrides)
    with pytest.raises(ConfigError) as error:
        validate_calibration(cfg)
    assert fragment in str(error.value)
    assert not (tmp_path / "c.pth").exists()


def test_calibrate_command_writes_a_checkpoint_the_suite_evaluates(tmp_path):
    from conftest import run_config, run_paths
    from experiments import calibration, pipeline

    out = tmp_path / "calibrated.pth"
    cfg = compose_calibrate(*run_paths(tmp_path), "baseline.enabled=false", "progress=false", "method.params.r=2",
                            "calibration.images=40", "calibration.batch_size=16", f"calibration.out={out}")
    summary = calibration.run(cfg)
    content = torch.load(out, weights_only=False)
    assert content["method"] == "tome" and content["method_params"]["threshold"] == "calibrated"
    assert content["calibration"]["calibration_images"] == 40 and summary["images"] == 40
    assert content["model"]["thresholds"].tolist() == pytest.approx(summary["thresholds"], abs=1e-6)
    record = pipeline.run(run_config(tmp_path, "method=tome", "method.params.threshold=calibrated",
                                     f"model.checkpoint={out}", "eval.map_images=0"))
    assert record["method_params"]["threshold"] == "calibrated"
    assert record["method_info"]["thresholds"] == summary["thresholds"]
    assert record["method_info"]["calibration_r"] == [2] * 12


def test_calibration_on_the_train_split_needs_the_train_folder(tmp_path):
    """Calibrating reads the ``calibration.split`` images: on a val-only image folder, ``split=train`` is refused
    at validation naming the missing folder; ``split=val`` validates."""
    from conftest import run_paths, write_png_folder
    from experiments.calibration import validate_calibration
    from experiments.config import DataError

    write_png_folder(tmp_path / "data", splits=("val",))
    data = ["data=imagefolder", f"data.root={tmp_path}/data", "data.img_size=32"]
    base = [*run_paths(tmp_path), "baseline.enabled=false", f"calibration.out={tmp_path}/c.pth", *data]
    with pytest.raises(DataError, match=r"data\.train_split='train': split folder 'train' not found"):
        validate_calibration(compose_calibrate(*base))  # calibration.split=train, the default
    plan, calibration, _ = validate_calibration(compose_calibrate(*base, "calibration.split=val"))
    assert calibration.split == "val" and plan.data_scan.train is None and len(plan.data_scan.val.samples) == 6
    assert not (tmp_path / "c.pth").exists()


def files_under(folder):
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


@pytest.mark.parametrize("overrides, message", [
    pytest.param(["method.params.threshold=1.5"], r"method\.params\.threshold=1\.5.*\[0, 1\]", id="above-1"),
    pytest.param(["method.params.threshold=-0.1"], r"method\.params\.threshold=-0\.1", id="below-0"),
    pytest.param(["method.params.threshold=calibrated"], r"threshold=calibrated .*experiments\.calibrate",
                 id="uncalibrated"),
    pytest.param(["method.params.threshold=0.9", "method.params.r=4"],
                 r"method\.params\.r=4 sets method\.params\.r, but method\.params\.threshold=0\.9", id="with-r"),
])
def test_bad_runs_are_refused_naming_the_key_with_nothing_written(tmp_path, overrides, message):
    """Issue 29's bad input through a run (``pipeline.run``), before anything is written."""
    from conftest import run_config
    from experiments import pipeline

    with pytest.raises(ValueError, match=message):
        pipeline.run(run_config(tmp_path / "out", "method=tome", "baseline.enabled=false", *overrides))
    assert files_under(tmp_path / "out") == set()


def test_calibrating_on_zero_images_writes_nothing(tmp_path):
    from conftest import run_paths
    from experiments import calibration
    from experiments.config import ConfigError

    out = tmp_path / "out"
    cfg = compose_calibrate(*run_paths(out), "baseline.enabled=false", "progress=false", "method.params.r=2",
                            "calibration.images=0", f"calibration.out={out}/c.pth")
    with pytest.raises(ConfigError, match=r"calibration\.images=0 must be in \[1, "):
        calibration.run(cfg)
    assert files_under(out) == set()
