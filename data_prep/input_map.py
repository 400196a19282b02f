"""The input mapping: what turns a raw Criteo line into the ids and dense values a model
trained on this dataset reads.  ``dqrm-prep criteo`` writes it as ``OUT/input_map.npz``
(its SHA-256 digest in ``meta.json``, ``extra.input_map``); ``dqrm-export --data`` copies
it into the packed model (``dqrm_mpi.quant.packed``), ``dqrm-predict`` applies it.

What it holds (``InputMap``):
    max_ind_range   the hash modulus (None: values taken as they are)
    freq_threshold  T of ``--freq-threshold``
    dense           the dense transform's name: "log1p_clamp0" (``schema.transform_dense``)
    vocab_JJ        column JJ's sorted vocabulary, uint32 [K_j] (the values, after the modulus)

The file is an ``.npz`` (a zip whose members carry CRC-32s, checked when read) with the
options as the JSON member ``options``; its ``digest`` is the SHA-256 of the options (sorted
JSON) and of each vocabulary's length and little-endian bytes, so the same mapping has the
same digest in the dataset and in a packed model.

Ids are ``vocab.Mapper``'s.  A value not in the vocabulary (never seen, or with T >= 1 seen
fewer than T times in train) gets ``OOV_ID`` = 0:
  * T >= 1: id 0 is the row every rare value shares in training (NVIDIA's and torchrec's
    convention), trained on them: an unseen value is treated as a rare one.
  * T = 0 (the reference DLRM): every value of every split has its own id and no row is
    reserved.  The reference DLRM defines nothing for a value it has never seen (its
    dictionaries are built over all days, test included, and a new value has no entry).
    Here such a value gets id 0, the smallest value's row: the empty (missing) field's
    wherever the column had empty fields (empty reads as 0 and sorts first), else the
    smallest hash seen.  Serving new traffic is better with ``--freq-threshold 1`` or more.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dqrm_mpi.data.schema import META_FILE, NUM_SPARSE, SchemaError, read_meta
from dqrm_mpi.files import write_atomic_bytes

from .vocab import Mapper

INPUT_MAP_FILE = "input_map.npz"
INPUT_MAP_VERSION = 1
DENSE_TRANSFORM = "log1p_clamp0"  # log(max(x, 0) + 1) as float32, empty = 0 (schema.transform_dense)
OOV_ID = 0


@dataclass(frozen=True, eq=False)
class InputMap:
    """Raw Criteo values -> model inputs (see the module doc).  vocabs: 26 sorted uint32 arrays."""

    max_ind_range: int | None
    freq_threshold: int
    vocabs: tuple[np.ndarray, ...]
    dense: str = DENSE_TRANSFORM

    def __post_init__(self) -> None:
        if len(self.vocabs) != NUM_SPARSE:
            raise ValueError(f"an input map has {NUM_SPARSE} vocabularies, got {len(self.vocabs)}")
        if self.dense != DENSE_TRANSFORM:
            raise ValueError(f"unknown dense transform {self.dense!r}; this dqrm_mpi knows {DENSE_TRANSFORM!r}")
        object.__setattr__(self, "vocabs", tuple(np.asarray(v, dtype=np.uint32) for v in self.vocabs))
        object.__setattr__(self, "_mappers", [Mapper(v, self.freq_threshold) for v in self.vocabs])

    def options(self) -> dict[str, Any]:
        return {"version": INPUT_MAP_VERSION, "max_ind_range": self.max_ind_range,
                "freq_threshold": self.freq_threshold, "dense": self.dense, "oov_id": OOV_ID}

    @property
    def cardinalities(self) -> list[int]:
        """Rows of each table the ids index (``vocab.build_vocab``'s cardinality)."""
        return [max(1, len(v)) if self.freq_threshold <= 0 else len(v) + 1 for v in self.vocabs]

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the options and the vocabularies (see the module doc)."""
        h = hashlib.sha256(json.dumps(self.options(), sort_keys=True).encode())
        for v in self.vocabs:
            h.update(np.uint64(len(v)).tobytes())
            h.update(np.ascontiguousarray(v, dtype="<u4").tobytes())
        return h.hexdigest()

    def ids(self, cat_dict: list[np.ndarray], cat_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A parsed block's categoricals (``ParsedBlock.cat_dict`` / ``cat_idx``, values already
        taken modulo max_ind_range by the parser) -> (int64 ids [n, 26], int64 unseen values per
        column [26]: rows whose value is not in the vocabulary, given OOV_ID)."""
        n = cat_idx.shape[1]
        out = np.empty((n, NUM_SPARSE), dtype=np.int64)
        unseen = np.zeros(NUM_SPARSE, dtype=np.int64)
        for j, (d, mapper) in enumerate(zip(cat_dict, self._mappers)):
            ids, missing = mapper.with_unseen(d)
            ids[missing] = OOV_ID
            out[:, j] = ids[cat_idx[j]]
            if missing.any():
                unseen[j] = int(np.count_nonzero(missing[cat_idx[j]]))
        return out, unseen

    def parts(self) -> "InputMapParts":
        """What a packed model keeps of it (``dqrm_mpi.quant.packed.export_packed``)."""
        from dqrm_mpi.quant.packed import InputMapParts

        return InputMapParts(self.options(), self.digest, self.vocabs)

    @classmethod
    def from_parts(cls, parts: "InputMapParts", where: str) -> "InputMap":
        """The map a packed model keeps, checked against its recorded digest (ValueError naming both)."""
        imap = cls.from_options(parts.options, list(parts.vocabs), where)
        if imap.digest != parts.sha256:
            raise ValueError(f"{where}: the input map's vocabulary changed: its digest is {imap.digest[:16]}, "
                             f"the header records {parts.sha256[:16]}; export the model again")
        return imap

    def to_bytes(self) -> bytes:
        """The ``.npz`` (what ``np.load`` reads), the same bytes for the same map: members stored
        uncompressed with a fixed time stamp (``np.savez`` stamps the current time)."""
        members = {"options": np.frombuffer(json.dumps(self.options(), sort_keys=True).encode(), np.uint8),
                   **{f"vocab_{j:02d}": v for j, v in enumerate(self.vocabs)}}
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, arr in members.items():
                with z.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w",
                            force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
        return buf.getvalue()

    @classmethod
    def from_options(cls, options: dict[str, Any], vocabs: list[np.ndarray], where: str) -> "InputMap":
        """The inverse of ``options()`` plus the vocabularies; ValueError naming ``where``."""
        if options.get("version") != INPUT_MAP_VERSION or options.get("oov_id") != OOV_ID:
            raise ValueError(f"{where}: input map version {options.get('version')!r} (OOV id "
                             f"{options.get('oov_id')!r}); this dqrm_mpi reads version {INPUT_MAP_VERSION}")
        try:
            return cls(options["max_ind_range"], int(options["freq_threshold"]), tuple(vocabs), options["dense"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: not a readable input map ({type(e).__name__}: {e})") from None


def write_input_map(out: str | os.PathLike, imap: InputMap) -> dict[str, Any]:
    """Write ``OUT/input_map.npz`` (temporary name, then rename); returns what meta.json records
    of it ({"file", "sha256", "bytes"})."""
    data = imap.to_bytes()
    write_atomic_bytes(Path(out) / INPUT_MAP_FILE, data)
    return {"file": INPUT_MAP_FILE, "sha256": imap.digest, "bytes": len(data)}


def read_input_map_file(path: str | os.PathLike) -> InputMap:
    """An ``input_map.npz``; ValueError naming the file when it is unreadable or damaged."""
    try:
        with np.load(path, allow_pickle=False) as z:
            options = json.loads(z["options"].tobytes().decode())
            vocabs = [z[f"vocab_{j:02d}"] for j in range(NUM_SPARSE)]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable input map ({type(e).__name__}: {e})") from None
    return InputMap.from_options(options, vocabs, str(path))


def load_input_map(data: str | os.PathLike) -> InputMap:
    """The input map of the dataset ``data``, checked against the digest its meta.json records;
    ValueError naming the file and both digests when they differ, or when the dataset has none
    (made by a dqrm-prep without it, or by ``write_synthetic_dataset``)."""
    try:
        meta = read_meta(data)
    except SchemaError as e:
        raise ValueError(str(e)) from None
    record = meta.extra.get("input_map")
    path = Path(data) / INPUT_MAP_FILE
    if not record:
        raise ValueError(f"{Path(data) / META_FILE}: records no input map (a dataset not made by dqrm-prep "
                         f"criteo, or by an older one): make it again with dqrm-prep criteo to score raw rows")
    imap = read_input_map_file(path)
    if imap.digest != record["sha256"]:
        raise ValueError(f"{path}: the vocabulary changed since the dataset was made: its digest is "
                         f"{imap.digest[:16]}, {META_FILE} records {record['sha256'][:16]}; the ids of the "
                         f"shards are those of {record['sha256'][:16]}: make the dataset again")
    if imap.cardinalities != meta.cardinalities:
        raise ValueError(f"{path}: its tables have {imap.cardinalities} rows, {META_FILE} says "
                         f"{meta.cardinalities}: make the dataset again")
    return imap
