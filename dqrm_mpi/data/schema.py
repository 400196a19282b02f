"""The on-disk dataset contract shared by `dqrm-prep` (writer) and `dqrm-train` (reader).

A dataset is a directory::

    OUT/
      meta.json               DatasetMeta (written last: its presence marks a finished dataset)
      train/part-00000.h5     HDF5 shards, each with
      val/part-00000.h5         dense  float32 [n, 13]   log(x + 1) of the clamped integer features
      test/part-00000.h5        sparse int32|int64 [n, 26] contiguous ids, 0 <= id < cardinality[j]
                                label  float32|uint8 [n]  click (1) or not (0)

Shards are chunked by rows so that a batch read touches few chunks, and every chunk
carries an HDF5 Fletcher-32 checksum (checked by HDF5 on every read; shards written
before checksums were added are still read, unchecked).  Every file is written under a
temporary name and renamed when complete, readable like any new file (umask).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..files import write_atomic_bytes

SCHEMA_VERSION = 1
NUM_DENSE = 13
NUM_SPARSE = 26
SPLITS = ("train", "val", "test")
META_FILE = "meta.json"
DENSE, SPARSE, LABEL = "dense", "sparse", "label"
DENSE_DTYPE = np.float32
SPARSE_DTYPES = (np.int32, np.int64)
LABEL_DTYPES = (np.float32, np.uint8)
SHARD_SUFFIX = ".h5"
# HDF5 reads and checks (Fletcher-32) whole chunks, and training reads batches in random order:
# a 256-row batch costs 0.4-0.5 ms from 2,048-row chunks, 1.6-2.8 ms from 16,384-row ones
# (measured here on 500k-row shards; 16,384-row chunks without checksums: 0.9 ms).
DEFAULT_CHUNK_ROWS = 2048
SHARD_OVERHEAD_BYTES = 64 << 10  # HDF5 headers, chunk index, checksums


class SchemaError(ValueError):
    """A dataset directory or shard does not follow the contract."""


class DataError(SchemaError):
    """A shard cannot be opened or read, or holds values outside the contract (a label
    other than 0/1, an id outside its table, a NaN or infinite dense value).  The message
    names the shard file, the rows and the column, and says what to do."""


@dataclass
class DatasetMeta:
    """Contents of ``meta.json``.

    cardinalities: rows of each of the 26 embedding tables.
    rows: number of rows per split (``train``, ``val``, ``test``).
    ctr: share of positive labels in the training split.
    options: how the dataset was made (prep options, generator parameters).
    extra: anything else the writer records (sources, counts, wall time, planted AUC).
    """

    cardinalities: list[int]
    rows: dict[str, int]
    ctr: float
    options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if len(self.cardinalities) != NUM_SPARSE:
            raise SchemaError(f"meta.json: expected {NUM_SPARSE} cardinalities, got {len(self.cardinalities)}")
        if any(int(c) < 1 for c in self.cardinalities):
            raise SchemaError(f"meta.json: cardinalities must be >= 1, got {self.cardinalities}")
        unknown = set(self.rows) - set(SPLITS)
        if unknown:
            raise SchemaError(f"meta.json: unknown splits {sorted(unknown)}; expected {SPLITS}")
        self.cardinalities = [int(c) for c in self.cardinalities]
        self.rows = {k: int(v) for k, v in self.rows.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetMeta":
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SchemaError(f"meta.json: schema_version {version!r}, this dqrm_mpi reads {SCHEMA_VERSION}")
        try:
            return cls(**d)
        except TypeError as e:
            raise SchemaError(f"meta.json: {e}") from None


def write_atomic_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file, then rename (``files.write_atomic``)."""
    write_atomic_bytes(path, text.encode())


def write_meta(root: str | os.PathLike, meta: DatasetMeta) -> None:
    write_atomic_text(Path(root) / META_FILE, json.dumps(meta.to_dict(), indent=2, sort_keys=True) + "\n")


def read_meta(root: str | os.PathLike) -> DatasetMeta:
    path = Path(root) / META_FILE
    if not path.is_file():
        raise SchemaError(f"{path}: missing; is {root} a dataset written by dqrm-prep?")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path}: not valid JSON ({e})") from None
    return DatasetMeta.from_dict(d)


def shard_name(index: int) -> str:
    return f"part-{index:05d}{SHARD_SUFFIX}"


def list_shards(root: str | os.PathLike, split: str) -> list[Path]:
    """Finished shards of ``split`` in order (temporary files are ignored)."""
    if split not in SPLITS:
        raise SchemaError(f"unknown split {split!r}; expected one of {SPLITS}")
    folder = Path(root) / split
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("part-") and p.suffix == SHARD_SUFFIX)


def write_shard(
    path: str | os.PathLike,
    dense: np.ndarray,
    sparse: np.ndarray,
    label: np.ndarray,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    attrs: dict[str, Any] | None = None,
) -> None:
    """Write one shard atomically (temporary name, then rename).

    dense: float32 [n, 13]; sparse: int32|int64 [n, 26]; label: float32|uint8 [n].
    """
    path = Path(path)
    n = check_arrays(dense, sparse, label, where=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    chunk = max(1, min(chunk_rows, n))
    # HDF5 meeting a full disk fails in its close and leaves its library in a bad state:
    # refuse before writing instead (one statvfs per shard).
    need, free = dense.nbytes + sparse.nbytes + label.nbytes + SHARD_OVERHEAD_BYTES, shutil.disk_usage(path.parent).free
    if free < need:
        raise OSError(errno.ENOSPC, f"No space left on device ({need:,} bytes needed, {free:,} free)", str(tmp))
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["rows"] = n
            for k, v in (attrs or {}).items():
                f.attrs[k] = v
            # fletcher32 needs chunks; an empty shard has neither (nothing to check).
            f.create_dataset(DENSE, data=dense, chunks=(chunk, NUM_DENSE) if n else None, fletcher32=bool(n))
            f.create_dataset(SPARSE, data=sparse, chunks=(chunk, NUM_SPARSE) if n else None, fletcher32=bool(n))
            f.create_dataset(LABEL, data=label, chunks=(chunk,) if n else None, fletcher32=bool(n))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_arrays(dense: np.ndarray, sparse: np.ndarray, label: np.ndarray, where: str) -> int:
    """Validate shapes and dtypes of one shard's arrays; return the row count."""
    n = len(label)
    if dense.dtype != DENSE_DTYPE or dense.shape != (n, NUM_DENSE):
        raise SchemaError(f"{where}: dense must be float32 [{n}, {NUM_DENSE}], got {dense.dtype} {dense.shape}")
    if sparse.dtype not in SPARSE_DTYPES or sparse.shape != (n, NUM_SPARSE):
        raise SchemaError(f"{where}: sparse must be int32|int64 [{n}, {NUM_SPARSE}], got {sparse.dtype} {sparse.shape}")
    if label.dtype not in LABEL_DTYPES or label.shape != (n,):
        raise SchemaError(f"{where}: label must be float32|uint8 [{n}], got {label.dtype} {label.shape}")
    return n


def find_bad_value(dense: np.ndarray, sparse: np.ndarray, label: np.ndarray,
                   cardinalities: np.ndarray, first_row: int = 0) -> str | None:
    """The first value outside the contract, as ``"row R: COLUMN = V, expected ..."`` (R is
    ``first_row`` + the 0-based index in the arrays given), or None when all are fine.  Vectorised: a few passes over
    the arrays (dense float32 [n, 13], sparse int [n, 26], label [n]; cardinalities int64 [26])."""
    if not ((label == 0) | (label == 1)).all():
        r = int(np.flatnonzero((label != 0) & (label != 1))[0])
        return f"row {first_row + r}: label = {label[r]}, expected 0 or 1"
    if sparse.size and (sparse.min() < 0 or (sparse >= cardinalities).any()):
        r, c = (int(x) for x in np.argwhere((sparse < 0) | (sparse >= cardinalities))[0])
        return (f"row {first_row + r}: C{c + 1} = {int(sparse[r, c])}, expected 0 <= id < {int(cardinalities[c])} "
                f"(the table's cardinality in meta.json)")
    if not np.isfinite(dense).all():
        r, c = (int(x) for x in np.argwhere(~np.isfinite(dense))[0])
        return f"row {first_row + r}: I{c + 1} = {dense[r, c]}, expected a finite number"
    return None


def transform_dense(raw: np.ndarray) -> np.ndarray:
    """The dense features as stored: int64 [n, 13] raw integers (missing already 0) ->
    float32 [n, 13] log(max(x, 0) + 1), the reference DLRM's transform."""
    x = np.maximum(raw, 0).astype(np.float64)
    x += 1.0
    return np.log(x).astype(np.float32)


def shard_rows(path: str | os.PathLike) -> int:
    with h5py.File(path, "r") as f:
        return int(f[LABEL].shape[0])
