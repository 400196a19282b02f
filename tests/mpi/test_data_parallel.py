"""Data-parallel invariants on real ranks: gradient exchange and replica consistency."""
from __future__ import annotations

import pytest
import torch

from dqrm_mpi.comm.sync import GradientSynchronizer
from dqrm_mpi.data.reader import SplitReader, TrainBatches, eval_batches
from dqrm_mpi.data.synthetic import PlantedClickModel, write_synthetic_dataset
from dqrm_mpi.model import DLRM, model_config_from_preset

CARDS = (30, 20, 50, 40, 10, 24, 35, 25, 3, 45, 15, 50, 22, 27, 40, 48, 10, 30, 20, 4, 50, 18, 15, 33, 21, 19)


def _model(seed: int = 0) -> DLRM:
    torch.manual_seed(seed)
    return DLRM(model_config_from_preset("tiny", CARDS))


def _flat_params(model: DLRM) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture(scope="module")
def dataset(backend, shared_tmp):
    path = shared_tmp / "dp"
    if backend.rank == 0:
        write_synthetic_dataset(path, {"train": 6_000, "val": 500, "test": 700},
                                PlantedClickModel(CARDS, seed=2), shard_rows=2_500)
    backend.barrier()
    return path


def test_exchange_equals_dense_average_of_the_same_gradients(backend):
    model = _model()
    backend.broadcast_module(model)
    sync = GradientSynchronizer(backend, model, model.embedding_parameter_names())
    gen = torch.Generator().manual_seed(100 + backend.rank)  # different data on every rank
    dense = torch.rand(64, 13, generator=gen)
    sparse = torch.stack([torch.randint(0, c, (64,), generator=gen) for c in CARDS], dim=1)
    model(dense, sparse).sum().backward()
    local = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in model.named_parameters()}
    expected = dict(zip(local, backend.allreduce_average(list(local.values()), name="test.dense_avg", kind="test")))
    sync.synchronize()
    for name, p in model.named_parameters():
        got = p.grad.to_dense() if p.grad.is_sparse else p.grad
        torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-6, msg=name)
        if name in model.embedding_parameter_names():
            assert p.grad.is_sparse, f"{name}: the embedding gradient must stay sparse"


def test_replicas_identical_after_every_step(backend, dataset):
    model = _model(seed=backend.rank)  # deliberately different until the broadcast
    backend.broadcast_module(model)
    sync = GradientSynchronizer(backend, model, model.embedding_parameter_names())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = TrainBatches(SplitReader(dataset, "train"), 600, backend.rank, backend.size, seed=1)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for step, batch in enumerate(batches.epoch(0)):
        opt.zero_grad()
        loss_fn(model(batch.dense, batch.sparse), batch.label).backward()
        sync.synchronize()
        opt.step()
        params = backend.allgather_array(_flat_params(model).unsqueeze(0), name=f"test.params.{step}")
        for r in range(1, backend.size):
            assert torch.equal(params[0], params[r]), f"rank {r} differs from rank 0 after step {step}"
    assert step == 9


def test_traffic_counts_the_tensors_handed_to_horovod(backend):
    model = _model()
    sync = GradientSynchronizer(backend, model, model.embedding_parameter_names())
    gen = torch.Generator().manual_seed(7 + backend.rank)
    sparse = torch.stack([torch.randint(0, c, (16,), generator=gen) for c in CARDS], dim=1)
    model(torch.rand(16, 13, generator=gen), sparse).sum().backward()
    unique_rows = sum(len(torch.unique(sparse[:, t])) for t in range(26))
    backend.traffic.take()
    sync.synchronize()
    t = backend.traffic.take()
    dense_bytes = 4 * sum(p.numel() for n, p in model.named_parameters()
                          if n not in model.embedding_parameter_names())
    assert t["comm_breakdown"]["mlp/allreduce"]["sent"] == dense_bytes
    emb_sent = t["comm_breakdown"]["emb/allgather"]["sent"]
    # every unique row: an int32 id (the id space fits) and d float32 values, plus the message
    # header (8 bytes: the row count) and the small per-tensor dim-0 counts
    payload = unique_rows * (4 + 4 * model.config.embedding_dim) + 8
    assert payload <= emb_sent <= payload + 64


@pytest.mark.np3
def test_three_ranks_uneven_eval_shares_cover_every_row(backend, dataset):
    reader = SplitReader(dataset, "test")  # 700 rows: shares of 233, 233, 234
    labels = torch.cat([b.label for b in eval_batches(reader, 100, backend.rank, backend.size)])
    everyone = backend.allgather_array(labels, name="test.eval_labels")
    assert torch.equal(everyone, reader.read(0, reader.num_rows).label)
    assert backend.size == 3


@pytest.mark.np3
def test_three_ranks_replicas_identical(backend, dataset):
    test_replicas_identical_after_every_step(backend, dataset)
