"""Scoring raw Criteo rows with a packed model that carries its input map (``dqrm-predict``).

Each input (a path, plain or gzip, or ``-`` for standard input) is read in whole-line blocks
(``data_prep.sources.iter_line_blocks``), parsed and validated by prep's own parser
(``data_prep.criteo_format.parse_block``: a bad line raises the BadLineError prep would, with
its file and line), mapped to ids by the model's input map (``data_prep.input_map``), and
scored in batches of exactly ``batch_size`` rows in input order (the batches ``dqrm-eval``
forms on the same rows, so the scores are the same bits).  A thread reads and parses the next
block while the model scores: memory stays at a few blocks and batches, plus 5 bytes a row
(float32 score, uint8 label) when the rows are labeled, kept for AUC and log loss.

A line has the 40 fields of prep's input, or 39 (no label): the first line of each input
decides, and every other line of it must agree.  Scores are written to a temporary name
and renamed when every input has been scored: on any error nothing is left under the
output name.
"""
from __future__ import annotations

import gzip
import io
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

import numpy as np
import torch

from data_prep.criteo_format import count_newlines, parse_block
from data_prep.errors import BadLineError, InputError
from data_prep.fields import NUM_FIELDS
from data_prep.input_map import InputMap
from data_prep.sources import GZIP_ERRORS, iter_line_blocks

from ..files import write_atomic
from ..model import DLRM
from ..model.config import NUM_SPARSE
from ..train.metrics import binary_metrics

STDIN = "-"
BLOCK_BYTES = 4 << 20  # raw bytes parsed at a time (about 16,000 Criteo lines)
OUT_FORMATS = ("text", "npy")


@dataclass(frozen=True)
class PredictConfig:
    """What ``predict_raw`` scores and writes.

    inputs: paths of raw Criteo files (plain or gzip) or ``-`` (standard input), in order.
    out: the scores file (``-``: standard output, text only); out_format: "text" (one
    probability per line, 9 significant digits: the float32 score exactly) or "npy" (float64 [n]).
    batch_size: rows per model call.  progress: a progress line on stderr.
    """

    inputs: tuple[str, ...]
    out: str
    out_format: str = "text"
    batch_size: int = 16384
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("no input: give one or more raw files, or - for standard input")
        if self.out_format not in OUT_FORMATS:
            raise ValueError(f"out_format must be one of {OUT_FORMATS}, got {self.out_format!r}")
        if self.out == STDIN and self.out_format != "text":
            raise ValueError("--out - (standard output) writes text only")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class PredictSummary:
    """What a run scored: rows per input, values not in the vocabulary per column (scored with
    the OOV id), metrics when every row was labeled."""

    rows: int = 0
    files: list[dict] = field(default_factory=list)
    unseen: list[int] = field(default_factory=lambda: [0] * NUM_SPARSE)
    metrics: dict | None = None
    seconds: float = 0.0


@dataclass
class _Rows:
    dense: np.ndarray
    ids: np.ndarray
    label: np.ndarray | None


def predict_raw(model: DLRM, imap: InputMap, config: PredictConfig) -> PredictSummary:
    """Score every row of ``config.inputs`` with ``model`` (see the module doc).  Raises
    InputError (a BadLineError for a bad line) or OSError; nothing is then written at ``config.out``."""
    summary = PredictSummary()
    start = time.time()
    progress = _Progress(config.progress, start)
    labels: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    all_labeled = [True]

    def run(out: BinaryIO) -> None:
        writer = _NpyWriter(out) if config.out_format == "npy" else None
        model.eval()
        with torch.no_grad():
            for rows in _batches(_prefetch(_rows(config.inputs, imap, summary, all_labeled)), config.batch_size):
                prob = torch.sigmoid(model(torch.from_numpy(rows.dense), torch.from_numpy(rows.ids))).numpy()
                if writer is not None:
                    writer.write(prob.astype(np.float64))
                else:
                    out.write(("\n".join(f"{p:.9g}" for p in prob.tolist()) + "\n").encode())
                if rows.label is not None:
                    labels.append(rows.label)
                    scores.append(prob.astype(np.float32, copy=False))
                summary.rows += len(prob)
                progress.update(summary.rows)
        if summary.rows == 0:
            raise InputError(f"{', '.join(config.inputs)}: no rows to score")
        if writer is not None:
            writer.finish()

    if config.out == STDIN:
        run(sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        write_atomic(config.out, run, 0)
    progress.done(summary.rows)
    if all_labeled[0] and labels:
        summary.metrics = binary_metrics(np.concatenate(labels), np.concatenate(scores).astype(np.float64))
    summary.seconds = round(time.time() - start, 3)
    return summary


def _rows(inputs: tuple[str, ...], imap: InputMap, summary: PredictSummary,
          all_labeled: list[bool]) -> Iterator[_Rows]:
    """Every input's rows, parsed and mapped, a block at a time."""
    for path in inputs:
        n_rows, labeled = 0, None
        first_line = 0
        for buf in _line_blocks(path):
            if labeled is None:
                labeled = _has_label(buf)
                all_labeled[0] = all_labeled[0] and labeled
            pb = _parse(buf, path, first_line, imap.max_ind_range, labeled)
            first_line += pb.n_lines
            ids, unseen = imap.ids(pb.cat_dict, pb.cat_idx)
            for j, u in enumerate(unseen.tolist()):
                summary.unseen[j] += u
            n_rows += len(ids)
            yield _Rows(pb.dense, ids, pb.label if labeled else None)
        if labeled is None:
            raise InputError(f"{path}: input file is empty")
        summary.files.append({"path": path, "rows": n_rows, "labeled": labeled})


def _line_blocks(path: str) -> Iterator[bytes]:
    """Whole-line blocks of ``path`` (``-``: standard input), gunzipped when it starts with the
    gzip magic; InputError naming it when it cannot be read or its gzip stream is damaged."""
    try:
        raw = sys.stdin.buffer if path == STDIN else open(path, "rb")
    except OSError as e:
        raise InputError(f"{path}: cannot read input ({e.strerror or e})") from None
    lines = 0
    try:
        stream = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)
        gz = stream.peek(2)[:2] == b"\x1f\x8b"
        try:
            for buf in iter_line_blocks(gzip.GzipFile(fileobj=stream) if gz else stream, BLOCK_BYTES):
                yield buf
                lines += count_newlines(buf)
        except GZIP_ERRORS as e:
            if not gz:
                raise InputError(f"{path}: cannot read input after line {lines:,} "
                                 f"({getattr(e, 'strerror', None) or e})") from None
            raise InputError(f"{path}: truncated or corrupt gzip file after line {lines:,} ({e})") from None
    finally:
        if path != STDIN:
            raw.close()


def _has_label(buf: bytes) -> bool:
    """Whether the block's first line has prep's 40 fields (else it is read as 39, no label)."""
    end = buf.find(b"\n")
    return buf[:end if end >= 0 else len(buf)].count(b"\t") + 1 != NUM_FIELDS - 1


_NO_LABEL = b"0\t"  # an unlabeled line is parsed with a label column of 0 put in front


def _parse(buf: bytes, path: str, first_line: int, max_ind_range: int | None, labeled: bool):
    """``parse_block`` of the block; a line without the label is given a 0 label first, and a
    bad line is then named as the 39 fields it has."""
    if labeled:
        return parse_block(buf, path, first_line, max_ind_range, "error")
    text = _NO_LABEL + buf.replace(b"\n", b"\n" + _NO_LABEL)
    if buf.endswith(b"\n"):
        text = text[:-len(_NO_LABEL)]
    try:
        return parse_block(text, path, first_line, max_ind_range, "error")
    except BadLineError as e:
        value = e.value[len(_NO_LABEL):] if e.field is None and e.value.startswith("0\t") else e.value
        found, expected = e.found, e.expected
        if e.field is None and found and found.endswith(" fields"):
            found = f"{int(found.split()[0]) - 1} fields"
            expected = f"{NUM_FIELDS - 1} tab-separated fields (no label) as on the first line"
        raise BadLineError(e.path, e.line, e.field, value, expected, found, labeled=False) from None


def _prefetch(items: Iterator[_Rows], depth: int = 2) -> Iterator[_Rows]:
    """``items`` produced by a thread ``depth`` ahead (reading, parsing and mapping overlap the
    model); its error is raised here, in order."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=produce, name="dqrm-predict-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # let the thread end; one blocked reading (standard input) is a daemon, left behind
        stop.set()
        deadline = time.time() + 1.0
        while thread.is_alive() and time.time() < deadline:
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def _batches(blocks: Iterator[_Rows], size: int) -> Iterator[_Rows]:
    """The rows of ``blocks`` in batches of exactly ``size`` (the last one shorter), in order."""
    pending: list[_Rows] = []
    have = 0
    for b in blocks:
        pending.append(b)
        have += len(b.ids)
        while have >= size:
            merged = _concat(pending)
            yield _take(merged, 0, size)
            rest = _take(merged, size, have)
            pending, have = ([rest] if have > size else []), have - size
    if have:
        yield _concat(pending)


def _concat(parts: list[_Rows]) -> _Rows:
    if len(parts) == 1:
        return parts[0]
    labels = [p.label for p in parts]
    return _Rows(np.concatenate([p.dense for p in parts]), np.concatenate([p.ids for p in parts]),
                 np.concatenate(labels) if all(x is not None for x in labels) else None)


def _take(rows: _Rows, a: int, b: int) -> _Rows:
    return _Rows(rows.dense[a:b], rows.ids[a:b], rows.label[a:b] if rows.label is not None else None)


class _NpyWriter:
    """A float64 [n] .npy written as it comes: a fixed 128-byte header, rewritten with n at the end."""

    HEADER = 128

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.n = f, 0
        f.write(self._header(0))

    def _header(self, n: int) -> bytes:
        text = repr({"descr": "<f8", "fortran_order": False, "shape": (n,)}).encode()
        pad = self.HEADER - 10 - len(text) - 1
        return b"\x93NUMPY\x01\x00" + (self.HEADER - 10).to_bytes(2, "little") + text + b" " * pad + b"\n"

    def write(self, values: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(values, dtype="<f8").tobytes())
        self.n += len(values)

    def finish(self) -> None:
        self.f.seek(0)
        self.f.write(self._header(self.n))
        self.f.seek(0, 2)


class _Progress:
    """``ROWS rows, RATE rows/s`` on one line of stderr (rewritten at most once a second) when enabled."""

    def __init__(self, enabled: bool, start: float) -> None:
        self.enabled, self.start, self.last = enabled, start, start

    def update(self, rows: int) -> None:
        now = time.time()
        if self.enabled and now - self.last >= 1.0:
            self.last = now
            print(f"\rdqrm-predict: {rows:,} rows, {rows / (now - self.start):,.0f} rows/s", end="",
                  file=sys.stderr, flush=True)

    def done(self, rows: int) -> None:
        if self.enabled:
            dt = max(time.time() - self.start, 1e-9)
            print(f"\rdqrm-predict: {rows:,} rows in {dt:.1f} s, {rows / dt:,.0f} rows/s", file=sys.stderr)
