"""The engine of TokenReduction's family (``methods/staged.py``): the official count rule, the patch-depth
convention, rectangular batches, and the family through the real harness (off the shelf, bad input). Its
registration: tests/test_method_contract.py."""
from __future__ import annotations

import copy
import json
from typing import Optional

import pytest
import torch
from torch import Tensor

from experiments import pipeline
from methods.patchmerger import PatchMergerStage
from methods.sit import TokenSlimming
from methods.staged import Reduced, StagedReduction, stage_counts
from test_schema import assert_refused_at_startup
from test_tradeoff import make_cfg


class KeepFirst(StagedReduction):
    """Keeps the first K patch tokens as themselves."""

    def reduce(self, stage: int, patches: Tensor, attention: Optional[Tensor]) -> Reduced:
        keep = self.patch_counts[stage]
        index = torch.arange(keep).expand(patches.shape[0], -1)
        return Reduced(patches[:, :keep], identity=index)


class MeanOfAll(StagedReduction):
    """Makes K copies of the mean token: a mixture that no input token is."""

    def reduce(self, stage: int, patches: Tensor, attention: Optional[Tensor]) -> Reduced:
        mean = patches.mean(dim=1, keepdim=True)
        return Reduced(mean.expand(-1, self.patch_counts[stage], -1), identity=None)


def test_counts_follow_the_official_rounding():
    # int(196 * kr ** (i + 1)): 0.7 -> 137.2, 96.04, 67.23; 0.9 -> 176.4, 158.76, 142.88; 0.25 -> 49, 12.25, 3.06
    assert stage_counts(0.7, None, 196, 3) == [137, 96, 67]
    assert stage_counts(0.9, None, 196, 3) == [176, 158, 142]
    assert stage_counts(0.25, None, 196, 3) == [49, 12, 3]
    assert stage_counts(1.0, None, 64, 3) == [64, 64, 64]
    assert stage_counts(0.3, [40, 20, 20], 64, 3) == [40, 20, 20]  # explicit counts replace the rate


def test_depth_convention_for_kept_and_mixed_tokens(tiny_vit, images):
    with torch.no_grad():
        kept = KeepFirst(tiny_vit, keep_rate=0.5, locations=[1, 3]).eval()(images)
        mixed = MeanOfAll(tiny_vit, keep_rate=0.5, locations=[1, 3]).eval()(images)
    # 16 -> 8 patches at the start of block 1, 8 -> 4 at block 3: patches 8-15 leave with depth 1 (block 0 saw
    # them), 4-7 with depth 3, 0-3 are seen by all 4 blocks.
    assert kept.patch_depth[0].tolist() == [4] * 4 + [3] * 4 + [1] * 8
    assert mixed.patch_depth.eq(1).all()  # a mixture is no patch: all leave at the first stage
    for out in (kept, mixed):
        assert out.token_counts[0].tolist() == [[17, 17], [9, 9], [9, 9], [5, 5]]


def test_a_reduction_making_the_wrong_count_is_a_bug_not_silence(tiny_vit, images):
    class TooMany(KeepFirst):
        def reduce(self, stage, patches, attention):
            return Reduced(patches, identity=None)

    with pytest.raises(RuntimeError, match="made 16 tokens, not 8"):
        TooMany(tiny_vit, keep_rate=0.5, locations=[1])(images)


def saved_records(tmp_path):
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "results" / "runs").glob("*.json"))]


@pytest.mark.parametrize("name", ["kmedoids", "heuristic"])
def test_parameter_free_methods_evaluate_off_the_shelf(tmp_path, name):
    record = pipeline.run(make_cfg(tmp_path, f"method={name}", "method.params.locations=[1,2,3]",
                                   "experiment.train=false"))
    assert record["train"]["epochs"] == 0 and record["method"] == name
    assert record["flops"]["flops_ratio"] < 1.0 and 0 <= record["metrics"]["top1"] <= 100
    assert [r["record_id"] for r in saved_records(tmp_path)] == [record["record_id"]]


@pytest.mark.parametrize("overrides,message", [
    (["method=kmedoids", "method.params.keep_rate=0.01"], r"method\.params\.keep_rate=0\.01 leaves fewer than 1"),
    (["method=sinkhorn", "method.params.iterations=0"], r"method\.params\.iterations=0"),
    (["method=dpcknn", "method.params.k_neighbors=9999"], r"method\.params\.k_neighbors=9999"),
    (["method=heuristic", "method.params.pattern=l3"], r"method\.params\.pattern='l3' unknown; valid: l1, l2, linf"),
])
def test_bad_input_through_the_harness_writes_nothing(tmp_path, overrides, message):
    assert_refused_at_startup(tmp_path, overrides, Exception, message)


@pytest.mark.parametrize("make_stage", [
    lambda: PatchMergerStage(outputs=3, width=8, scaled_attention=True, mix_normalized=True),
    lambda: TokenSlimming(width=8, outputs=3),
], ids=["patchmerger", "sit"])
def test_soft_mixing_stages_return_tokens_in_the_input_dtype(make_stage):
    torch.manual_seed(0)
    stage = make_stage()
    x = torch.randn(2, 6, 8)
    reference, _ = stage(x)
    out, mix = copy.deepcopy(stage).to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16 and mix.dtype == torch.float32  # the softmax in fp32
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.02)
    double, mix = copy.deepcopy(stage).double()(x.double())
    assert double.dtype == mix.dtype == torch.float64  # wider stays wider
    torch.testing.assert_close(double.float(), reference)
