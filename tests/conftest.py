"""Shared fixtures: small synthetic datasets written as real HDF5 shards."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dqrm_mpi.data.synthetic import PlantedClickModel, write_synthetic_dataset

SMALL_CARDINALITIES = (50, 40, 300, 200, 30, 24, 150, 60, 3, 250, 100, 300, 90,
                       27, 200, 280, 10, 100, 70, 4, 300, 18, 15, 160, 105, 90)
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """12,000 train / 2,000 val / 2,000 test rows; train in three shards of up to 5,000 rows."""
    out = tmp_path_factory.mktemp("small") / "ds"
    write_synthetic_dataset(out, {"train": 12_000, "val": 2_000, "test": 2_000},
                            PlantedClickModel(SMALL_CARDINALITIES, seed=7), shard_rows=5_000)
    return out


@pytest.fixture(scope="session")
def learnable_dataset(tmp_path_factory) -> Path:
    """Enough rows of a planted model with small tables for a tiny DLRM to learn in one epoch."""
    out = tmp_path_factory.mktemp("learn") / "ds"
    write_synthetic_dataset(out, {"train": 120_000, "val": 10_000, "test": 20_000},
                            PlantedClickModel(SMALL_CARDINALITIES, seed=11), shard_rows=40_000)
    return out


def mpi_env() -> dict[str, str]:
    """Environment for launching horovodrun/mpirun from a test (as root too), venv first on PATH."""
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    return env


def run_cmd(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output when it exits non-zero."""
    proc = subprocess.run(args, env=mpi_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                    f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def horovodrun(np_: int, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    exe = shutil.which("horovodrun", path=mpi_env()["PATH"])
    assert exe, "horovodrun not found: run `make install`"
    return run_cmd([exe, "-np", str(np_), "-H", f"localhost:{np_}", *args], timeout)
