"""SIGKILL of a rank other than 0 in mid-run: the job ends soon after, naming the rank, and
``--out`` resumes from its last checkpoint."""
from __future__ import annotations

import json
import os
import signal
import time

from dqrm_mpi.train.checkpoint_file import read_checkpoint
from dqrm_mpi.train.run_dir import read_metrics
from dqrm_mpi.train.watchdog import HEARTBEAT_DIR

from ..conftest import run_cmd
from .conftest import on_ranks, start, train_args


def _pid_of_rank_1_after_a_checkpoint(out, job, deadline: float) -> int:
    while time.monotonic() < deadline and job.poll() is None:
        try:
            beat = json.loads((out / HEARTBEAT_DIR / "rank-00001.json").read_text())
            if any(r["event"] == "checkpoint" for r in read_metrics(out)):
                return beat["pid"]
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"the run did not get to its first checkpoint (exit {job.poll()})")


def _gone(pid: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_sigkill_of_rank_1_ends_the_job_naming_it_and_out_resumes(small_dataset, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    # the stall watchdog only writes the heartbeats (the pids); its timeout is far off
    args = train_args(small_dataset, out, "--epochs", "1000", "--checkpoint-every", "5", "--stall-timeout", "600")
    job = start(on_ranks(2, args), log)
    try:
        rank1 = _pid_of_rank_1_after_a_checkpoint(out, job, time.monotonic() + 300)
        rank0 = json.loads((out / HEARTBEAT_DIR / "rank-00000.json").read_text())["pid"]
        os.kill(rank1, signal.SIGKILL)
        job.wait(timeout=120)  # a bound for a hung test, not a timing assertion
        text = log.read_text()
        assert job.returncode != 0, text[-3000:]
        assert "process rank 1" in text and "exited on signal 9 (Killed)" in text, text[-3000:]
        assert _gone(rank0, time.monotonic() + 60), "rank 0 outlived the job"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    saved = read_checkpoint(out / "checkpoint.pt")["step"]
    run_cmd(on_ranks(2, train_args(small_dataset, out, "--epochs", "1000", "--max-steps", str(saved + 2),
                                   "--resume")))
    assert read_checkpoint(out / "checkpoint.pt")["step"] == saved + 2
    assert [r["step"] for r in read_metrics(out) if r["event"] == "step"] == list(range(1, saved + 3))
