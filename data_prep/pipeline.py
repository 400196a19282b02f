"""`dqrm-prep criteo`: raw Criteo logs -> HDF5 shards, in five passes.

1. plan: find the inputs, cut plain files into pieces of ~32 MiB at newlines, count
   lines where the split needs them (cheap byte counting; gzip files only when they
   hold test/val rows).
2. parse (one task per piece, in parallel): parse, validate, sub-sample, and spill the
   rows grouped by destination: a training row goes to a random bucket (seeded hash of
   its file and line), test and val rows keep their order.  Categoricals are spilled as
   int32 indices into the run's own sorted list of distinct values per column (found
   with a hash table while parsing), which is also the piece's vocabulary record.
3. vocabularies (one task per column): merge the pieces' values into contiguous ids.
4. ids (one task per piece): map each run's short lists of distinct values to ids once
   (look-up table or binary search), then one take turns the spilled indices into ids.
5. shards (in parallel): each output shard is a slice of the concatenation of buckets
   (each bucket shuffled with its own seed), written atomically.  Row
   assignment to buckets is i.i.d. uniform and every bucket is permuted, so the
   training order is a uniform random permutation that depends only on the seed and
   the input, not on the number of workers or pieces.

Everything in progress lives in ``OUT/.prep`` (finished pieces are marked by a
``done.json`` written last); shards are written under a temporary name and renamed;
``meta.json`` is written last and the state removed.  A rerun resumes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dqrm_mpi.data.schema import (
    META_FILE, NUM_DENSE, NUM_SPARSE, SPLITS, DatasetMeta, SchemaError, read_meta, shard_name, write_atomic_text,
    write_meta, write_shard,
)

from .criteo_format import MAX_EXAMPLES, parse_block
from .errors import InputError, OptionsMismatchError, OutputError
from .executor import Executor
from .sources import (
    Piece, Source, assign_splits, count_piece_lines, cut_plain, discover, iter_gzip_blocks, planted_path, read_range,
)
from .vocab import LUT_MAX, CountAccumulator, build_vocab, load_mappers, make_lut

PREP_VERSION = 1
STATE_DIR = ".prep"
PIECE_BYTES = 32 << 20
GZIP_BLOCK_BYTES = 32 << 20
RUN_ROWS = 1 << 20
GZ_BYTES_PER_ROW_EST = 60  # only sizes the number of shuffle buckets for uncounted gzip days
PLAIN_BYTES_PER_ROW_EST = 240
KILL_ENV = "DQRM_PREP_KILL_AFTER"  # test hook: "pieces:N" or "shards:N" -> SIGKILL self
SALT_SUBSAMPLE, SALT_BUCKET, SALT_PERMUTE = 0x5B5A, 0xB0C7, 0x9E2D
TRAIN, TEST, VAL = 0, 1, 2


@dataclass
class PrepOptions:
    """Options of `dqrm-prep criteo`.  The first group decides the output (recorded in
    meta.json and compared on resume); the second only how it is made."""

    dataset: str = "auto"
    max_ind_range: int | None = None
    freq_threshold: int = 0
    sub_sample_rate: float = 0.0
    seed: int = 0
    shard_rows: int = 1_000_000
    bad_lines: str = "error"
    label_dtype: str = "uint8"

    workers: int = 1
    progress: bool = True
    overwrite: bool = False
    keep_temp: bool = False
    piece_bytes: int = PIECE_BYTES

    OUTPUT_FIELDS = ("dataset", "max_ind_range", "freq_threshold", "sub_sample_rate", "seed", "shard_rows",
                     "bad_lines", "label_dtype")

    def output_options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.OUTPUT_FIELDS}

    def validate(self) -> None:
        if self.max_ind_range is not None and not 1 <= self.max_ind_range <= 2**32:
            raise InputError(f"--max-ind-range must be in 1 .. 2^32, got {self.max_ind_range}")
        if self.freq_threshold < 0:
            raise InputError(f"--freq-threshold must be >= 0, got {self.freq_threshold}")
        if not 0.0 <= self.sub_sample_rate < 1.0:
            raise InputError(f"--sub-sample-rate must be in [0, 1), got {self.sub_sample_rate}")
        if self.shard_rows < 1:
            raise InputError(f"--shard-rows must be >= 1, got {self.shard_rows}")
        if self.bad_lines not in ("error", "skip"):
            raise InputError(f"--bad-lines must be error or skip, got {self.bad_lines!r}")
        if self.label_dtype not in ("uint8", "float32"):
            raise InputError(f"--label-dtype must be uint8 or float32, got {self.label_dtype!r}")
        if self.workers < 1:
            raise InputError(f"--workers must be >= 1, got {self.workers}")


@dataclass
class Ctx:
    """What every task needs (pickled to worker processes)."""

    out: str
    opts: dict[str, Any]
    sources: list[Source]
    buckets: int

    @property
    def state(self) -> Path:
        return Path(self.out) / STATE_DIR


# ---------------------------------------------------------------- hashing

def splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def row_hash(source: int, line: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """A seeded 64-bit hash of (file, line): the same row always gets the same draw."""
    key = (np.uint64(source) << np.uint64(40)) | line.astype(np.uint64)
    mix = splitmix64(np.array([(seed * 0x100000001B3 + salt) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    return splitmix64(key ^ mix)


def uniform01(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ---------------------------------------------------------------- test hook

_KILL_COUNTS: dict[str, int] = {}


def _maybe_kill(stage: str) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want != stage:
        return
    _KILL_COUNTS[stage] = _KILL_COUNTS.get(stage, 0) + 1
    if _KILL_COUNTS[stage] >= int(n):
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- pass 0: plan

def _count_task(args: tuple[str, int, int, bool]) -> int:
    return count_piece_lines(*args)


def _plan(kind: str, sources: list[Source], opts: PrepOptions, ex: Executor) -> tuple[list[Piece], int]:
    pieces: list[Piece] = []
    for s in sources:
        if s.gz:
            pieces.append(Piece(len(pieces), s.index, 0, -1, first_line=0))
        else:
            pieces.extend(cut_plain(s, opts.piece_bytes, len(pieces)))
    # Count lines: every plain piece (fast), gzip files only when they hold test/val.
    todo = [p for p in pieces if not sources[p.source].gz or sources[p.source].holdout]
    args = [(sources[p.source].path, p.start, p.end, sources[p.source].gz) for p in todo]
    counts = ex.map(_count_task, args, desc="count lines", unit="piece")
    for p, n in zip(todo, counts):
        p.lines = n
    for s in sources:
        mine = [p for p in pieces if p.source == s.index]
        if all(p.lines >= 0 for p in mine):
            first = 0
            for p in mine:
                p.first_line = first
                first += p.lines
            s.lines = first
            if s.lines == 0:
                raise InputError(f"{s.path}: input has no lines")
    assign_splits(kind, sources)
    est = 0
    for s in sources:
        if s.lines >= 0:
            est += min(s.lines, s.train_end)
        else:
            est += s.size // (GZ_BYTES_PER_ROW_EST if s.gz else PLAIN_BYTES_PER_ROW_EST)
    buckets = max(1, math.ceil(est * (1.0 - opts.sub_sample_rate * 0.7) / opts.shard_rows))
    return pieces, buckets


# ---------------------------------------------------------------- pass 1: parse pieces

def _piece_dir(state: Path, index: int) -> Path:
    return state / "pieces" / f"{index:06d}"


def parse_piece(ctx: Ctx, piece: Piece) -> dict:
    """Parse one piece; spill its rows grouped by destination; save its vocabulary counts."""
    state = ctx.state
    pdir = _piece_dir(state, piece.index)
    done = pdir / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    pdir.mkdir(parents=True, exist_ok=True)
    o = ctx.opts
    src = ctx.sources[piece.source]
    T, R, S = int(o["freq_threshold"]), float(o["sub_sample_rate"]), ctx.buckets
    acc = [CountAccumulator(T > 0) for _ in range(NUM_SPARSE)]
    summary: dict[str, Any] = {"index": piece.index, "lines": 0, "bad": 0, "subsampled": 0,
                               "rows": [0, 0, 0], "positives": [0, 0, 0], "bad_examples": [], "runs": []}
    pending: list[tuple] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal pending, pending_rows
        if not pending:
            return
        group = np.concatenate([p[0] for p in pending])
        train = group < S
        order = np.argsort(group, kind="stable")
        counts = np.bincount(group, minlength=S + 2)
        local, dicts = _run_dictionaries(pending, acc, train, T)
        r = len(summary["runs"])
        _save(pdir / f"run{r:04d}.label.npy", np.concatenate([p[1] for p in pending])[order])
        _save(pdir / f"run{r:04d}.dense.npy", np.concatenate([p[2] for p in pending])[order])
        _save(pdir / f"run{r:04d}.idx.npy", local[order])
        offs = np.zeros(NUM_SPARSE + 1, dtype=np.int64)
        np.cumsum([len(d) for d in dicts], out=offs[1:])
        _save(pdir / f"run{r:04d}.dict.npy", np.concatenate(dicts))
        _save(pdir / f"run{r:04d}.dictoff.npy", offs)
        summary["runs"].append(counts.tolist())
        pending, pending_rows = [], 0

    if src.gz:
        blocks = iter_gzip_blocks(src.path, GZIP_BLOCK_BYTES)
    else:
        blocks = iter([read_range(src.path, piece.start, piece.end)])
    first_line = piece.first_line
    for buf in blocks:
        pb = parse_block(buf, src.path, first_line, o["max_ind_range"], o["bad_lines"])
        first_line += pb.n_lines
        summary["lines"] += pb.n_lines
        summary["bad"] += pb.n_bad
        room = MAX_EXAMPLES - len(summary["bad_examples"])
        summary["bad_examples"].extend(e.to_dict() for e in pb.bad[:max(0, room)])
        line = pb.line
        split = np.where(line < src.train_end, TRAIN, np.where(line < src.test_end, TEST, VAL)).astype(np.int64)
        label, dense, cat_idx = pb.label, pb.dense, pb.cat_idx
        if R > 0:
            drop = (split == TRAIN) & (label == 0) & (uniform01(row_hash(src.index, line, o["seed"], SALT_SUBSAMPLE)) < R)
            if drop.any():
                keep = ~drop
                summary["subsampled"] += int(drop.sum())
                label, dense, cat_idx, line, split = label[keep], dense[keep], cat_idx[keep], line[keep], split[keep]
        bucket = (row_hash(src.index, line, o["seed"], SALT_BUCKET) % np.uint64(S)).astype(np.int64)
        group = np.where(split == TRAIN, bucket, S + split - 1)
        for s in (TRAIN, TEST, VAL):
            m = split == s
            summary["rows"][s] += int(m.sum())
            summary["positives"][s] += int(label[m].sum())
        pending.append((group, label, dense, cat_idx, pb.cat_dict))
        pending_rows += len(label)
        if pending_rows >= RUN_ROWS:
            flush()
    flush()
    if piece.lines >= 0 and summary["lines"] != piece.lines:
        raise InputError(f"{src.path}: read {summary['lines']} lines, counted {piece.lines} (file changed?)")
    arrays = {}
    for j in range(NUM_SPARSE):
        v, c = acc[j].result()
        arrays[f"v{j:02d}"] = v
        if c is not None:
            arrays[f"c{j:02d}"] = c
    np.savez(pdir / "vocab.npz", **arrays)
    write_atomic_text(done, json.dumps(summary))
    _maybe_kill("pieces")
    return summary


def _save(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def _save_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    _save(tmp, arr)
    os.replace(tmp, path)


def _run_dictionaries(pending: list[tuple], acc: list[CountAccumulator], train: np.ndarray,
                      T: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The blocks of one run -> (int32 [n, 26] row indices into the concatenation of the
    returned per-column dictionaries, per-column sorted unique values used by the run's
    rows).  Adds each column's values (with train counts when T > 0) to ``acc``."""
    n = sum(len(p[1]) for p in pending)
    local = np.empty((n, NUM_SPARSE), dtype=np.int32)
    dicts: list[np.ndarray] = []
    base = 0
    for j in range(NUM_SPARSE):
        if len(pending) == 1:
            d, idx = pending[0][4][j], pending[0][3][:, j]
        else:
            d = np.concatenate([p[4][j] for p in pending])
            sizes = np.cumsum([0] + [len(p[4][j]) for p in pending[:-1]])
            idx = np.concatenate([p[3][:, j] + np.int32(o) for p, o in zip(pending, sizes)])
        u, inv = np.unique(d, return_inverse=True)
        loc = inv[idx]
        cnt = np.bincount(loc, minlength=len(u))
        used = cnt > 0
        if not used.all():  # values only in dropped (bad or sub-sampled) rows
            newpos = np.cumsum(used) - 1
            u, loc = u[used], newpos[loc]
        if T > 0:
            c = np.bincount(loc[train], minlength=len(u))
            seen = c > 0
            acc[j].add(u[seen], c[seen].astype(np.int64))
        else:
            acc[j].add(u)
        local[:, j] = loc
        if base:
            local[:, j] += np.int32(base)
        dicts.append(u.astype(np.uint32, copy=False))
        base += len(u)
    return local, dicts


# ---------------------------------------------------------------- pass 2: vocabularies

def merge_column(ctx: Ctx, j: int, n_pieces: int) -> dict:
    folder = ctx.state / "vocab"
    T = int(ctx.opts["freq_threshold"])
    M = ctx.opts["max_ind_range"]
    marker = folder / f"vocab_{j:02d}.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    acc = CountAccumulator(T > 0)
    for i in range(n_pieces):
        with np.load(_piece_dir(ctx.state, i) / "vocab.npz") as z:
            acc.add(z[f"v{j:02d}"], z[f"c{j:02d}"] if T > 0 else None)
    values, counts = acc.result()
    vocab, card = build_vocab(values, counts, T)
    np.save(folder / f"vocab_{j:02d}.npy", vocab)
    if _use_lut(M):
        np.save(folder / f"lut_{j:02d}.npy", make_lut(vocab, T, int(M)))
    info = {"column": j, "cardinality": int(card), "distinct": int(len(values))}
    write_atomic_text(marker, json.dumps(info))
    return info


def _use_lut(M: int | None) -> bool:
    return M is not None and M <= LUT_MAX


# ---------------------------------------------------------------- pass 3: ids

def map_piece(ctx: Ctx, piece_index: int, n_runs: int, sparse_dtype: str) -> int:
    """Turn the spilled per-run dictionary indices of one piece into final ids: each run's
    dictionaries (its distinct values per column) are mapped once, then one take."""
    pdir = _piece_dir(ctx.state, piece_index)
    mappers = None
    rows = 0
    for r in range(n_runs):
        ids_path = pdir / f"run{r:04d}.ids.npy"
        if ids_path.is_file():
            rows += len(np.load(ids_path, mmap_mode="r"))
            continue
        if mappers is None:
            mappers = _mappers(ctx)
        local = np.load(pdir / f"run{r:04d}.idx.npy")
        d = np.load(pdir / f"run{r:04d}.dict.npy")
        offs = np.load(pdir / f"run{r:04d}.dictoff.npy")
        gmap = np.empty(len(d), dtype=sparse_dtype)
        for j in range(NUM_SPARSE):
            a, b = int(offs[j]), int(offs[j + 1])
            if b > a:
                gmap[a:b] = mappers[j](d[a:b])
        _save_atomic(ids_path, gmap[local])
        rows += len(local)
        for name in ("idx", "dict", "dictoff"):
            (pdir / f"run{r:04d}.{name}.npy").unlink(missing_ok=True)
    return rows


# ---------------------------------------------------------------- pass 4: shards

_MAPPERS: dict[str, list] = {}
_UNIT_CACHE: dict[str, Any] = {}


def _mappers(ctx: Ctx) -> list:
    key = str(ctx.state)
    if key not in _MAPPERS:
        _MAPPERS.clear()
        _MAPPERS[key] = load_mappers(ctx.state / "vocab", int(ctx.opts["freq_threshold"]),
                                     _use_lut(ctx.opts["max_ind_range"]))
    return _MAPPERS[key]


def _load_unit(ctx: Ctx, split: str, u: int, segments: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, ...]:
    key = (str(ctx.state), split, u)
    if _UNIT_CACHE.get("key") == key:
        return _UNIT_CACHE["val"]
    parts: dict[str, list[np.ndarray]] = {"label": [], "dense": [], "ids": []}
    for piece, run, off, cnt in segments:
        for name in parts:
            a = np.load(_piece_dir(ctx.state, piece) / f"run{run:04d}.{name}.npy", mmap_mode="r")
            parts[name].append(np.asarray(a[off:off + cnt]))
    label = np.concatenate(parts["label"]) if parts["label"] else np.zeros(0, np.uint8)
    dense = np.concatenate(parts["dense"]) if parts["dense"] else np.zeros((0, NUM_DENSE), np.float32)
    cats = np.concatenate(parts["ids"]) if parts["ids"] else np.zeros((0, NUM_SPARSE), np.int32)
    if split == "train":
        perm = np.random.default_rng([int(ctx.opts["seed"]), SALT_PERMUTE, u]).permutation(len(label))
        label, dense, cats = label[perm], dense[perm], cats[perm]
    _UNIT_CACHE["key"], _UNIT_CACHE["val"] = key, (label, dense, cats)
    return label, dense, cats


def write_shards(ctx: Ctx, split: str, units: list[list[tuple[int, int, int, int]]], shards: range,
                 total: int, sparse_dtype: str) -> dict:
    """Write shards ``shards`` of ``split`` (each the rows [k*R, (k+1)*R) of the split's stream)."""
    R = int(ctx.opts["shard_rows"])
    sizes = np.array([sum(s[3] for s in segs) for segs in units], dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(sizes)])
    label_dtype = np.dtype(ctx.opts["label_dtype"])
    written = rows = 0
    for k in shards:
        lo, hi = k * R, min((k + 1) * R, total)
        rows += hi - lo
        path = Path(ctx.out) / split / shard_name(k)
        if path.is_file():
            continue
        u0 = int(np.searchsorted(cum, lo, side="right") - 1)
        parts = []
        u = u0
        while u < len(units) and cum[u] < hi:
            if sizes[u]:
                lab, den, cat = _load_unit(ctx, split, u, units[u])
                a, b = max(lo, cum[u]) - cum[u], min(hi, cum[u + 1]) - cum[u]
                parts.append((lab[a:b], den[a:b], cat[a:b]))
            u += 1
        label = np.concatenate([p[0] for p in parts])
        dense = np.concatenate([p[1] for p in parts])
        ids = np.concatenate([p[2] for p in parts]).astype(sparse_dtype, copy=False)
        write_shard(path, dense, ids, label.astype(label_dtype), attrs={"split": split, "shard": k})
        written += 1
        _maybe_kill("shards")
    return {"rows": rows, "written": written}


def _call(args: tuple) -> Any:
    fn, a = args[0], args[1:]
    return fn(*a)


# ---------------------------------------------------------------- driver

def planted_metrics_for(kind: str, sources: list[Source], totals: dict[str, int]) -> dict | None:
    """The planted model's test/val metrics from ``RAW.planted.json`` (``dqrm-prep synth``),
    in the shape ``write_synthetic_dataset`` records (``{"test": {...}, "val": {...}}``), when
    the dataset's test and val rows are exactly the rows they were computed on: one Kaggle
    file with the line count the sidecar names, and no test/val line skipped.  None otherwise."""
    if kind != "kaggle" or len(sources) != 1:
        return None
    src = sources[0]
    side = planted_path(src.path)
    if not side.is_file():
        return None
    try:
        info = json.loads(side.read_text())
        ok = (int(info["rows"]) == src.lines
              and all(int(info[split]["rows"]) == totals[split] for split in ("test", "val")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not ok:
        return None
    return {split: dict(info[split]) for split in ("test", "val")}


def fingerprint(kind: str, sources: list[Source], opts: PrepOptions) -> dict[str, Any]:
    return {"prep_version": PREP_VERSION, "kind": kind, **opts.output_options(),
            "sources": [{"name": s.name, "size": s.size} for s in sources]}


def _fp_hash(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _describe_diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs) or "(no difference in options; different prep version?)"


def _prepare_output(out: Path, fp: dict, overwrite: bool) -> str:
    """Check OUT; returns 'done' (same dataset already there), 'resume' or 'fresh'."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create output directory ({e.strerror or e})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: output directory is not writable")
    state = out / STATE_DIR
    ours = [out / META_FILE, state] + [out / s for s in SPLITS]
    existing = [p for p in ours if p.exists()]
    if overwrite:
        for p in existing:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        existing = []
    status = "fresh"
    if (out / META_FILE).is_file():
        try:
            meta = read_meta(out)
            old = meta.options.get("fingerprint_fields")
        except SchemaError:
            old = None
        if old == fp:
            return "done"
        raise OptionsMismatchError(
            f"{out}: holds a dataset made with other options or inputs ({_describe_diff(old or {}, fp)}); "
            f"use --overwrite to replace it")
    if (state / "options.json").is_file():
        old = json.loads((state / "options.json").read_text())
        if old != fp:
            raise OptionsMismatchError(
                f"{out}: holds an unfinished run with other options or inputs ({_describe_diff(old, fp)}); "
                f"use --overwrite to start again")
        status = "resume"
    elif existing:
        raise OptionsMismatchError(
            f"{out}: already holds {', '.join(p.name for p in existing)} not made by this command; "
            f"use --overwrite to replace them")
    try:
        state.mkdir(exist_ok=True)
        write_atomic_text(state / "options.json", json.dumps(fp, indent=2, sort_keys=True))
    except OSError as e:
        raise OutputError(f"{out}: cannot write in output directory ({e.strerror or e})") from None
    return status


def run_prep(raw: str | os.PathLike, out: str | os.PathLike, opts: PrepOptions,
             log=lambda msg: print(msg, file=sys.stderr)) -> DatasetMeta:
    """Make the dataset OUT from RAW (see module doc).  Returns its metadata."""
    t0 = time.time()
    stage_s: dict[str, float] = {}
    opts.validate()
    out = Path(out)
    ex = Executor(opts.workers, opts.progress)
    try:
        kind, sources = ex.root_call(lambda: discover(raw, opts.dataset))
        fp = fingerprint(kind, sources, opts)
        status = ex.root_call(lambda: _prepare_output(out, fp, opts.overwrite))
        if status == "done":
            if ex.is_root:
                log(f"{out}: already complete with these options; nothing to do")
            return read_meta(out)
        state = out / STATE_DIR
        plan_file = state / "plan.json"
        if plan_file.is_file():
            plan = json.loads(plan_file.read_text())
            sources = [Source(**s) for s in plan["sources"]]
            pieces = [Piece(**p) for p in plan["pieces"]]
            buckets = int(plan["buckets"])
        else:
            pieces, buckets = _plan(kind, sources, opts, ex)
            if ex.is_root:
                write_atomic_text(plan_file, json.dumps({"sources": [s.to_dict() for s in sources],
                                                         "pieces": [p.to_dict() for p in pieces],
                                                         "buckets": buckets}))
            ex.barrier()
        stage_s["plan"] = round(time.time() - t0, 3)
        ctx = Ctx(str(out), opts.output_options() | {"kind": kind}, sources, buckets)
        known = sum(s.lines for s in sources if s.lines >= 0)
        all_known = all(s.lines >= 0 for s in sources)
        summaries = ex.map(_call, [(parse_piece, ctx, p) for p in pieces], desc="parse",
                           total=known if all_known else None, unit="rows",
                           weight=(lambda r: r["lines"]) if all_known else None)
        stage_s["parse"] = round(time.time() - t0 - sum(stage_s.values()), 3)
        (state / "vocab").mkdir(exist_ok=True)
        infos = ex.map(_call, [(merge_column, ctx, j, len(pieces)) for j in range(NUM_SPARSE)],
                       desc="vocabularies", unit="col")
        stage_s["vocabularies"] = round(time.time() - t0 - sum(stage_s.values()), 3)
        cards = [i["cardinality"] for i in infos]
        sparse_dtype = "int32" if max(cards) < 2**31 else "int64"
        ex.map(_call, [(map_piece, ctx, s["index"], len(s["runs"]), sparse_dtype) for s in summaries],
               desc="ids", total=sum(sum(s["rows"]) for s in summaries), unit="rows", weight=lambda r: r)
        stage_s["ids"] = round(time.time() - t0 - sum(stage_s.values()), 3)

        # Layout of every split's stream of rows.
        S = buckets
        runs = [(s["index"], r, counts) for s in summaries for r, counts in enumerate(s["runs"])]
        layouts: dict[str, list[list[tuple[int, int, int, int]]]] = {}
        train_units: list[list[tuple[int, int, int, int]]] = [[] for _ in range(S)]
        held: dict[str, list] = {"test": [], "val": []}
        for piece, r, counts in runs:
            offs = np.concatenate([[0], np.cumsum(counts)])
            for b in range(S):
                if counts[b]:
                    train_units[b].append((piece, r, int(offs[b]), int(counts[b])))
            for name, g in (("test", S), ("val", S + 1)):
                if counts[g]:
                    held[name].append([(piece, r, int(offs[g]), int(counts[g]))])
        layouts = {"train": train_units, "test": held["test"], "val": held["val"]}
        totals = {name: sum(s["rows"][i] for s in summaries) for i, name in ((TRAIN, "train"), (TEST, "test"), (VAL, "val"))}
        if sum(totals.values()) == 0:
            raise InputError(f"{raw}: no rows left to write (every line was bad or dropped)")
        jobs = []
        R = opts.shard_rows
        for split in SPLITS:
            n_shards = math.ceil(totals[split] / R)
            if n_shards == 0:
                continue
            (out / split).mkdir(exist_ok=True)
            # One chunk of consecutive shards per worker: a shuffle bucket that straddles two
            # chunks is loaded twice, so fewer chunks means less repeated work.
            n_chunks = min(n_shards, max(1, opts.workers * ex.size))
            edges = np.linspace(0, n_shards, n_chunks + 1).round().astype(int)
            for a, b in zip(edges[:-1], edges[1:]):
                if b > a:
                    jobs.append((write_shards, ctx, split, layouts[split], range(int(a), int(b)), totals[split], sparse_dtype))
        results = ex.map(_call, jobs, desc="shards", total=sum(totals.values()), unit="rows",
                         weight=lambda r: r["rows"])
        written = sum(r["written"] for r in results)
        stage_s["shards"] = round(time.time() - t0 - sum(stage_s.values()), 3)

        lines = sum(s["lines"] for s in summaries)
        bad = sum(s["bad"] for s in summaries)
        subsampled = sum(s["subsampled"] for s in summaries)
        examples = [e for s in summaries for e in s["bad_examples"]][:MAX_EXAMPLES]
        positives = {name: sum(s["positives"][i] for s in summaries) for i, name in ((TRAIN, "train"), (TEST, "test"), (VAL, "val"))}
        planted = planted_metrics_for(kind, sources, totals)
        meta = DatasetMeta(
            cardinalities=cards,
            rows=totals,
            ctr=positives["train"] / max(1, totals["train"]),
            options={**opts.output_options(), "kind": kind, "fingerprint": _fp_hash(fp), "fingerprint_fields": fp},
            extra={
                "tool": "dqrm-prep criteo",
                "prep_version": PREP_VERSION,
                "sources": [{"name": s.name, "path": str(Path(s.path).resolve()), "size": s.size,
                             "gzip": s.gz, "lines": s.lines if s.lines >= 0 else None} for s in sources],
                "counts": {"lines_read": lines, "rows_kept": sum(totals.values()), "rows_skipped_bad": bad,
                           "rows_subsampled": subsampled, "positives": positives},
                "bad_line_examples": examples,
                "distinct_values": [i["distinct"] for i in infos],
                "sparse_dtype": sparse_dtype,
                "label_dtype": opts.label_dtype,
                "shards": {split: math.ceil(totals[split] / R) for split in SPLITS},
                "split_rule": ("kaggle: 7 equal consecutive days, days 0-5 train, day 6 first half test, second half val"
                               if kind == "kaggle" else
                               "terabyte: all days but the last train, last day first half test, second half val"),
                "shuffle_buckets": buckets,
                "workers": opts.workers,
                "mpi_ranks": ex.size,
                "resumed": status == "resume",
                "shards_written_this_run": written,
                "stage_seconds": stage_s,
                "wall_time_s": round(time.time() - t0, 3),
            },
        )
        if planted is not None:
            meta.extra["planted"] = planted
            meta.extra["planted_source"] = planted_path(sources[0].path).name
        if ex.is_root:
            write_meta(out, meta)
            if not opts.keep_temp:
                shutil.rmtree(state, ignore_errors=True)
            msg = (f"{out}: {totals['train']:,} train / {totals['val']:,} val / {totals['test']:,} test rows "
                   f"from {lines:,} lines in {meta.extra['wall_time_s']:.1f} s")
            if bad:
                msg += f"; skipped {bad:,} bad lines (first: {examples[0]['path']}:{examples[0]['line']})" if examples else f"; skipped {bad:,} bad lines"
            log(msg)
        ex.barrier()
        return meta
    finally:
        ex.close()
