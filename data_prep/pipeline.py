"""`dqrm-prep criteo`: raw Criteo logs -> HDF5 shards, in six passes.

1. plan (``plan.py``): pieces of work, line counts, shuffle buckets.
2. parse (``parse.py``, one task per piece): parse, validate, sub-sample, spill rows
   grouped by destination with per-run dictionaries of the categorical values.
3. vocabularies (``vocab.py``, one task per column): merge the pieces' values into
   contiguous ids.
4. ids (``map_ids.py``, one task per piece): spilled dictionary indices -> ids.
5. shards (``shards.py``, in parallel): cut each split's stream into shards.
6. meta (``meta.py``): ``meta.json``, written last.

Everything in progress lives in ``OUT/.prep`` (``workdir.py``); a rerun resumes
(``output_dir.py`` decides whether it may).  Every pass is a function of the frozen
``PrepOptions`` and of what the passes before it returned.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

from dqrm_mpi.data.schema import NUM_SPARSE, DatasetMeta, read_meta, write_meta

from .errors import InputError
from .executor import Executor
from .map_ids import map_piece
from .meta import RunRecord, build_meta, split_totals, summary_line
from .options import PrepOptions
from .output_dir import fingerprint, prepare_output
from .parse import PieceSummary, parse_piece
from .plan import Plan, load_or_make_plan
from .shards import ShardJob, shard_jobs, split_layouts, write_shards
from .sources import discover
from .vocab import merge_column
from .workdir import WorkDir


def run_prep(raw: str | os.PathLike, out: str | os.PathLike, opts: PrepOptions,
             log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> DatasetMeta:
    """Make the dataset OUT from RAW (see module doc).  Returns its metadata."""
    clock = _StageClock()
    out = Path(out)
    ex = Executor(opts.workers, opts.progress)
    try:
        kind, sources = ex.root_call(lambda: discover(raw, opts.dataset))
        fp = fingerprint(kind, sources, opts)
        status = ex.root_call(lambda: prepare_output(out, fp, opts.overwrite))
        if status == "done":
            if ex.is_root:
                log(f"{out}: already complete with these options; nothing to do")
            return read_meta(out)
        work = WorkDir(out)
        plan = load_or_make_plan(work, kind, sources, opts, ex)
        clock.lap("plan")
        summaries = _parse(ex, work, opts, plan)
        clock.lap("parse")
        vocab_infos = _vocabularies(ex, work, opts, len(plan.pieces))
        clock.lap("vocabularies")
        sparse_dtype = "int32" if max(i["cardinality"] for i in vocab_infos) < 2**31 else "int64"
        _map_ids(ex, work, opts, summaries, sparse_dtype)
        clock.lap("ids")
        totals = split_totals([s.rows for s in summaries])
        if sum(totals.values()) == 0:
            raise InputError(f"{raw}: no rows left to write (every line was bad or dropped)")
        jobs = shard_jobs(split_layouts(summaries, plan.buckets), totals, opts.shard_rows,
                          chunks=max(1, opts.workers * ex.size))
        written = _shards(ex, work, opts, jobs, sparse_dtype, sum(totals.values()))
        clock.lap("shards")
        record = RunRecord(mpi_ranks=ex.size, resumed=status == "resume", shards_written=written,
                           stage_seconds=clock.seconds, wall_time_s=clock.total())
        meta = build_meta(kind, plan.sources, opts, fp, summaries, vocab_infos, sparse_dtype, plan.buckets, record)
        if ex.is_root:
            write_meta(out, meta)
            if not opts.keep_temp:
                shutil.rmtree(work.root, ignore_errors=True)
            log(summary_line(out, meta))
        ex.barrier()
        return meta
    finally:
        ex.close()


def _parse(ex: Executor, work: WorkDir, opts: PrepOptions, plan: Plan) -> list[PieceSummary]:
    counted = all(s.lines >= 0 for s in plan.sources)
    return ex.map(partial(parse_piece, work, opts, plan.sources, plan.buckets), plan.pieces, desc="parse",
                  total=sum(s.lines for s in plan.sources) if counted else None, unit="rows",
                  weight=(lambda s: s.lines) if counted else None)


def _vocabularies(ex: Executor, work: WorkDir, opts: PrepOptions, n_pieces: int) -> list[dict]:
    work.vocab_dir.mkdir(exist_ok=True)
    return ex.map(partial(merge_column, work, opts, n_pieces), range(NUM_SPARSE), desc="vocabularies", unit="col")


def _map_ids(ex: Executor, work: WorkDir, opts: PrepOptions, summaries: list[PieceSummary], sparse_dtype: str) -> None:
    ex.map(partial(map_piece, work, opts, sparse_dtype), [(s.index, len(s.runs)) for s in summaries], desc="ids",
           total=sum(sum(s.rows) for s in summaries), unit="rows", weight=lambda rows: rows)


def _shards(ex: Executor, work: WorkDir, opts: PrepOptions, jobs: list[ShardJob], sparse_dtype: str,
            total_rows: int) -> int:
    """Writes the shards; returns how many were written now (not found from an earlier run)."""
    results = ex.map(partial(write_shards, work, opts, sparse_dtype), jobs, desc="shards", total=total_rows,
                     unit="rows", weight=lambda r: r["rows"])
    return sum(r["written"] for r in results)


class _StageClock:
    """Seconds spent in each pass, rounded to ms."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.seconds: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        self.seconds[stage] = round(time.time() - self.t0 - sum(self.seconds.values()), 3)

    def total(self) -> float:
        return round(time.time() - self.t0, 3)
