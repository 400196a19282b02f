"""The output directory: is the dataset already there, is a run to resume, or is it fresh?

A run is identified by its fingerprint (prep version, dataset kind, the options that
decide the output, and each input's name and size).  It is recorded in
``OUT/.prep/options.json`` when a run starts and in ``meta.json`` when it ends; a rerun
with another fingerprint is refused unless ``--overwrite``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from dqrm_mpi.data.schema import META_FILE, SPLITS, SchemaError, read_meta, write_atomic_text

from .errors import OptionsMismatchError, OutputError
from .options import PrepOptions
from .sources import Source
from .workdir import WorkDir

PREP_VERSION = 1
Status = Literal["done", "resume", "fresh"]


def fingerprint(kind: str, sources: list[Source], opts: PrepOptions) -> dict[str, Any]:
    return {"prep_version": PREP_VERSION, "kind": kind, **opts.output_options(),
            "sources": [{"name": s.name, "size": s.size} for s in sources]}


def fingerprint_hash(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _describe_diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs) or "(no difference in options; different prep version?)"


def prepare_output(out: Path, fp: dict[str, Any], overwrite: bool) -> Status:
    """Check OUT and record the run's fingerprint in it.  Returns 'done' (the same dataset is
    already there), 'resume' (an unfinished run with the same fingerprint) or 'fresh';
    raises OutputError when OUT is unusable or holds something else."""
    _check_writable(out)
    work = WorkDir(out)
    ours = [out / META_FILE, work.root] + [out / s for s in SPLITS]
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
        raise OptionsMismatchError(
            f"{out}: holds a dataset made with other options or inputs ({_describe_diff(old or {}, fp)}); "
            f"use --overwrite to replace it")
    if work.options_file.is_file():
        old = json.loads(work.options_file.read_text())
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
        write_atomic_text(work.options_file, json.dumps(fp, indent=2, sort_keys=True))
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
