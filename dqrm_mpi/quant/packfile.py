"""The packed model file format: bytes, not models.

Layout (all integers little-endian)::

    offset 0    8 bytes   magic b"DQRMPACK"
    offset 8    u32       format version (FORMAT_VERSION)
    offset 12   u64       H, the length of the header
    offset 20   H bytes   header, UTF-8 JSON (compact):
                            format_version   int
                            ...              what the writer adds (``packed.py``: architecture, quant)
                            tensors          [{name, dtype, shape, bits, offset, nbytes, crc32}]
    offset 20+H u32       CRC-32 of bytes [0, 20+H) (magic, version, length and header)
    offset 24+H           payload: the tensors back to back, ``offset`` counted from here

Tensor dtypes: "float32" (little-endian IEEE, C order), "uint32" (little-endian, C order:
the input map's vocabularies) or "packed": signed ``bits``-bit
integers packed by ``qcore.pack`` row by row (shape = [rows, values per row]; each row
takes ceil(values * bits / 8) bytes; INT4 two values per byte, INT2 four).  ``crc32`` is the
CRC-32 (``zlib.crc32``) of the tensor's stored bytes: a damaged file is refused on load with
the tensor named.

Version 1 files (no header CRC word, no tensor ``crc32``) are still read, unchecked.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import write_atomic
from ..qcore import packed_row_bytes

MAGIC = b"DQRMPACK"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length
_CRC = struct.Struct("<I")  # CRC-32 of prefix + header (version 2)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file: float32 of ``shape``, or ``bits``-bit integers packed per row
    (shape [rows, values per row])."""

    name: str
    dtype: str  # "float32" | "uint32" | "packed"
    shape: tuple[int, ...]
    bits: int | None = None

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of the stored tensor: ``shape`` (float32, uint32) or [rows, bytes per row] (uint8)."""
        if self.dtype in _WORDS:
            return self.shape
        return self.shape[0], packed_row_bytes(self.shape[1], self.bits)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.stored_shape)) * (4 if self.dtype in _WORDS else 1)


_WORDS = {"float32": "<f4", "uint32": "<u4"}  # 4-byte dtypes: their stored numpy type


def encode_header(meta: dict[str, Any], entries: list[TensorEntry], crcs: dict[str, int] | None = None) -> bytes:
    """The prefix, JSON header and header CRC of a file holding ``entries`` in order, ``meta``
    beside them; ``crcs``: name -> CRC-32 of the tensor's bytes (0 when only sizing the file:
    written as 8 hex digits, the header's length does not depend on them)."""
    tensors, offset = [], 0
    for e in entries:
        tensors.append({"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "bits": e.bits,
                        "offset": offset, "nbytes": e.nbytes, "crc32": f"{(crcs or {}).get(e.name, 0):08x}"})
        offset += e.nbytes
    header = {"format_version": FORMAT_VERSION, **meta, "tensors": tensors}
    blob = json.dumps(header, separators=(",", ":")).encode()
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(blob)) + blob
    return head + _CRC.pack(zlib.crc32(head))


def file_size(meta: dict[str, Any], entries: list[TensorEntry]) -> int:
    """Bytes of the file (without writing it)."""
    return len(encode_header(meta, entries)) + sum(e.nbytes for e in entries)


def write(path: str | Path, meta: dict[str, Any], entries: list[TensorEntry],
          tensors: dict[str, torch.Tensor]) -> int:
    """Write ``tensors`` (float32, or packed uint8 [rows, bytes per row]) as ``entries`` say,
    through a temporary name (``files.write_atomic``: a full disk is named with the size);
    returns the file size in bytes."""
    def stored(e: TensorEntry) -> np.ndarray:
        t = tensors[e.name]
        if tuple(t.shape) != tuple(e.stored_shape):
            raise AssertionError(f"{e.name}: shape {tuple(t.shape)}, layout says {e.stored_shape}")
        return np.ascontiguousarray(t.numpy(), dtype=_WORDS.get(e.dtype, np.uint8))

    head = encode_header(meta, entries, {e.name: zlib.crc32(stored(e)) for e in entries})

    def write_all(f) -> None:
        f.write(head)
        for e in entries:
            f.write(stored(e).data)

    path = Path(path)
    write_atomic(path, write_all, len(head) + sum(e.nbytes for e in entries))
    return path.stat().st_size


def is_packed_file(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """(header dict, payload start offset); ValueError if not a packed model of a readable
    version or if its header fails its CRC."""
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise ValueError(f"{path}: too short to be a packed DQRM model")
        magic, version, length = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise ValueError(f"{path}: not a packed DQRM model (no {MAGIC!r} magic)")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"{path}: format version {version}, this dqrm_mpi reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        blob = f.read(length)
        if version >= 2:
            crc = f.read(_CRC.size)
            if len(blob) != length or len(crc) != _CRC.size or _CRC.unpack(crc)[0] != zlib.crc32(prefix + blob):
                raise ValueError(f"{path}: the header is damaged (CRC-32 mismatch or truncated); export the model again")
        try:
            header = json.loads(blob.decode())
        except ValueError as e:
            raise ValueError(f"{path}: the header is not readable JSON ({e})") from None
    return header, _PREFIX.size + length + (_CRC.size if version >= 2 else 0)


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, name -> tensor): float32 and uint32 tensors, packed ones as uint8 [rows, bytes
    per row].  Each tensor is read into its own memory, once: a loaded file takes about its size.
    ValueError naming the tensor when one is truncated or fails its CRC-32."""
    header, start = read_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for e in header["tensors"]:
            chunk = np.empty(e["nbytes"], dtype=np.uint8)
            f.seek(start + e["offset"])
            if f.readinto(memoryview(chunk)) != e["nbytes"]:
                raise ValueError(f"{path}: truncated at tensor {e['name']}")
            if "crc32" in e and f"{zlib.crc32(chunk):08x}" != e["crc32"]:
                raise ValueError(f"{path}: tensor {e['name']} is damaged (CRC-32 {zlib.crc32(chunk):08x}, the file "
                                 f"says {e['crc32']}): the file changed after export; export the model again")
            entry = TensorEntry(e["name"], e["dtype"], tuple(e["shape"]), e["bits"])
            if e["dtype"] in _WORDS:
                native = np.dtype(_WORDS[e["dtype"]]).newbyteorder("=")
                tensors[e["name"]] = torch.from_numpy(chunk.view(_WORDS[e["dtype"]]).astype(native, copy=False)
                                                      .reshape(entry.shape))
            else:
                tensors[e["name"]] = torch.from_numpy(chunk.reshape(entry.stored_shape))
    return header, tensors
