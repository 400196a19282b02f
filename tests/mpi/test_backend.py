"""The in-process ranks behave as Horovod does: the same collectives on real ranks and on
simulated ranks (threads, inside each real rank) return the same tensors, splits and byte
counts, so tests/comm's exchange tests speak for real ranks too."""
from __future__ import annotations

import pytest
import torch

from dqrm_mpi.comm.inprocess import run_ranks

from ..comm.test_inprocess import collectives_scenario


def _comparable(result: dict) -> dict:
    """Everything but the seconds."""
    traffic = {k: {f: v[f] for f in ("sent", "received", "calls")} for k, v in result["traffic"].items()}
    return {**result, "traffic": traffic}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_simulated_ranks_return_what_horovod_returns(backend):
    real = _comparable(collectives_scenario(backend))
    simulated = _comparable(run_ranks(backend.size, collectives_scenario)[backend.rank])
    verdicts = backend.allgather_object(_equal(real, simulated), name="t.backend_contract")
    assert all(verdicts), (real, simulated)


@pytest.mark.np3
def test_simulated_ranks_return_what_horovod_returns_3_ranks(backend):
    test_simulated_ranks_return_what_horovod_returns(backend)
