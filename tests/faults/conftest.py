"""Fault injection for the trainer: damaged copies of the small dataset, commands run to
completion without failing the test (their exit code and output are what is tested), and
processes started in their own session for signal tests."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import h5py
import pytest

from ..conftest import VENV_BIN, mpi_env

TRAIN = str(VENV_BIN / "dqrm-train")
HOROVODRUN = str(VENV_BIN / "horovodrun")


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [TRAIN, "--data", str(data), "--out", str(out), "--preset", "tiny", "--batch-size", "400",
            "--eval-splits", "test", *extra]


def on_ranks(np_: int, args: list[str]) -> list[str]:
    return [HOROVODRUN, "-np", str(np_), "-H", f"localhost:{np_}", *args]


def run(args: list[str], timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run to the end (in ``cwd``); the caller asserts on returncode, stdout and stderr."""
    return subprocess.run(args, env=mpi_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)


def start(args: list[str], log: Path) -> subprocess.Popen:
    """Start in a session of its own (signals sent to it reach nothing else), output to ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen(args, env=mpi_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture()
def dataset_copy(small_dataset, tmp_path) -> Path:
    """A private copy of the small dataset, to damage."""
    return Path(shutil.copytree(small_dataset, tmp_path / "ds"))


def write_rows(shard: Path, name: str, rows: slice, value) -> None:
    """Overwrite ``name`` (dense, sparse or label) of rows ``rows`` of an HDF5 shard in place."""
    with h5py.File(shard, "r+") as f:
        f[name][rows] = value


def process_gone(pid: int, deadline: float) -> bool:
    """Whether process ``pid`` has ended by ``deadline`` (time.monotonic()), polled every 0.2 s."""
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False
