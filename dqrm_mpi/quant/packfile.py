"""The packed model file format: bytes, not models.

Layout (all integers little-endian)::

    offset 0    8 bytes   magic b"DQRMPACK"
    offset 8    u32       format version (FORMAT_VERSION)
    offset 12   u64       H, the length of the header
    offset 20   H bytes   header, UTF-8 JSON (compact):
                            format_version   int
                            ...              what the writer adds (``packed.py``: architecture, quant)
                            tensors          [{name, dtype, shape, bits, offset, nbytes}]
    offset 20+H           payload: the tensors back to back, ``offset`` counted from here

Tensor dtypes: "float32" (little-endian IEEE, C order) or "packed": signed ``bits``-bit
integers packed by ``qcore.pack`` row by row (shape = [rows, values per row]; each row
takes ceil(values * bits / 8) bytes; INT4 two values per byte, INT2 four).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..qcore import packed_row_bytes

MAGIC = b"DQRMPACK"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file: float32 of ``shape``, or ``bits``-bit integers packed per row
    (shape [rows, values per row])."""

    name: str
    dtype: str  # "float32" | "packed"
    shape: tuple[int, ...]
    bits: int | None = None

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of the stored tensor: ``shape`` (float32) or [rows, bytes per row] (uint8)."""
        if self.dtype == "float32":
            return self.shape
        return self.shape[0], packed_row_bytes(self.shape[1], self.bits)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.stored_shape)) * (4 if self.dtype == "float32" else 1)


def encode_header(meta: dict[str, Any], entries: list[TensorEntry]) -> bytes:
    """The prefix and JSON header of a file holding ``entries`` in order, ``meta`` beside them."""
    tensors, offset = [], 0
    for e in entries:
        tensors.append({"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "bits": e.bits,
                        "offset": offset, "nbytes": e.nbytes})
        offset += e.nbytes
    header = {"format_version": FORMAT_VERSION, **meta, "tensors": tensors}
    blob = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(blob)) + blob


def file_size(meta: dict[str, Any], entries: list[TensorEntry]) -> int:
    """Bytes of the file (without writing it)."""
    return len(encode_header(meta, entries)) + sum(e.nbytes for e in entries)


def write(path: str | Path, meta: dict[str, Any], entries: list[TensorEntry],
          tensors: dict[str, torch.Tensor]) -> int:
    """Write ``tensors`` (float32, or packed uint8 [rows, bytes per row]) as ``entries`` say,
    through a temporary name; returns the file size in bytes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(encode_header(meta, entries))
            for e in entries:
                t = tensors[e.name]
                if tuple(t.shape) != tuple(e.stored_shape):
                    raise AssertionError(f"{e.name}: shape {tuple(t.shape)}, layout says {e.stored_shape}")
                f.write(t.contiguous().numpy().astype("<f4" if e.dtype == "float32" else np.uint8).tobytes())
        tmp.replace(path)
    except BaseException:  # no half-written .tmp left beside the output
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def is_packed_file(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """(header dict, payload start offset); ValueError if not a packed model of this version."""
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise ValueError(f"{path}: too short to be a packed DQRM model")
        magic, version, length = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise ValueError(f"{path}: not a packed DQRM model (no {MAGIC!r} magic)")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: format version {version}, this dqrm_mpi reads {FORMAT_VERSION}")
        header = json.loads(f.read(length).decode())
    return header, _PREFIX.size + length


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, name -> tensor): float32 tensors, packed ones as uint8 [rows, bytes per row]."""
    header, start = read_header(path)
    raw = np.fromfile(path, dtype=np.uint8, offset=start)
    tensors = {}
    for e in header["tensors"]:
        chunk = raw[e["offset"]:e["offset"] + e["nbytes"]]
        if len(chunk) != e["nbytes"]:
            raise ValueError(f"{path}: truncated at tensor {e['name']}")
        entry = TensorEntry(e["name"], e["dtype"], tuple(e["shape"]), e["bits"])
        if e["dtype"] == "float32":
            tensors[e["name"]] = torch.from_numpy(chunk.view("<f4").astype(np.float32).reshape(entry.shape))
        else:
            tensors[e["name"]] = torch.from_numpy(chunk.reshape(entry.stored_shape).copy())
    return header, tensors
