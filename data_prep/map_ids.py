"""Pass 4, ids (one task per piece): each run's dictionaries become ids.

Each run's dictionaries (its distinct values per column, sorted) are mapped to ids with
a binary search in the vocabulary: ``runRRRR.vmap.npy`` replaces the run's dict/dictoff
files.  The rows' indices (``idx``) stay as they are; the shards pass takes every row's
ids from the map as it reads them (``vmap[idx]``), so the rows are not rewritten here.
"""
from __future__ import annotations

from functools import lru_cache, partial

import numpy as np

from dqrm_mpi.data.schema import NUM_SPARSE

from .executor import Executor
from .options import PrepOptions
from .parse import PieceSummary
from .vocab import Mapper, load_mappers
from .workdir import WorkDir, save_npy_atomic


def map_all(ex: Executor, work: WorkDir, opts: PrepOptions, summaries: list[PieceSummary], sparse_dtype: str) -> None:
    """Pass 4 over every piece."""
    try:
        ex.map(partial(map_piece, work, opts, sparse_dtype), [(s.index, len(s.runs)) for s in summaries], desc="ids",
               total=sum(sum(s.rows) for s in summaries), unit="rows", weight=lambda rows: rows)
    finally:
        _mappers.cache_clear()  # tasks that ran in this process must not reuse them in a later run


def map_piece(work: WorkDir, opts: PrepOptions, sparse_dtype: str, task: tuple[int, int]) -> int:
    """task: (piece index, number of runs).  Returns the piece's row count."""
    piece, n_runs = task
    rows = 0
    for r in range(n_runs):
        rows += len(np.load(work.run_file(piece, r, "label"), mmap_mode="r"))
        vmap_path = work.run_file(piece, r, "vmap")
        if vmap_path.is_file():
            continue
        mappers = _mappers(work, opts)
        values = np.load(work.run_file(piece, r, "dict"))
        offs = np.load(work.run_file(piece, r, "dictoff"))
        ids_of_value = np.empty(len(values), dtype=sparse_dtype)
        for j in range(NUM_SPARSE):
            a, b = int(offs[j]), int(offs[j + 1])
            if b > a:
                ids_of_value[a:b] = mappers[j](values[a:b])
        save_npy_atomic(vmap_path, ids_of_value)
        for name in ("dict", "dictoff"):
            work.run_file(piece, r, name).unlink(missing_ok=True)
    return rows


@lru_cache(maxsize=1)
def _mappers(work: WorkDir, opts: PrepOptions) -> list[Mapper]:
    """Loaded once per process and pass (every task of a run asks for the same ones)."""
    return load_mappers(work, opts)
