"""Vocabularies: values seen per categorical column, merged across pieces, and the
mapping from values to contiguous ids.

Without a frequency threshold (``T = 0``, the reference DLRM) the vocabulary of a
column is every value seen in any kept row of any split; ids are the ranks of the
values in sorted order, ``0 .. K-1``.  With ``T >= 1`` only values seen at least ``T``
times in the training split get their own id ``1 .. K``; every other value (rare, or
never seen in train) shares id 0 (as NVIDIA's and torchrec's pipelines do).

Pass 3 (``merge_all``, one task per column) merges the pieces' records of a column
into its vocabulary; the ids pass maps values with a ``Mapper`` per column.
"""
from __future__ import annotations

import json
from functools import partial

import numpy as np

from dqrm_mpi.data.schema import NUM_SPARSE

from .executor import Executor
from .options import PrepOptions
from .workdir import WorkDir, save_done, save_npy


def union_sorted(values: list[np.ndarray], counts: list[np.ndarray] | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Union of sorted unique uint32 arrays (with their counts added when given).

    A stable sort of the concatenation finds the sorted runs (timsort), so merging k
    arrays of n values in all costs about n log k."""
    if len(values) == 1:
        return values[0], (counts[0] if counts is not None else None)
    vals = np.concatenate(values)
    if len(vals) == 0:
        return vals.astype(np.uint32), (np.zeros(0, np.int64) if counts is not None else None)
    if counts is None:
        vals = np.sort(vals, kind="stable")
        keep = np.empty(len(vals), dtype=bool)
        keep[0] = True
        np.not_equal(vals[1:], vals[:-1], out=keep[1:])
        return vals[keep], None
    order = np.argsort(vals, kind="stable")
    vals = vals[order]
    cnts = np.concatenate(counts)[order]
    start = np.empty(len(vals), dtype=bool)
    start[0] = True
    np.not_equal(vals[1:], vals[:-1], out=start[1:])
    first = np.flatnonzero(start)
    return vals[first], np.add.reduceat(cnts, first).astype(np.int64)


class CountAccumulator:
    """Union of sorted unique value arrays (with counts added when given), compacted lazily
    so the cost stays near-linear in what is added."""

    def __init__(self, with_counts: bool) -> None:
        self.with_counts = with_counts
        self.values = np.zeros(0, np.uint32)
        self.counts = np.zeros(0, np.int64) if with_counts else None
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending_size = 0

    def add(self, values: np.ndarray, counts: np.ndarray | None = None) -> None:
        """values: sorted, unique; counts: int64 aligned with values (when with_counts)."""
        if len(values) == 0:
            return
        self._pending.append((values, counts))
        self._pending_size += len(values)
        if self._pending_size > max(len(self.values), 1 << 22):
            self._compact()

    def _compact(self) -> None:
        if not self._pending:
            return
        parts = ([(self.values, self.counts)] if len(self.values) else []) + self._pending
        vals, cnts = union_sorted([p[0] for p in parts], [p[1] for p in parts] if self.with_counts else None)
        self.values = vals.astype(np.uint32, copy=False)
        if self.with_counts:
            self.counts = cnts.astype(np.int64, copy=False)
        self._pending, self._pending_size = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        self._compact()
        return self.values, self.counts


def build_vocab(values: np.ndarray, counts: np.ndarray | None, threshold: int) -> tuple[np.ndarray, int]:
    """(sorted vocabulary, cardinality)."""
    if threshold <= 0:
        return values.astype(np.uint32), max(1, len(values))
    keep = values[counts >= threshold].astype(np.uint32)
    return keep, len(keep) + 1


class Mapper:
    """Maps raw (hashed, modulo) values of one column to contiguous ids (a binary search
    in the sorted vocabulary: the ids pass maps only each run's distinct values, which
    come sorted, so this costs little even for millions of values)."""

    def __init__(self, vocab: np.ndarray, threshold: int) -> None:
        self.vocab, self.threshold = vocab, threshold

    def __call__(self, v: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.vocab, v)
        if self.threshold <= 0:
            return idx
        k = len(self.vocab)
        if k == 0:
            return np.zeros(len(v), dtype=np.int64)
        found = self.vocab[np.minimum(idx, k - 1)] == v
        return np.where(found, idx + 1, 0)

    def with_unseen(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 as ``__call__`` gives them, bool: the value is not in the vocabulary).  Prep's
        own values are all in it; new rows' may not be (``input_map``: they get its OOV id)."""
        k = len(self.vocab)
        if k == 0:
            return np.zeros(len(v), dtype=np.int64), np.ones(len(v), dtype=bool)
        idx = np.searchsorted(self.vocab, v)
        missing = self.vocab[np.minimum(idx, k - 1)] != v
        ids = idx + 1 if self.threshold > 0 else idx
        return np.where(missing, 0, ids).astype(np.int64, copy=False), missing


def merge_all(ex: Executor, work: WorkDir, opts: PrepOptions, n_pieces: int) -> list[dict]:
    """Pass 3 over every column; the columns' {"column", "cardinality", "distinct"}."""
    work.vocab_dir.mkdir(exist_ok=True)
    return ex.map(partial(merge_column, work, opts, n_pieces), range(NUM_SPARSE), desc="vocabularies", unit="col")


def merge_column(work: WorkDir, opts: PrepOptions, n_pieces: int, column: int) -> dict:
    """Pass 3 for one column: merge the pieces' values into the vocabulary file; returns {"column", "cardinality", "distinct"}."""
    done = work.column_done(column)
    if done.is_file():
        return json.loads(done.read_text())
    threshold = opts.freq_threshold
    acc = CountAccumulator(threshold > 0)
    for i in range(n_pieces):
        a, b = np.load(work.piece_vocab(i, "offsets"))[column:column + 2]
        values = np.load(work.piece_vocab(i, "values"), mmap_mode="r")[a:b]
        acc.add(values, np.load(work.piece_vocab(i, "counts"), mmap_mode="r")[a:b] if threshold > 0 else None)
    values, counts = acc.result()
    vocab, card = build_vocab(values, counts, threshold)
    save_npy(work.column_vocab(column), vocab)
    info = {"column": column, "cardinality": int(card), "distinct": int(len(values))}
    save_done(done, json.dumps(info))
    return info


def load_mappers(work: WorkDir, opts: PrepOptions) -> list[Mapper]:
    """The value -> id mapping of every column (files memory-mapped)."""
    out = []
    for j in range(NUM_SPARSE):
        vocab = np.load(work.column_vocab(j), mmap_mode="r")
        out.append(Mapper(np.asarray(vocab), opts.freq_threshold))
    return out
