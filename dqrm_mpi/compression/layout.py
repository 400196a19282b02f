"""Where a flat vector's scale groups lie, as 2-D blocks whose rows are groups.

Every grouping the exchanges use is a sequence of contiguous runs: the output channels of
a weight (rows of one width), a bias or a whole tensor (one row), embedding rows (width
dim) or tables (runs of rows).  A ``Block`` views ``x[lo:hi]`` as ``[rows, cols]``; row i
is group ``g_lo + i``, or ``row_group[i]`` when rows share groups (embedding tables).
Adjacent runs of equal width merge into one block, so the MLP's 1,624 channels are a
handful of blocks: absmax is ``amax(dim=1)`` per block and scales broadcast per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Block:
    lo: int
    rows: int
    cols: int
    g_lo: int = 0
    row_group: torch.Tensor | None = None  # int64 [rows] group of each row, or None: g_lo + row

    @property
    def hi(self) -> int:
        return self.lo + self.rows * self.cols

    def row_scales(self, scales: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The scale of each row: scales [groups] (dim 0) or [r, groups] (dim 1) -> [rows] / [r, rows]."""
        if self.row_group is None:
            return scales.narrow(dim, self.g_lo, self.rows)
        return scales.index_select(dim, self.row_group)


@dataclass(frozen=True)
class Layout:
    blocks: tuple[Block, ...]
    numel: int
    num_groups: int

    @staticmethod
    def from_sizes(sizes: list[int]) -> "Layout":
        """Groups of ``sizes`` elements, one after another."""
        blocks: list[Block] = []
        lo = g = 0
        i = 0
        while i < len(sizes):
            j = i
            while j < len(sizes) and sizes[j] == sizes[i]:
                j += 1
            blocks.append(Block(lo, j - i, sizes[i], g))
            lo += (j - i) * sizes[i]
            g += j - i
            i = j
        return Layout(tuple(blocks), lo, len(sizes))

    @staticmethod
    def single(numel: int) -> "Layout":
        return Layout((Block(0, 1, numel, 0),), numel, 1)

    @staticmethod
    def rows(n: int, cols: int, row_group: torch.Tensor | None, num_groups: int) -> "Layout":
        """n rows of ``cols``; row i in group row_group[i] (None: group i, num_groups == n)."""
        return Layout((Block(0, n, cols, 0, row_group),), n * cols, num_groups)

    @staticmethod
    def from_groups(groups: torch.Tensor | None, num_groups: int, numel: int) -> "Layout | None":
        """The layout of a per-element group index, or None when groups are not contiguous runs."""
        if groups is None:
            return Layout.single(numel)
        if groups.numel() > 1 and not bool((groups[1:] >= groups[:-1]).all()):
            return None
        counts = torch.bincount(groups, minlength=num_groups) if groups.numel() else torch.zeros(num_groups)
        return Layout.from_sizes([int(c) for c in counts.tolist()])
