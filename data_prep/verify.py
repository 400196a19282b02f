"""`dqrm-prep verify` and `dqrm-prep inspect`: checking and describing a dataset directory."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from dqrm_mpi.data.schema import (
    DENSE, LABEL, NUM_DENSE, NUM_SPARSE, SPARSE, SPLITS, SchemaError, find_bad_value, list_shards, read_meta,
)

from .input_map import load_input_map

READ_ROWS = 1 << 18


def verify_dataset(root: str | os.PathLike, warn: Callable[[str], None] = lambda msg: None) -> list[str]:
    """Every problem found (empty list: the dataset follows the contract and meta.json).
    Reading checks each chunk's Fletcher-32 checksum: a flipped bit is a problem.  ``warn``
    gets what is not a problem but worth saying (shards without checksums).  The input map, when
    meta.json records one, must have the digest and table sizes it records."""
    root = Path(root)
    problems: list[str] = []
    try:
        meta = read_meta(root)
    except SchemaError as e:
        return [str(e)]
    cards = np.array(meta.cardinalities, dtype=np.int64)
    for split in SPLITS:
        shards = list_shards(root, split)
        expected_rows = int(meta.rows.get(split, 0))
        total = 0
        unchecked: list[Path] = []
        for path in shards:
            try:
                with h5py.File(path, "r") as f:
                    missing = [k for k in (DENSE, SPARSE, LABEL) if k not in f]
                    if missing:
                        problems.append(f"{path}: missing datasets {missing}")
                        continue
                    d, s, lab = f[DENSE], f[SPARSE], f[LABEL]
                    n = lab.shape[0]
                    total += n
                    if d.dtype != np.float32 or d.shape != (n, NUM_DENSE) or s.shape != (n, NUM_SPARSE) \
                            or s.dtype not in (np.int32, np.int64) or lab.dtype not in (np.float32, np.uint8):
                        problems.append(f"{path}: shapes/dtypes dense {d.dtype}{d.shape} sparse {s.dtype}{s.shape} "
                                        f"label {lab.dtype}{lab.shape}; expected float32[n,13], int32|int64[n,26], "
                                        f"float32|uint8[n]")
                        continue
                    if "rows" in f.attrs and int(f.attrs["rows"]) != n:
                        problems.append(f"{path}: attribute rows={int(f.attrs['rows'])} but {n} rows stored")
                    for a in range(0, n, READ_ROWS):
                        b = min(n, a + READ_ROWS)
                        try:
                            dense, sparse, label = d[a:b], s[a:b], lab[a:b]
                        except OSError as e:  # a Fletcher-32 checksum mismatch, or an unreadable chunk
                            problems.append(f"{path}: rows [{a}, {b}) cannot be read, the file is corrupt "
                                            f"(checksum mismatch or bad chunk: {e})")
                            continue
                        problem = find_bad_value(dense, sparse, label, cards, first_row=a)
                        if problem:
                            problems.append(f"{path}: {problem}")
                        if (dense < 0).any():
                            problems.append(f"{path}: dense has negative values (log(x+1) of clamped x is >= 0)")
                    if n and not all(f[k].fletcher32 for k in (DENSE, SPARSE, LABEL)):
                        unchecked.append(path)
            except OSError as e:
                problems.append(f"{path}: cannot open shard, the file is truncated or corrupt ({e})")
        if unchecked:
            warn(f"{root}/{split}: {len(unchecked)} shard(s) without checksums (written by an older dqrm-prep); "
                 f"bit flips in them cannot be detected")
        if total != expected_rows:
            problems.append(f"{root}/{split}: {total} rows in {len(shards)} shards, meta.json says {expected_rows}")
        expected_shards = meta.extra.get("shards", {}).get(split)
        if expected_shards is not None and expected_shards != len(shards):
            problems.append(f"{root}/{split}: {len(shards)} shards, meta.json says {expected_shards}")
    if meta.extra.get("input_map"):
        try:
            load_input_map(root)  # its digest and tables against meta.json
        except ValueError as e:
            problems.append(str(e))
    return problems


def describe_dataset(root: str | os.PathLike) -> str:
    root = Path(root)
    meta = read_meta(root)
    lines = [f"dataset: {root}", f"schema_version: {meta.schema_version}"]
    lines.append("splits:")
    for split in SPLITS:
        shards = list_shards(root, split)
        size = sum(p.stat().st_size for p in shards)
        lines.append(f"  {split:<5} {meta.rows.get(split, 0):>14,} rows  {len(shards):>5} shards  {size / 2**20:>10.1f} MiB")
    lines.append(f"train ctr: {meta.ctr:.4f}")
    lines.append(f"cardinalities: {meta.cardinalities}")
    lines.append(f"embedding rows in all: {sum(meta.cardinalities):,}")
    if meta.options:
        lines.append("options:")
        for k, v in sorted(meta.options.items()):
            if k != "fingerprint_fields":
                lines.append(f"  {k}: {v}")
    extra = meta.extra
    if extra:
        lines.append("extra:")
        for k, v in sorted(extra.items()):
            if k in ("sources",):
                lines.append(f"  {k}:")
                for s in v:
                    lines.append(f"    {s.get('name')}  {s.get('size', 0):,} bytes  lines={s.get('lines')}")
            elif k == "bad_line_examples":
                lines.append(f"  {k}: {len(v)} shown")
                for e in v[:5]:
                    lines.append(f"    {e.get('path')}:{e.get('line')} field={e.get('field')} expected {e.get('expected')}")
            else:
                lines.append(f"  {k}: {v}")
    return "\n".join(lines)
