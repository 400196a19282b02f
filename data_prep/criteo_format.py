"""The Criteo raw text format: parsing a block of lines into arrays, vectorized.

A line is 40 tab-separated fields: ``label`` (0 or 1), ``I1``..``I13`` (integers, may
be negative or empty) and ``C1``..``C26`` (hexadecimal 32-bit hashes, 8 digits, may be
empty).  The transformation is the reference DLRM's (facebookresearch/dlrm
``data_utils.py``): an empty field is 0; dense negatives become 0, then log(x + 1)
as float32; a categorical is its hexadecimal value (0 when empty), modulo
``max_ind_range`` when given.  Contiguous ids are assigned later (``vocab.py``).

Parsing uses pyarrow's CSV reader (one C++ pass over the bytes); the 26 hexadecimal
columns are dictionary-encoded (a hash table over the raw 8-byte fields) and only the
distinct values are decoded, with numpy table look-ups.  Nothing loops over rows in Python.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from dqrm_mpi.data.schema import NUM_DENSE, NUM_SPARSE, transform_dense

from .errors import BadLineError, InputError
from .fields import DENSE_NAMES, FIELD_NAMES, MAX_HEX_DIGITS, NUM_FIELDS, SPARSE_NAMES

MAX_EXAMPLES = 20  # bad lines kept as examples per block / in meta.json
MAX_LINE_BYTES = 1 << 20  # a Criteo line is about 250 bytes; longer ones are bad lines
INTEGER_DIGITS = 18  # a dense value (or the label) is [+-]digits, below 10^18 in magnitude
INTEGER_LIMIT = 10**INTEGER_DIGITS
INTEGER_PATTERN = rf"^[+-]?0*[0-9]{{1,{INTEGER_DIGITS}}}$"

_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i

def _read_options() -> pacsv.ReadOptions:
    # Internal blocks of 1.5 MiB: much faster than one huge block (cache), and any line the
    # reader may take (at most MAX_LINE_BYTES) fits in one.
    return pacsv.ReadOptions(column_names=FIELD_NAMES, use_threads=False, block_size=MAX_LINE_BYTES + (1 << 19))


_FAST_TYPES = {"label": pa.int64(), **{n: pa.int64() for n in DENSE_NAMES}, **{n: pa.binary() for n in SPARSE_NAMES}}
_STRING_TYPES = {n: pa.string() for n in FIELD_NAMES}
# Fastest: every categorical exactly 8 digits (or empty, read as null), as in Criteo's logs.
_FIXED8_TYPES = {**_FAST_TYPES, **{n: pa.binary(MAX_HEX_DIGITS) for n in SPARSE_NAMES}}


@dataclass
class ParsedBlock:
    """Rows of one block that passed validation.

    label uint8 [n]; dense float32 [n, 13] (already log(x + 1)); line int64 [n] 0-based
    line index in the file.  Categoricals are dictionary-encoded per column:
    ``cat_dict[j]`` uint32 values (hex value, modulo max_ind_range; may repeat and may
    hold values no kept row uses) and ``cat_idx`` int32 [26, n] (column-major: each
    column's indices contiguous), row i's value of column j being
    ``cat_dict[j][cat_idx[j, i]]`` (see ``cats``).
    n_lines: lines in the block; bad: examples of rejected lines; n_bad: how many.
    """

    label: np.ndarray
    dense: np.ndarray
    cat_idx: np.ndarray
    cat_dict: list[np.ndarray]
    line: np.ndarray
    n_lines: int
    n_bad: int = 0
    bad: list[BadLineError] = field(default_factory=list)

    @property
    def cats(self) -> np.ndarray:
        """uint32 [n, 26]: the categorical values themselves."""
        out = np.empty(self.cat_idx.shape[::-1], dtype=np.uint32)
        for j, d in enumerate(self.cat_dict):
            out[:, j] = d[self.cat_idx[j]]
        return out


_COUNT_CHUNK = 1 << 20  # bytes compared at a time: the temporary mask stays in cache


def count_newlines(buf: bytes | bytearray | memoryview) -> int:
    """Newline bytes in ``buf`` (numpy, a chunk at a time: 3x faster than ``bytes.count``)."""
    a = np.frombuffer(buf, dtype=np.uint8)
    return sum(int(np.count_nonzero(a[i:i + _COUNT_CHUNK] == 10)) for i in range(0, len(a), _COUNT_CHUNK))


def count_lines(buf: bytes | bytearray | memoryview) -> int:
    """Lines in ``buf`` (a last line without a final newline counts)."""
    if not len(buf):
        return 0
    return count_newlines(buf) + (0 if buf[-1] == 10 else 1)


def decode_hex(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Hexadecimal strings -> (uint32 values, bool bad).  Empty -> 0; more than 8 digits
    or a non-hexadecimal character -> bad."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    out = np.zeros(n, dtype=np.uint32)
    bad = np.zeros(n, dtype=bool)
    if n == 0:
        return out, bad
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    if bufs[2] is None or offsets[-1] == offsets[0]:
        return out, bad
    data = np.frombuffer(bufs[2], dtype=np.uint8)
    lengths = np.diff(offsets)
    full = lengths == MAX_HEX_DIGITS
    n_full = int(np.count_nonzero(full))
    if n_full * MAX_HEX_DIGITS == int(offsets[-1] - offsets[0]):
        # Common case: every non-empty value has exactly 8 digits, so the data buffer is
        # an [m, 8] matrix of ASCII digits.
        seg = data[offsets[0]:offsets[-1]]
        vals, vbad = _pack8(_HEX[seg].view(np.uint64))
        out[full] = vals
        bad[full] = vbad
        return out, bad
    # General case: 1..8 digits, right-aligned into 8 positions.
    k = np.arange(MAX_HEX_DIGITS)
    ok_len = lengths <= MAX_HEX_DIGITS
    mask = (k[None, :] >= (MAX_HEX_DIGITS - lengths)[:, None]) & ok_len[:, None]
    pos = offsets[1:, None].astype(np.int64) - MAX_HEX_DIGITS + k[None, :]
    pos = np.where(mask, pos, 0)
    nib = np.where(mask, _HEX[data[np.clip(pos, 0, len(data) - 1)]], 0).astype(np.uint8)
    bad = ~ok_len | ((nib == 255) & mask).any(axis=1)
    nib[bad] = 0
    packed = np.ascontiguousarray((nib[:, 0::2] << 4) | nib[:, 1::2])
    out = packed.view(">u4").ravel().astype(np.uint32)
    return out, bad


_U = np.uint64


def _pack8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x: uint64 whose 8 little-endian bytes are the nibbles of 8 hex digits (first digit in
    the lowest byte; 255 for a non-hex character) -> (uint32 values, bool bad)."""
    bad = (x & _U(0x8080808080808080)) != 0
    y = ((x & _U(0x000F000F000F000F)) << _U(4)) | ((x & _U(0x0F000F000F000F00)) >> _U(8))
    z = (((y & _U(0xFF)) << _U(24)) | (((y >> _U(16)) & _U(0xFF)) << _U(16))
         | (((y >> _U(32)) & _U(0xFF)) << _U(8)) | ((y >> _U(48)) & _U(0xFF)))
    return z.astype(np.uint32), bad


def encode_column(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Hexadecimal strings -> (uint32 dictionary, int32 index per row, bool bad per row or None).

    Common case (every non-empty value has 8 digits): the raw 8 ASCII bytes of each value
    are one uint64 key, keys are deduplicated with a hash table (pyarrow's
    dictionary_encode) and only the distinct ones are decoded.  Otherwise every row is
    decoded and the dictionary is the rows themselves."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if n == 0:
        return np.zeros(1, np.uint32), np.zeros(0, np.int32), None
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    total = int(offsets[-1] - offsets[0])
    if bufs[2] is None or total == 0:  # every value empty
        return np.zeros(1, np.uint32), np.zeros(n, np.int32), None
    lengths = np.diff(offsets)
    full = lengths == MAX_HEX_DIGITS
    m = int(np.count_nonzero(full))
    if m * MAX_HEX_DIGITS != total:
        vals, bad = decode_hex(arr)
        return vals, np.arange(n, dtype=np.int32), bad
    data = np.frombuffer(bufs[2], dtype=np.uint8)
    keys = np.ascontiguousarray(data[offsets[0]:offsets[-1]]).view(np.uint64)
    enc = pc.dictionary_encode(pa.array(keys, type=pa.uint64()))
    vals, vbad = _pack8(_HEX[enc.dictionary.to_numpy().view(np.uint8)].view(np.uint64))
    idx = enc.indices.to_numpy().astype(np.int32, copy=False)
    if m < n:  # empty fields -> an extra dictionary entry 0
        rows = np.full(n, len(vals), dtype=np.int32)
        rows[full] = idx
        idx = rows
        vals = np.append(vals, np.uint32(0))
        vbad = np.append(vbad, False)
    return vals, idx, (vbad[idx] if vbad.any() else None)


def encode_fixed8(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``encode_column`` for a column read as 8-byte fixed-size binary (null where empty):
    the values buffer is already the uint64 keys, and the hash table encodes the empty
    fields too (as a null entry of the dictionary, decoded as 0)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if n == 0:
        return np.zeros(1, np.uint32), np.zeros(0, np.int32), None
    validity, values = arr.buffers()
    keys = pa.Array.from_buffers(pa.uint64(), n, [validity, values], offset=arr.offset)
    enc = pc.dictionary_encode(keys, null_encoding="encode")
    d = enc.dictionary
    raw = np.frombuffer(d.buffers()[1], dtype=np.uint64, count=len(d), offset=d.offset * 8)
    vals, vbad = _pack8(_HEX[raw.view(np.uint8)].view(np.uint64))
    if d.null_count:  # the empty fields' entry
        empty = d.is_null().to_numpy(zero_copy_only=False)
        vals[empty], vbad[empty] = 0, False
    idx = enc.indices.to_numpy().astype(np.int32, copy=False)
    return vals, idx, (vbad[idx] if vbad.any() else None)


def _to_int(col: pa.ChunkedArray | pa.Array, fill: int) -> np.ndarray:
    return pc.fill_null(col, fill).to_numpy().astype(np.int64, copy=False)


def _ints_from_strings(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Slow path: strings -> (int64 values, 0 where empty or bad; bool ok: empty or an integer)."""
    ok = pc.or_(pc.equal(col, ""), pc.match_substring_regex(col, INTEGER_PATTERN))
    clean = pc.if_else(pc.and_(ok, pc.not_equal(col, "")), pc.replace_substring_regex(col, r"^\+", ""), "0")
    return pc.cast(clean, pa.int64()).to_numpy(), ok.to_numpy(zero_copy_only=False).astype(bool)


def _dense_from_strings(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Slow path (some dense field is not an integer): int64 [n, 13] and bad field index per
    row (-1 when fine)."""
    n = table.num_rows
    raw = np.zeros((n, NUM_DENSE), dtype=np.int64)
    first_bad = np.full(n, -1, dtype=np.int64)
    for j, name in enumerate(DENSE_NAMES):
        raw[:, j], ok = _ints_from_strings(table.column(name))
        bad_here = ~ok & (first_bad < 0)
        first_bad[bad_here] = 1 + j
    return raw, first_bad


def _needs_strings(buf: bytes) -> bool:
    """Could pyarrow's integer conversion accept what the format does not?  It trims spaces
    and reads a 0x prefix; such blocks take the strict (string) path."""
    return b" " in buf or b"x" in buf or b"X" in buf


class _NeedsLineCheck(Exception):
    """pyarrow could not take some line: longer than its block ('straddling object'), or
    split in two by a carriage return (it saw more rows than there are lines)."""


def parse_block(
    buf: bytes,
    path: str,
    first_line: int,
    max_ind_range: int | None = None,
    bad_lines: str = "error",
) -> ParsedBlock:
    """Parse whole lines ``buf`` (the lines ``first_line``, ``first_line + 1``, ... of ``path``).

    ``bad_lines='error'`` raises BadLineError for the first malformed line; ``'skip'``
    drops malformed lines and reports them in ``n_bad`` / ``bad``.  Lines the CSV reader
    cannot take (longer than MAX_LINE_BYTES, not UTF-8, a carriage return inside) are bad
    lines too: the block is parsed around them.
    """
    n_lines = count_lines(buf)
    if n_lines == 0:
        return _empty(0)
    unreadable = _unreadable_lines(buf, path, first_line)
    if not unreadable:
        try:
            return _parse_lines(buf, path, first_line, n_lines, max_ind_range, bad_lines)
        except _NeedsLineCheck as e:
            unreadable = _unreadable_lines(buf, path, first_line, check_every_line=True)
            if not unreadable:
                raise InputError(str(e)) from None
    return _parse_around(buf, unreadable, path, first_line, n_lines, max_ind_range, bad_lines)


def _unreadable_lines(buf: bytes, path: str, first_line: int,
                      check_every_line: bool = False) -> dict[int, BadLineError]:
    """Lines of ``buf`` the CSV reader cannot take, by 0-based index in ``buf``.  Without
    ``check_every_line``, only looks for bytes that are not UTF-8 (one scan of an ASCII
    buffer); the other cases are found when the reader fails on them."""
    if not check_every_line:
        if buf.isascii():
            return {}
        try:
            buf.decode("utf-8")
            return {}
        except UnicodeDecodeError:
            pass
    lines = buf.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    found = {}
    for i, line in enumerate(lines):
        error = _unreadable(line, path, first_line + i + 1)
        if error is not None:
            found[i] = error
    return found


def _unreadable(line: bytes, path: str, lineno: int) -> BadLineError | None:
    """Why the CSV reader cannot take ``line`` (without its newline), or None."""
    if len(line) > MAX_LINE_BYTES:
        return BadLineError(path, lineno, None, _clip(line[:200].decode("utf-8", "backslashreplace")),
                            f"a line of at most {MAX_LINE_BYTES:,} bytes", found=f"{len(line):,} bytes")
    fields = (line[:-1] if line.endswith(b"\r") else line).split(b"\t")
    for k, f in enumerate(fields):
        what = None
        if b"\r" in f:
            what = ("no carriage return inside a line", "a carriage return")
        else:
            try:
                f.decode("utf-8")
            except UnicodeDecodeError:
                what = ("UTF-8 text", "non-UTF-8 bytes")
        if what:
            return BadLineError(path, lineno, FIELD_NAMES[k] if k < NUM_FIELDS else None,
                                _clip(f.decode("utf-8", "backslashreplace")), what[0], found=what[1])
    return None


def _parse_around(buf: bytes, unreadable: dict[int, BadLineError], path: str, first_line: int, n_lines: int,
                  max_ind_range: int | None, bad_lines: str) -> ParsedBlock:
    """Parse the lines between the unreadable ones, in order, and count those as bad."""
    starts = np.concatenate([[0], np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == 10) + 1])
    blocks = []
    seg = 0  # first line of the next run of readable lines
    for i in sorted(unreadable) + [n_lines]:
        if i > seg:
            a, b = int(starts[seg]), int(starts[i]) if i < n_lines else len(buf)
            blocks.append(_parse_lines(buf[a:b], path, first_line + seg, i - seg, max_ind_range, bad_lines))
        if i < n_lines and bad_lines == "error":
            raise unreadable[i]
        seg = i + 1
    return _merge(blocks, n_lines, list(unreadable.values()))


def _merge(blocks: list[ParsedBlock], n_lines: int, more_bad: list[BadLineError]) -> ParsedBlock:
    """The blocks as one (dictionaries concatenated, indices shifted), plus ``more_bad`` lines."""
    bad = sorted(more_bad + [e for b in blocks for e in b.bad], key=lambda e: e.line)[:MAX_EXAMPLES]
    n_bad = len(more_bad) + sum(b.n_bad for b in blocks)
    if not blocks:
        return replace(_empty(n_lines), n_bad=n_bad, bad=bad)
    shift = np.zeros(NUM_SPARSE, dtype=np.int32)
    idx = []
    for b in blocks:
        idx.append(b.cat_idx + shift[:, None])
        shift += np.array([len(d) for d in b.cat_dict], dtype=np.int32)
    return ParsedBlock(np.concatenate([b.label for b in blocks]), np.concatenate([b.dense for b in blocks]),
                       np.concatenate(idx, axis=1),
                       [np.concatenate([b.cat_dict[j] for b in blocks]) for j in range(NUM_SPARSE)],
                       np.concatenate([b.line for b in blocks]), n_lines, n_bad, bad)


def _parse_lines(buf: bytes, path: str, first_line: int, n_lines: int, max_ind_range: int | None,
                 bad_lines: str) -> ParsedBlock:
    """parse_block for lines the CSV reader can take."""
    wrong_fields: list[tuple[int, int, str]] = []

    def on_invalid(row) -> str:
        wrong_fields.append((row.number, row.actual_columns, row.text))
        return "skip"

    parse = pacsv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False, escape_char=False,
                               newlines_in_values=False, ignore_empty_lines=False, invalid_row_handler=on_invalid)

    def read(types):
        conv = pacsv.ConvertOptions(column_types=types, strings_can_be_null=types is _FIXED8_TYPES,
                                    quoted_strings_can_be_null=False,
                                    null_values=[] if types is _STRING_TYPES else [""])
        return pacsv.read_csv(pa.py_buffer(buf), read_options=_read_options(), parse_options=parse,
                              convert_options=conv)

    # Fixed 8-byte categoricals, else variable-length ones (a value of other length fails
    # the first), else all fields as strings (a field pyarrow's integers would not take).
    types = _STRING_TYPES if _needs_strings(buf) else _FIXED8_TYPES
    while True:
        wrong_fields.clear()
        try:
            table = read(types)
            break
        except pa.ArrowInvalid as e:
            if "straddling" in str(e):
                raise _NeedsLineCheck(f"{path}: cannot parse lines {first_line + 1}..{first_line + n_lines}: {e}") from None
            if types is _STRING_TYPES or "conversion error" not in str(e):
                raise InputError(f"{path}: cannot parse lines {first_line + 1}..{first_line + n_lines}: {e}") from None
            types = _FAST_TYPES if types is _FIXED8_TYPES and "fixed_size_binary" in str(e) else _STRING_TYPES
    slow = types is _STRING_TYPES

    # Line number (1-based within the block) of every parsed row.
    skipped = np.array(sorted(r[0] for r in wrong_fields if r[0] is not None and r[0] > 0), dtype=np.int64)
    if table.num_rows + len(wrong_fields) != n_lines or len(skipped) != len(wrong_fields):
        raise _NeedsLineCheck(
            f"{path}: lines {first_line + 1}..{first_line + n_lines}: the CSV reader saw "
            f"{table.num_rows + len(wrong_fields)} lines, expected {n_lines} (stray carriage return or NUL?)")
    rows_line = np.arange(1, n_lines + 1, dtype=np.int64)
    if len(skipped):
        rows_line = np.setdiff1d(rows_line, skipped, assume_unique=True)
    n = table.num_rows

    # Bad field per row: index into FIELD_NAMES, -1 when the row is fine.
    first_bad = np.full(n, -1, dtype=np.int64)
    if slow:
        lab, lab_ok = _ints_from_strings(table.column("label"))
        lab_ok &= pc.not_equal(table.column("label"), "").to_numpy(zero_copy_only=False).astype(bool)
        raw, dense_bad = _dense_from_strings(table)
        dense_cols = list(raw.T)
    else:
        lab = _to_int(table.column("label"), -1)
        lab_ok = np.ones(n, dtype=bool)
        dense_cols = [_to_int(table.column(name), 0) for name in DENSE_NAMES]
        dense_bad = np.full(n, -1, dtype=np.int64)
    lab_ok &= (lab == 0) | (lab == 1)
    first_bad[~lab_ok] = 0
    label = np.where(lab_ok, lab, 0).astype(np.uint8)
    for j in reversed(range(NUM_DENSE)):  # pyarrow reads up to 19 digits; the first such field is named
        c = dense_cols[j]
        if n and (c.max() >= INTEGER_LIMIT or c.min() <= -INTEGER_LIMIT):
            too_big = (c >= INTEGER_LIMIT) | (c <= -INTEGER_LIMIT)
            dense_bad[too_big & ((dense_bad < 0) | (dense_bad > 1 + j))] = 1 + j
    upd = (first_bad < 0) & (dense_bad >= 0)
    first_bad[upd] = dense_bad[upd]
    cat_idx = np.empty((NUM_SPARSE, n), dtype=np.int32)
    cat_dict: list[np.ndarray] = []
    for j, name in enumerate(SPARSE_NAMES):
        if slow:
            vals, vbad = decode_hex(table.column(name))
            cat_dict.append(vals)
            cat_idx[j] = np.arange(n, dtype=np.int32)
        else:
            d, idx, vbad = (encode_fixed8 if types is _FIXED8_TYPES else encode_column)(table.column(name))
            cat_dict.append(d)
            cat_idx[j] = idx
        if vbad is not None and vbad.any():
            upd = vbad & (first_bad < 0)
            first_bad[upd] = 1 + NUM_DENSE + j
    if max_ind_range and max_ind_range < 2**32:  # values are 32-bit: modulo 2^32 changes nothing
        for d in cat_dict:
            np.remainder(d, np.uint32(max_ind_range), out=d)

    bad_examples: list[BadLineError] = []
    for number, actual, text in wrong_fields:
        bad_examples.append(BadLineError(path, first_line + number, None, _clip(text),
                                         f"{NUM_FIELDS} tab-separated fields", found=f"{actual} fields"))
    bad_rows = np.flatnonzero(first_bad >= 0)
    for i in bad_rows[:MAX_EXAMPLES]:
        f = int(first_bad[i])
        name = FIELD_NAMES[f]
        value = table.column(name)[int(i)].as_py()
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        expected = ("0 or 1" if f == 0 else f"an integer of at most {INTEGER_DIGITS} digits (or empty)"
                    if f <= NUM_DENSE else f"at most {MAX_HEX_DIGITS} hexadecimal digits (or empty)")
        bad_examples.append(BadLineError(path, first_line + int(rows_line[i]), name,
                                         "" if value is None else _clip(str(value)), expected))
    n_bad = len(wrong_fields) + len(bad_rows)
    bad_examples.sort(key=lambda e: e.line)
    if n_bad and bad_lines == "error":
        raise bad_examples[0]

    dense = np.empty((n, NUM_DENSE), dtype=np.float32)
    for j, c in enumerate(dense_cols):  # a column at a time: no [n, 13] int64 copy
        dense[:, j] = transform_dense(c)
    line = first_line + rows_line - 1
    if len(bad_rows):
        keep = first_bad < 0
        label, dense, cat_idx, line = label[keep], dense[keep], cat_idx[:, keep], line[keep]
    return ParsedBlock(label, dense, cat_idx, cat_dict, line, n_lines, n_bad, bad_examples[:MAX_EXAMPLES])


def _clip(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[:n] + "..."


def _empty(n_lines: int) -> ParsedBlock:
    return ParsedBlock(np.zeros(0, np.uint8), np.zeros((0, NUM_DENSE), np.float32),
                       np.zeros((NUM_SPARSE, 0), np.int32), [np.zeros(1, np.uint32) for _ in range(NUM_SPARSE)],
                       np.zeros(0, np.int64), n_lines)


# ---------------------------------------------------------------- writing (synth)

_HEX_PAIRS = np.frombuffer(b"".join(f"{i:02x}".encode() for i in range(256)), dtype=np.uint8).reshape(256, 2)


def encode_hex(values: np.ndarray, present: np.ndarray) -> pa.StringArray:
    """uint32 values -> 8-digit lowercase hex strings; '' where ``present`` is False."""
    v = np.asarray(values, dtype=np.uint64)[present].astype(">u4")
    digits = _HEX_PAIRS[v.view(np.uint8).reshape(-1, 4)].reshape(-1)
    lengths = np.where(present, MAX_HEX_DIGITS, 0).astype(np.int32)
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.StringArray.from_buffers(len(values), pa.py_buffer(offsets), pa.py_buffer(digits.tobytes()))
