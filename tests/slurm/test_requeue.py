"""launch/train.sbatch under a real slurmctld: USR1 before the time limit (sent here with
``scancel --signal=USR1 --batch``, as ``--signal=B:USR1@300`` does), the ranks stop at a
checkpoint and exit 75, the script requeues the job, and the requeued job resumes."""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from dqrm_mpi.data.synthetic import PlantedClickModel, write_synthetic_dataset

pytestmark = pytest.mark.slurm
TASKS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"]


def _rank_pids(out: Path) -> list[int]:
    """The dqrm-train processes (python running it) of the run writing to ``out``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (len(argv) > 2 and b"python" in Path(argv[0].decode()).name.encode() and argv[1].endswith(b"dqrm-train")
                and str(out).encode() in argv):
            pids.append(int(proc.name))
    return pids


def _usr1_pending(pid: int) -> bool:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    bit = 1 << (signal.SIGUSR1 - 1)
    return any(int(status[k].strip(), 16) & bit for k in ("SigPnd", "ShdPnd"))


def _steps_running(cluster, job: str) -> set[str]:
    """The job's steps (batch script included) that slurmd started and is not yet done with (its log)."""
    log = (cluster.dir / "log" / "slurmd.log").read_text(errors="replace")
    launched = set(re.findall(rf"launch task StepId=({job}\.\d+) ", log))
    if f"Launching batch job {job} " in log:
        launched.add(f"{job}.batch")
    return {step for step in launched if f"[{step}] done with job" not in log}


def _wait(what: str, predicate, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.1)
    return result


@pytest.mark.parametrize("launcher", ["mpirun", "srun"])
def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, launcher):
    data, run, output = tmp_path / "data", tmp_path / "run", tmp_path / "train.out"
    write_synthetic_dataset(data, {"train": 6_000, "test": 1_000}, PlantedClickModel((40,) * 26, seed=2),
                            shard_rows=6_000)
    job = slurm_cluster.start(TASKS, "launch/train.sbatch",
                              ["--data", str(data), "--out", str(run), "--preset", "tiny", "--batch-size", "128",
                               "--epochs", "10", "--max-steps", "40", "--eval-splits", "test"], output,
                              extra_env={"LAUNCHER": launcher})
    # Once both ranks are training, pause them so that the signal surely arrives mid-run (a
    # tiny model could otherwise finish its steps first); let them go once mpirun passed it on.
    ranks = _wait("2 training ranks", lambda: len(pids := _rank_pids(run)) == 2 and (run / "metrics.jsonl").exists()
                  and '"step"' in (run / "metrics.jsonl").read_text() and pids)
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)
    try:
        proc = slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
        assert proc.returncode == 0, proc.stderr
        _wait("SIGUSR1 at both ranks", lambda: all(_usr1_pending(pid) for pid in ranks), timeout=60)
    finally:
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
    slurm_cluster.wait_until(job, "requeue", lambda f: f.get("Restarts") == "1")
    # SLURM holds a requeued job for about 2 minutes.  Start it sooner, but only once slurmd
    # is done with the first run (a step J.0 launched while the old J.0 ends does not start)
    # and a few seconds after it revoked the first run's credential (at one-second
    # granularity: a job started within that second is refused as "already killed").
    _wait("the first run's steps to end", lambda: not _steps_running(slurm_cluster, job), timeout=120)
    slurm_cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"])
    end = slurm_cluster.wait(job, output)
    text = end.text
    assert (end.state, end.exit_code) == ("COMPLETED", "0:0"), f"{end}\n{slurm_cluster.logs()}"
    assert text.index("(restart 0)") < text.index(f"requeueing job {job}") < text.index("(restart 1)"), text
    assert "SIGUSR1: passed on to the ranks" in text and "exiting with code 75" in text
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < summary["resumed_from_step"] < 40 and summary["steps"] == 40
    stopped = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if r["event"] == "preempted"]
    assert [r["step"] for r in stopped] == [summary["resumed_from_step"]]
    assert text.rstrip().endswith("dqrm-train exited with code 0")
