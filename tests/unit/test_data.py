import json
import time

import numpy as np
import pytest
import torch

from dqrm_mpi.data.reader import Prefetcher, SplitReader, TrainBatches, eval_batches
from dqrm_mpi.data.schema import SchemaError, list_shards, read_meta, transform_dense, write_meta, write_shard
from dqrm_mpi.data.synthetic import PlantedClickModel, planted_metrics


def test_meta_round_trip_and_version(tmp_path, small_dataset):
    meta = read_meta(small_dataset)
    assert meta.rows == {"train": 12000, "val": 2000, "test": 2000}
    assert len(meta.cardinalities) == 26 and 0.15 < meta.ctr < 0.35
    d = meta.to_dict()
    d["schema_version"] = 99
    (tmp_path / "meta.json").write_text(json.dumps(d))
    with pytest.raises(SchemaError, match="schema_version 99"):
        read_meta(tmp_path)


def test_missing_meta_names_the_path(tmp_path):
    with pytest.raises(SchemaError, match=str(tmp_path / "meta.json")):
        read_meta(tmp_path)


def test_write_shard_rejects_bad_arrays_and_leaves_nothing(tmp_path):
    with pytest.raises(SchemaError, match="dense must be float32"):
        write_shard(tmp_path / "train" / "part-00000.h5", np.zeros((3, 13)), np.zeros((3, 26), np.int32),
                    np.zeros(3, np.float32))
    assert list((tmp_path).rglob("*.h5")) == [] and list(tmp_path.rglob("*.tmp")) == []


def test_reader_spans_shards(small_dataset):
    reader = SplitReader(small_dataset, "train")
    assert [p.name for p in list_shards(small_dataset, "train")] == ["part-00000.h5", "part-00001.h5", "part-00002.h5"]
    whole = reader.read(4990, 5010)
    a, b = reader.read(4990, 5000), reader.read(5000, 5010)
    assert whole.dense.shape == (20, 13) and whole.sparse.dtype.is_floating_point is False
    assert np.array_equal(whole.sparse.numpy(), np.concatenate([a.sparse.numpy(), b.sparse.numpy()]))
    with pytest.raises(IndexError, match=r"rows \[0, 12001\) outside train of 12000 rows"):
        reader.read(0, 12001)


def test_reader_checks_row_count_against_meta(tmp_path, small_dataset):
    meta = read_meta(small_dataset)
    meta.rows["test"] = 1999
    import shutil
    shutil.copytree(small_dataset, tmp_path / "ds")
    write_meta(tmp_path / "ds", meta)
    with pytest.raises(SchemaError, match="shards hold 2000 rows, meta.json says 1999"):
        SplitReader(tmp_path / "ds", "test")


def test_two_ranks_read_exactly_the_one_rank_batches(small_dataset):
    reader = SplitReader(small_dataset, "train")
    one = TrainBatches(reader, 1000, rank=0, world=1, seed=3, prefetch=0)
    two = [TrainBatches(reader, 1000, rank=r, world=2, seed=3, prefetch=2) for r in range(2)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == 12
    for b1, b20, b21 in zip(one.epoch(0), two[0].epoch(0), two[1].epoch(0)):
        assert np.array_equal(b1.sparse.numpy(), np.concatenate([b20.sparse.numpy(), b21.sparse.numpy()]))
    # a new epoch visits batches in another order
    assert not np.array_equal(one.batch_starts(0), one.batch_starts(1))


def test_left_over_rows_change_with_the_epoch(small_dataset):
    reader = SplitReader(small_dataset, "train")
    batches = TrainBatches(reader, 5000, 0, 1, seed=0)
    assert batches.steps_per_epoch == 2 and batches.dropped_per_epoch == 2000
    covered = [set() for _ in range(6)]
    for e in range(6):
        for s in batches.batch_starts(e):
            covered[e].update(range(s, s + 5000))
    assert len({frozenset(c) for c in covered}) > 1


def test_batch_size_must_divide_across_ranks(small_dataset):
    with pytest.raises(ValueError, match="divisible by the number of ranks"):
        TrainBatches(SplitReader(small_dataset, "train"), 1001, 0, 2, seed=0)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shares_cover_every_row_once(small_dataset, world):
    reader = SplitReader(small_dataset, "test")
    labels = np.concatenate([b.label.numpy() for r in range(world) for b in eval_batches(reader, 300, r, world)])
    assert np.array_equal(labels, reader.read(0, reader.num_rows).label.numpy())


def test_split_in_memory_reads_what_the_shards_hold(small_dataset):
    disk, memory = SplitReader(small_dataset, "train"), SplitReader(small_dataset, "train", in_memory=True)
    assert len(disk.paths) > 1 and memory.rows is not None and disk.rows is None
    for start, stop in [(0, 10), (4990, 5010), (0, disk.num_rows), (7, 7), (disk.num_rows - 3, disk.num_rows)]:
        a, b = disk.read(start, stop), memory.read(start, stop)  # (4990, 5010) spans two shards
        for x, y in zip((a.dense, a.sparse, a.label), (b.dense, b.sparse, b.label)):
            assert x.dtype == y.dtype and torch.equal(x, y)
    batch = memory.read(0, 4)
    batch.dense.add_(1.0)
    batch.sparse.zero_()  # a batch is a copy: the rows kept do not change
    assert torch.equal(memory.read(0, 4).dense, disk.read(0, 4).dense)
    assert torch.equal(memory.read(0, 4).sparse, disk.read(0, 4).sparse)
    with pytest.raises(IndexError):
        memory.read(0, memory.num_rows + 1)


def test_prefetch_hands_the_producer_error_to_the_consumer():
    """The batches before the failure arrive, then the producer's own exception object."""
    error = OSError("part-00001.h5: unreadable")

    def items():
        yield 0
        yield 1
        raise error

    got = []
    with pytest.raises(OSError, match="part-00001.h5: unreadable") as e:
        for item in Prefetcher(items(), depth=2):
            got.append(item)
    assert got == [0, 1] and e.value is error


class _Counted:
    """Items 0, 1, ... n-1, counting how many the producer has taken."""

    def __init__(self, n: int) -> None:
        self.n, self.taken = n, 0

    def __iter__(self):
        for i in range(self.n):
            self.taken += 1
            yield i


def _settled(counted: _Counted, expected: int) -> int:
    """``counted.taken`` once it has reached ``expected`` (the producer thread catches up), or
    after a second without reaching it."""
    deadline = time.monotonic() + 1.0
    while counted.taken < expected and time.monotonic() < deadline:
        time.sleep(0.001)
    return counted.taken


def test_prefetcher_on_demand_reads_only_when_refilled():
    items = _Counted(10)
    with Prefetcher(iter(items), depth=2, refill_on_demand=True) as batches:
        assert _settled(items, 2) == 2  # reads ahead up to depth
        assert next(batches) == 0 and next(batches) == 1
        time.sleep(0.05)
        assert items.taken == 2  # taking items started no read
        batches.refill()
        assert _settled(items, 4) == 4  # one read per item taken
        time.sleep(0.05)
        assert items.taken == 4
        # never refilled again: an empty queue lets the producer go on, nothing waits forever
        assert list(batches) == list(range(2, 10))


def test_prefetcher_reads_ahead_eagerly_and_inline():
    items = _Counted(6)
    with Prefetcher(iter(items), depth=2) as batches:
        assert next(batches) == 0
        assert _settled(items, 3) == 3  # the item taken started the next read
        assert list(batches) == [1, 2, 3, 4, 5]
    items = _Counted(3)
    inline = Prefetcher(iter(items), depth=0)  # no thread: read when taken
    assert items.taken == 0 and next(inline) == 0 and items.taken == 1
    inline.refill()
    assert items.taken == 1 and list(inline) == [1, 2]


def test_prefetcher_close_stops_the_producer():
    items = _Counted(100)
    batches = Prefetcher(iter(items), depth=3, refill_on_demand=True)
    assert next(batches) == 0
    batches.close()
    assert not batches._thread.is_alive() and items.taken <= 4
    with pytest.raises(StopIteration):
        next(batches)


def test_prefetched_read_error_reaches_the_reader_loop(small_dataset):
    reader = SplitReader(small_dataset, "train")
    first = reader.read(0, 4000)
    reader.files[1].close()  # the second shard (rows 5000..9999) becomes unreadable
    got = []
    with pytest.raises(RuntimeError, match="Unable to"):  # h5py: reading from a closed file
        for batch in eval_batches(reader, 4000, 0, 1, prefetch=2):
            got.append(batch)
    assert len(got) == 1 and np.array_equal(got[0].sparse.numpy(), first.sparse.numpy())


def test_planted_model_is_deterministic_and_calibrated():
    m = PlantedClickModel(seed=5)
    a, b = m.sample(20_000, 3), PlantedClickModel(seed=5).sample(20_000, 3)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.label, b.label)
    assert abs(a.label.mean() - 0.256) < 0.02
    assert 0.75 < planted_metrics(a.label, a.prob)["auc"] < 0.9


def test_transform_dense_is_log_of_clamped_plus_one():
    x = transform_dense(np.array([[-3, 0, 9, 2**40]], dtype=np.int64))
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, np.float32([[0.0, 0.0, np.log(10.0), np.log(2.0**40 + 1)]]))
