"""pytest-benchmark microbenchmarks: the eval forward of every registered method on the embedded DeiT.

Excluded from ``make test`` (marker ``benchmark``); ``make bench`` runs them and saves the JSON under
``results/benchmarks/``. Each benchmark's ``extra_info`` carries the method's analytic GFLOPs per image and its
FLOPs ratio to dense, so the JSON alone shows whether wall time tracks FLOPs. These are regression timings of
the forward code (Python overhead dominates at this size); the throughput table comes from
``experiments/measure.py`` (protocol in ``experiments/cost/throughput.py``).
"""
from __future__ import annotations

import pytest
import torch

import methods
from experiments.cost import flops
from methods.models import EMBEDDED_MODEL, create_backbone

pytestmark = pytest.mark.benchmark


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("name", methods.list_methods())
def test_forward(benchmark, name, batch):
    torch.manual_seed(0)
    method = methods.create_method(name, create_backbone(EMBEDDED_MODEL, 10)).eval()
    images = torch.randn(batch, 3, 32, 32)

    def forward():
        with torch.inference_mode():
            return method(images)

    counts = forward().token_counts
    summary = flops.flops_summary(method, counts)
    benchmark.group = f"forward b{batch}"
    benchmark.extra_info.update(method=name, batch_size=batch, gflops=summary["gflops"],
                                flops_ratio=summary["flops_ratio"], threads=torch.get_num_threads())
    out = benchmark(forward)
    assert out.logits.shape == (batch, 10)
