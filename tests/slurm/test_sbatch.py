"""launch/prep.sbatch and launch/train.sbatch submitted to a real slurmctld (2 tasks on one node)."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm
TASKS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"]
NODE = socket.gethostname().split(".")[0]


@pytest.fixture(scope="module")
def raw_file(slurm_cluster, tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw") / "train.txt"
    proc = slurm_cluster.run(["dqrm-prep", "synth", str(raw), "--rows", "12000", "--preset", "tiny", "--seed", "3"])
    assert proc.returncode == 0, proc.stderr
    return raw


def _prep(cluster, raw: Path, out: Path, launcher: str) -> str:
    text = cluster.sbatch(TASKS, "launch/prep.sbatch", [str(raw), str(out), "--shard-rows", "4000"],
                          out.parent / f"prep-{launcher}.out", extra_env={"LAUNCHER": launcher})
    assert f"dqrm-prep criteo, 2 ranks on {NODE}:2 via {launcher}, 1 workers each" in text
    return text


@pytest.fixture(scope="module")
def dataset(slurm_cluster, raw_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "data"
    text = _prep(slurm_cluster, raw_file, out, "mpirun")
    assert f"{out}: " in text and "rows from 12,000 lines" in text
    return out


def test_slurm_allocation_expands_tasks_per_node(slurm_cluster):
    """HOSTS/NP come from SLURM_TASKS_PER_NODE's run-length form, node by node."""
    script = 'source launch/common.sh; slurm_allocation && echo "$HOSTS $NP"'
    proc = slurm_cluster.run(["bash", "-c", script], extra_env={
        "SLURM_JOB_NODELIST": "n[1-3],gpu07", "SLURM_TASKS_PER_NODE": "2(x3),1"})
    assert proc.stdout.strip() == "n1:2,n2:2,n3:2,gpu07:1 7", proc.stderr
    proc = slurm_cluster.run(["bash", "-c", script], extra_env={
        "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2(x2)"})
    assert proc.returncode == 1 and "counts 2 nodes" in proc.stderr and "n[1-3]' 3" in proc.stderr


def test_prep_sbatch_mpirun_writes_the_dataset(dataset):
    meta = json.loads((dataset / "meta.json").read_text())
    assert sum(meta["rows"].values()) == 12_000
    assert len(list((dataset / "train").glob("*.h5"))) == -(-meta["rows"]["train"] // 4000)


def test_prep_sbatch_srun_ranks_share_the_work(slurm_cluster, raw_file, dataset, tmp_path):
    """srun --mpi=pmix sets no OMPI_*/PMIX_SIZE before MPI starts: prep must still see 2 ranks
    (each alone would collide on the output and fail) and make the same dataset as mpirun."""
    out = tmp_path / "data"
    _prep(slurm_cluster, raw_file, out, "srun")
    assert json.loads((out / "meta.json").read_text())["rows"] == json.loads((dataset / "meta.json").read_text())["rows"]


@pytest.mark.parametrize("launcher", ["mpirun", "srun"])
def test_train_sbatch_two_ranks(slurm_cluster, dataset, tmp_path, launcher):
    run = tmp_path / "run"
    output = tmp_path / "train.out"
    text = slurm_cluster.sbatch(TASKS, "launch/train.sbatch",
                                ["--data", str(dataset), "--out", str(run), "--preset", "tiny",
                                 "--batch-size", "128", "--max-steps", "12", "--eval-every", "0"], output,
                                extra_env={"LAUNCHER": launcher})
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 12
    assert (run / "checkpoint.pt").is_file()
    # the job file as a user reads it: what ran where, the trainer's summary, how it ended
    assert f"(restart 0): 2 ranks on {NODE}:2 via {launcher}, cpus per task 1" in text
    assert "== dqrm-train: 12 steps on 2 rank(s)" in text
    assert text.rstrip().endswith("dqrm-train exited with code 0")


def test_train_sbatch_failure_reaches_the_job_state(slurm_cluster, tmp_path):
    """A bad option fails the job (state FAILED, the trainer's exit code) with the trainer's message."""
    end = slurm_cluster.submit(TASKS, "launch/train.sbatch",
                               ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")],
                               tmp_path / "bad.out")
    assert end.state == "FAILED" and end.exit_code != "0:0"
    assert "--data" in end.text and "does not exist" in end.text
    assert f"dqrm-train exited with code {end.exit_code.split(':')[0]}" in end.text
