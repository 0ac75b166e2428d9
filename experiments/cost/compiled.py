"""``torch.compile`` for the throughput protocol: compiling the timed models, counting their compilations, and
refusing a method that cannot compile instead of timing it eagerly.

- :func:`compile_model`: ``torch.compile(model, backend=...)`` with dynamo's defaults (``dynamic=None``: the
  first call compiles for its shapes, a shape that then changes is recompiled once as dynamic and stays so). That
  default is also the ragged methods' choice (``methods/ragged.py``, "Compiled runs"): their host syncs break
  the graph, and each piece between two syncs becomes dynamic in the packed length after its first change, so
  the number of graphs stops growing after the first batches (``tests/test_compile.py`` bounds it).
- :class:`CompileCount`: dynamo's own counters (``torch._dynamo.utils.counters``: ``frames.ok`` counts every
  frame dynamo compiled, ``graph_break`` every graph break by reason), read before and after a model runs, so a
  measurement reports the frames compiled at its first forward, the recompilations after it and those during
  the timed runs (which must be 0: a timing that includes compilation is not a steady-state timing).
- :func:`strict`: while it is active, a frame that reaches dynamo's recompile limit raises instead of running
  eagerly from then on (``fail_on_recompile_limit_hit``), and any error dynamo raises becomes a
  :class:`CompileError` naming the method, the backend and the reason. Graph breaks are not errors (the pieces
  between them still run compiled); their count is reported.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

BACKENDS = ("inductor", "aot_eager", "eager")  # measure.compile_backend's choices (experiments/config.py)


class CompileError(RuntimeError):
    """A timed model cannot run compiled; the message names the model, the backend and the reason."""


def compile_model(model: nn.Module, backend: str, dynamic: Optional[bool] = None) -> nn.Module:
    """``torch.compile(model, backend=backend, dynamic=dynamic)``; ``dynamic=None`` is dynamo's automatic
    dynamic shapes (the protocol's), ``True`` symbolic shapes from the first call
    (``experiments/compile_strategies.py`` compares them)."""
    if backend not in BACKENDS:
        raise ValueError(f"measure.compile_backend={backend!r} unknown; valid: {', '.join(BACKENDS)}")
    return torch.compile(model, backend=backend, dynamic=dynamic)


@dataclass(frozen=True)
class CompileCount:
    """Dynamo's counters at one moment; the difference of two is what ran in between."""

    frames: int
    graph_breaks: int

    @classmethod
    def now(cls) -> "CompileCount":
        from torch._dynamo.utils import counters

        return cls(int(counters["frames"]["ok"]), int(sum(counters["graph_break"].values())))

    def since(self, earlier: "CompileCount") -> "CompileCount":
        return CompileCount(self.frames - earlier.frames, self.graph_breaks - earlier.graph_breaks)


@contextlib.contextmanager
def strict(name: str, backend: str) -> Iterator[None]:
    """Run compiled models so that failing to compile is an error naming ``name``, never a silent eager run."""
    import torch._dynamo

    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, suppress_errors=False):
            yield
    except CompileError:
        raise
    except Exception as error:  # dynamo's and the backends' errors have no common base class
        if not _from_compiler(error):
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompileError(f"{name} cannot run under torch.compile(backend={backend!r}): "
                           f"{type(error).__name__}: {reason}") from error


def _from_compiler(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) was raised by dynamo, AOT autograd or inductor."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        module = type(error).__module__ or ""
        if module.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "torch.fx")):
            return True
        error = error.__cause__ or error.__context__
    return False
