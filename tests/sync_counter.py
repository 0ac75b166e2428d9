"""Counting, on CPU tensors, the operations that would make a GPU wait for the host (a "host sync").

On CPU nothing waits, so a sync-heavy path costs nothing here and goes unnoticed until it runs on a GPU. This
module records every such operation a callable performs, by name, so that tests can bound them on CPU:

- host reads of tensor values, seen as Python calls by a ``TorchFunctionMode``: ``Tensor.item``,
  ``Tensor.tolist``, truth-value tests (``Tensor.__bool__``: ``bool(t)``, ``if t:``), ``int(t)`` / ``float(t)`` /
  ``operator.index(t)``, ``Tensor.cpu`` and ``Tensor.numpy`` (these two read no device on CPU and reach no
  aten op, so only the Python call shows them);
- operations whose output shape depends on the data, seen as aten ops by a ``TorchDispatchMode`` (so that those
  called inside other operators count too): ``nonzero`` (also ``torch.where(c)``), ``masked_select``, boolean
  mask indexing and assignment (``x[mask]``, ``x[mask] = v``: ``index`` / ``index_put_`` with a bool index),
  ``unique`` in all its forms, ``bincount`` (its length comes from the input's maximum), ``repeat_interleave``
  with a tensor of repeats and no ``output_size``, and ``_local_scalar_dense`` (a scalar read that no Python
  call above accounts for) and ``equal`` (a Python bool).

``nonzero_static`` and ``repeat_interleave(..., output_size=n)`` are sync-free by design and are not counted;
``one_hot`` counts only without ``num_classes`` (with it, its range checks read the data on CPU only: the CUDA
kernel skips them).
A counted Python call hides the aten ops it runs (``bool(t)`` is one sync, not also ``_local_scalar_dense``).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Python-level reads of tensor values, by the name they are counted under.
HOST_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__int__: "int",
    torch.Tensor.__float__: "float",
    torch.Tensor.__index__: "index",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
}

# aten ops (overload packets, by name) whose output size or value needs the data on the host.
DATA_DEPENDENT = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                  "unique_dim_consecutive", "bincount", "equal", "_local_scalar_dense"}
MASK_INDEXED = {"index", "index_put", "index_put_", "_index_put_impl_"}  # sync only with a bool index


def _bool_index(indices) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


class _Reads(TorchFunctionMode):
    def __init__(self, counts: Counter, depth: list) -> None:
        super().__init__()
        self.counts, self.depth = counts, depth

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = HOST_READS.get(func)
        if func is torch.nn.functional.one_hot:
            classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
            name = "one_hot" if classes < 0 else None  # a given class count: its checks run on CPU only
        elif name is None:
            return func(*args, **kwargs)
        if name is not None:
            self.counts[name] += 1
        self.depth[0] += 1  # the aten ops it runs are this read (or CPU-only checks), not more syncs
        try:
            return func(*args, **kwargs)
        finally:
            self.depth[0] -= 1


class _DataDependent(TorchDispatchMode):
    def __init__(self, counts: Counter, depth: list) -> None:
        super().__init__()
        self.counts, self.depth = counts, depth

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.depth[0]:
            name = func.overloadpacket.__name__
            if name in DATA_DEPENDENT:
                self.counts[name] += 1
            elif name in MASK_INDEXED and _bool_index(args[1] if len(args) > 1 else kwargs.get("indices")):
                self.counts[f"{name}[mask]"] += 1
            elif name == "repeat_interleave" and func._overloadname == "Tensor" and kwargs.get("output_size") is None:
                self.counts["repeat_interleave"] += 1
        return func(*args, **kwargs)


def count_syncs(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, Counter]:
    """Run ``fn(*args, **kwargs)`` and return ``(its result, Counter of host syncs by operation name)``."""
    counts, depth = Counter(), [0]
    with _DataDependent(counts, depth), _Reads(counts, depth):
        result = fn(*args, **kwargs)
    return result, counts
