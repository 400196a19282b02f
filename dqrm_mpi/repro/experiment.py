"""The vocabulary of the specs: runs, exports, metrics, cells, tables and figures."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

COMM = None  # Run.ranks: the profile's rank count for communication experiments


@dataclass(frozen=True)
class Export:
    """``dqrm-export`` of a run's checkpoint (flags: e.g. ``--bits 4`` for PTQ), then ``dqrm-eval``
    of the packed file on each split in ``splits``."""

    label: str
    flags: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("test",)


@dataclass(frozen=True)
class Run:
    """One ``dqrm-train`` invocation: flags beyond the profile's, on ``ranks`` ranks (COMM: the
    profile's communication rank count).  ``needs``: a dqrm-train option this run needs; where the
    installed dqrm-train lacks it, the run is not made and its cells say so.  Flags may name
    profile fields in braces, e.g. ``{scale_period}``.  ``diagnose``: run ``dqrm-repro diagnose``
    on it (an FP32 run kept with ``--keep-epoch-checkpoints``; see repro.diagnosis)."""

    name: str
    flags: tuple[str, ...] = ()
    ranks: int | None = 1
    exports: tuple[Export, ...] = ()
    needs: str | None = None
    diagnose: bool = False

    def at(self, ranks: int) -> "Run":
        return replace(self, ranks=ranks)


@dataclass(frozen=True)
class Metric:
    """A number read from a run's files (see results.METRICS for the keys)."""

    run: Run
    key: str
    export: str | None = None  # the Export label for size_mb / packed_* keys
    split: str = "test"        # the split for packed_* keys


@dataclass(frozen=True)
class Drop:
    """``reference - value`` (``value - reference`` when ``higher_is_worse``): how much worse
    ``value`` is than ``reference``."""

    value: Metric
    reference: Metric
    higher_is_worse: bool = False


@dataclass(frozen=True)
class NotMeasured:
    """A cell this toolkit does not produce, with the reason."""

    reason: str


Cell = Metric | Drop | NotMeasured


@dataclass(frozen=True)
class Row:
    """One table row; ``paper[dataset]`` gives the published numbers aligned with the columns."""

    label: str
    cells: tuple[Cell, ...]
    paper: dict[str, tuple[str | None, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Table:
    key: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[Row, ...]
    note: str = ""


@dataclass(frozen=True)
class Figure:
    """Curves of several runs; panels among "accuracy", "auc" (test, against steps) and "loss"
    (training loss per step, smoothed).  ``paper[dataset][label]``: the published AUC of a series."""

    key: str
    title: str
    series: tuple[tuple[str, Run], ...]
    panels: tuple[str, ...]
    paper: dict[str, dict[str, str]] = field(default_factory=dict)
    note: str = ""


def cell_runs(cell: Cell) -> tuple[Run, ...]:
    if isinstance(cell, Metric):
        return (cell.run,)
    if isinstance(cell, Drop):
        return (cell.value.run, cell.reference.run)
    return ()
