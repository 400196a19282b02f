"""`dqrm-prep verify` and `dqrm-prep inspect`: checking and describing a dataset directory."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from dqrm_mpi.data.schema import (
    DENSE, LABEL, NUM_DENSE, NUM_SPARSE, SPARSE, SPLITS, SchemaError, check_arrays, list_shards, read_meta,
)

READ_ROWS = 1 << 18


def verify_dataset(root: str | os.PathLike) -> list[str]:
    """Every problem found (empty list: the dataset follows the contract and meta.json)."""
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
                        dense, sparse, label = d[a:b], s[a:b], lab[a:b]
                        check_arrays(dense, sparse, label, where=str(path))
                        if not np.isfinite(dense).all():
                            r = a + int(np.flatnonzero(~np.isfinite(dense).all(axis=1))[0])
                            problems.append(f"{path}: row {r}: dense has NaN or inf")
                        if (dense < 0).any():
                            problems.append(f"{path}: dense has negative values (log(x+1) of clamped x is >= 0)")
                        bad = (sparse < 0) | (sparse >= cards[None, :])
                        if bad.any():
                            r, c = (int(x) for x in np.argwhere(bad)[0])
                            problems.append(f"{path}: row {a + r}: sparse C{c + 1} = {int(sparse[r, c])}, "
                                            f"expected 0 <= id < cardinality {int(cards[c])}")
                        if not np.isin(label, (0, 1)).all():
                            problems.append(f"{path}: label values other than 0 and 1")
            except (OSError, SchemaError) as e:
                problems.append(f"{path}: {e}")
        if total != expected_rows:
            problems.append(f"{root}/{split}: {total} rows in {len(shards)} shards, meta.json says {expected_rows}")
        expected_shards = meta.extra.get("shards", {}).get(split)
        if expected_shards is not None and expected_shards != len(shards):
            problems.append(f"{root}/{split}: {len(shards)} shards, meta.json says {expected_shards}")
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
