"""Batch reader over a dataset's HDF5 shards.

Training: an epoch is cut into global batches of consecutive rows (training rows were
shuffled across shards by ``dqrm-prep``); the batch order and a start offset are drawn
from (seed, epoch), so every rank agrees without communication.  Rank r reads rows
[r*B/W, (r+1)*B/W) of each global batch of B rows, so every rank runs the same number
of steps and 1 rank with batch B sees exactly what W ranks see together.  The
``N mod B`` rows left over each epoch differ from epoch to epoch (and are reported).

Evaluation: each rank reads a disjoint contiguous share of the split, every row once.

Every batch is checked as it is read (labels 0/1, ids below their table's cardinality,
finite dense values; vectorised, a few passes over the batch), or every shard once when a
split is held in memory: bad data, an unreadable shard or a checksum mismatch raise
DataError naming the shard file, rows and column.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch

from .schema import DENSE, LABEL, SPARSE, DataError, SchemaError, find_bad_value, list_shards, read_meta


@dataclass
class Batch:
    """dense float32 [b, 13], sparse int64 [b, 26], label float32 [b]."""

    dense: torch.Tensor
    sparse: torch.Tensor
    label: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.dense.to(device, non_blocking=True), self.sparse.to(device, non_blocking=True),
                     self.label.to(device, non_blocking=True))


ROW_BYTES = 4 * 13 + 4 * 26 + 4  # a row in memory as stored: dense float32, sparse int32, label float32


class SplitReader:
    """The shards of one split seen as one array of rows; ``read(start, stop)`` spans shards.

    in_memory: every row is read (and checked) once, here, and ``read`` copies rows from memory
    (``ROW_BYTES`` a row); otherwise each ``read`` reads and checks its rows from the shards."""

    def __init__(self, root: str | Path, split: str, in_memory: bool = False) -> None:
        self.root, self.split = Path(root), split
        meta = read_meta(root)
        self.cardinalities = np.array(meta.cardinalities, dtype=np.int64)
        self.paths = list_shards(root, split)
        self.files: list[h5py.File] = []
        # (dense, sparse, label) of each shard, opened once: looking a dataset up by name costs
        # about 40 us, and a fresh Dataset object reads several times slower than a kept one
        self.datasets: list[tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset]] = []
        sizes = []
        try:
            for p in self.paths:
                self.files.append(self._open(p))
                self.datasets.append(tuple(self.files[-1][name] for name in (DENSE, SPARSE, LABEL)))
                sizes.append(int(self.datasets[-1][2].shape[0]))
        except DataError:
            self.close()
            raise
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.num_rows = int(self.starts[-1])
        expected = meta.rows.get(split, 0)
        if self.num_rows != expected:
            self.close()
            raise SchemaError(f"{self.root / split}: shards hold {self.num_rows} rows, meta.json says {expected}")
        self.rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # in memory: dense, sparse, label
        if in_memory:
            try:
                parts = [self._read_shard(s, 0, sizes[s]) for s in range(len(sizes))]
            except DataError:
                self.close()
                raise
            self.rows = (tuple(np.concatenate(x) for x in zip(*parts)) if parts else
                         (np.empty((0, 13), np.float32), np.empty((0, 26), np.int32), np.empty(0, np.float32)))

    def read(self, start: int, stop: int) -> Batch:
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"rows [{start}, {stop}) outside {self.split} of {self.num_rows} rows")
        if self.rows is not None:  # copies: nothing done to a batch reaches the rows kept
            dense, sparse, label = (x[start:stop] for x in self.rows)
            return Batch(torch.from_numpy(dense.copy()), torch.from_numpy(sparse.astype(np.int64)),
                         torch.from_numpy(label.astype(np.float32)))
        parts = []
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        for s in range(max(first, 0), len(self.files)):
            lo, hi = max(start, self.starts[s]), min(stop, self.starts[s + 1])
            if lo >= hi:
                if self.starts[s] >= stop:
                    break
                continue
            parts.append(self._read_shard(s, int(lo - self.starts[s]), int(hi - self.starts[s])))
        if not parts:
            return Batch(torch.empty(0, 13), torch.empty(0, 26, dtype=torch.int64), torch.empty(0))
        dense, sparse, label = (np.concatenate(x) if len(parts) > 1 else x[0] for x in zip(*parts))
        return Batch(torch.from_numpy(dense), torch.from_numpy(sparse.astype(np.int64, copy=False)),
                     torch.from_numpy(label.astype(np.float32, copy=False)))

    def close(self) -> None:
        for f in self.files:
            f.close()

    def _advice(self) -> str:
        return f"run `dqrm-prep verify {self.root}`, then re-make the dataset (dqrm-prep criteo ... --overwrite)"

    def _open(self, path: Path) -> h5py.File:
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise DataError(f"{path}: cannot open shard, the file is truncated or corrupt ({e}); "
                            f"{self._advice()}") from None
        missing = [k for k in (DENSE, SPARSE, LABEL) if k not in f]
        if missing:
            f.close()
            raise DataError(f"{path}: shard has no {', '.join(missing)} dataset; {self._advice()}")
        return f

    def _read_shard(self, s: int, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [a, b) of shard ``s``, checked (DataError names the shard, the rows and the column)."""
        path, arrays = self.paths[s], []
        for name, dataset in zip((DENSE, SPARSE, LABEL), self.datasets[s]):
            try:
                arrays.append(dataset[a:b])
            except OSError as e:  # a Fletcher-32 checksum mismatch, or an unreadable chunk
                raise DataError(f"{path}: rows [{a}, {b}) of {name!r} cannot be read, the file is corrupt "
                                f"(checksum mismatch or bad chunk: {e}); {self._advice()}") from None
        problem = find_bad_value(*arrays, self.cardinalities, first_row=a)
        if problem:
            raise DataError(f"{path}: rows [{a}, {b}): {problem}; {self._advice()}")
        return arrays[0], arrays[1], arrays[2]


_END = object()  # the producer's last item: the items are exhausted


class Prefetcher:
    """``items`` produced by a background thread, up to ``depth`` ahead, as an iterator (depth
    0: no thread, each item produced when taken); an exception raised by ``items`` reaches the
    consumer after the items before it.

    A read holds the GIL from start to end (h5py and NumPy keep it), while a training step's
    forward pass gives up and retakes the GIL at every torch op: a read that starts during
    forward stalls the step for its length (0.1-0.2 ms a batch, several percent of a batch-128
    step).  ``refill_on_demand=True``: taking an item does not start the next read; ``refill()``
    does (the training loop calls it right before ``backward()``, which runs for milliseconds
    without the GIL), and so does finding nothing ready (the consumer never waits on a read
    nobody started).  Otherwise each item taken starts the next read at once.  ``close()`` (or
    leaving a ``with`` block, or the end of the items) stops the thread.
    """

    def __init__(self, items: Iterator, depth: int, refill_on_demand: bool = False) -> None:
        self._items = iter(items)
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._credits = threading.Semaphore(depth)  # reads the producer may start
        self._owed = 0  # items taken whose read has not been started again
        self._on_demand = refill_on_demand
        self._closed = False
        self._thread = threading.Thread(target=self._produce, daemon=True) if depth > 0 else None
        if self._thread is not None:
            self._thread.start()

    def _produce(self) -> None:
        try:
            while True:
                self._credits.acquire()
                if self._closed:
                    return
                item = next(self._items, _END)
                self._ready.put(item)
                if item is _END:
                    return
        except BaseException as e:  # handed to the consumer
            self._ready.put(e)

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        if self._closed:
            raise StopIteration
        if self._thread is None:
            return next(self._items)
        if self._owed and self._ready.empty():  # nothing ready: the producer may go on now
            self.refill()
        item = self._ready.get()
        if item is _END or isinstance(item, BaseException):
            self.close()
            if item is _END:
                raise StopIteration
            raise item
        self._owed += 1
        if not self._on_demand:
            self.refill()
        return item

    def refill(self) -> None:
        """Let the producer read again: one item for each taken since the last refill."""
        for _ in range(self._owed):
            self._credits.release()
        self._owed = 0

    def close(self) -> None:
        """Stop the producer (after the read it is in, if any)."""
        if not self._closed:
            self._closed = True
            if self._thread is not None:
                self._credits.release()  # wakes a producer waiting for credit
                self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TrainBatches:
    """This rank's share of each global batch of an epoch (see module docstring)."""

    def __init__(self, reader: SplitReader, global_batch: int, rank: int, world: int, seed: int,
                 prefetch: int = 4) -> None:
        if global_batch % world:
            raise ValueError(f"--batch-size {global_batch} is the global batch; it must be divisible "
                             f"by the number of ranks ({world})")
        if reader.num_rows < global_batch:
            raise ValueError(f"{reader.root / reader.split}: {reader.num_rows} rows, fewer than one "
                             f"global batch of {global_batch}")
        self.reader, self.global_batch, self.rank, self.world = reader, global_batch, rank, world
        self.local_batch = global_batch // world
        self.seed, self.prefetch = seed, prefetch
        self.steps_per_epoch = reader.num_rows // global_batch
        self.dropped_per_epoch = reader.num_rows - self.steps_per_epoch * global_batch

    def batch_starts(self, epoch: int) -> np.ndarray:
        """First row of every global batch of ``epoch``, in visiting order (same on every rank)."""
        rng = np.random.default_rng([self.seed, epoch])
        shift = int(rng.integers(0, self.dropped_per_epoch + 1))
        return shift + rng.permutation(self.steps_per_epoch) * self.global_batch

    def epoch(self, epoch: int, start_step: int = 0, refill_on_demand: bool = False) -> Prefetcher:
        """The batches of ``epoch`` from step ``start_step`` on, read ahead (see ``Prefetcher``)."""
        offset = self.rank * self.local_batch
        starts = self.batch_starts(epoch)[start_step:]
        items = (self.reader.read(int(s) + offset, int(s) + offset + self.local_batch) for s in starts)
        return Prefetcher(items, self.prefetch, refill_on_demand)


def eval_batches(reader: SplitReader, batch: int, rank: int, world: int, prefetch: int = 2) -> Iterator[Batch]:
    """This rank's contiguous share of the split (every row read by exactly one rank)."""
    lo = reader.num_rows * rank // world
    hi = reader.num_rows * (rank + 1) // world
    items = (reader.read(s, min(s + batch, hi)) for s in range(lo, hi, batch))
    return Prefetcher(items, prefetch)
