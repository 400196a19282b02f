"""Finding the raw input files, cutting them into pieces, reading whole-line blocks.

Kaggle: one file (``train.txt`` or any single file), plain or gzip.  Terabyte: a
directory of ``day_0`` .. ``day_23`` (each plain or ``.gz``).  The dataset kind is
detected from the path unless forced.

Splits (reference DLRM): Kaggle is cut into 7 equal consecutive "days" (the first
``lines % 7`` days get one more line), days 0-5 train, day 6 first half (rounded up)
test, second half val.  Terabyte: every day but the last present (``day_23`` in the
full set) is train; the last is halved into test (first half, rounded up) and val.
"""
from __future__ import annotations

import gzip
import os
import re
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import BinaryIO, Iterator

from .criteo_format import count_lines, count_newlines
from .errors import InputError

KINDS = ("auto", "kaggle", "terabyte")
_DAY = re.compile(r"^day_(\d+)(\.gz)?$")
NEVER = 1 << 62  # a line index past any file
COUNT_BLOCK_BYTES, COUNT_GZIP_BLOCK_BYTES = 4 << 20, 32 << 20  # read at a time when counting lines


@dataclass(frozen=True)
class Source:
    """One raw input file.  ``train_end`` / ``test_end``: 0-based line indices where the
    test and val parts of this file start (``NEVER`` when the file is all train)."""

    index: int
    path: str
    size: int
    gz: bool
    holdout: bool  # has test/val rows; its total line count is needed before parsing
    lines: int = -1  # known after counting (-1: not counted)
    train_end: int = NEVER
    test_end: int = NEVER

    @property
    def name(self) -> str:
        return Path(self.path).name

    def to_dict(self) -> dict:
        return asdict(self)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _check_file(path: Path) -> int:
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as e:
        raise InputError(f"{path}: cannot read input ({e.strerror or e})") from None
    if size == 0:
        raise InputError(f"{path}: input file is empty")
    return size


def discover(raw: str | os.PathLike, dataset: str = "auto") -> tuple[str, list[Source]]:
    """(kind, sources) for RAW; raises InputError when it is missing, empty or ambiguous."""
    if dataset not in KINDS:
        raise InputError(f"--dataset must be one of {KINDS}, got {dataset!r}")
    raw = Path(raw)
    if not raw.exists():
        raise InputError(f"{raw}: no such file or directory")
    if raw.is_dir():
        days = {}
        for p in raw.iterdir():
            m = _DAY.match(p.name)
            if m and p.is_file():
                d = int(m.group(1))
                if d in days:
                    raise InputError(f"{raw}: both {days[d].name} and {p.name}; keep one of them")
                days[d] = p
        kaggle_files = [raw / n for n in ("train.txt", "train.txt.gz") if (raw / n).is_file()]
        if dataset == "kaggle" or (dataset == "auto" and not days):
            if len(kaggle_files) != 1:
                raise InputError(f"{raw}: expected exactly one train.txt or train.txt.gz (Kaggle), "
                                 f"or day_0 .. day_23 files (Terabyte); found "
                                 f"{[p.name for p in kaggle_files] or 'neither'}")
            return "kaggle", _kaggle(kaggle_files[0])
        if not days:
            raise InputError(f"{raw}: no day_N or day_N.gz files (Terabyte layout)")
        order = sorted(days)
        if order != list(range(len(order))):
            missing = sorted(set(range(order[-1] + 1)) - set(order))
            raise InputError(f"{raw}: Terabyte days must be day_0 .. day_K without gaps; missing "
                             f"{['day_%d' % d for d in missing]}")
        if len(order) < 2:
            raise InputError(f"{raw}: need at least two days (train days, then the last day for test/val)")
        sources = []
        for i, d in enumerate(order):
            p = days[d]
            size = _check_file(p)
            sources.append(Source(i, str(p), size, _is_gzip(p), holdout=(i == len(order) - 1)))
        return "terabyte", sources
    if dataset == "terabyte":
        raise InputError(f"{raw}: --dataset terabyte needs a directory of day_0 .. day_23 files")
    return "kaggle", _kaggle(raw)


def _kaggle(path: Path) -> list[Source]:
    size = _check_file(path)
    return [Source(0, str(path), size, _is_gzip(path), holdout=True)]


def kaggle_bounds(lines: int) -> tuple[int, int]:
    """(train_end, test_end) line indices under the Kaggle split rule (see the module doc)."""
    per, extra = divmod(lines, 7)
    days = [per + 1] * extra + [per] * (7 - extra)
    train_end = sum(days[:6])
    return train_end, train_end + (days[6] + 1) // 2


def planted_path(raw_file: str | os.PathLike) -> Path:
    """``RAW.planted.json``: the planted model's metrics, written beside a raw file by ``dqrm-prep synth``."""
    return Path(str(raw_file) + ".planted.json")


def with_splits(kind: str, source: Source) -> Source:
    """``source`` with train_end / test_end set from its line count (reference DLRM split rules)."""
    if not source.holdout:
        return replace(source, train_end=NEVER, test_end=NEVER)
    if source.lines < 0:
        raise AssertionError(f"{source.path}: lines not counted")
    if kind == "kaggle":
        train_end, test_end = kaggle_bounds(source.lines)
    else:
        train_end, test_end = 0, (source.lines + 1) // 2
    return replace(source, train_end=train_end, test_end=test_end)


# ---------------------------------------------------------------- pieces and blocks

@dataclass(frozen=True)
class Piece:
    """A unit of work: bytes [start, end) of a plain file, or a whole gzip file (end=-1).
    first_line: 0-based index of its first line in the file (-1: unknown until read)."""

    index: int
    source: int
    start: int
    end: int
    first_line: int = -1
    lines: int = -1

    def to_dict(self) -> dict:
        return asdict(self)


def cut_plain(source: Source, piece_bytes: int, first_index: int) -> list[Piece]:
    """Cut a plain file into pieces of about ``piece_bytes`` ending at newlines."""
    cuts = [0]
    with open(source.path, "rb") as f:
        pos = piece_bytes
        while pos < source.size:
            f.seek(pos)
            while True:
                chunk = f.read(1 << 16)
                if not chunk:
                    pos = source.size
                    break
                nl = chunk.find(b"\n")
                if nl >= 0:
                    pos += nl + 1
                    break
                pos += len(chunk)
            if pos >= source.size:
                break
            cuts.append(pos)
            pos += piece_bytes
    cuts.append(source.size)
    return [Piece(first_index + i, source.index, a, b) for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]


def read_range(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def iter_gzip_blocks(path: str, block_bytes: int) -> Iterator[bytes]:
    """Whole-line blocks of about ``block_bytes`` from a gzip file; InputError if it is
    truncated or corrupt."""
    try:
        with gzip.open(path, "rb") as f:
            yield from iter_line_blocks(f, block_bytes)
    except GZIP_ERRORS as e:
        raise InputError(f"{path}: truncated or corrupt gzip file ({e})") from None


GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, OSError)


def iter_line_blocks(f: BinaryIO, block_bytes: int) -> Iterator[bytes]:
    """Whole-line blocks of about ``block_bytes`` read from the binary stream ``f`` (the last
    line may lack its newline)."""
    carry = b""
    while True:
        chunk = f.read(block_bytes)
        if not chunk:
            break
        buf = carry + chunk
        nl = buf.rfind(b"\n")
        if nl < 0:
            carry = buf
            continue
        carry = buf[nl + 1:]
        yield buf[:nl + 1]
    if carry:
        yield carry


def count_piece_lines(path: str, start: int, end: int, gz: bool) -> int:
    """Lines in bytes [start, end) of a plain file, or in a whole gzip file."""
    if gz:
        return sum(count_lines(b) for b in iter_gzip_blocks(path, COUNT_GZIP_BLOCK_BYTES))
    n = 0
    last = 10
    buf = bytearray(min(COUNT_BLOCK_BYTES, max(1, end - start)))  # reused: no new pages per block
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = end - start
        while left > 0:
            got = f.readinto(memoryview(buf)[:min(left, len(buf))])
            if not got:
                break
            n += count_newlines(memoryview(buf)[:got])
            last = buf[got - 1]
            left -= got
    return n + (0 if last == 10 else 1)
