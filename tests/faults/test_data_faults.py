"""Faults in a dataset on disk, as training meets them: bad values, truncated and
bit-flipped shards.  Each is a real HDF5 file changed on disk; the reader (and
`dqrm-prep verify`) must name the shard, the rows and the column."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from data_prep.cli import cli as prep_cli
from dqrm_mpi.data.reader import SplitReader, TrainBatches
from dqrm_mpi.data.schema import DataError, list_shards, read_meta, write_meta, write_shard
from tests.conftest import VENV_BIN, mpi_env


@pytest.fixture
def dataset(tmp_path, small_dataset) -> Path:
    """A private copy of the small dataset (3 train shards of up to 5,000 rows)."""
    out = tmp_path / "ds"
    shutil.copytree(small_dataset, out)
    return out


def set_value(path: Path, name: str, index: tuple, value) -> None:
    with h5py.File(path, "r+") as f:
        f[name][index] = value


def read_epoch(root: Path) -> None:
    reader = SplitReader(root, "train")
    try:
        for _ in TrainBatches(reader, 1000, rank=0, world=1, seed=0, prefetch=2).epoch(0):
            pass
    finally:
        reader.close()


def flip_bit(path: Path, name: str, chunk: int, byte: int = 100) -> None:
    """Flip one bit inside the stored bytes of one chunk of dataset ``name``."""
    with h5py.File(path, "r") as f:
        offset = f[name].id.get_chunk_info(chunk).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + byte)
        b = fh.read(1)[0]
        fh.seek(offset + byte)
        fh.write(bytes([b ^ 0x10]))


@pytest.mark.parametrize("name,index,value,expected", [
    ("label", (1234,), 2, "row 1234: label = 2.0, expected 0 or 1"),
    ("label", (1234,), -1, "row 1234: label = -1.0, expected 0 or 1"),
    ("sparse", (4321, 4), 30, "row 4321: C5 = 30, expected 0 <= id < 30"),         # id == cardinality
    ("sparse", (4321, 16), -16776626, "row 4321: C17 = -16776626, expected 0 <= id < 10"),
    ("dense", (77, 2), np.nan, "row 77: I3 = nan, expected a finite number"),
    ("dense", (77, 12), np.inf, "row 77: I13 = inf, expected a finite number"),
])
def test_bad_values_are_named_by_shard_row_and_column(dataset, name, index, value, expected):
    shard = list_shards(dataset, "train")[1]
    set_value(shard, name, index, value)
    with pytest.raises(DataError) as e:
        read_epoch(dataset)
    msg = str(e.value)
    assert msg.startswith(f"{shard}: rows [") and expected in msg, msg
    assert f"dqrm-prep verify {dataset}" in msg
    assert isinstance(e.value, ValueError)  # the trainer's CLI turns ValueError into a clear error
    r = CliRunner().invoke(prep_cli, ["verify", str(dataset)])
    assert r.exit_code == 1 and f"{shard}: {expected}" in r.output, r.output


def test_cardinalities_smaller_than_the_ids(dataset):
    meta = read_meta(dataset)
    meta.cardinalities[2] = 5  # C3 ids go up to 299
    write_meta(dataset, meta)
    with pytest.raises(DataError, match=r"part-0000\d.h5: rows \[\d+, \d+\): row \d+: C3 = \d+, expected 0 <= id < 5"):
        read_epoch(dataset)


def test_truncated_shard_is_named_when_opened(dataset):
    shard = list_shards(dataset, "train")[2]
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(DataError) as e:
        SplitReader(dataset, "train")
    msg = str(e.value)
    assert msg.startswith(f"{shard}: cannot open shard, the file is truncated or corrupt") and "verify" in msg, msg
    r = CliRunner().invoke(prep_cli, ["verify", str(dataset)])
    assert r.exit_code == 1 and f"{shard}: cannot open shard" in r.output, r.output


def test_flipped_bit_in_dense_values_is_caught_by_the_checksum(dataset):
    shard = list_shards(dataset, "train")[0]
    flip_bit(shard, "dense", chunk=0)
    reader = SplitReader(dataset, "train")  # opening reads no chunk
    with pytest.raises(DataError) as e:
        reader.read(10, 20)
    reader.close()
    msg = str(e.value)
    assert msg.startswith(f"{shard}: rows [10, 20) of 'dense' cannot be read, the file is corrupt (checksum"), msg
    r = CliRunner().invoke(prep_cli, ["verify", str(dataset)])
    assert r.exit_code == 1 and f"{shard}: rows [0, 5000) cannot be read" in r.output, r.output


def test_shards_without_checksums_are_still_read_and_verify_says_so(dataset):
    """A shard written before checksums (no fletcher32) is read as before; verify warns."""
    shard = list_shards(dataset, "train")[1]
    with h5py.File(shard, "r") as f:
        arrays = {k: f[k][:] for k in ("dense", "sparse", "label")}
    with h5py.File(shard, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v, chunks=True)
    reader = SplitReader(dataset, "train")
    np.testing.assert_array_equal(reader.read(5000, 5010).sparse.numpy(), arrays["sparse"][:10])
    reader.close()
    r = CliRunner().invoke(prep_cli, ["verify", str(dataset)])
    assert r.exit_code == 0 and "1 shard(s) without checksums" in r.output, r.output


def test_shards_carry_checksums(tmp_path):
    path = tmp_path / "part-00000.h5"
    write_shard(path, np.zeros((10, 13), np.float32), np.zeros((10, 26), np.int32), np.zeros(10, np.uint8))
    with h5py.File(path, "r") as f:
        assert all(f[k].fletcher32 for k in ("dense", "sparse", "label"))


def test_dqrm_train_reports_a_bad_label_with_its_shard(dataset, tmp_path):
    """A real dqrm-train process: the bad label stops it with exit 1 and one clear line."""
    shard = list_shards(dataset, "train")[0]
    set_value(shard, "label", (slice(0, 5000),), 2)
    p = subprocess.run([str(VENV_BIN / "dqrm-train"), "--data", str(dataset), "--out", str(tmp_path / "run"),
                        "--preset", "tiny", "--batch-size", "500", "--max-steps", "3", "--threads", "1"],
                       env=mpi_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    assert f"Error: {shard}: rows [" in p.stderr and "label = 2.0, expected 0 or 1" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
