"""Faults on real ranks under horovodrun: non-finite steps, a failing rank, a stopped rank, a
signal to the launcher."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch

from dqrm_mpi.train.run_dir import read_metrics
from dqrm_mpi.train.watchdog import EXIT_STALLED, HEARTBEAT_DIR

from .conftest import on_ranks, process_gone, run, start, train_args, write_rows

ROW = 1234  # of train/part-00001.h5: in rank 1's share of step 30 of epoch 0 (seed 0, batch 400)


def _finite(checkpoint: Path) -> bool:
    state = torch.load(checkpoint)["model"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_nan_in_one_shard_stops_every_rank_before_the_update(dataset_copy, tmp_path):
    shard = dataset_copy / "train" / "part-00001.h5"
    write_rows(shard, "dense", slice(ROW, ROW + 1), float("nan"))
    out = tmp_path / "run"
    # read from the shards, as a split too large to hold in memory: the bad row is met in mid-run
    proc = run(on_ranks(2, train_args(dataset_copy, out, "--checkpoint-every", "1", "--data-in-memory", "no")))
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert str(shard) in proc.stdout + proc.stderr
    saved = torch.load(out / "checkpoint.pt")
    steps = [r["step"] for r in read_metrics(out) if r["event"] == "step"]
    assert saved["step"] == steps[-1] < 30, "the last checkpoint is the last finite step's"
    assert _finite(out / "checkpoint.pt")


def test_divergence_keeps_the_last_finite_checkpoint_and_names_lr(small_dataset, tmp_path):
    out = tmp_path / "run"
    proc = run(train_args(small_dataset, out, "--checkpoint-every", "1", "--lr", "3e38"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "step 2: NaN/inf in rank 0: loss" in proc.stderr and "stopped before the update" in proc.stderr
    assert "training diverged: lower --lr (now 3e+38)" in proc.stderr
    assert torch.load(out / "checkpoint.pt")["step"] == 1 and _finite(out / "checkpoint.pt")


def test_error_on_one_rank_is_stated_by_that_rank_with_its_shard(dataset_copy, tmp_path):
    shard = dataset_copy / "train" / "part-00001.h5"
    write_rows(shard, "sparse", slice(ROW, ROW + 1), 10**6)
    proc = run(on_ranks(2, train_args(dataset_copy, tmp_path / "run", "--data-in-memory", "no")))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert str(shard) in output and "Traceback" not in output, output[-3000:]


def test_bad_row_of_a_split_held_in_memory_is_named_before_the_first_step(dataset_copy, tmp_path):
    shard = dataset_copy / "train" / "part-00001.h5"
    write_rows(shard, "sparse", slice(ROW, ROW + 1), 10**6)
    out = tmp_path / "run"
    proc = run(train_args(dataset_copy, out, "--data-in-memory", "yes"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{shard}: rows [0, " in proc.stderr and f"row {ROW}: C1 = 1000000" in proc.stderr, proc.stderr[-3000:]
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint.pt").exists()  # no step was taken


def _heartbeats(out: Path, size: int, proc, deadline: float) -> list[dict]:
    """Every rank's heartbeat once each has written one and rank 0 has logged two steps."""
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            beats = [json.loads((out / HEARTBEAT_DIR / f"rank-{r:05d}.json").read_text()) for r in range(size)]
            if len([1 for r in read_metrics(out) if r["event"] == "step"]) >= 2:
                return beats
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"the run did not get going (exit {proc.poll()})")


def test_stopped_rank_ends_the_job_naming_it(small_dataset, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    job = start(on_ranks(2, train_args(small_dataset, out, "--epochs", "1000", "--stall-timeout", "12")), log)
    stopped = None
    try:
        beats = _heartbeats(out, 2, job, time.monotonic() + 300)
        stopped = beats[1]["pid"]
        os.kill(stopped, signal.SIGSTOP)
        job.wait(timeout=240)
        text = log.read_text()
        assert job.returncode == EXIT_STALLED, text[-3000:]
        assert "has waited" in text and "stalled: waited" in text
        assert f"rank 1 (host {beats[1]['host']}, pid {stopped})" in text and "no sign of life" in text
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        if stopped and not process_gone(stopped, time.monotonic() + 1):
            os.kill(stopped, signal.SIGKILL)


def test_sigterm_to_horovodrun_ends_every_rank(small_dataset, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    job = start(on_ranks(2, train_args(small_dataset, out, "--epochs", "1000")), log)
    beats = []
    try:
        beats = _heartbeats(out, 2, job, time.monotonic() + 300)
        job.send_signal(signal.SIGTERM)  # horovodrun's own process only: not its process group
        job.wait(timeout=60)
        deadline = time.monotonic() + 120
        assert all(process_gone(b["pid"], deadline) for b in beats), log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        for b in beats:
            if not process_gone(b["pid"], time.monotonic() + 0.1):
                os.kill(b["pid"], signal.SIGKILL)
