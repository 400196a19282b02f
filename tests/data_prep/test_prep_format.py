"""Parsing real Criteo rows against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from data_prep.criteo_format import count_lines, decode_hex, encode_column, encode_fixed8, encode_hex, parse_block
from data_prep.errors import BadLineError

from prep_testlib import KAGGLE, TERABYTE


def f32log(x: int) -> np.float32:
    return np.float32(math.log(max(x, 0) + 1))


def test_first_kaggle_rows_by_hand():
    b = parse_block(KAGGLE.read_bytes(), "k", 0)
    assert b.n_lines == 1999 and len(b.label) == 1999 and b.n_bad == 0
    # Line 1: 0  1 1 5 0 1382 4 15 2 181 1 2 <empty> 2  68fd1e64 80e26c9b ... C20 empty (07b5194c, '', 3a171ecb)
    assert b.label[0] == 0
    expect = [1, 1, 5, 0, 1382, 4, 15, 2, 181, 1, 2, 0, 2]
    np.testing.assert_array_equal(b.dense[0], np.array([f32log(x) for x in expect], np.float32))
    assert b.cats[0, 0] == 0x68FD1E64 and b.cats[0, 1] == 0x80E26C9B
    assert b.cats[0, 21] == 0  # C22 empty -> 0
    assert b.cats[0, 25] == 0x9727DD16  # last field, before the CRLF
    # Line 3: 0  2 0 1 14 767 89 4 2 245 1 3 3 45  287e684f 0a519c5c 02cf9876 ...
    assert list(b.dense[2, :4]) == [f32log(2), f32log(0), f32log(1), f32log(14)]
    assert b.cats[2, 0] == 0x287E684F and b.cats[2, 1] == 0x0A519C5C
    # Line 5: I2 = -1 -> clamped to 0 -> log(1) = 0
    line5 = KAGGLE.read_bytes().split(b"\n")[4].split(b"\t")
    assert line5[2] == b"-1"
    assert b.dense[4, 1] == 0.0
    assert np.all(b.line == np.arange(1999))
    assert b.dense.dtype == np.float32 and b.cats.dtype == np.uint32 and b.label.dtype == np.uint8


def test_every_field_against_python_reference():
    """Vectorized parse == a line-by-line Python parse (the reference's rules) on all real rows."""
    for path in (KAGGLE, TERABYTE):
        data = path.read_bytes()
        b = parse_block(data, str(path), 0, max_ind_range=1000)
        for i, line in enumerate(data.decode().replace("\r\n", "\n").rstrip("\n").split("\n")):
            f = line.split("\t")
            assert b.label[i] == int(f[0])
            dense = [f32log(int(x or "0")) for x in f[1:14]]
            np.testing.assert_array_equal(b.dense[i], dense)
            assert list(b.cats[i]) == [int(x or "0", 16) % 1000 for x in f[14:40]]


def test_terabyte_rows():
    b = parse_block(TERABYTE.read_bytes(), "t", 0)
    assert b.n_lines == 1000 and len(b.label) == 1000
    # Line 1: 1 5 110 <e> 16 <e> 1 0 14 7 1 <e> 306 <e> 62770d79 ...
    assert b.label[0] == 1
    np.testing.assert_array_equal(b.dense[0, :5], [f32log(5), f32log(110), 0, f32log(16), 0])
    assert b.cats[0, 0] == 0x62770D79 and b.cats[0, 25] == 0xED10571D
    assert 0.0 < b.label.mean() < 0.1


def test_decode_hex_general_lengths_and_errors():
    vals, bad = decode_hex(pa.array(["", "a", "0F", "ffffffff", "123456789", "xyz", "00000001"], pa.string()))
    assert list(vals[:4]) == [0, 10, 15, 0xFFFFFFFF]
    assert list(bad) == [False, False, False, False, True, True, False]
    assert vals[6] == 1


def test_encode_decode_roundtrip():
    rng = np.random.default_rng(0)
    v = rng.integers(0, 2**32, 1000, dtype=np.uint64)
    present = rng.random(1000) < 0.8
    arr = encode_hex(v, present)
    assert arr[int(np.flatnonzero(~present)[0])].as_py() == ""
    out, bad = decode_hex(arr)
    assert not bad.any()
    np.testing.assert_array_equal(out, np.where(present, v, 0).astype(np.uint32))


def test_count_lines():
    assert count_lines(b"") == 0
    assert count_lines(b"a\nb\n") == 2
    assert count_lines(b"a\nb") == 2
    big = b"x\n" * (3 << 19) + b"tail"  # 3 MiB of lines: counted a MiB at a time
    assert count_lines(big) == count_lines(memoryview(big)) == (3 << 19) + 1


def test_count_piece_lines_over_ranges(tmp_path):
    from data_prep.sources import count_piece_lines

    data = b"".join(b"%d\t%s\n" % (i, b"y" * (i % 50)) for i in range(200_000)) + b"last line"
    path = tmp_path / "f.txt"
    path.write_bytes(data)
    cuts = [0, 1, 1000, len(data) // 2, len(data) - 3, len(data)]  # pieces of any size, mid-line too
    counts = [count_piece_lines(str(path), a, b, False) for a, b in zip(cuts[:-1], cuts[1:])]
    # a piece ending mid-line counts that line: the pieces' sum counts each cut line twice
    assert sum(counts) == 200_001 + sum(data[c - 1] != 10 for c in cuts[1:-1])
    assert count_piece_lines(str(path), 0, len(data), False) == 200_001
    assert count_piece_lines(str(path), 5, 5, False) == 0


def test_bad_field_messages_name_line_and_field():
    lines = KAGGLE.read_bytes().split(b"\n")
    f = lines[9].split(b"\t")
    f[3] = b"3.5"
    lines[9] = b"\t".join(f)
    with pytest.raises(BadLineError) as e:
        parse_block(b"\n".join(lines), "x.tsv", 100)
    assert e.value.line == 110 and e.value.field == "I3" and e.value.value == "3.5"
    assert "x.tsv:110" in str(e.value) and "integer" in str(e.value)


@pytest.mark.parametrize("values", [
    ["0000000a", "", "ffffffff", "0000000a", "", "DEADBEEF"],      # 8 digits or empty: hashed path
    ["0000000a", "ffffffff", "0000000a", "deadbeef"],               # no empty field
    ["a", "", "0000000a", "1f"],                                    # shorter values: general path
    ["", ""],
])
def test_encode_column_matches_decode_hex(values):
    arr = pa.array(values, pa.binary())
    d, idx, bad = encode_column(arr)
    want, want_bad = decode_hex(arr)
    np.testing.assert_array_equal(d[idx], want)
    assert idx.dtype == np.int32 and (bad is None or not bad.any()) and not want_bad.any()
    assert len(np.unique(d[idx])) <= len(d)


@pytest.mark.parametrize("values", [
    ["0000000a", None, "ffffffff", "0000000a", None, "DEADBEEF", "zz12ab34"],
    ["0000000a", "ffffffff", "0000000a", "deadbeef"],
    [None, None],
])
def test_encode_fixed8_matches_encode_column(values):
    """The 8-byte path (empty fields read as null) gives every row the value and the
    bad flag of the variable-length path (empty fields read as empty strings)."""
    fixed = pa.array([None if v is None else v.encode() for v in values], pa.binary(8))[1:]  # an offset too
    d, idx, bad = encode_fixed8(fixed)
    want_d, want_idx, want_bad = encode_column(pa.array([v or "" for v in values], pa.binary())[1:])
    np.testing.assert_array_equal(d[idx], want_d[want_idx])
    assert idx.dtype == np.int32 and len(np.unique(d)) == len(d)
    np.testing.assert_array_equal(np.zeros(len(idx), bool) if bad is None else bad,
                                  np.zeros(len(idx), bool) if want_bad is None else want_bad)


def test_blocks_with_short_categoricals_parse_like_clean_ones():
    """A value of fewer than 8 digits sends the block down the variable-length path; its
    rows parse as in a block of 8-digit values."""
    dense = ["5", "", "3"] + ["0"] * 10
    cats = ["0000000a", "", "DEADBEEF"] + ["00000001"] * 23
    line = "\t".join(["1"] + dense + cats)
    short = "\t".join(["1"] + dense + cats[:3] + ["1"] + cats[4:])  # 00000001 written as 1
    clean = parse_block(f"{line}\n{line}\n".encode(), "x.tsv", 0)
    mixed = parse_block(f"{line}\n{short}\n".encode(), "x.tsv", 0)
    assert list(clean.cats[0, :4]) == [10, 0, 0xDEADBEEF, 1]
    np.testing.assert_array_equal(mixed.cats, clean.cats)
    np.testing.assert_array_equal(mixed.dense, clean.dense)


def test_encode_column_flags_bad_hex():
    d, idx, bad = encode_column(pa.array(["0000000a", "zz12ab34", "", "0000000a"], pa.binary()))
    assert list(bad) == [False, True, False, False]
    assert d[idx[0]] == 10 and d[idx[2]] == 0
