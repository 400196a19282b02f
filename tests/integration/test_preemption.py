"""SIGUSR1 to one rank of a horovodrun job: every rank stops at the same step, rank 0 writes
the checkpoint, every rank exits with 75, and ``--resume auto`` finishes the run with the
parameters of an uninterrupted one."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from dqrm_mpi.train.preemption import AGREE_EVERY, PREEMPTED_EXIT
from dqrm_mpi.train.run_dir import read_metrics

from ..conftest import VENV_BIN, horovodrun, mpi_env, run_cmd

TRAIN = str(VENV_BIN / "dqrm-train")
# Runs the command given after it as this rank's process, writing its pid and, once it has
# ended, its exit code to DIR/{pid,rc}.RANK; deaf to the SIGTERM with which mpirun ends the
# other ranks once one has exited non-zero (so the exit code is always written).
RANK_PROCESS = """
import os, signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
d, rank = sys.argv[1], os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("HOROVOD_RANK"))
p = subprocess.Popen(sys.argv[2:], preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
open(f"{d}/pid.{rank}", "w").write(str(p.pid))
rc = p.wait()
open(f"{d}/rc.{rank}", "w").write(str(rc))
sys.exit(rc)
"""


def _args(data, out, *extra):
    return [TRAIN, "--data", str(data), "--out", str(out), "--preset", "tiny", "--batch-size", "400",
            "--seed", "5", "--eval-splits", "test", "--emb-bits", "4", "--scale-period", "7", *extra]


def _wait_for(what, predicate, proc, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.1)


def _steps(out):
    try:
        return [r["step"] for r in read_metrics(out) if r["event"] == "step"]
    except (OSError, json.JSONDecodeError):  # not written yet, or a line being written
        return []


def test_usr1_to_one_rank_stops_all_and_resume_auto_completes(small_dataset, tmp_path):
    out, ranks = tmp_path / "preempted", tmp_path / "ranks"
    ranks.mkdir()
    job = subprocess.Popen([shutil.which("horovodrun", path=mpi_env()["PATH"]), "-np", "2", "-H", "localhost:2",
                            sys.executable, "-c", RANK_PROCESS, str(ranks),
                            *_args(small_dataset, out, "--epochs", "1000")],
                           env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for("rank 1's pid and step 3", lambda: (ranks / "pid.1").exists() and len(_steps(out)) >= 3, job)
        os.kill(int((ranks / "pid.1").read_text()), signal.SIGUSR1)
        text, _ = job.communicate(timeout=300)
    finally:
        job.kill()
    assert job.returncode == PREEMPTED_EXIT, text[-4000:]
    assert [(ranks / f"rc.{r}").read_text() for r in range(2)] == [str(PREEMPTED_EXIT)] * 2, text[-4000:]
    stopped = torch.load(out / "checkpoint.pt")["step"]
    assert stopped >= 3 and stopped % AGREE_EVERY == 0
    assert f"SIGUSR1: stopped at step {stopped}, checkpoint {out / 'checkpoint.pt'}" in text
    records = read_metrics(out)
    assert [(r["step"], r["signal"]) for r in records if r["event"] == "preempted"] == [(stopped, "SIGUSR1")]
    assert not (out / "summary.json").exists()

    # the requeued job: --resume auto continues.  The uninterrupted run (--resume auto on an
    # empty --out starts afresh) checkpoints by time too: rank 0's 1 ns interval has passed at
    # every agreement (every AGREE_EVERY steps), and the last step is always checkpointed.
    end = str(stopped + 7)
    horovodrun(2, _args(small_dataset, out, "--epochs", "1000", "--max-steps", end, "--resume", "auto"))
    horovodrun(2, _args(small_dataset, tmp_path / "whole", "--epochs", "1000", "--max-steps", end,
                        "--resume", "auto", "--checkpoint-minutes", "1e-9"))
    saved = [r["step"] for r in read_metrics(tmp_path / "whole") if r["event"] == "checkpoint"]
    assert saved == [*range(AGREE_EVERY, stopped + 1, AGREE_EVERY), stopped + 7]
    resumed, whole = (torch.load(p / "checkpoint.pt") for p in (out, tmp_path / "whole"))
    assert resumed["step"] == whole["step"] == stopped + 7
    for name, value in whole["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == stopped and summary["steps"] == stopped + 7


def test_resume_auto_starts_afresh_over_a_run_killed_before_its_first_checkpoint(small_dataset, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"event": "step", "step": 1}\n{"event": "step", "st')  # cut off by a kill
    run_cmd(_args(small_dataset, out, "--max-steps", "2", "--resume", "auto"))
    assert _steps(out) == [1, 2]
    run_cmd(_args(small_dataset, out, "--max-steps", "4", "--resume", "auto"))  # with a checkpoint: resumes
    assert _steps(out) == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 2
    proc = subprocess.run(_args(small_dataset, tmp_path / "none", "--resume"), env=mpi_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 1 and "nothing to resume; --resume auto starts afresh then" in proc.stderr

