"""TrainingLog on two simulated ranks: windows of --log-every steps cut at epoch ends, the
loss averaged over ALL ranks' batches, epoch lines, best metrics with their steps,
timestamps on every record, TensorBoard scalars and summary.json's fields."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dqrm_mpi.comm.inprocess import run_ranks
from dqrm_mpi.train.log_config import LogConfig, auto_log_every
from dqrm_mpi.train.run_dir import RunDir, read_metrics
from dqrm_mpi.train.step_timer import StepTimer
from dqrm_mpi.train.training_log import TrainingLog

PER_EPOCH, BATCH = 5, 8
EPOCH_OF = {step: (step - 1) // PER_EPOCH for step in range(1, 8)}  # epoch 0: steps 1-5, epoch 1: 6-7 (stopped)
EVALS = {5: (0.70, 0.60, 0.55), 7: (0.68, 0.65, 0.50)}  # step: accuracy, auc, log_loss


def _loss(rank: int, step: int) -> float:
    return 1.0 + rank + step / 10  # rank 1's batches differ from rank 0's


def test_windows_epochs_and_best_metrics(tmp_path):
    start = time.time()

    def rank_main(backend):
        run = RunDir(tmp_path / "run") if backend.rank == 0 else None
        config = LogConfig(progress="none", log_every=3, tensorboard=tmp_path / "tb")
        log = TrainingLog(backend, run, config, StepTimer(), batch_size=BATCH, steps_per_epoch=PER_EPOCH,
                          total_steps=10, start_step=0)
        for step, epoch in EPOCH_OF.items():
            backend.allgather([torch.zeros(backend.rank + 1, 4)], name=f"g{step}", kind="emb")
            log.after_step(step, epoch, _loss(backend.rank, step))
            if step in EVALS:
                log.end_epoch(step, epoch)
                accuracy, auc, log_loss = EVALS[step]
                result = {"accuracy": accuracy, "auc": auc, "log_loss": log_loss, "rows": 100, "ctr": 0.25}
                log.evaluated(step, epoch, "test", result if backend.rank == 0 else None)
        fields = log.summary_fields()
        log.close()
        if run:
            run.close()
        return fields

    fields, other = run_ranks(2, rank_main)
    records = read_metrics(tmp_path / "run")
    assert all(start <= r["time"] <= time.time() for r in records)
    steps = [r for r in records if r["event"] == "step"]
    windows = [(r["first_step"], r["step"]) for r in steps]
    assert windows == [(1, 3), (4, 5), (6, 6), (7, 7)]  # multiples of 3, and the ends of the epochs
    for r, (first, last) in zip(steps, windows):
        assert r["steps"] == last - first + 1 and r["epoch"] == EPOCH_OF[last]
        assert r["loss"] == pytest.approx(np.mean([_loss(k, s) for k in (0, 1) for s in range(first, last + 1)]))
        assert r["comm_bytes_sent"] == 16 + 8 and r["comm_breakdown"]["emb/allgather"]["calls"] == 1
        assert set(r["step_time"]) == {"data", "scale_pass", "forward_backward", "exchange", "optimizer", "other"}
        assert r["seconds"] == pytest.approx(sum(r["step_time"].values()))
    comm = [r for r in records if r["event"] == "comm"]
    assert [(r["first_step"], r["step"]) for r in comm] == windows
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [(r["epoch"], r["step"], r["steps"], r["complete"]) for r in epochs] == [(0, 5, 5, True), (1, 7, 2, False)]
    assert epochs[0]["loss"] == pytest.approx(np.mean([_loss(k, s) for k in (0, 1) for s in range(1, 6)]))
    assert fields["train_loss"]["per_epoch"] == [{k: v for k, v in e.items() if k not in ("event", "time")}
                                                 for e in epochs]
    assert fields["train_loss"]["last_window"]["step"] == 7
    best = fields["best"]["test"]
    assert best["accuracy"] == {"value": 0.70, "step": 5, "epoch": 0}
    assert best["auc"] == {"value": 0.65, "step": 7, "epoch": 1}
    assert best["log_loss"] == {"value": 0.50, "step": 7, "epoch": 1}
    assert fields["best_test"]["step"] == 7 and fields["final"]["test"]["accuracy"] == 0.68
    assert fields["steps_per_epoch"] == PER_EPOCH and fields["log_every"] == 3
    assert fields["samples_per_second"] == pytest.approx(7 * BATCH / fields["train_seconds"])
    assert fields["comm_per_rank"]["per_rank"]["1"]["sent"]["mean"] == 32 + 8
    assert other["final"] == {} and other["comm_per_rank"] is None  # rank 1 writes and keeps nothing

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert [s for s, _ in scalars["train/loss"]] == [3, 5, 6, 7]
    assert scalars["train/loss"][0][1] == pytest.approx(steps[0]["loss"])
    assert scalars["test/auc"] == [(5, pytest.approx(0.60)), (7, pytest.approx(0.65))]
    assert {"train/epoch_loss", "train/samples_per_second", "comm/bytes_sent_per_step",
            "comm/bytes_received_per_step", "comm/ms_per_step", "test/accuracy", "test/log_loss"} <= set(scalars)


def test_auto_window_keeps_a_kaggle_epoch_small():
    kaggle_steps = 45_840_617 * 6 // 7 // 128
    assert auto_log_every(kaggle_steps) == 1000 and kaggle_steps // 1000 < 400
    assert auto_log_every(30) == 1 and auto_log_every(5_000) == 50
    assert LogConfig(log_every=7).window_steps(kaggle_steps) == 7
    with pytest.raises(ValueError, match="log_every must be >= 1"):
        LogConfig(log_every=0)
