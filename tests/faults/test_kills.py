"""SIGKILL of a rank other than 0 in mid-run: the job ends soon after, naming the rank, and
``--out`` resumes from its last checkpoint.  SIGINT of ``dqrm-repro run``: a re-run redoes the
interrupted step only, and no cell is filled from it meanwhile."""
from __future__ import annotations

import csv
import json
import os
import signal
import time

from dqrm_mpi.train.checkpoint_file import read_checkpoint
from dqrm_mpi.train.run_dir import read_metrics
from dqrm_mpi.train.watchdog import HEARTBEAT_DIR

from ..conftest import VENV_BIN, run_cmd
from .conftest import on_ranks, process_gone, start, train_args

REPRO = str(VENV_BIN / "dqrm-repro")


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
        assert process_gone(rank0, time.monotonic() + 60), "rank 0 outlived the job"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    saved = read_checkpoint(out / "checkpoint.pt")["step"]
    run_cmd(on_ranks(2, train_args(small_dataset, out, "--epochs", "1000", "--max-steps", str(saved + 2),
                                   "--resume")))
    assert read_checkpoint(out / "checkpoint.pt")["step"] == saved + 2
    assert [r["step"] for r in read_metrics(out) if r["event"] == "step"] == list(range(1, saved + 3))


def test_sigint_of_repro_run_then_a_rerun_redoes_only_the_interrupted_step(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while `dqrm-repro run smoke
    --only T2` trains its second model; a re-run skips the finished steps and redoes that one."""
    out, log = tmp_path / "repro", tmp_path / "repro.log"
    args = [REPRO, "run", "smoke", "--out", str(out), "--only", "T2"]
    job = start(args, log)
    try:
        while not (out / "runs" / "dqrm4" / "metrics.jsonl").exists() and job.poll() is None:
            time.sleep(0.05)
        assert job.poll() is None, log.read_text()[-3000:]
        os.killpg(job.pid, signal.SIGINT)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    text = log.read_text()
    assert job.returncode == 130, text[-3000:]
    assert "dqrm-repro: interrupted during step train:dqrm4 (its log: runs/dqrm4/train.log); nothing of it is " \
           "used" in text and "Traceback" not in text, text[-3000:]
    report = run_cmd([REPRO, "report", str(out)])
    assert "wrote" in report.stdout
    with open(out / "tables" / "cells.csv") as f:
        cells = list(csv.DictReader(f))
    assert cells and not [c for c in cells if "dqrm4" in c["runs"] and c["status"] == "ok"]
    assert [c for c in cells if c["runs"] == "fp32" and c["status"] == "ok"]
    rerun = run_cmd(args, timeout=900).stdout
    skipped = [line.split(":")[0] for line in rerun.splitlines() if line.endswith("finished before, skipped")]
    assert len(skipped) == 10 and "train:dqrm4: done in" in rerun, rerun[-3000:]
    with open(out / "tables" / "cells.csv") as f:
        assert [c for c in csv.DictReader(f) if "dqrm4" in c["runs"] and c["status"] == "ok"]
