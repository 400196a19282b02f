"""Packed models carry CRC-32s; dqrm-eval refuses data whose tables differ from the model's."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from dqrm_mpi.data.synthetic import PlantedClickModel, write_synthetic_dataset
from dqrm_mpi.quant import packfile

from ..conftest import SMALL_CARDINALITIES, VENV_BIN, run_cmd
from .conftest import run, train_args

EXPORT, EVAL = str(VENV_BIN / "dqrm-export"), str(VENV_BIN / "dqrm-eval")


@pytest.fixture(scope="module")
def packed_model(small_dataset, tmp_path_factory) -> Path:
    """An INT4 model trained a few steps on one rank and exported."""
    out = tmp_path_factory.mktemp("packed")
    run_cmd(train_args(small_dataset, out / "run", "--max-steps", "4", "--emb-bits", "4", "--mlp-bits", "4"))
    run_cmd([EXPORT, str(out / "run" / "checkpoint.pt"), str(out / "int4.dqrm")])
    return out / "int4.dqrm"


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_flipped_payload_bit_is_refused_naming_the_tensor(packed_model, small_dataset, tmp_path):
    damaged = tmp_path / "damaged.dqrm"
    damaged.write_bytes(packed_model.read_bytes())
    header, start = packfile.read_header(damaged)
    table = next(e for e in header["tensors"] if e["name"] == "embeddings.2.q")
    _flip(damaged, start + table["offset"] + table["nbytes"] // 2)
    proc = run([EVAL, str(damaged), "--data", str(small_dataset)])
    assert proc.returncode == 1, proc.stdout
    assert "tensor embeddings.2.q is damaged" in proc.stderr and str(damaged) in proc.stderr


def test_flipped_header_bit_is_refused(packed_model, small_dataset, tmp_path):
    damaged = tmp_path / "damaged.dqrm"
    damaged.write_bytes(packed_model.read_bytes())
    text = packed_model.read_bytes()
    _flip(damaged, text.index(b'"embedding_dim"') + 2)  # a letter of a key: still JSON-shaped, wrong
    proc = run([EVAL, str(damaged), "--data", str(small_dataset)])
    assert proc.returncode == 1 and "the header is damaged" in proc.stderr


def test_version_1_files_are_still_read(packed_model, small_dataset, tmp_path):
    """A version 1 file (no header CRC word, no tensor crc32) evaluates as before."""
    header, start = packfile.read_header(packed_model)
    payload = packed_model.read_bytes()[start:]
    for e in header["tensors"]:
        del e["crc32"]
    header["format_version"] = 1
    blob = json.dumps(header, separators=(",", ":")).encode()
    old = tmp_path / "v1.dqrm"
    old.write_bytes(struct.pack("<8sIQ", packfile.MAGIC, 1, len(blob)) + blob + payload)
    new = json.loads(run_cmd([EVAL, str(packed_model), "--data", str(small_dataset)]).stdout)
    v1 = json.loads(run_cmd([EVAL, str(old), "--data", str(small_dataset)]).stdout)
    assert v1["auc"] == new["auc"] and v1["log_loss"] == new["log_loss"]
    assert zlib.crc32(payload) == zlib.crc32(old.read_bytes()[-len(payload):])


@pytest.mark.parametrize("change", [-1, +1], ids=["smaller", "larger"])
def test_eval_refuses_data_with_other_cardinalities(packed_model, small_dataset, tmp_path, change):
    cards = list(SMALL_CARDINALITIES)
    cards[5] += change * 4
    other = tmp_path / "other"
    write_synthetic_dataset(other, {"train": 500, "val": 0, "test": 500}, PlantedClickModel(cards, seed=2))
    for model in (packed_model, packed_model.parent / "run" / "checkpoint.pt"):
        proc = run([EVAL, str(model), "--data", str(other)])
        assert proc.returncode == 1, proc.stdout
        assert f"embedding table 5 has {cards[5]} rows in the data, {SMALL_CARDINALITIES[5]} in the model" \
            in proc.stderr
