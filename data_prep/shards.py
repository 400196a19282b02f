"""Pass 5, shards: each split is one stream of rows cut into shards of ``--shard-rows``.

The train stream is the concatenation of the shuffle buckets, each permuted with its
own seeded generator; test and val streams are their rows in input order.  Row
assignment to buckets is i.i.d. uniform and every bucket is permuted, so the training
order is a uniform random permutation that depends only on the seed and the input,
not on the number of workers or pieces.  Shards are written atomically and a rerun
skips those already there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, Sequence

import numpy as np

from dqrm_mpi.data.schema import NUM_DENSE, NUM_SPARSE, SPLITS, shard_name, write_shard

from .executor import Executor
from .kill_hook import maybe_kill
from .options import PrepOptions
from .parse import PieceSummary
from .workdir import WorkDir

SALT_PERMUTE = 0x9E2D


class Segment(NamedTuple):
    """Rows [offset, offset + rows) of run ``run`` of piece ``piece``."""

    piece: int
    run: int
    offset: int
    rows: int


Unit = list[Segment]  # a train bucket, or one run's test (or val) rows


def split_layouts(summaries: Sequence[PieceSummary], buckets: int) -> dict[str, list[Unit]]:
    """Each split's stream as a list of units in order: train, one unit per bucket (its
    segments in piece and run order); test and val, one unit per run that has such rows."""
    train: list[Unit] = [[] for _ in range(buckets)]
    held: dict[str, list[Unit]] = {"test": [], "val": []}
    for s in summaries:
        for r, counts in enumerate(s.runs):
            offs = np.concatenate([[0], np.cumsum(counts)])
            for b in range(buckets):
                if counts[b]:
                    train[b].append(Segment(s.index, r, int(offs[b]), int(counts[b])))
            for name, g in (("test", buckets), ("val", buckets + 1)):
                if counts[g]:
                    held[name].append([Segment(s.index, r, int(offs[g]), int(counts[g]))])
    return {"train": train, "test": held["test"], "val": held["val"]}


@dataclass(frozen=True)
class ShardJob:
    """Write shards [first, stop) of ``split``, whose stream is ``units`` (``total`` rows)."""

    split: str
    units: list[Unit]
    first: int
    stop: int
    total: int


def shard_jobs(layouts: dict[str, list[Unit]], totals: dict[str, int], shard_rows: int, chunks: int) -> list[ShardJob]:
    """Per split, up to ``chunks`` jobs of consecutive shards: a shuffle bucket that
    straddles two jobs is read by both (the one that needs less than half of it reads only
    those rows), so fewer jobs means less repeated work."""
    jobs = []
    for split in SPLITS:
        n_shards = math.ceil(totals[split] / shard_rows)
        if n_shards == 0:
            continue
        edges = np.linspace(0, n_shards, min(n_shards, chunks) + 1).round().astype(int)
        for a, b in zip(edges[:-1], edges[1:]):
            if b > a:
                jobs.append(ShardJob(split, layouts[split], int(a), int(b), totals[split]))
    return jobs


def write_all(ex: Executor, work: WorkDir, opts: PrepOptions, jobs: list[ShardJob], sparse_dtype: str,
              total_rows: int) -> int:
    """Pass 5: run the jobs; returns how many shards were written now (not found from an earlier run)."""
    results = ex.map(partial(write_shards, work, opts, sparse_dtype), jobs, desc="shards", total=total_rows,
                     unit="rows", weight=lambda r: r["rows"])
    return sum(r["written"] for r in results)


def write_shards(work: WorkDir, opts: PrepOptions, sparse_dtype: str, job: ShardJob) -> dict:
    """Write the job's shards (shard k holds rows [k*R, (k+1)*R) of the split's stream);
    returns {"rows": rows covered, "written": shards written now}."""
    R = opts.shard_rows
    sizes = np.array([sum(s.rows for s in segs) for segs in job.units], dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(sizes)])
    label_dtype = np.dtype(opts.label_dtype)
    perms: dict[int, np.ndarray | None] = {}  # the last unit's (consecutive shards share it)
    written = rows = 0
    for k in range(job.first, job.stop):
        lo, hi = k * R, min((k + 1) * R, job.total)
        rows += hi - lo
        path = work.out / job.split / shard_name(k)
        if path.is_file():
            continue
        shard = _Rows.empty(hi - lo, sparse_dtype)
        u = int(np.searchsorted(cum, lo, side="right") - 1)
        while u < len(job.units) and cum[u] < hi:
            if sizes[u]:
                if u not in perms:
                    perms = {u: _permutation(opts.seed, job.split, u, int(sizes[u]))}
                a, b = max(lo, cum[u]), min(hi, cum[u + 1])
                _unit_rows(work, job.units[u], perms[u], int(a - cum[u]), int(b - cum[u]), shard.part(a - lo, b - lo))
            u += 1
        write_shard(path, shard.dense, shard.ids, shard.label.astype(label_dtype, copy=False),
                    attrs={"split": job.split, "shard": k})
        written += 1
        maybe_kill("shards")
    return {"rows": rows, "written": written}


class _Rows(NamedTuple):
    """Rows of a shard or of a unit: label uint8 [n], dense float32 [n, 13], ids [n, 26]."""

    label: np.ndarray
    dense: np.ndarray
    ids: np.ndarray

    @classmethod
    def empty(cls, n: int, sparse_dtype: str) -> _Rows:
        return cls(np.empty(n, np.uint8), np.empty((n, NUM_DENSE), np.float32), np.empty((n, NUM_SPARSE), sparse_dtype))

    def part(self, a: int, b: int) -> _Rows:
        """Rows [a, b) (views)."""
        return _Rows(self.label[a:b], self.dense[a:b], self.ids[a:b])


def _permutation(seed: int, split: str, u: int, n: int) -> np.ndarray | None:
    """The order of unit ``u``'s rows in its split's stream: a train bucket's seeded
    permutation of its ``n`` rows; None (input order) for test and val."""
    return np.random.default_rng([seed, SALT_PERMUTE, u]).permutation(n) if split == "train" else None


def _unit_rows(work: WorkDir, segments: Unit, perm: np.ndarray | None, a: int, b: int, out: _Rows) -> None:
    """Rows [a, b) of the unit's stream (its rows taken in ``perm`` order) into ``out``.
    A shard that needs a small part of a bucket reads only those rows."""
    if perm is None:
        _read_rows(work, segments, np.arange(a, b), out)
        return
    sel = perm[a:b]
    if 2 * len(sel) > len(perm):  # most of the bucket: read all of it (sequentially)
        wanted, at = np.arange(len(perm)), sel
    else:  # its rows in input order, and where each row of the stream is among them
        mark = np.zeros(len(perm), dtype=bool)
        mark[sel] = True
        wanted = np.flatnonzero(mark)
        rank = np.empty(len(perm), dtype=np.int64)
        rank[wanted] = np.arange(len(wanted))
        at = rank[sel]
    rows = _Rows.empty(len(wanted), out.ids.dtype)
    _read_rows(work, segments, wanted, rows)
    for src, dst in zip(rows, out):
        np.take(src, at, axis=0, out=dst, mode="clip")  # mode "raise" would copy through a temporary


def _read_rows(work: WorkDir, segments: Unit, rows: np.ndarray, out: _Rows) -> None:
    """The unit's rows at the sorted positions ``rows`` (its segments concatenated) into
    ``out``.  A row's ids are its run's value map at its dictionary indices (``vmap[idx]``,
    see ``map_ids.py``)."""
    lo = 0  # the segment's first position in the unit
    for seg in segments:
        hi = lo + seg.rows
        i, j = (int(x) for x in np.searchsorted(rows, [lo, hi]))
        if j > i:
            first = int(rows[i]) - lo + seg.offset
            # Where the rows are in the run's files: a slice when they are consecutive (test,
            # val and whole buckets), else the positions.
            at = slice(first, first + j - i) if rows[j - 1] - rows[i] == j - i - 1 else rows[i:j] - (lo - seg.offset)
            out.label[i:j] = np.load(work.run_file(seg.piece, seg.run, "label"), mmap_mode="r")[at]
            out.dense[i:j] = np.load(work.run_file(seg.piece, seg.run, "dense"), mmap_mode="r")[at]
            vmap = np.load(work.run_file(seg.piece, seg.run, "vmap"))
            out.ids[i:j] = np.take(vmap, np.load(work.run_file(seg.piece, seg.run, "idx"), mmap_mode="r")[:, at]).T
        lo = hi
