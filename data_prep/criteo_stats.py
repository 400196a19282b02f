"""Column statistics of a raw Criteo-format file (label, I1..I13, C1..C26; empty = missing).

The same measurement serves two purposes: it gives the calibration targets of the
criteo-like generator (on real Kaggle rows, ``criteo_calibration``), and it checks
a generated file against those targets (tests).  Categorical shares are over the
rows where the column is present; dense quantiles over present values.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from .fields import FIELD_NAMES

DENSE_NAMES = FIELD_NAMES[1:14]
SPARSE_NAMES = FIELD_NAMES[14:]


@dataclass(frozen=True)
class FileColumns:
    """label uint8 [n]; dense float64 [n, 13] (NaN = missing); sparse: 26 arrays int64 [n]
    of value codes (equal code = equal value within a column; MISSING_CODE = empty)."""

    label: np.ndarray
    dense: np.ndarray
    sparse: tuple[np.ndarray, ...]


MISSING_CODE = -1


def read_columns(path: str | os.PathLike, max_rows: int | None = None) -> FileColumns:
    """Read a Criteo-format file (plain or gzip; LF or CRLF) into columns."""
    types = {name: pa.int64() for name in FIELD_NAMES[:14]}
    types.update({name: pa.string() for name in SPARSE_NAMES})
    table = pacsv.read_csv(
        str(path),
        read_options=pacsv.ReadOptions(column_names=list(FIELD_NAMES)),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True),
    )
    if max_rows is not None:
        table = table.slice(0, max_rows)

    def codes(name: str) -> np.ndarray:
        enc = table.column(name).combine_chunks().dictionary_encode()
        return enc.indices.fill_null(MISSING_CODE).to_numpy().astype(np.int64)

    label = table.column(FIELD_NAMES[0]).to_numpy().astype(np.uint8)
    dense = np.stack([table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
                      for name in DENSE_NAMES], axis=1).reshape(table.num_rows, len(DENSE_NAMES))
    return FileColumns(label, dense, tuple(codes(name) for name in SPARSE_NAMES))


def dense_stats(x: np.ndarray) -> dict:
    """Missing share, negative share (of present values), p50 / p90 of present values,
    and the shares of each negative value (of present values)."""
    present = x[~np.isnan(x)]
    neg = present[present < 0]
    values, counts = np.unique(neg, return_counts=True)
    return {
        "missing": float(np.isnan(x).mean()),
        "negative": float(len(neg) / max(1, len(present))),
        "negative_values": {str(int(v)): float(c / max(1, len(present))) for v, c in zip(values, counts)},
        "p50": float(np.quantile(present, 0.5, method="lower")) if len(present) else 0.0,
        "p90": float(np.quantile(present, 0.9, method="lower")) if len(present) else 0.0,
    }


def sparse_stats(col: np.ndarray) -> dict:
    """Missing share; over present rows: distinct values, top-value share, singleton
    values per present row.  ``col``: value codes int64 [n] (FileColumns.sparse)."""
    present = col[col != MISSING_CODE]
    counts = np.bincount(present)
    counts = counts[counts > 0]
    n = max(1, len(present))
    return {
        "missing": float(1.0 - len(present) / max(1, len(col))),
        "present_rows": int(len(present)),
        "distinct": int(len(counts)),
        "top_share": float(counts.max() / n) if len(counts) else 0.0,
        "singleton_share": float((counts == 1).sum() / n),
    }


def missing_groups(cols: FileColumns) -> list[list[str]]:
    """Columns (2 or more) whose missing masks are identical: they go missing together."""
    masks = {name: np.isnan(cols.dense[:, j]) for j, name in enumerate(DENSE_NAMES)}
    masks.update({name: cols.sparse[t] == MISSING_CODE for t, name in enumerate(SPARSE_NAMES)})
    groups: dict[bytes, list[str]] = {}
    for name, m in masks.items():
        if m.any():
            groups.setdefault(np.packbits(m).tobytes(), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def file_stats(cols: FileColumns) -> dict:
    """All statistics of a file: rows, CTR, per column stats, missing groups."""
    return {
        "rows": int(len(cols.label)),
        "ctr": float(cols.label.mean()),
        "dense": {name: dense_stats(cols.dense[:, j]) for j, name in enumerate(DENSE_NAMES)},
        "sparse": {name: sparse_stats(cols.sparse[t]) for t, name in enumerate(SPARSE_NAMES)},
        "missing_groups": missing_groups(cols),
    }
