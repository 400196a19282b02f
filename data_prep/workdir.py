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
        vocab.npz                  the piece's distinct values (and train counts) per column
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

    def piece_vocab(self, piece: int) -> Path:
        return self.piece_dir(piece) / "vocab.npz"

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
