"""The ragged-token runtime: a batch whose images keep different numbers of tokens, run without padding.

This module owns the packed representation, for every method whose token counts vary per image (A-ViT, ATS,
threshold ToMe, LTMP):

- :class:`Packed`: the rows ``x`` ``[T, C]`` of all images one after another (image-major, each image's rows
  in their original order) and their :class:`Layout`: ``source`` ``[T]`` (``image * tokens + position``:
  which image and which original token each row is), ``lengths`` and ``images`` of the images still present
  (an image with no rows left leaves the layout), and indices derived from them, built once per layout;
- :meth:`Packed.keep`: compaction (dropping rows) and gathering of any per-row state carried along.

What runs on the rows: the attention half of a timm block, within each image's own rows, and the choice of its
backend are ``methods/ragged_attention.py``'s; the MLP half is :func:`methods.backbone.mlp_residual`, which is
row-wise already.

Host syncs (on CUDA; none costs anything on CPU), counted on CPU by ``tests/test_host_syncs.py``: a compaction
(:meth:`Packed.keep`) reads how many rows and images survive in one ``tolist``, and finds them with
``nonzero_static`` sized by it: one sync per call, also when no row leaves (the caller learns that from it). The
CUDA paths (``varlen``, and ``padded`` with ``group=0`` padded to ``tokens``) make no other. Only ``padded`` with
``group > 0`` (the CPU default) reads the lengths on the host, once per layout (:attr:`Layout.sizes`).

Compiled runs (``measure.compile``, ``experiments/cost/compiled.py``): the whole method is compiled with dynamo's
defaults. Every host sync above breaks the graph, and each piece between two syncs is compiled for its first
packed length, then once more as dynamic in that length when it changes (automatic dynamic shapes), which the
first forward already does as the length shrinks from block to block. Later batches, whose images keep other
counts, reuse those graphs: on the tiny test model A-ViT compiled 45 frames in its first forward and one in the
next eleven batches (``tests/test_compile.py`` bounds it), and nothing falls back to eager silently.

Why automatic dynamic shapes and not ``dynamic=True`` from the start (``experiments/compile_strategies.py``,
DeiT-S at 224 px, batch 32, one CPU thread, inductor, random weights; speedup over timm compiled the same way in
the same run): A-ViT 1.48x automatic against 1.37x symbolic (55 against 43 frames compiled, 31 against 34 s),
LTMP 4.99x against 4.93x (32 against 20 s), ATS 1.02x against 0.98x (30 against 36 s). Symbolic shapes
from the first call compile fewer frames, but every kernel, the fixed-shape patch embedding and head included, is
then generic in the batch and the length, and runs slower; the automatic default keeps the shapes that never
change static, and its recompilations end within the first batches (none during timing). Bucketing the packed
length (padding it to a few sizes) was not built: it would trade padded rows, i.e. FLOPs this runtime exists to
avoid, for static kernels, and the automatic default already stops recompiling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class Layout:
    """Where the rows of a ragged batch come from; everything derived from it is computed once per layout.

    A layout changes only at a compaction, so the blocks in between reuse its index tensors (row starts,
    per-row image, the padded attention plan) instead of rebuilding them per block.
    """

    def __init__(self, source: Tensor, lengths: Tensor, images: Tensor, tokens: int, batch: int) -> None:
        self.source = source  # [T] long: image * tokens + original position
        self.lengths = lengths  # [R] long, all > 0: rows of each image still present
        self.images = images  # [R] long: the original index of each present image, ascending
        self.tokens = tokens  # tokens per image before packing: an upper bound on every length
        self.batch = batch  # images in the original batch
        self._cache: dict = {}

    def cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def starts(self) -> Tensor:
        """``[R]`` row of each present image's first row."""
        return self.cached("starts", lambda: torch.cumsum(self.lengths, 0) - self.lengths)

    @property
    def segment(self) -> Tensor:
        """``[T]`` which present image (0..R-1) each row belongs to."""
        return self.cached("segment", lambda: torch.repeat_interleave(
            torch.arange(self.lengths.shape[0], device=self.lengths.device), self.lengths,
            output_size=self.source.shape[0]))

    @property
    def sizes(self) -> list[int]:
        """The lengths on the host (a sync on CUDA; the padded backend's grouping needs them)."""
        return self.cached("sizes", self.lengths.tolist)

    @property
    def image_lengths(self) -> Tensor:
        """``[batch]`` rows of every image of the original batch (0 for images that have left)."""
        return self.cached("image_lengths", lambda: self.lengths.new_zeros(self.batch).index_copy_(
            0, self.images, self.lengths))

    def cu_seqlens(self) -> Tensor:
        """``[R + 1]`` int32 cumulative lengths, the varlen kernels' sequence boundaries."""
        return self.cached("cu_seqlens", lambda: torch.nn.functional.pad(
            torch.cumsum(self.lengths, 0, dtype=torch.int32), (1, 0)))


@dataclass
class Packed:
    """Rows of a ragged batch (see the module docstring) and their :class:`Layout`."""

    x: Tensor  # [T, C]
    layout: Layout

    @classmethod
    def pack(cls, x: Tensor) -> "Packed":
        """All tokens of ``x`` ``[B, N, C]`` as rows."""
        batch, tokens, dim = x.shape
        device = x.device
        layout = Layout(torch.arange(batch * tokens, device=device),
                        torch.full((batch,), tokens, dtype=torch.long, device=device),
                        torch.arange(batch, device=device), tokens, batch)
        return cls(x.reshape(batch * tokens, dim), layout)

    def with_rows(self, x: Tensor) -> "Packed":
        """The same layout holding new row values (e.g. a block's output)."""
        return Packed(x, self.layout)

    def keep(self, keep: Tensor, *carried: Tensor) -> tuple["Packed", ...]:
        """Drop the rows where ``keep`` (``[T]`` bool) is False, from the packed rows and from every ``carried``
        per-row tensor (gathered together, order kept); images left without rows leave the layout.
        Returns ``(packed, *carried)``: this very ``Packed`` and the same ``carried`` when every row stays."""
        old = self.layout
        counts = torch.zeros_like(old.lengths).index_add_(0, old.segment, keep.long())  # rows each image keeps
        present = counts > 0
        # The one host sync of a compaction (on CUDA): how many rows and images stay, read together. With them
        # known, nonzero_static finds the rows and images without a sync of its own.
        rows_left, images_left = torch.stack([counts.sum(), present.sum()]).tolist()
        if rows_left == keep.numel():
            return (self, *carried)
        rows = torch.nonzero_static(keep, size=rows_left).squeeze(1)
        present = torch.nonzero_static(present, size=images_left).squeeze(1)
        source = old.source.index_select(0, rows)  # index_select: several times faster than indexing on CPU
        layout = Layout(source, counts.index_select(0, present), old.images.index_select(0, present),
                        old.tokens, old.batch)
        return (Packed(self.x.index_select(0, rows), layout), *(t.index_select(0, rows) for t in carried))

    def unpack(self, fill: float = 0.0) -> Tensor:
        """The rows back in a ``[B, tokens, C]`` tensor at their original positions, ``fill`` elsewhere."""
        layout = self.layout
        out = self.x.new_full((layout.batch * layout.tokens, self.x.shape[1]), fill)
        out.index_copy_(0, layout.source, self.x)
        return out.view(layout.batch, layout.tokens, -1)
