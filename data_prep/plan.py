"""Pass 1, plan: the pieces of work, the line counts the split needs, the shuffle buckets.

Plain files are cut at newlines into equal pieces of at most about ``--piece-bytes``, as
many as a multiple of the workers, and every piece's lines are counted (cheap byte
counting); a gzip file is one piece, counted only when it holds test/val rows.  The number
of shuffle buckets is about one per output train shard.  The plan is saved in
``OUT/.prep/plan.json`` so that a resumed run uses the same one.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

from dqrm_mpi.data.schema import write_atomic_text

from .errors import InputError
from .executor import Executor
from .options import PrepOptions
from .sources import Piece, Source, count_piece_lines, cut_plain, with_splits
from .workdir import WorkDir

GZ_BYTES_PER_ROW_EST = 60  # only sizes the number of shuffle buckets for uncounted gzip days
PLAIN_BYTES_PER_ROW_EST = 240


@dataclass(frozen=True)
class Plan:
    """sources: the inputs with their line counts and split bounds (where known); pieces:
    the parse tasks in input order; buckets: the number of shuffle buckets of train rows."""

    sources: tuple[Source, ...]
    pieces: tuple[Piece, ...]
    buckets: int


def load_or_make_plan(work: WorkDir, kind: str, sources: list[Source], opts: PrepOptions, ex: Executor) -> Plan:
    """The saved plan of a resumed run, or a new one (saved by rank 0)."""
    if work.plan_file.is_file():
        saved = json.loads(work.plan_file.read_text())
        return Plan(tuple(Source(**s) for s in saved["sources"]), tuple(Piece(**p) for p in saved["pieces"]),
                    int(saved["buckets"]))
    plan = make_plan(kind, sources, opts, ex)
    if ex.is_root:
        write_atomic_text(work.plan_file, json.dumps({"sources": [s.to_dict() for s in plan.sources],
                                                      "pieces": [p.to_dict() for p in plan.pieces],
                                                      "buckets": plan.buckets}))
    ex.barrier()
    return plan


def make_plan(kind: str, sources: list[Source], opts: PrepOptions, ex: Executor) -> Plan:
    pieces = _cut(sources, opts.piece_bytes, slots=ex.workers * ex.size)
    pieces = _count_lines(pieces, sources, ex)
    sources, pieces = _number_lines(sources, pieces)
    sources = [with_splits(kind, s) for s in sources]
    return Plan(tuple(sources), tuple(pieces), _bucket_count(sources, opts))


def _cut(sources: list[Source], piece_bytes: int, slots: int) -> list[Piece]:
    """Each plain file cut into pieces of at most about ``piece_bytes``, as many as a
    multiple of ``slots`` (the workers of all ranks) and of equal size: no worker is left
    waiting for the others' last pieces.  A gzip file is one piece."""
    pieces: list[Piece] = []
    for s in sources:
        if s.gz:
            pieces.append(Piece(len(pieces), s.index, 0, -1, first_line=0))
        else:
            n = slots * math.ceil(s.size / (piece_bytes * slots))
            pieces.extend(cut_plain(s, math.ceil(s.size / n), len(pieces)))
    return pieces


def _count_task(task: tuple[str, int, int, bool]) -> int:
    return count_piece_lines(*task)


def _count_lines(pieces: list[Piece], sources: list[Source], ex: Executor) -> list[Piece]:
    """Every plain piece counted (fast); gzip files only when they hold test/val rows."""
    todo = [i for i, p in enumerate(pieces) if not sources[p.source].gz or sources[p.source].holdout]
    tasks = [(sources[pieces[i].source].path, pieces[i].start, pieces[i].end, sources[pieces[i].source].gz)
             for i in todo]
    counts = ex.map(_count_task, tasks, desc="count lines", unit="piece")
    pieces = list(pieces)
    for i, n in zip(todo, counts):
        pieces[i] = replace(pieces[i], lines=n)
    return pieces


def _number_lines(sources: list[Source], pieces: list[Piece]) -> tuple[list[Source], list[Piece]]:
    """Each piece's first line and each source's line count, for sources whose pieces are all counted."""
    sources, pieces = list(sources), list(pieces)
    for s in sources:
        mine = [i for i, p in enumerate(pieces) if p.source == s.index]
        if any(pieces[i].lines < 0 for i in mine):
            continue
        first = 0
        for i in mine:
            pieces[i] = replace(pieces[i], first_line=first)
            first += pieces[i].lines
        if first == 0:
            raise InputError(f"{s.path}: input has no lines")
        sources[s.index] = replace(s, lines=first)
    return sources, pieces


def _bucket_count(sources: list[Source], opts: PrepOptions) -> int:
    """About one bucket per output train shard, from the train rows (estimated where not counted)."""
    est = 0
    for s in sources:
        if s.lines >= 0:
            est += min(s.lines, s.train_end)
        else:
            est += s.size // (GZ_BYTES_PER_ROW_EST if s.gz else PLAIN_BYTES_PER_ROW_EST)
    return max(1, math.ceil(est * (1.0 - opts.sub_sample_rate * 0.7) / opts.shard_rows))
