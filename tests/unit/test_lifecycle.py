"""Stop signals, the checkpoint schedule agreed by all ranks (simulated ranks), threads per rank."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from dqrm_mpi.comm.backend import default_threads, fair_share, usable_cores
from dqrm_mpi.comm.inprocess import run_ranks
from dqrm_mpi.data.reader import ROW_BYTES
from dqrm_mpi.data.schema import DatasetMeta
from dqrm_mpi.train.config import IN_MEMORY_AUTO_BYTES
from dqrm_mpi.train.loop import batches_read_ahead, splits_in_memory
from dqrm_mpi.train.preemption import AGREE_EVERY, CheckpointSchedule, StopSignals


def test_stop_signals_are_recorded_while_entered_and_restored_after():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as signals:
        assert signals.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == "SIGUSR1"  # the first one is kept
    assert signal.getsignal(signal.SIGUSR1) is before


def _decisions(backend, seen_at: dict[int, int], steps: int, every: int = 0, seconds: float = 0.0):
    """(step, checkpoint, stop) for every step where something is decided, on this rank;
    rank r 'receives' a signal before step ``seen_at[r]``."""
    signals = StopSignals()  # not entered: the ranks are threads, the signal is simulated
    schedule = CheckpointSchedule(backend, signals, every, seconds)
    out = []
    for step in range(1, steps + 1):
        if seen_at.get(backend.rank) == step:
            signals.received = "SIGUSR1"
        d = schedule.after_step(step)
        if d.checkpoint or d.stop:
            out.append((step, d.checkpoint, d.stop))
            schedule.saved()
            if d.stop:
                break
    return out


def test_a_signal_seen_by_one_rank_stops_every_rank_at_the_same_step():
    results = run_ranks(2, lambda b: _decisions(b, {1: 13}, 40, every=7))
    assert results[0] == results[1] == [(7, True, None), (14, True, None), (20, True, "SIGUSR1")]
    assert 20 % AGREE_EVERY == 0


def test_rank_zeros_clock_decides_time_based_checkpoints_for_all():
    # rank 0's interval has always passed (1 ns): every agreement checkpoints, on every rank
    results = run_ranks(3, lambda b: _decisions(b, {}, 35, seconds=1e-9 if b.rank == 0 else 1e9))
    assert results[0] == results[1] == results[2] == [(s, True, None) for s in (10, 20, 30)]
    # one rank agrees with itself after every step
    assert run_ranks(1, lambda b: _decisions(b, {}, 3, seconds=1e-9))[0] == [(s, True, None) for s in (1, 2, 3)]


@pytest.mark.parametrize("mine, others, expected", [
    ({0, 1, 2, 3}, [{0, 1, 2, 3}] * 2, 2),            # two ranks sharing 4 cores
    ({0, 1, 2, 3}, [{0, 1, 2, 3}] * 3, 1),            # 4 / 3 rounds down
    ({0, 1}, [{0, 1}, {2, 3}], 2),                    # bound ranks keep their own cores
    ({0, 1, 2, 3}, [{0, 1, 2, 3}, {0, 1, 2, 3}, {4, 5, 6, 7}, {4, 5, 6, 7}], 2),  # two ranks per socket
    ({0}, [{0}] * 4, 1),                              # never below one thread
])
def test_fair_share_of_cores(mine, others, expected):
    assert fair_share(mine, others) == expected


def test_default_threads_from_the_affinity_unless_omp_num_threads(monkeypatch):
    cores = len(usable_cores())
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert run_ranks(2, default_threads) == [max(1, cores // 2)] * 2
    assert run_ranks(1, default_threads)[0] == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert run_ranks(2, default_threads) == [3, 3]
    monkeypatch.setenv("OMP_NUM_THREADS", "x")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='x'"):
        run_ranks(1, default_threads)



@pytest.mark.parametrize("prefetch, threads, cores, device, expected", [
    (None, 2, 2, "cpu", 0),    # torch's threads fill the rank's cores: read in line
    (None, 1, 2, "cpu", 4),    # a core left over: a reading thread
    (None, 8, 8, "cuda", 4),   # a GPU computes
    (2, 2, 2, "cpu", 2),       # --prefetch as given
    (0, 1, 4, "cuda", 0),
])
def test_batches_read_ahead_by_default_only_with_a_spare_core(prefetch, threads, cores, device, expected):
    assert batches_read_ahead(prefetch, threads, cores, torch.device(device)) == expected
    if prefetch is None:  # batches copied from memory: nothing to read ahead
        assert batches_read_ahead(prefetch, threads, cores, torch.device(device), in_memory=True) == 0


def test_splits_in_memory_when_small_or_asked():
    meta = DatasetMeta(cardinalities=[10] * 26, rows={"train": 1000, "val": 100, "test": 100}, ctr=0.25)
    assert splits_in_memory("auto", meta, ("train", "test", "val"))
    assert not splits_in_memory("no", meta, ("train", "test"))
    big = DatasetMeta(cardinalities=[10] * 26, rows={"train": IN_MEMORY_AUTO_BYTES // ROW_BYTES, "test": 1}, ctr=0.25)
    assert splits_in_memory("auto", big, ("train",)) and not splits_in_memory("auto", big, ("train", "test"))
    assert splits_in_memory("yes", big, ("train", "test"))
