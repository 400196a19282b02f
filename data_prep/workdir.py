"""``OUT/.prep``: the files of a run in progress, named in one place.

    OUT/.prep/
      options.json                 the run's fingerprint (compared when a rerun resumes)
      plan.json                    sources, pieces and the number of shuffle buckets
      pieces/NNNNNN/               one folder per piece
        runRRRR.label.npy          uint8 [n]       one spilled run of rows, sorted by group
        runRRRR.dense.npy          float32 [n, 13]
        runRRRR.idx.npy            int32 [26, n]   indices into the run's dictionaries (parse),
                                                   column-major
        runRRRR.dict.npy           uint32 [m]      the run's distinct values, column after column
        runRRRR.dictoff.npy        int64 [27]      where each column's values start in dict
        runRRRR.vmap.npy           [m]             the id of each dictionary value; replaces
                                                   dict/dictoff (ids pass); a row's ids are vmap[idx]
        vocab.values.npy           uint32          the piece's distinct values, column after column
        vocab.offsets.npy          int64 [27]      where each column's values start
        vocab.counts.npy           int64           their train counts (with a frequency threshold)
        done.json                  the piece's summary, written last
      vocab/vocab_JJ.npy           a column's sorted vocabulary
      vocab/vocab_JJ.json          the column's cardinality, written last

Files that later passes rely on are written last or atomically, so a rerun that finds
them skips the work.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STATE_DIR = ".prep"


@dataclass(frozen=True)
class WorkDir:
    """The state folder of the dataset being made in ``out``."""

    out: Path

    @property
    def root(self) -> Path:
        return self.out / STATE_DIR

    @property
    def options_file(self) -> Path:
        return self.root / "options.json"

    @property
    def plan_file(self) -> Path:
        return self.root / "plan.json"

    def piece_dir(self, piece: int) -> Path:
        return self.root / "pieces" / f"{piece:06d}"

    def run_file(self, piece: int, run: int, name: str) -> Path:
        """``name``: label, dense, idx, dict, dictoff or vmap."""
        return self.piece_dir(piece) / f"run{run:04d}.{name}.npy"

    def piece_vocab(self, piece: int, name: str) -> Path:
        """``name``: values, offsets or counts."""
        return self.piece_dir(piece) / f"vocab.{name}.npy"

    def piece_done(self, piece: int) -> Path:
        return self.piece_dir(piece) / "done.json"

    @property
    def vocab_dir(self) -> Path:
        return self.root / "vocab"

    def column_vocab(self, column: int) -> Path:
        return self.vocab_dir / f"vocab_{column:02d}.npy"

    def column_done(self, column: int) -> Path:
        return self.vocab_dir / f"vocab_{column:02d}.json"


def save_npy(path: Path, arr: np.ndarray) -> None:
    """``np.save(path, arr)``, but a failed write raises OSError with its errno and the file
    name (numpy's own short-write error, "N requested and M written", has neither)."""
    arr = np.ascontiguousarray(arr)
    try:
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(arr))
            f.write(arr.data)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_npy(tmp, arr)
    os.replace(tmp, path)


def save_done(path: Path, text: str) -> None:
    """Write a task's ``done`` file through a temporary name, then rename.  Not fsynced (an
    fsync costs milliseconds per file on a journaled disk): like the arrays the task wrote
    before it, it survives a killed run, not a power cut."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
    except OSError as e:  # name the file (a full disk is reported with it)
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.replace(tmp, path)
