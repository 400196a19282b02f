"""End-to-end `dqrm-prep criteo` on real rows: splits, ids vs an independent reference,
gz vs plain, Terabyte layout, shuffle, sub-sampling, invariance to workers."""
from __future__ import annotations

import gzip
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_prep.errors import InputError
from data_prep.options import PrepOptions
from data_prep.pipeline import run_prep
from dqrm_mpi.data.schema import list_shards, read_meta
from prep_testlib import KAGGLE, TERABYTE, assert_same_dataset, load_all, read_lines


def prep(raw, out, **kw) -> object:
    kw.setdefault("progress", False)
    return run_prep(raw, out, PrepOptions(**kw), log=lambda m: None)


# ------------------------------------------------------------ independent reference

def reference_ids(lines: list[str], max_ind_range: int | None = None, threshold: int = 0,
                  train_rows: int | None = None) -> tuple[np.ndarray, list[int]]:
    """A line-by-line re-implementation of the reference DLRM's id assignment: per column a
    dict in first-seen order (with threshold: train counts, rare -> one shared id)."""
    raw = []
    for line in lines:
        f = line.split("\t")
        vals = []
        for x in f[14:40]:
            v = int(x, 16) if x else 0
            vals.append(v % max_ind_range if max_ind_range else v)
        raw.append(vals)
    ids = np.zeros((len(raw), 26), dtype=np.int64)
    cards = []
    for j in range(26):
        if threshold:
            counts = Counter(r[j] for r in raw[:train_rows])
            d: dict[int, int] = {}
            for r in raw:
                v = r[j]
                if counts[v] >= threshold and v not in d:
                    d[v] = len(d) + 1
            for i, r in enumerate(raw):
                ids[i, j] = d.get(r[j], 0)
            cards.append(len(d) + 1)
        else:
            d = {}
            for i, r in enumerate(raw):
                ids[i, j] = d.setdefault(r[j], len(d))
            cards.append(len(d))
    return ids, cards


def kaggle_split_sizes(n: int) -> tuple[int, int, int]:
    per, extra = divmod(n, 7)
    days = [per + 1] * extra + [per] * (7 - extra)
    train = sum(days[:6])
    return train, (days[6] + 1) // 2, days[6] // 2


def assert_same_partition(ours: np.ndarray, ref: np.ndarray) -> None:
    """ours[:, j] == f_j(ref[:, j]) for a bijection f_j, column by column."""
    for j in range(ref.shape[1]):
        pairs = set(zip(ref[:, j].tolist(), ours[:, j].tolist()))
        assert len(pairs) == len(set(ref[:, j].tolist())) == len(set(ours[:, j].tolist())), f"column C{j + 1}"


def rows_in_file_order(out: Path, lines: list[str]) -> np.ndarray:
    """Sparse ids of every row, put back in file order by matching (label, dense) keys,
    which are unique for the rows compared (duplicates are dropped from the comparison)."""
    from data_prep.criteo_format import parse_block

    data = load_all(out)
    b = parse_block(("\n".join(lines) + "\n").encode(), "x", 0)
    key = lambda lab, d: lab.tobytes() + d.tobytes()  # noqa: E731
    file_keys = [key(b.label[i:i + 1], b.dense[i]) for i in range(len(b.label))]
    dup = {k for k, c in Counter(file_keys).items() if c > 1}
    out_rows = {}
    for split in ("train", "val", "test"):
        s = data[split]
        for i in range(len(s["label"])):
            k = key(s["label"][i:i + 1].astype(np.uint8), s["dense"][i])
            out_rows[k] = s["sparse"][i]
    keep = [i for i, k in enumerate(file_keys) if k not in dup]
    assert len(keep) > 0.95 * len(file_keys)
    return np.array(keep), np.stack([out_rows[file_keys[i]] for i in keep])


# ------------------------------------------------------------ tests

def test_kaggle_real_rows_split_and_reference_ids(kaggle_file, tmp_path):
    out = tmp_path / "out"
    meta = prep(kaggle_file, out, shard_rows=500, workers=1)
    lines = read_lines(KAGGLE)
    n_train, n_test, n_val = kaggle_split_sizes(len(lines))
    assert (n_train, n_test, n_val) == (1714, 143, 142)
    assert meta.rows == {"train": n_train, "test": n_test, "val": n_val}
    assert read_meta(out).rows == meta.rows
    assert len(list_shards(out, "train")) == 4
    ref, cards = reference_ids(lines)
    assert meta.cardinalities == cards
    keep, ours = rows_in_file_order(out, lines)
    assert_same_partition(ours, ref[keep])
    # test and val rows come in file order: day 6 first half, then second half
    data = load_all(out)
    from data_prep.criteo_format import parse_block

    b = parse_block(KAGGLE.read_bytes(), "k", 0)
    np.testing.assert_array_equal(data["test"]["dense"], b.dense[n_train:n_train + n_test])
    np.testing.assert_array_equal(data["val"]["dense"], b.dense[n_train + n_test:])
    np.testing.assert_array_equal(data["val"]["label"], b.label[n_train + n_test:])
    assert data["train"]["sparse"].dtype == np.int32 and data["train"]["label"].dtype == np.uint8
    extra = meta.extra
    assert extra["counts"]["lines_read"] == 1999 and extra["counts"]["rows_skipped_bad"] == 0
    assert extra["sources"][0]["name"] == "train.txt" and extra["sources"][0]["size"] == KAGGLE.stat().st_size
    assert meta.options["freq_threshold"] == 0 and extra["wall_time_s"] >= 0
    assert meta.ctr == pytest.approx(data["train"]["label"].mean())
    assert not (out / ".prep").exists()


def test_hash_mode_and_threshold_match_reference(kaggle_file, tmp_path):
    lines = read_lines(KAGGLE)
    n_train = kaggle_split_sizes(len(lines))[0]
    for M, T in ((1000, 0), (None, 3), (5000, 2)):
        out = tmp_path / f"out_{M}_{T}"
        meta = prep(kaggle_file, out, shard_rows=700, max_ind_range=M, freq_threshold=T)
        ref, cards = reference_ids(lines, M, T, n_train)
        assert meta.cardinalities == cards, (M, T)
        keep, ours = rows_in_file_order(out, lines)
        assert_same_partition(ours, ref[keep])
        if T:
            # the shared id of rare values is 0
            assert all((ours[:, j][ref[keep][:, j] == 0] == 0).all() for j in range(26))


@pytest.mark.parametrize("field, value, message", [
    ("max_ind_range", 0, "--max-ind-range must be in 1 .. 2^32, got 0"),
    ("freq_threshold", -1, "--freq-threshold must be >= 0, got -1"),
    ("sub_sample_rate", 1.0, "--sub-sample-rate must be in [0, 1), got 1.0"),
    ("shard_rows", 0, "--shard-rows must be >= 1, got 0"),
    ("bad_lines", "ignore", "--bad-lines must be error or skip, got 'ignore'"),
    ("label_dtype", "int8", "--label-dtype must be uint8 or float32, got 'int8'"),
    ("workers", 0, "--workers must be >= 1, got 0"),
])
def test_options_out_of_range_are_refused_when_made(field, value, message):
    with pytest.raises(InputError) as e:
        PrepOptions(**{field: value})
    assert str(e.value) == message


def test_max_ind_range_2_to_the_32_keeps_every_value(kaggle_file, tmp_path):
    """The largest --max-ind-range the CLI accepts is the identity on 32-bit hashes."""
    prep(kaggle_file, tmp_path / "none", shard_rows=700)
    meta = prep(kaggle_file, tmp_path / "full", shard_rows=700, max_ind_range=2**32)
    assert_same_dataset(tmp_path / "none", tmp_path / "full")
    assert meta.options["max_ind_range"] == 2**32


def test_second_run_in_one_process_maps_with_its_own_vocabularies(kaggle_file, tmp_path):
    """Replacing a dataset in the same process (same OUT, same options, other input) gives the
    same shards as a fresh run: nothing of the first run's vocabularies is reused."""
    other = tmp_path / "other.txt"
    other.write_text("\n".join(read_lines(TERABYTE)) + "\n")
    for raw in (kaggle_file, other):
        prep(raw, tmp_path / "out", shard_rows=500, overwrite=True)
    prep(other, tmp_path / "fresh", shard_rows=500, overwrite=True)
    assert_same_dataset(tmp_path / "fresh", tmp_path / "out")


def test_gzip_and_plain_give_identical_shards(kaggle_file, kaggle_gz, tmp_path):
    prep(kaggle_file, tmp_path / "a", shard_rows=300)
    prep(kaggle_gz, tmp_path / "b", shard_rows=300)
    assert_same_dataset(tmp_path / "a", tmp_path / "b")
    assert read_meta(tmp_path / "b").extra["sources"][0]["gzip"] is True


def test_output_independent_of_workers_and_pieces(kaggle_file, tmp_path):
    prep(kaggle_file, tmp_path / "a", shard_rows=256, workers=1)
    prep(kaggle_file, tmp_path / "b", shard_rows=256, workers=2, piece_bytes=20_000)
    assert_same_dataset(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("shard_rows, workers", [(1000, 2), (150, 1)])
def test_train_stream_is_the_seeded_buckets_each_permuted(kaggle_file, tmp_path, shard_rows, workers):
    """The train rows come exactly in the documented order (``shards.py``): bucket 0's rows
    (a seeded hash of the line) in their bucket's seeded permutation, then bucket 1's, ...;
    shards cut buckets both in small parts (read row by row) and in large ones (read whole)."""
    from data_prep.criteo_format import parse_block
    from data_prep.parse import SALT_BUCKET, row_hash
    from data_prep.shards import SALT_PERMUTE

    seed = 4
    prep(kaggle_file, tmp_path / "out", shard_rows=shard_rows, workers=workers, seed=seed, piece_bytes=100_000)
    b = parse_block(KAGGLE.read_bytes(), "k", 0)
    n_train = kaggle_split_sizes(len(b.label))[0]
    buckets = math.ceil(n_train / shard_rows)
    bucket = row_hash(0, np.arange(n_train), seed, SALT_BUCKET) % np.uint64(buckets)
    order = np.concatenate([rows[np.random.default_rng([seed, SALT_PERMUTE, u]).permutation(len(rows))]
                            for u in range(buckets) for rows in [np.flatnonzero(bucket == u)]])
    train = load_all(tmp_path / "out")["train"]
    np.testing.assert_array_equal(train["dense"], b.dense[order])
    np.testing.assert_array_equal(train["label"], b.label[order])
    cats = b.cats
    ids = np.stack([np.searchsorted(np.unique(cats[:, j]), cats[:, j]) for j in range(26)], axis=1)
    np.testing.assert_array_equal(train["sparse"], ids[order])


def test_training_rows_are_shuffled_by_seed(kaggle_file, tmp_path):
    prep(kaggle_file, tmp_path / "s0", shard_rows=400, seed=0)
    prep(kaggle_file, tmp_path / "s1", shard_rows=400, seed=1)
    a, b = load_all(tmp_path / "s0")["train"], load_all(tmp_path / "s1")["train"]
    from data_prep.criteo_format import parse_block

    file_dense = parse_block(KAGGLE.read_bytes(), "k", 0).dense[:1714]
    assert not np.array_equal(a["dense"], file_dense)
    assert not np.array_equal(a["dense"], b["dense"])
    # same multiset of rows
    srt = lambda d: d[np.lexsort(d.T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(srt(a["dense"]), srt(file_dense))
    # spread across shards: the first shard draws rows from the whole training range
    first = {r.tobytes() for r in a["dense"][:400]}
    pos = [i for i, r in enumerate(file_dense) if r.tobytes() in first]
    assert min(pos) < 200 and max(pos) > 1500


def test_sub_sampling_drops_train_negatives_only(kaggle_file, tmp_path):
    full = prep(kaggle_file, tmp_path / "full", shard_rows=1000)
    sub = prep(kaggle_file, tmp_path / "sub", shard_rows=1000, sub_sample_rate=0.5, seed=3)
    again = prep(kaggle_file, tmp_path / "again", shard_rows=1000, sub_sample_rate=0.5, seed=3)
    assert_same_dataset(tmp_path / "sub", tmp_path / "again")
    df, ds = load_all(tmp_path / "full"), load_all(tmp_path / "sub")
    assert sub.rows["test"] == full.rows["test"] and sub.rows["val"] == full.rows["val"]
    pos = int(df["train"]["label"].sum())
    assert int(ds["train"]["label"].sum()) == pos
    neg_full, neg_sub = full.rows["train"] - pos, sub.rows["train"] - pos
    assert abs(neg_sub - neg_full * 0.5) < 4 * math.sqrt(neg_full * 0.25)
    assert sub.extra["counts"]["rows_subsampled"] == neg_full - neg_sub
    assert again.rows == sub.rows


def test_terabyte_directory(tmp_path):
    lines = read_lines(TERABYTE)
    raw = tmp_path / "tb"
    raw.mkdir()
    (raw / "day_0").write_text("\n".join(lines[:400]) + "\n")
    with gzip.open(raw / "day_1.gz", "wt") as f:
        f.write("\n".join(lines[400:700]) + "\n")
    (raw / "day_2").write_text("\n".join(lines[700:]) + "\n")  # the last day: test / val
    meta = prep(raw, tmp_path / "out", shard_rows=250)
    assert meta.options["kind"] == "terabyte"
    assert meta.rows == {"train": 700, "test": 150, "val": 150}
    ref, cards = reference_ids(lines)
    assert meta.cardinalities == cards
    keep, ours = rows_in_file_order(tmp_path / "out", lines)
    assert_same_partition(ours, ref[keep])
    from data_prep.criteo_format import parse_block

    b = parse_block(TERABYTE.read_bytes(), "t", 0)
    data = load_all(tmp_path / "out")
    np.testing.assert_array_equal(data["test"]["dense"], b.dense[700:850])
    np.testing.assert_array_equal(data["val"]["dense"], b.dense[850:])
    assert [s["name"] for s in meta.extra["sources"]] == ["day_0", "day_1.gz", "day_2"]


def test_label_float32(kaggle_file, tmp_path):
    prep(kaggle_file, tmp_path / "o", label_dtype="float32", shard_rows=5000)
    d = load_all(tmp_path / "o")
    assert d["train"]["label"].dtype == np.float32 and set(np.unique(d["train"]["label"])) <= {0.0, 1.0}


def test_terabyte_detection_and_kaggle_dir(tmp_path, kaggle_file):
    d = tmp_path / "kdir"
    d.mkdir()
    shutil.copy(kaggle_file, d / "train.txt")
    meta = prep(d, tmp_path / "o", shard_rows=5000)
    assert meta.options["kind"] == "kaggle"
