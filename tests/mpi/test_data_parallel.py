"""Data-parallel invariants on real ranks reading real shards: replicas stay identical, and
evaluation shares cover every row (the exchange itself: test_compression.py and tests/comm)."""
from __future__ import annotations

import pytest
import torch

from dqrm_mpi.comm.sync import GradientSynchronizer
from dqrm_mpi.compression import CompressionConfig
from dqrm_mpi.data.reader import SplitReader, TrainBatches, eval_batches
from dqrm_mpi.data.synthetic import PlantedClickModel, write_synthetic_dataset
from dqrm_mpi.model import DLRM, model_config_from_preset
from dqrm_mpi.train.optimizers import OptimConfig, TrainingOptimizer

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


@pytest.mark.np3
def test_three_ranks_uneven_eval_shares_cover_every_row(backend, dataset):
    reader = SplitReader(dataset, "test")  # 700 rows: shares of 233, 233, 234
    labels = torch.cat([b.label for b in eval_batches(reader, 100, backend.rank, backend.size)])
    everyone = backend.allgather_array(labels, name="test.eval_labels")
    assert torch.equal(everyone, reader.read(0, reader.num_rows).label)
    assert backend.size == 3



@pytest.mark.parametrize("emb, mlp", [("rowwise-adagrad", "adam"), ("adagrad", "lamb")])
def test_optimizer_state_identical_on_every_rank_with_compressed_exchange(backend, dataset, emb, mlp):
    model = _model(seed=backend.rank)
    backend.broadcast_module(model)
    config = CompressionConfig(emb="int8", mlp="int8", error_feedback="mlp")
    sync = GradientSynchronizer(backend, model, model.embedding_parameter_names(), config)
    opt = TrainingOptimizer(model, model.embedding_parameter_names(),
                            OptimConfig(emb_optimizer=emb, mlp_optimizer=mlp, emb_lr=0.05, mlp_lr=0.01), 0.1, 600, 10)
    batches = TrainBatches(SplitReader(dataset, "train"), 600, backend.rank, backend.size, seed=1)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for step, batch in enumerate(batches.epoch(0)):
        opt.zero_grad()
        loss_fn(model(batch.dense, batch.sparse), batch.label).backward()
        sync.synchronize(step)
        opt.step(step)
    state = opt.state_dict()
    flat = torch.cat([_flat_params(model), state["emb"]["sum"].reshape(-1),
                      *(s["exp_avg_sq"].reshape(-1) for s in state["mlp"]["state"].values())])
    everyone = backend.allgather_array(flat.unsqueeze(0), name=f"test.optim_state.{emb}")
    for r in range(1, backend.size):
        assert torch.equal(everyone[0], everyone[r]), f"rank {r}'s parameters or optimizer state differ from rank 0's"
    assert state["emb"]["sum"].any()
