"""`dqrm-prep synth`: a raw Criteo-format file drawn from a planted click model.

Rows have the 40 Criteo fields (missing values empty, some negative integers,
categories as 8-digit hex hashes).  Two profiles: ``planted`` (the default; Zipf
categories of fixed cardinalities, ``dqrm_mpi.data.synthetic``) and ``criteo-like``
(statistics calibrated to real Criteo Kaggle, with day drift; ``criteo_like``).  Beside the file,
``OUT_FILE.planted.json`` holds the planted model's own AUC and log loss on the rows
that become the test and val splits under the Kaggle rule (7 equal consecutive days;
day 6 first half test, second half val): the best any model trained on the file can do.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from dqrm_mpi.data.schema import NUM_DENSE, NUM_SPARSE, write_atomic_text
from dqrm_mpi.data.synthetic import DEFAULT_CARDINALITIES, PlantedClickModel, planted_metrics

from .criteo_format import encode_hex
from .criteo_like import CriteoLikeModel
from .errors import InputError, OutputError
from .fields import FIELD_NAMES
from .sources import kaggle_bounds, planted_path

# The 26 categorical cardinalities of a synth file, by the name `dqrm-prep synth --preset` takes.
CARDINALITY_PROFILES = {
    "tiny": tuple(max(3, c // 50) for c in DEFAULT_CARDINALITIES),
    "small": DEFAULT_CARDINALITIES,
    "large": tuple(c * 200 for c in DEFAULT_CARDINALITIES),
}
CHUNK_ROWS = 100_000
PROFILES = ("planted", "criteo-like")
_WOPTS = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
_worker_model = None  # the model of a worker process (set by _start_worker)


def make_model(profile: str, rows: int, seed: int, cardinalities: tuple[int, ...]):
    """The generator of a synth profile."""
    if profile == "criteo-like":
        return CriteoLikeModel(rows, seed=seed)
    return PlantedClickModel(tuple(cardinalities), seed=seed)


def render_chunk(model, start: int, n: int, chunk_rows: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(Criteo-format text, label uint8 [n], planted probability float64 [n]) of file lines
    start..start+n-1; deterministic in the model's seed and ``start``."""
    if isinstance(model, CriteoLikeModel):
        b = model.sample_rows(start, n)
    else:
        b = model.sample(n, start // chunk_rows)
    cols = [pa.array(b.label.astype(np.int64))]
    for j in range(NUM_DENSE):
        cols.append(pa.array(b.dense_raw[:, j], mask=b.dense_missing[:, j]))
    for t in range(NUM_SPARSE):
        ids = b.ids[:, t]
        cols.append(encode_hex(model.category_hashes(t, ids), ids != 0))
    buf = pa.BufferOutputStream()
    pacsv.write_csv(pa.table(cols, names=FIELD_NAMES), buf, _WOPTS)
    return buf.getvalue().to_pybytes(), b.label, b.prob


def _start_worker(*model_args) -> None:
    global _worker_model
    _worker_model = make_model(*model_args)


def _render_in_worker(start: int, n: int, chunk_rows: int):
    return render_chunk(_worker_model, start, n, chunk_rows)


def _chunks(model, model_args: tuple, rows: int, chunk_rows: int, workers: int):
    """Rendered chunks in file order; with workers > 1 from that many processes, at most
    2 * workers chunks in flight (bounded memory)."""
    spans = [(start, min(chunk_rows, rows - start)) for start in range(0, rows, chunk_rows)]
    if workers <= 1 or len(spans) <= 1:
        for start, n in spans:
            yield start, render_chunk(model, start, n, chunk_rows)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(spans)), mp_context=ctx, initializer=_start_worker,
                             initargs=model_args) as pool:
        pending = deque()
        for start, n in spans:
            pending.append((start, pool.submit(_render_in_worker, start, n, chunk_rows)))
            if len(pending) >= 2 * workers:
                first, fut = pending.popleft()
                yield first, fut.result()
        while pending:
            first, fut = pending.popleft()
            yield first, fut.result()


def write_synth(out_file: str | os.PathLike, rows: int, seed: int = 0,
                cardinalities: tuple[int, ...] = DEFAULT_CARDINALITIES, chunk_rows: int = CHUNK_ROWS,
                progress=None, profile: str = "planted", workers: int = 1) -> dict:
    """Write ``rows`` Criteo-format lines to ``out_file`` (gzip when it ends in ``.gz``),
    atomically, in chunks, drawn by ``workers`` processes (the file does not depend on
    how many); returns (and writes beside it) the planted metrics.
    ``cardinalities`` applies to the ``planted`` profile only."""
    if rows < 1:
        raise InputError(f"--rows must be >= 1, got {rows}")
    if profile not in PROFILES:
        raise InputError(f"--profile: expected one of {', '.join(PROFILES)}, got {profile!r}")
    if len(cardinalities) != NUM_SPARSE:
        raise InputError(f"--cardinalities needs {NUM_SPARSE} values, got {len(cardinalities)}")
    out = Path(out_file)
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out.parent}: cannot create directory ({e.strerror or e})") from None
    model_args = (profile, rows, seed, tuple(cardinalities))
    model = make_model(*model_args)
    train_end, test_end = kaggle_bounds(rows)
    tmp = out.with_name(f".{out.name}.tmp")
    held_label, held_prob, positives = [], [], 0
    gz = out.name.endswith(".gz")
    try:
        sink = pa.CompressedOutputStream(str(tmp), "gzip") if gz else pa.OSFile(str(tmp), "wb")
        with sink:
            for start, (text, label, prob) in _chunks(model, model_args, rows, chunk_rows, workers):
                sink.write(text)
                idx = np.arange(start, start + len(label))
                held = idx >= train_end
                held_label.append(label[held])
                held_prob.append(prob[held])
                positives += int(label[~held].sum())
                if progress:
                    progress(len(label))
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{out}: cannot write ({e.strerror or e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    label = np.concatenate(held_label)
    prob = np.concatenate(held_prob)
    n_test = test_end - train_end
    info = {
        "file": out.name, "rows": rows, "seed": seed, "profile": profile,
        "cardinalities": list(model.cardinalities),
        "split_rule": "kaggle: 7 equal consecutive days; day 6 first half test, second half val",
        "train": {"rows": train_end, "ctr": positives / max(1, train_end)},
        "test": planted_metrics(label[:n_test], prob[:n_test]),
        "val": planted_metrics(label[n_test:], prob[n_test:]),
    }
    write_atomic_text(planted_path(out), json.dumps(info, indent=2) + "\n")
    return info


def parse_cardinalities(text: str | None, profile: str) -> tuple[int, ...]:
    """The cardinalities ``--cardinalities`` gives (26 comma-separated integers), else those
    of the named profile (``--preset``)."""
    if not text:
        return CARDINALITY_PROFILES[profile]
    try:
        vals = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise InputError(f"--cardinalities: expected {NUM_SPARSE} comma-separated integers, got {text!r}") from None
    if len(vals) != NUM_SPARSE or min(vals) < 2:
        raise InputError(f"--cardinalities: expected {NUM_SPARSE} integers >= 2, got {len(vals)} values")
    return vals

