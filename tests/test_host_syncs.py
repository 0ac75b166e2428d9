"""Host syncs counted on CPU (``tests/sync_counter.py``): the counter on crafted functions, then every registered
method's eval forward on the GPU's code path. Fixed-count methods make none; a ragged method (per-image token counts,
``methods/ragged.py``) makes at most one per compaction event, a change of the packed batch's length."""
from __future__ import annotations

import pytest
import torch

from sync_counter import count_syncs
from test_method_contract import build
from methods import list_methods, ragged_attention

# The ragged methods. The others keep a count fixed by their settings and must make no sync at all.
RAGGED = {"adavit", "ats", "ltmp"}
# Ragged methods that decide in every block whether rows leave: each block whose batch holds more than the CLS rows
# makes one compaction check (one sync), also where, with these random thresholds, no row happens to leave.
CHECKS_EVERY_BLOCK = {"ltmp"}

X = torch.tensor([0.5, -1.0, 2.0, -0.25])
MASK = X > 0


def reads_a_value(x):
    return x * x.sum().item()


def branches_on_a_tensor(x):
    return x * 2 if (x > 1).any() else x


def masks(x):
    return x[x > 0].sum()


def stays_on_device(x):
    keep = x > 0
    rows = torch.nonzero_static(keep, size=2)  # a size given: no sync
    lengths = torch.tensor([1, 3])
    segment = torch.repeat_interleave(torch.arange(2), lengths, output_size=4)  # idem
    return torch.where(keep, x, 0.0).index_select(0, rows[:, 0]), segment, (x > 1).any()


@pytest.mark.parametrize("fn, expected", [
    (reads_a_value, {"item": 1}),
    (branches_on_a_tensor, {"bool": 1}),
    (masks, {"index[mask]": 1}),
    (stays_on_device, {}),
    (lambda x: (x.tolist(), int(x.argmax()), float(x[0]), x.cpu(), x.numpy()),
     {"tolist": 1, "int": 1, "float": 1, "cpu": 1, "numpy": 1}),
    (lambda x: (torch.nonzero(MASK), MASK.nonzero(), torch.where(MASK), x.masked_select(MASK)),
     {"nonzero": 3, "masked_select": 1}),
    (lambda x: (torch.unique(MASK), torch.repeat_interleave(x, torch.tensor([1, 0, 2, 1])), torch.bincount(
        MASK.long()), torch.equal(x, x)), {"_unique2": 1, "repeat_interleave": 1, "bincount": 1, "equal": 1}),
], ids=["item", "if-any", "mask-index", "none", "host-reads", "nonzero", "sized-by-data"])
def test_counts_each_sync_of_a_crafted_function(fn, expected):
    result, counts = count_syncs(fn, X.clone())
    assert dict(counts) == expected
    assert counts == count_syncs(fn, X.clone())[1]  # counting changes nothing: the same again


def test_counts_nothing_outside_and_returns_the_result():
    result, counts = count_syncs(reads_a_value, X)
    torch.testing.assert_close(result, X * X.sum(), rtol=0, atol=1e-6)
    X.sum().item()  # after the count: not counted
    assert dict(counts) == {"item": 1}


@pytest.fixture
def gpu_path(monkeypatch):
    """The code path a CUDA device takes: ``group=0`` and no lengths on the host (``methods/ragged_attention.py``)."""
    monkeypatch.setattr(ragged_attention, "SIZES_ON_HOST", ())
    monkeypatch.setattr(ragged_attention, "AUTO_GROUP", {})


def compaction_events(token_counts: torch.Tensor) -> int:
    """How often the packed length changes along the forward: the batch's tokens at each block's attention and
    at its MLP, one after the other, ``[2 * depth]``."""
    lengths = token_counts.sum(dim=0).flatten()
    return int((lengths[1:] != lengths[:-1]).sum())


@pytest.mark.parametrize("name", list_methods())
def test_host_syncs_of_every_method(name, gpu_path):
    torch.manual_seed(1)
    images = torch.randn(4, 3, 32, 32) * 2
    method = build(name)
    with torch.no_grad():
        out, counts = count_syncs(method, images)
    syncs = sum(counts.values())
    if name not in RAGGED:
        assert syncs == 0, f"{name}: {dict(counts)}"
        return
    events = compaction_events(out.token_counts)
    assert events > 0  # the model makes the method compact, so the bound below is not empty
    if name in CHECKS_EVERY_BLOCK:
        checks = int((out.token_counts[..., 0].sum(dim=0) > len(images)).sum())  # blocks with more than CLS left
        assert syncs <= checks and set(counts) == {"tolist"}, f"{name}: {syncs} syncs for {checks} checks"
        return
    # One read of the surviving rows and images per compaction; a block where nothing leaves still needs it to
    # find out, so the bound is per compaction event only when, as here, every compaction check drops rows.
    assert syncs <= events, f"{name}: {syncs} syncs for {events} compaction events: {dict(counts)}"
    assert set(counts) == {"tolist"}, dict(counts)
