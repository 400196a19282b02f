"""Overlapped gradient exchange over Horovod on real ranks: the MLP buckets and the
embedding exchange start inside backward (Horovod's background thread moves them while
backward goes on), and the parameters after a few steps equal the exchange after backward
bit for bit; every rank starts the same collectives in the same order."""
from __future__ import annotations

import pytest
import torch

from tests.comm.overlap_run import CASES, tiny_model, train


@pytest.mark.parametrize("emb,mlp", CASES)
def test_overlap_is_bit_identical_to_the_exchange_after_backward(backend, emb, mlp):
    plain, _, _ = train(backend, tiny_model(), emb, mlp, overlap=False)
    overlapped, orders, _ = train(backend, tiny_model(), emb, mlp, overlap=True)
    same = all(torch.equal(a, b) for a, b in zip(plain, overlapped))
    in_backward = all(started for order in orders for _, started in order)
    verdicts = backend.allgather_object((same, in_backward, orders), name=f"t.overlap.{emb}.{mlp}")
    assert all(s for s, _, _ in verdicts), "overlapped parameters differ from the exchange after backward"
    assert all(b for _, b, _ in verdicts), "an exchange was not started inside backward"
    assert all(o == verdicts[0][2] for _, _, o in verdicts), "ranks started collectives in different orders"
    params = backend.allgather([torch.cat([p.reshape(-1) for p in overlapped])], f"t.overlap.p.{emb}.{mlp}", "test")[0]
    assert all(torch.equal(params[0], p) for p in params[1:])  # replicas identical
    backend.traffic.take()
