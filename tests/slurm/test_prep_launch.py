"""How dqrm-prep tells that a launcher started it with others (no cluster needed)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.executor import launched_world_size

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("env, expected", [
    ({}, (1, None)),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, (4, "OMPI_COMM_WORLD_SIZE")),
    ({"PMI_SIZE": "3"}, (3, "PMI_SIZE")),
    ({"PMIX_SIZE": "2", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "1"}, (2, "PMIX_SIZE")),
    # srun --mpi=pmix: SLURM's PMIx plugin sets PMIX_RANK but no size
    ({"PMIX_RANK": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"},
     (2, "SLURM_STEP_NUM_TASKS")),
    # a batch script's own shell: the allocation's SLURM_NTASKS, but one process
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_ID": "12"}, (1, None)),
    ({"SLURM_STEP_NUM_TASKS": "2"}, (1, None)),
])
def test_launched_world_size(env, expected):
    assert launched_world_size(env) == expected


def test_prep_refuses_ranks_that_mpi_does_not_join(tmp_path):
    """srun started 2 tasks but MPI forms a world of 1: refuse before writing anything."""
    raw = tmp_path / "raw.txt"
    raw.write_text("")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMI", "SLURM_"))}
    env.update(SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p))
    out = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-m", "data_prep.cli", "criteo", str(raw), str(out), "--workers", "1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "SLURM_STEP_NUM_TASKS=2: 2 processes were launched together, but MPI sees a world of 1" in proc.stderr
    assert "srun --mpi=pmix" in proc.stderr
    assert not out.exists()
