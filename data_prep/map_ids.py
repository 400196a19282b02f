"""Pass 4, ids (one task per piece): the spilled dictionary indices become final ids.

Each run's dictionaries (its distinct values per column) are mapped to ids once, with
a look-up table or a binary search in the vocabulary, then one take gives every row's
ids.  ``runRRRR.ids.npy`` replaces the run's idx/dict/dictoff files.
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
        ids_path = work.run_file(piece, r, "ids")
        if ids_path.is_file():
            rows += len(np.load(ids_path, mmap_mode="r"))
            continue
        mappers = _mappers(work, opts)
        local = np.load(work.run_file(piece, r, "idx"))
        values = np.load(work.run_file(piece, r, "dict"))
        offs = np.load(work.run_file(piece, r, "dictoff"))
        ids_of_value = np.empty(len(values), dtype=sparse_dtype)
        for j in range(NUM_SPARSE):
            a, b = int(offs[j]), int(offs[j + 1])
            if b > a:
                ids_of_value[a:b] = mappers[j](values[a:b])
        save_npy_atomic(ids_path, ids_of_value[local])
        rows += len(local)
        for name in ("idx", "dict", "dictoff"):
            work.run_file(piece, r, name).unlink(missing_ok=True)
    return rows


@lru_cache(maxsize=1)
def _mappers(work: WorkDir, opts: PrepOptions) -> list[Mapper]:
    """Loaded once per process and pass (every task of a run asks for the same ones)."""
    return load_mappers(work, opts)
