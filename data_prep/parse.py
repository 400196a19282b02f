"""Pass 2, parse (one task per piece): parse, validate, sub-sample and spill the rows
grouped by destination.

A training row goes to a random shuffle bucket (a seeded hash of its file and line, so
the draw does not depend on how the input was cut into pieces); test and val rows keep
their order.  Groups are numbered: buckets ``0 .. S-1``, then test ``S``, then val
``S + 1``.  Every ``RUN_ROWS`` rows the piece spills a run: its rows sorted by group, the
categoricals as int32 indices into the run's own sorted list of distinct values per
column (its dictionaries).  The piece's distinct values per column (with train counts
when a frequency threshold is set) are its vocabulary record for pass 3.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Iterator, NamedTuple

import numpy as np

from dqrm_mpi.data.schema import NUM_SPARSE

from .criteo_format import MAX_EXAMPLES, ParsedBlock, parse_block
from .errors import InputError
from .executor import Executor
from .kill_hook import maybe_kill
from .options import PrepOptions
from .plan import Plan
from .sources import Piece, Source, iter_gzip_blocks, read_range
from .vocab import CountAccumulator
from .workdir import WorkDir, save_done, save_npy

GZIP_BLOCK_BYTES = 32 << 20
RUN_ROWS = 1 << 20
SALT_SUBSAMPLE, SALT_BUCKET = 0x5B5A, 0xB0C7
TRAIN, TEST, VAL = 0, 1, 2  # split codes: the index into PieceSummary.rows / .positives
SPLIT_CODES = {"train": TRAIN, "test": TEST, "val": VAL}


@dataclass
class PieceSummary:
    """What parsing one piece found (its ``done.json``).

    rows, positives: kept rows and clicks per split code (train, test, val); runs: for
    each spilled run, its row count per group (buckets 0 .. S-1, test, val)."""

    index: int
    lines: int = 0
    bad: int = 0
    subsampled: int = 0
    rows: list[int] = field(default_factory=lambda: [0, 0, 0])
    positives: list[int] = field(default_factory=lambda: [0, 0, 0])
    bad_examples: list[dict] = field(default_factory=list)
    runs: list[list[int]] = field(default_factory=list)


class SpillBlock(NamedTuple):
    """Kept rows of one parsed block: group int64 [n] (destination), label uint8 [n], dense
    float32 [n, 13], cat_idx int32 [26, n] (column-major) into cat_dict (per column uint32
    values)."""

    group: np.ndarray
    label: np.ndarray
    dense: np.ndarray
    cat_idx: np.ndarray
    cat_dict: list[np.ndarray]


def parse_all(ex: Executor, work: WorkDir, opts: PrepOptions, plan: Plan) -> list[PieceSummary]:
    """Pass 2 over every piece of the plan, in piece order."""
    counted = all(s.lines >= 0 for s in plan.sources)
    return ex.map(partial(parse_piece, work, opts, plan.sources, plan.buckets), plan.pieces, desc="parse",
                  total=sum(s.lines for s in plan.sources) if counted else None, unit="rows",
                  weight=(lambda s: s.lines) if counted else None)


def parse_piece(work: WorkDir, opts: PrepOptions, sources: tuple[Source, ...], buckets: int,
                piece: Piece) -> PieceSummary:
    """Parse one piece, spill its rows in runs, save its vocabulary record (see module doc)."""
    done = work.piece_done(piece.index)
    if done.is_file():
        return PieceSummary(**json.loads(done.read_text()))
    work.piece_dir(piece.index).mkdir(parents=True, exist_ok=True)
    src = sources[piece.source]
    summary = PieceSummary(piece.index)
    spill = RunSpill(work, piece.index, buckets, opts.freq_threshold)
    first_line = piece.first_line
    for buf in _blocks(src, piece):
        pb = parse_block(buf, src.path, first_line, opts.max_ind_range, opts.bad_lines)
        first_line += pb.n_lines
        _count_parsed(summary, pb)
        spill.add(_route(pb, src, opts, buckets, summary))
    summary.runs = spill.finish()
    if piece.lines >= 0 and summary.lines != piece.lines:
        raise InputError(f"{src.path}: read {summary.lines} lines, counted {piece.lines} (file changed?)")
    save_done(done, json.dumps(asdict(summary)))
    maybe_kill("pieces")
    return summary


def _blocks(src: Source, piece: Piece) -> Iterator[bytes]:
    if src.gz:
        return iter_gzip_blocks(src.path, GZIP_BLOCK_BYTES)
    return iter([read_range(src.path, piece.start, piece.end)])


def _count_parsed(summary: PieceSummary, pb: ParsedBlock) -> None:
    summary.lines += pb.n_lines
    summary.bad += pb.n_bad
    room = MAX_EXAMPLES - len(summary.bad_examples)
    summary.bad_examples.extend(e.to_dict() for e in pb.bad[:max(0, room)])


def _route(pb: ParsedBlock, src: Source, opts: PrepOptions, buckets: int, summary: PieceSummary) -> SpillBlock:
    """The block's rows with their groups, train negatives sub-sampled; counts them in ``summary``."""
    line = pb.line
    split = np.where(line < src.train_end, TRAIN, np.where(line < src.test_end, TEST, VAL)).astype(np.int64)
    label, dense, cat_idx = pb.label, pb.dense, pb.cat_idx
    if opts.sub_sample_rate > 0:
        draw = uniform01(row_hash(src.index, line, opts.seed, SALT_SUBSAMPLE))
        drop = (split == TRAIN) & (label == 0) & (draw < opts.sub_sample_rate)
        if drop.any():
            keep = ~drop
            summary.subsampled += int(drop.sum())
            label, dense, cat_idx, line, split = label[keep], dense[keep], cat_idx[:, keep], line[keep], split[keep]
    bucket = (row_hash(src.index, line, opts.seed, SALT_BUCKET) % np.uint64(buckets)).astype(np.int64)
    group = np.where(split == TRAIN, bucket, buckets + split - 1)
    for s in (TRAIN, TEST, VAL):
        m = split == s
        summary.rows[s] += int(m.sum())
        summary.positives[s] += int(label[m].sum())
    return SpillBlock(group, label, dense, cat_idx, pb.cat_dict)


class RunSpill:
    """Collects one piece's blocks and spills them as runs of about ``RUN_ROWS`` rows;
    gathers the piece's distinct values per column (with train counts when threshold > 0)."""

    def __init__(self, work: WorkDir, piece: int, buckets: int, threshold: int) -> None:
        self.work, self.piece, self.buckets, self.threshold = work, piece, buckets, threshold
        self.values = [CountAccumulator(threshold > 0) for _ in range(NUM_SPARSE)]
        self.pending: list[SpillBlock] = []
        self.pending_rows = 0
        self.runs: list[list[int]] = []

    def add(self, block: SpillBlock) -> None:
        self.pending.append(block)
        self.pending_rows += len(block.label)
        if self.pending_rows >= RUN_ROWS:
            self._flush()

    def finish(self) -> list[list[int]]:
        """Spill what is left and save the vocabulary record; the row count per group of each run."""
        self._flush()
        found = [acc.result() for acc in self.values]
        offsets = np.zeros(NUM_SPARSE + 1, dtype=np.int64)
        np.cumsum([len(v) for v, _ in found], out=offsets[1:])
        save_npy(self.work.piece_vocab(self.piece, "values"), np.concatenate([v for v, _ in found]))
        if self.threshold > 0:
            save_npy(self.work.piece_vocab(self.piece, "counts"), np.concatenate([c for _, c in found]))
        save_npy(self.work.piece_vocab(self.piece, "offsets"), offsets)
        return self.runs

    def _flush(self) -> None:
        if not self.pending:
            return
        pending = self.pending
        group = np.concatenate([b.group for b in pending])
        order = np.argsort(group, kind="stable")
        counts = np.bincount(group, minlength=self.buckets + 2)
        local, dicts = self._dictionaries(group < self.buckets, order)
        offs = np.zeros(NUM_SPARSE + 1, dtype=np.int64)
        np.cumsum([len(d) for d in dicts], out=offs[1:])
        run = len(self.runs)
        for name, arr in (("label", np.concatenate([b.label for b in pending])[order]),
                          ("dense", np.concatenate([b.dense for b in pending])[order]),
                          ("idx", local), ("dict", np.concatenate(dicts)), ("dictoff", offs)):
            save_npy(self.work.run_file(self.piece, run, name), arr)
        self.runs.append(counts.tolist())
        self.pending, self.pending_rows = [], 0

    def _dictionaries(self, train: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The pending blocks as one run -> (int32 [26, n] indices of the rows, taken in
        ``order``, into the concatenation of the returned per-column dictionaries; the
        per-column sorted unique values used by the run's rows).  Adds each column's values
        (with train counts) to ``self.values``."""
        pending = self.pending
        n = len(order)
        local = np.empty((NUM_SPARSE, n), dtype=np.int32)
        dicts: list[np.ndarray] = []
        base = 0
        for j in range(NUM_SPARSE):
            if len(pending) == 1:
                d, idx = pending[0].cat_dict[j], pending[0].cat_idx[j]
            else:
                d = np.concatenate([b.cat_dict[j] for b in pending])
                sizes = np.cumsum([0] + [len(b.cat_dict[j]) for b in pending[:-1]])
                idx = np.concatenate([b.cat_idx[j] + np.int32(o) for b, o in zip(pending, sizes)])
            u, inv = sorted_unique(d, likely_distinct=len(pending) == 1)
            loc = np.take(inv, idx)
            cnt = np.bincount(loc, minlength=len(u))
            used = cnt > 0
            if not used.all():  # values only in dropped (bad or sub-sampled) rows
                newpos = (np.cumsum(used) - 1).astype(np.int32)
                u, loc = u[used], np.take(newpos, loc)
            if self.threshold > 0:
                c = np.bincount(loc[train], minlength=len(u))
                seen = c > 0
                self.values[j].add(u[seen], c[seen].astype(np.int64))
            else:
                self.values[j].add(u)
            np.add(np.take(loc, order), np.int32(base), out=local[j])
            dicts.append(u.astype(np.uint32, copy=False))
            base += len(u)
        return local, dicts


def sorted_unique(d: np.ndarray, likely_distinct: bool) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(d, return_inverse=True)`` with an int32 inverse; faster when ``d`` holds
    no repeats, as one block's dictionary usually does (``likely_distinct``: try that first)."""
    if likely_distinct:
        order = np.argsort(d)
        u = d[order]
        if len(u) < 2 or (u[1:] != u[:-1]).all():
            inv = np.empty(len(d), dtype=np.int32)
            inv[order] = np.arange(len(d), dtype=np.int32)
            return u, inv
    u, inv = np.unique(d, return_inverse=True)
    return u, inv.astype(np.int32)


# ---------------------------------------------------------------- seeded per-row draws

def splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def row_hash(source: int, line: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """A seeded 64-bit hash of (file, line): the same row always gets the same draw."""
    key = (np.uint64(source) << np.uint64(40)) | line.astype(np.uint64)
    mix = splitmix64(np.array([(seed * 0x100000001B3 + salt) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    return splitmix64(key ^ mix)


def uniform01(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
