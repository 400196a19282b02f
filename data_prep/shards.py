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
    straddles two jobs is loaded twice, so fewer jobs means less repeated work."""
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
    loaded: dict[int, _LoadedUnit] = {}  # the last unit read (consecutive shards share it)
    written = rows = 0
    for k in range(job.first, job.stop):
        lo, hi = k * R, min((k + 1) * R, job.total)
        rows += hi - lo
        path = work.out / job.split / shard_name(k)
        if path.is_file():
            continue
        parts = []
        u = int(np.searchsorted(cum, lo, side="right") - 1)
        while u < len(job.units) and cum[u] < hi:
            if sizes[u]:
                if u not in loaded:
                    loaded = {u: _load_unit(work, opts.seed, job.split, u, job.units[u], sparse_dtype)}
                a, b = max(lo, cum[u]) - cum[u], min(hi, cum[u + 1]) - cum[u]
                parts.append(loaded[u].rows(int(a), int(b)))
            u += 1
        label, dense, ids = (p[0] if len(parts) == 1 else np.concatenate(p) for p in zip(*parts))
        write_shard(path, dense, ids, label.astype(label_dtype, copy=False), attrs={"split": job.split, "shard": k})
        written += 1
        maybe_kill("shards")
    return {"rows": rows, "written": written}


class _LoadedUnit(NamedTuple):
    """A unit's rows in input order (label [n], dense [n, 13], ids [n, 26]) and, for a
    train bucket, its permutation: the unit's stream is the rows taken in ``perm`` order."""

    label: np.ndarray
    dense: np.ndarray
    ids: np.ndarray
    perm: np.ndarray | None

    def rows(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [a, b) of the unit's stream (only these are gathered: a shard that needs
        part of a bucket does not pay for permuting all of it)."""
        if self.perm is None:
            return self.label[a:b], self.dense[a:b], self.ids[a:b]
        sel = self.perm[a:b]
        return np.take(self.label, sel), np.take(self.dense, sel, axis=0), np.take(self.ids, sel, axis=0)


def _load_unit(work: WorkDir, seed: int, split: str, u: int, segments: Unit, sparse_dtype: str) -> _LoadedUnit:
    """Unit ``u`` (a train bucket gets its seeded permutation).  A row's ids are its run's
    value map at its dictionary indices (``vmap[idx]``, see ``map_ids.py``)."""
    n = sum(seg.rows for seg in segments)
    label = np.empty(n, np.uint8)
    dense = np.empty((n, NUM_DENSE), np.float32)
    ids = np.empty((n, NUM_SPARSE), sparse_dtype)
    at = 0
    for seg in segments:
        rows = slice(seg.offset, seg.offset + seg.rows)
        out = slice(at, at + seg.rows)
        label[out] = np.load(work.run_file(seg.piece, seg.run, "label"), mmap_mode="r")[rows]
        dense[out] = np.load(work.run_file(seg.piece, seg.run, "dense"), mmap_mode="r")[rows]
        vmap = np.load(work.run_file(seg.piece, seg.run, "vmap"))
        ids[out] = np.take(vmap, np.load(work.run_file(seg.piece, seg.run, "idx"), mmap_mode="r")[:, rows]).T
        at += seg.rows
    perm = np.random.default_rng([seed, SALT_PERMUTE, u]).permutation(n) if split == "train" else None
    return _LoadedUnit(label, dense, ids, perm)
