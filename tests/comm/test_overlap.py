"""Overlapped gradient exchange on 2 simulated ranks: buckets started from backward's hooks
give parameters bit-identical to the exchange after backward, every rank starts the same
collectives in the same order, and the step's exchange / waited seconds are recorded."""
from __future__ import annotations

import copy

import pytest
import torch

from dqrm_mpi.comm.inprocess import run_ranks
from dqrm_mpi.comm.sync import GradientSynchronizer, _buckets
from dqrm_mpi.compression import CompressionConfig

from .overlap_run import CASES, tiny_model, train


@pytest.mark.parametrize("emb,mlp", CASES)
def test_overlap_is_bit_identical_to_the_exchange_after_backward(emb, mlp):
    model = tiny_model()

    def rank_main(backend):
        return (train(backend, copy.deepcopy(model), emb, mlp, overlap=False),
                train(backend, copy.deepcopy(model), emb, mlp, overlap=True))

    for (plain, _, _), (overlapped, orders, traffic) in run_ranks(2, rank_main):
        assert all(torch.equal(a, b) for a, b in zip(plain, overlapped))
        for order in orders:  # everything started inside backward, the top MLP first
            assert all(in_backward for _, in_backward in order), order
            assert len(order) > 2 and order[0][0] == "grad.mlp.0"
        for t in traffic:
            assert 0 < t["waited_seconds"] and 0 < t["exchange_seconds"]


def test_every_rank_starts_the_same_collectives_in_the_same_order():
    model = tiny_model()
    results = run_ranks(2, lambda backend: train(backend, copy.deepcopy(model), "int8", "int8", overlap=True)[1])
    assert results[0] == results[1]
    names = [n for n, _ in results[0][0]]
    mlp = [n for n in names if n.startswith("grad.mlp.")]
    assert sorted(names) == sorted(set(names)) and "grad.emb" in names  # each once a step
    assert mlp == sorted(mlp, key=lambda n: int(n.rsplit(".", 1)[1]))  # buckets complete in backward's order


def test_buckets_are_whole_tensors_in_reverse_order():
    model = tiny_model()
    dense = [(n, p) for n, p in model.named_parameters() if n not in model.embedding_parameter_names()][::-1]
    for bucket_bytes in (0, 2048, 1 << 30):
        groups = _buckets(dense, bucket_bytes)
        assert [n for g in groups for n, _ in g] == [n for n, _ in dense]
        assert all(4 * sum(p.numel() for _, p in g) >= bucket_bytes for g in groups[:-1])
        assert all(len(g) == 1 or 4 * sum(p.numel() for _, p in g[:-1]) < bucket_bytes for g in groups)
    assert len(_buckets(dense, 0)) == len(dense) and len(_buckets(dense, 1 << 30)) == 1


@pytest.mark.parametrize("config,why", [
    (CompressionConfig(mlp="int8", collective="two-phase"), "two-phase"),
    (CompressionConfig(mlp="topk:0.1"), "sparse MLP compressor"),
    (CompressionConfig(emb_exchange="dense"), "dense embedding exchange"),
    (CompressionConfig(mlp="int8", overlap=False), "--no-overlap"),
])
def test_where_overlap_does_not_apply_the_exchange_waits_for_backward(config, why):
    model = tiny_model()

    def rank_main(backend):
        return GradientSynchronizer(backend, model, model.embedding_parameter_names(), config).overlap

    assert run_ranks(2, rank_main) == [False, False], why
    assert not run_ranks(1, lambda b: GradientSynchronizer(b, model, model.embedding_parameter_names()).overlap)[0]
