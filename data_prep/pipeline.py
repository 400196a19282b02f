"""`dqrm-prep criteo`: raw Criteo logs -> HDF5 shards, in six passes.

1. plan (``plan.py``): pieces of work, line counts, shuffle buckets.
2. parse (``parse.py``, one task per piece): parse, validate, sub-sample, spill rows
   grouped by destination with per-run dictionaries of the categorical values.
3. vocabularies (``vocab.py``, one task per column): merge the pieces' values into
   contiguous ids.
4. ids (``map_ids.py``, one task per piece): each spilled run's dictionaries -> ids.
5. shards (``shards.py``, in parallel): cut each split's stream into shards (a row's
   ids: its run's mapped dictionary at the row's indices).
6. meta (``meta.py``): the input mapping (``input_map.py``: the vocabularies and options
   that map raw values to ids, for scoring new rows) and ``meta.json``, written last.

Everything in progress lives in ``OUT/.prep`` (``workdir.py``); a rerun resumes
(``output_dir.py`` decides whether it may).  Every pass is a function of the frozen
``PrepOptions`` and of what the passes before it returned.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from dqrm_mpi.data.schema import NUM_SPARSE, DatasetMeta, read_meta, write_meta
from dqrm_mpi.locking import DirectoryLock

from .errors import InputError
from .executor import Executor
from .input_map import InputMap, write_input_map
from .map_ids import map_all
from .meta import RunRecord, build_meta, split_totals, summary_line
from .options import PrepOptions
from .output_dir import PREP_LOCK_FILE, fingerprint, no_space_error, prepare_output
from .parse import parse_all
from .plan import load_or_make_plan
from .shards import shard_jobs, split_layouts, write_all
from .sources import discover
from .vocab import merge_all
from .workdir import WorkDir


def run_prep(raw: str | os.PathLike, out: str | os.PathLike, opts: PrepOptions,
             log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> DatasetMeta:
    """Make the dataset OUT from RAW (see module doc).  Returns its metadata."""
    clock = _StageClock()
    out = Path(out)
    ex = Executor(opts.workers, opts.progress)
    lock = DirectoryLock(out, str(out), PREP_LOCK_FILE)  # taken by rank 0 (prepare_output) until the run ends
    sources: list = []
    try:
        kind, sources = ex.root_call(lambda: discover(raw, opts.dataset))
        fp = ex.root_call(lambda: fingerprint(kind, sources, opts))
        status = ex.root_call(lambda: prepare_output(out, fp, opts.overwrite, lock))
        if status == "done":
            if ex.is_root:
                log(f"{out}: already complete with these options; nothing to do")
            return read_meta(out)
        work = WorkDir(out)
        plan = load_or_make_plan(work, kind, sources, opts, ex)
        clock.lap("plan")
        summaries = parse_all(ex, work, opts, plan)
        clock.lap("parse")
        vocab_infos = merge_all(ex, work, opts, len(plan.pieces))
        clock.lap("vocabularies")
        sparse_dtype = "int32" if max(i["cardinality"] for i in vocab_infos) < 2**31 else "int64"
        map_all(ex, work, opts, summaries, sparse_dtype)
        clock.lap("ids")
        totals = split_totals([s.rows for s in summaries])
        if sum(totals.values()) == 0:
            raise InputError(f"{raw}: no rows left to write (every line was bad or dropped)")
        jobs = shard_jobs(split_layouts(summaries, plan.buckets), totals, opts.shard_rows,
                          chunks=max(1, opts.workers * ex.size))
        written = write_all(ex, work, opts, jobs, sparse_dtype, sum(totals.values()))
        clock.lap("shards")
        record = RunRecord(mpi_ranks=ex.size, resumed=status == "resume", shards_written=written,
                           stage_seconds=clock.seconds, wall_time_s=clock.total())
        map_record = ex.root_call(lambda: write_input_map(out, _input_map(work, opts)))
        meta = build_meta(kind, plan.sources, opts, fp, summaries, vocab_infos, sparse_dtype, plan.buckets, record,
                          map_record)
        if ex.is_root:
            write_meta(out, meta)
            if not opts.keep_temp:
                shutil.rmtree(work.root, ignore_errors=True)
            log(summary_line(out, meta))
        ex.barrier()
        return meta
    except OSError as e:
        error = no_space_error(out, sources, e)
        if error is None:
            raise
        raise error from None
    finally:
        ex.close()
        lock.release()


def _input_map(work: WorkDir, opts: PrepOptions) -> InputMap:
    """The run's vocabularies (pass 3) and the options that map raw values to ids."""
    vocabs = tuple(np.load(work.column_vocab(j)) for j in range(NUM_SPARSE))
    return InputMap(opts.max_ind_range, opts.freq_threshold, vocabs)


class _StageClock:
    """Seconds spent in each pass, rounded to ms."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.seconds: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        self.seconds[stage] = round(time.time() - self.t0 - sum(self.seconds.values()), 3)

    def total(self) -> float:
        return round(time.time() - self.t0, 3)
