"""Property-based test of the Criteo line parser (Hypothesis): every generated input either
parses to the values a simple line-by-line Python reading of the format gives, or is
rejected with the file, the line and the field that reading names."""
from __future__ import annotations

import math
import re

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_prep.criteo_format import MAX_LINE_BYTES, parse_block
from data_prep.errors import BadLineError
from data_prep.fields import FIELD_NAMES

PATH = "fuzz.txt"

# ------------------------------------------------------------ the format, read line by line


def reference(data: bytes, max_ind_range: int | None):
    """Per line (1-based number): ("row", label, dense float32 [13], cats [26]) or
    ("bad", field name or None).  The Kaggle/Terabyte format: 40 tab-separated UTF-8
    fields, a label 0 or 1, 13 integers (empty = 0; below 10^18 in magnitude; log(max(x, 0)
    + 1) as float32), 26 hexadecimal values of 1..8 digits (empty = 0; modulo max_ind_range)."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out = []
    for raw in lines:
        out.append(_read_line(raw, max_ind_range))
    return out


def _read_line(raw: bytes, max_ind_range: int | None):
    if len(raw) > MAX_LINE_BYTES:
        return ("bad", None)
    body = raw[:-1] if raw.endswith(b"\r") else raw
    fields = body.split(b"\t")
    for k, f in enumerate(fields):
        try:
            f.decode("utf-8")
        except UnicodeDecodeError:
            return ("bad", FIELD_NAMES[k] if k < 40 else None)
        if b"\r" in f:
            return ("bad", FIELD_NAMES[k] if k < 40 else None)
    if body == b"":
        return ("bad", "label")
    if len(fields) != 40:
        return ("bad", None)
    text = [f.decode() for f in fields]
    if not (re.fullmatch(r"[+-]?[0-9]+", text[0]) and int(text[0]) in (0, 1)):
        return ("bad", "label")
    dense = []
    for k in range(1, 14):
        t = text[k]
        if t == "":
            dense.append(0)
        elif re.fullmatch(r"[+-]?[0-9]+", t) and abs(int(t)) < 10**18:
            dense.append(int(t))
        else:
            return ("bad", FIELD_NAMES[k])
    cats = []
    for k in range(14, 40):
        t = text[k]
        if t == "":
            v = 0
        elif re.fullmatch(r"[0-9a-fA-F]{1,8}", t):
            v = int(t, 16)
        else:
            return ("bad", FIELD_NAMES[k])
        cats.append(v % max_ind_range if max_ind_range else v)
    dense_f = np.array([math.log(float(max(x, 0)) + 1.0) for x in dense], dtype=np.float32)
    return ("row", int(text[0]), dense_f, cats)


# ------------------------------------------------------------ inputs

_junk = st.text(alphabet="0123456789abcdefABCDEFxX +-.\r\x00é_", max_size=6).map(str.encode) | \
    st.sampled_from([b"\xff", b"1\xfe", b"\xc3\x28", b"\xe9t\xe9"])
_label = st.sampled_from([b"0", b"1"]) | st.sampled_from([b"", b"2", b"-1", b"00", b"+1", b"-0", b" 1", b"0x1"]) | _junk
_dense = (st.just(b"") | st.integers(-10**19, 10**19).map(lambda x: str(x).encode())
          | st.integers(0, 999).map(lambda x: f"+{x}".encode()) | st.integers(0, 99).map(lambda x: f"000{x}".encode())
          | _junk)
_cat = (st.just(b"") | st.integers(0, 2**32 - 1).map(lambda x: f"{x:08x}".encode())
        | st.text(alphabet="0123456789abcdefABCDEF", min_size=1, max_size=10).map(str.encode) | _junk)


@st.composite
def lines(draw) -> bytes:
    fields = [draw(_label)] + [draw(_dense) for _ in range(13)] + [draw(_cat) for _ in range(26)]
    mutate = draw(st.integers(0, 9))
    if mutate == 0:
        fields.pop(draw(st.integers(0, 39)))
    elif mutate == 1:
        fields.insert(draw(st.integers(0, 40)), draw(_cat))
    elif mutate == 2:
        fields = [b""]  # an empty line
    return b"\t".join(fields)


@st.composite
def files(draw) -> bytes:
    body = draw(st.lists(lines(), min_size=1, max_size=6))
    ends = draw(st.lists(st.sampled_from([b"\n", b"\r\n"]), min_size=len(body), max_size=len(body)))
    data = b"".join(line + end for line, end in zip(body, ends))
    if draw(st.booleans()):  # no newline after the last line
        data = data.rstrip(b"\n")
        if data.endswith(b"\r"):
            data = data[:-1]
    return data


# ------------------------------------------------------------ the property

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=files(), max_ind_range=st.none() | st.integers(1, 2**32))
def test_parser_agrees_with_a_line_by_line_reading(data, max_ind_range):
    expected = reference(data, max_ind_range)
    first_bad = next((i for i, e in enumerate(expected) if e[0] == "bad"), None)
    try:
        strict = parse_block(data, PATH, 0, max_ind_range=max_ind_range, bad_lines="error")
    except BadLineError as e:
        assert first_bad is not None, f"rejected a good input: {e}"
        assert (e.path, e.line, e.field) == (PATH, first_bad + 1, expected[first_bad][1]), str(e)
        assert str(e).startswith(f"{PATH}:{first_bad + 1}: ")
    else:
        assert first_bad is None, f"accepted line {first_bad + 1}, expected {expected[first_bad]}"
        assert strict.n_bad == 0

    b = parse_block(data, PATH, 0, max_ind_range=max_ind_range, bad_lines="skip")
    rows = [(i, e) for i, e in enumerate(expected) if e[0] == "row"]
    assert b.n_lines == len(expected) and b.n_bad == len(expected) - len(rows)
    assert b.line.tolist() == [i for i, _ in rows]
    assert b.label.tolist() == [e[1] for _, e in rows]
    np.testing.assert_array_equal(b.dense, np.array([e[2] for _, e in rows], np.float32).reshape(-1, 13))
    assert b.cats.tolist() == [e[3] for _, e in rows]
    assert [(x.line, x.field) for x in b.bad] == \
        [(i + 1, e[1]) for i, e in enumerate(expected) if e[0] == "bad"][:len(b.bad)]
