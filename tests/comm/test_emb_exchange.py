"""--emb-exchange dense (whole table-sized gradients through allreduce, the paper's
uncompressed baseline) against the sparse exchange of touched rows, on simulated ranks."""
from __future__ import annotations

import copy

import pytest
import torch

from dqrm_mpi.comm.inprocess import run_ranks
from dqrm_mpi.comm.sync import GradientSynchronizer
from dqrm_mpi.compression import CompressionConfig
from dqrm_mpi.model import DLRM, model_config_from_preset

CARDS = (30, 20, 50, 40, 10, 24, 35, 25, 3, 45, 15, 50, 22, 27, 40, 48, 10, 30, 20, 4, 50, 18, 15, 33, 21, 19)


def _synchronized(cfg: CompressionConfig, size: int):
    """Every rank's gradients after one backward on its own batch and one synchronize, and its traffic."""
    torch.manual_seed(0)
    base = DLRM(model_config_from_preset("tiny", CARDS))
    models = [copy.deepcopy(base) for _ in range(size)]

    def rank_main(backend):
        model = models[backend.rank]
        sync = GradientSynchronizer(backend, model, model.embedding_parameter_names(), cfg)
        gen = torch.Generator().manual_seed(100 + backend.rank)
        sparse = torch.stack([torch.randint(0, c, (16,), generator=gen) for c in CARDS], dim=1)
        model(torch.rand(16, 13, generator=gen), sparse).sum().backward()
        backend.traffic.take()
        sync.synchronize()
        return {n: p.grad for n, p in model.named_parameters()}, backend.traffic.take()["comm_breakdown"]

    return run_ranks(size, rank_main), base


@pytest.mark.parametrize("size", [2, 3])
def test_dense_embedding_exchange_equals_the_sparse_one(size):
    sparse_runs, base = _synchronized(CompressionConfig(), size)
    dense_runs, _ = _synchronized(CompressionConfig(emb_exchange="dense"), size)
    emb = base.embedding_parameter_names()
    dim = base.config.embedding_dim
    for (s_grads, s_traffic), (d_grads, d_traffic) in zip(sparse_runs, dense_runs):
        for n, g in s_grads.items():
            assert d_grads[n].is_sparse == g.is_sparse == (n in emb), n
            torch.testing.assert_close(d_grads[n].to_dense(), g.to_dense(), rtol=1e-6, atol=1e-7)
            if n in emb:  # the same rows are touched
                assert torch.equal(d_grads[n].coalesce().indices(), g.coalesce().indices()), n
        assert set(s_traffic) == {"emb/allgather", "mlp/allreduce"}
        assert set(d_traffic) == {"emb/allreduce", "mlp/allreduce"}
        assert d_traffic["emb/allreduce"]["sent"] == 4 * sum(CARDS) * dim  # every row of every table
        assert d_traffic["emb/allreduce"]["sent"] > s_traffic["emb/allgather"]["sent"]
    for grads, _ in dense_runs[1:]:
        assert all(torch.equal(g.to_dense(), dense_runs[0][0][n].to_dense()) for n, g in grads.items())


def test_tables_above_the_limit_are_refused_with_the_sizes():
    dim = model_config_from_preset("tiny", CARDS).embedding_dim
    fits = 4 * sum(CARDS) * dim
    _synchronized(CompressionConfig(emb_exchange="dense", dense_emb_max_bytes=fits), 2)
    with pytest.raises(ValueError, match=rf"--emb-exchange dense would allreduce .* GiB .*\(26 tables, {sum(CARDS)} "
                                         rf"rows x {dim}\), above the limit.*--emb-exchange sparse"):
        _synchronized(CompressionConfig(emb_exchange="dense", dense_emb_max_bytes=fits - 1), 2)
