"""The output directory: is the dataset already there, is a run to resume, or is it fresh?

A run is identified by its fingerprint (prep version, dataset kind, the options that
decide the output, and each input's name, size, modification time and a hash of its
first and last MiB).  It is recorded in ``OUT/.prep/options.json`` when a run starts and
in ``meta.json`` when it ends; a rerun with another fingerprint is refused unless
``--overwrite`` (an input edited in place makes a finished dataset stale).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from dqrm_mpi.data.schema import META_FILE, SPLITS, SchemaError, read_meta, write_atomic_text
from dqrm_mpi.locking import DirectoryInUseError, DirectoryLock

from .errors import OptionsMismatchError, OutputError
from .input_map import INPUT_MAP_FILE
from .options import PrepOptions
from .plan import GZ_BYTES_PER_ROW_EST, PLAIN_BYTES_PER_ROW_EST
from .sources import Source
from .workdir import STATE_DIR, WorkDir

# One dqrm-prep run per output directory (``locking.DirectoryLock``: released by the OS when
# the run ends, however it ends); named apart from dqrm-train's lock.
PREP_LOCK_FILE = ".dqrm-prep.lock"

PREP_VERSION = 1
# The layout of the files in OUT/.prep (recorded in its options.json, not in meta.json): an
# unfinished run left by a dqrm-prep with another layout is not resumed.
STATE_LAYOUT = 3
Status = Literal["done", "resume", "fresh"]


ENDS_BYTES = 1 << 20  # the first and the last MiB of each input are hashed


def fingerprint(kind: str, sources: list[Source], opts: PrepOptions) -> dict[str, Any]:
    return {"prep_version": PREP_VERSION, "kind": kind, **opts.output_options(),
            "sources": [source_identity(s) for s in sources]}


def source_identity(src: Source) -> dict[str, Any]:
    """What tells one version of an input from another, without reading all of it."""
    h = hashlib.sha256()
    with open(src.path, "rb") as f:
        h.update(f.read(ENDS_BYTES))
        f.seek(max(0, src.size - ENDS_BYTES))
        h.update(f.read(ENDS_BYTES))
        mtime_ns = os.fstat(f.fileno()).st_mtime_ns
    return {"name": src.name, "size": src.size, "mtime_ns": mtime_ns, "ends_sha256": h.hexdigest()[:16]}


def fingerprint_hash(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _describe_diff(old: dict, new: dict) -> str:
    keys = sorted((set(old) | set(new)) - {"sources"})
    diffs = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]
    if old.get("sources") != new.get("sources"):
        diffs.append(_describe_sources(old.get("sources") or [], new["sources"]))
    return "; ".join(diffs) or "(no difference in options; different prep version?)"


def _describe_sources(old: list[dict], new: list[dict]) -> str:
    before = {s.get("name"): s for s in old}
    changes = []
    for s in new:
        was = before.pop(s["name"], None)
        if was is None:
            changes.append(f"{s['name']} is new")
        elif was != s:
            what = []
            if was.get("size") != s["size"]:
                what.append(f"size {was.get('size')} there, {s['size']} now")
            if was.get("mtime_ns") != s["mtime_ns"]:
                what.append(f"modified {_when(was.get('mtime_ns'))} there, {_when(s['mtime_ns'])} now")
            if was.get("ends_sha256") != s["ends_sha256"]:
                what.append("content differs")
            changes.append(f"{s['name']} changed since ({', '.join(what) or 'recorded by an older dqrm-prep'})")
    changes += [f"{name} is gone" for name in before]
    return "inputs: " + "; ".join(changes)


def _when(mtime_ns: int | None) -> str:
    if mtime_ns is None:
        return "(not recorded)"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime_ns / 1e9)) + f".{mtime_ns % 10**9:09d}"


def _inputs_only(old: dict | None, new: dict) -> bool:
    """Do the fingerprints differ in their inputs only?"""
    return bool(old) and old != new and {k: v for k, v in old.items() if k != "sources"} == \
        {k: v for k, v in new.items() if k != "sources"}


def prepare_output(out: Path, fp: dict[str, Any], overwrite: bool, lock: DirectoryLock) -> Status:
    """Check OUT, take its ``lock`` and record the run's fingerprint in it.  Returns 'done'
    (the same dataset is already there), 'resume' (an unfinished run with the same
    fingerprint) or 'fresh'; raises OutputError when OUT is unusable, locked by another
    run or holds something else."""
    _check_writable(out)
    try:
        lock.acquire()
    except DirectoryInUseError as e:
        raise OutputError(str(e)) from None
    except OSError as e:
        raise OutputError(f"{lock.path}: cannot create the lock file ({e.strerror or e})") from None
    work = WorkDir(out)
    ours = [out / META_FILE, out / INPUT_MAP_FILE, work.root] + [out / s for s in SPLITS]
    existing = [p for p in ours if p.exists()]
    if overwrite:
        for p in existing:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        existing = []
    status: Status = "fresh"
    if (out / META_FILE).is_file():
        try:
            old = read_meta(out).options.get("fingerprint_fields")
        except SchemaError:
            old = None
        if old == fp:
            return "done"
        if _inputs_only(old, fp):
            raise OptionsMismatchError(
                f"{out}: stale: the dataset there was made from other inputs ({_describe_diff(old, fp)}); "
                f"use --overwrite to make it again from the inputs as they are now")
        raise OptionsMismatchError(
            f"{out}: holds a dataset made with other options or inputs ({_describe_diff(old or {}, fp)}); "
            f"use --overwrite to replace it")
    if work.options_file.is_file():
        old = json.loads(work.options_file.read_text())
        layout = old.pop("state_layout", 1)
        if layout != STATE_LAYOUT:
            raise OptionsMismatchError(
                f"{out}: holds an unfinished run of another dqrm-prep version (work files of layout {layout}, "
                f"this one writes {STATE_LAYOUT}); use --overwrite to start again")
        if _inputs_only(old, fp):
            raise OptionsMismatchError(
                f"{out}: holds an unfinished run whose inputs changed since it started ({_describe_diff(old, fp)}); "
                f"resuming would mix two versions of the data: use --overwrite to start again")
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
        work.root.mkdir(exist_ok=True)
        write_atomic_text(work.options_file, json.dumps({**fp, "state_layout": STATE_LAYOUT}, indent=2, sort_keys=True))
    except OSError as e:
        raise OutputError(f"{out}: cannot write in output directory ({e.strerror or e})") from None
    return status


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create output directory ({e.strerror or e})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: output directory is not writable")


BYTES_PER_ROW_ON_DISK = 2 * 160  # a row spilled in OUT/.prep, then in a shard: label, 13 dense, 26 ids


def no_space_error(out: Path, sources: list[Source], error: OSError) -> OutputError | None:
    """An OutputError naming the file and the space the run needs when ``error`` is ENOSPC
    (from Python, numpy or HDF5), else None."""
    text = str(error)
    if error.errno != errno.ENOSPC and "No space left on device" not in text and "errno = 28" not in text:
        return None
    m = re.search(r"filename = '([^']*)'", text)
    path = error.filename or (m.group(1) if m else None)
    rows = sum(s.size // (GZ_BYTES_PER_ROW_EST if s.gz else PLAIN_BYTES_PER_ROW_EST) for s in sources)
    try:
        free = f"{_size(shutil.disk_usage(out).free)} free now"
    except OSError:
        free = "free space unknown"
    return OutputError(
        f"{out}: no space left on device{f' writing {path}' if path else ''}; this run needs about "
        f"{_size(rows * BYTES_PER_ROW_ON_DISK)} there in all (~{rows:,} rows spilled to {out / STATE_DIR}, "
        f"then written as shards), {free}.  Free some space (or choose another OUT) and rerun the same "
        f"command: it resumes")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
