"""A few SGD steps of a tiny DLRM through ``GradientSynchronizer``, overlapped or not: the
run behind the bit-identity tests on simulated ranks (test_overlap.py) and real ranks
(tests/mpi/test_overlap_mpi.py).  Every rank trains on its own batches."""
from __future__ import annotations

from dataclasses import replace

import torch

from dqrm_mpi.comm.collectives import Collectives
from dqrm_mpi.comm.sync import GradientSynchronizer
from dqrm_mpi.compression import CompressionConfig
from dqrm_mpi.model import DLRM, model_config_from_preset

CARDS = (30, 20, 50, 40, 10, 24, 35, 25, 3, 45, 15, 50, 22, 27, 40, 48, 10, 30, 20, 4, 50, 18, 15, 33, 21, 19)
# (emb, mlp) compressors with error feedback on both: what overlap must reproduce bit for bit
CASES = [("int8", "none"), ("int8", "int8"), ("int8", "int4"), ("none", "fp16")]


def _batch(rank: int, step: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)  # different data on every rank
    dense = torch.rand(n, 13, generator=gen)
    sparse = torch.stack([torch.randint(0, c, (n,), generator=gen) for c in CARDS], dim=1)
    return dense, sparse, torch.randint(0, 2, (n,), generator=gen).float()


def tiny_model() -> DLRM:
    """The seeded tiny DLRM (simulated ranks share torch's global generator: make it once and
    give each rank a deep copy)."""
    torch.manual_seed(0)
    return DLRM(model_config_from_preset("tiny", CARDS))


def train(backend: Collectives, model: DLRM, emb: str, mlp: str, overlap: bool, steps: int = 3,
          bucket_bytes: int = 2048) -> tuple[list[torch.Tensor], list[list[tuple[str, bool]]], list[dict]]:
    """``model``'s parameters after ``steps`` steps, each step's (collective, started in backward)
    order and traffic.  ``bucket_bytes`` small enough that the tiny MLP makes several buckets."""
    config = replace(CompressionConfig(emb=emb, mlp=mlp, error_feedback="both", collective="allgather"),
                     overlap=overlap, bucket_bytes=bucket_bytes)
    sync = GradientSynchronizer(backend, model, model.embedding_parameter_names(), config)
    assert sync.overlap == overlap
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    orders, traffic = [], []
    backend.traffic.take()
    for step in range(steps):
        dense, sparse, label = _batch(backend.rank, step)
        opt.zero_grad(set_to_none=True)
        sync.begin_step()
        loss_fn(model(dense, sparse), label).backward()
        sync.synchronize(step)
        opt.step()
        orders.append(sync.last_start_order)
        traffic.append(backend.traffic.take())
    return [p.detach().clone() for p in model.parameters()], orders, traffic
