"""Tests in this folder run on real ranks: `horovodrun -np 2 python -m pytest tests/mpi`
(and `-np 3 ... -m np3`).  Every test runs the same collectives in the same order on
every rank and asserts on gathered results, so a failure fails everywhere instead of
deadlocking."""
from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if not any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "HOROVOD_SIZE")):
        skip = pytest.mark.skip(reason="needs real ranks: horovodrun -np 2 python -m pytest tests/mpi")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def backend():
    from dqrm_mpi.comm.backend import HorovodBackend

    b = HorovodBackend()
    assert b.size >= 2, "tests/mpi must run on 2 or more ranks"
    return b


@pytest.fixture(scope="session")
def shared_tmp(backend, tmp_path_factory):
    """A directory chosen by rank 0 and used by every rank (same machine)."""
    path = str(tmp_path_factory.mktemp("shared")) if backend.rank == 0 else None
    from pathlib import Path

    return Path(backend.broadcast_object(path, name="shared_tmp"))
