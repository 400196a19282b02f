from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from dqrm_mpi.data.schema import SPLITS, list_shards, read_meta

DATA = Path(__file__).resolve().parents[1] / "data"
KAGGLE = DATA / "criteo_kaggle_train_head1999.tsv"
TERABYTE = DATA / "criteo_terabyte_format_1000.tsv"


def load_split(root: Path, split: str) -> dict[str, np.ndarray]:
    parts = {"dense": [], "sparse": [], "label": []}
    for p in list_shards(root, split):
        with h5py.File(p, "r") as f:
            for k in parts:
                parts[k].append(f[k][:])
    if not parts["label"]:
        return {"dense": np.zeros((0, 13), np.float32), "sparse": np.zeros((0, 26), np.int64),
                "label": np.zeros(0, np.uint8)}
    return {k: np.concatenate(v) for k, v in parts.items()}


def load_all(root: Path) -> dict[str, dict[str, np.ndarray]]:
    return {s: load_split(root, s) for s in SPLITS}


def assert_same_dataset(a: Path, b: Path) -> None:
    ma, mb = read_meta(a), read_meta(b)
    assert ma.cardinalities == mb.cardinalities
    assert ma.rows == mb.rows
    for split in SPLITS:
        sa, sb = list_shards(a, split), list_shards(b, split)
        assert [p.name for p in sa] == [p.name for p in sb]
        for pa_, pb_ in zip(sa, sb):
            with h5py.File(pa_, "r") as fa, h5py.File(pb_, "r") as fb:
                for k in ("dense", "sparse", "label"):
                    np.testing.assert_array_equal(fa[k][:], fb[k][:], err_msg=f"{pa_} {k}")


@pytest.fixture
def kaggle_file(tmp_path) -> Path:
    p = tmp_path / "train.txt"
    shutil.copy(KAGGLE, p)
    return p


@pytest.fixture
def kaggle_gz(tmp_path) -> Path:
    p = tmp_path / "gz" / "train.txt.gz"
    p.parent.mkdir()
    with open(KAGGLE, "rb") as src, gzip.open(p, "wb") as dst:
        dst.write(src.read())
    return p


def read_lines(path: Path) -> list[str]:
    return path.read_bytes().decode().replace("\r\n", "\n").rstrip("\n").split("\n")
