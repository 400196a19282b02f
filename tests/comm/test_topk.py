"""The sparsifying MLP compressors in the real exchange, on 2 and 3 simulated ranks: the
average of what every rank sent, identical on every rank, the logged bytes, error
feedback over steps, and a rank with another ratio refused with a message."""
from __future__ import annotations

import copy

import pytest
import torch

from dqrm_mpi.comm.inprocess import run_ranks
from dqrm_mpi.comm.sync import DenseExchange, GradientSynchronizer
from dqrm_mpi.compression import CompressionConfig, get_compressor
from dqrm_mpi.compression.layout import Layout
from dqrm_mpi.model import DLRM, model_config_from_preset

SHAPES = {"bottom.0.weight": (40, 13), "bottom.0.bias": (40,), "top.0.weight": (30, 40), "top.0.bias": (30,),
          "top.1.weight": (1, 30), "top.1.bias": (1,)}
NUMELS = [torch.Size(s).numel() for s in SHAPES.values()]


def _grads(rank: int, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return {n: torch.randn(s, generator=gen) * (0.1 + i) for i, (n, s) in enumerate(SHAPES.items())}


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[n].reshape(-1) for n in SHAPES])


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("spec", ["topk:0.05", "topk:0.01+int8", "threshold:0.8+int4"])
def test_sparse_exchange_is_the_average_of_what_each_rank_sent(spec, size):
    def rank_main(backend):
        ex = DenseExchange(backend, SHAPES, get_compressor(spec), error_feedback=False)
        backend.traffic.take()
        out = ex.exchange(_grads(backend.rank, 0))
        return _flat(out), backend.traffic.take()["comm_breakdown"], ex.payload_nbytes()

    results = run_ranks(size, rank_main)
    layout = Layout.from_sizes(NUMELS)
    msgs = [get_compressor(spec).encode(_flat(_grads(r, 0)), layout) for r in range(size)]
    expected = sum(torch.zeros(sum(NUMELS)).index_put_((idx,), sent) for _, idx, sent in msgs) / size
    torch.testing.assert_close(results[0][0], expected, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(res[0], results[0][0]) for res in results[1:]), "ranks differ"
    sizes = [m.numel() for m, _, _ in msgs]
    for r, (_, traffic, payload) in enumerate(results):
        assert set(traffic) == {"mlp/allgather"}
        assert traffic["mlp/allgather"]["sent"] == sizes[r] + 8  # + the allgather's dim-0 count
        assert traffic["mlp/allgather"]["received"] == sum(sizes) - sizes[r] + 8 * (size - 1)
        if spec.startswith("topk"):
            assert payload == sizes[r]
    if spec.startswith("threshold"):
        assert len(set(sizes)) > 1  # variable size per rank


def test_error_feedback_sent_plus_residual_equals_the_true_sum_on_every_rank():
    steps, size = 25, 3

    def rank_main(backend):
        ex = DenseExchange(backend, SHAPES, get_compressor("topk:0.02+int8"), error_feedback=True)
        applied = torch.zeros(sum(NUMELS))
        for s in range(steps):
            applied += _flat(ex.exchange(_grads(backend.rank, s)))
        return applied, _flat({n: r.clone() for n, r in ex.memory.residuals.items()})

    results = run_ranks(size, rank_main)
    true = sum(_flat(_grads(r, s)) for r in range(size) for s in range(steps)) / size
    mean_residual = sum(res for _, res in results) / size
    torch.testing.assert_close(results[0][0] + mean_residual, true, rtol=0, atol=1e-4)
    assert all(torch.equal(applied, results[0][0]) for applied, _ in results[1:]), "ranks differ"
    assert float(mean_residual.abs().max()) > 0  # something was held back


def test_a_warmup_keeps_the_same_decaying_ratio_on_every_rank_and_error_feedback_exact():
    steps, size, spec = 12, 3, "topk:0.02+int8@warmup=8"
    layout = Layout.from_sizes(NUMELS)

    def rank_main(backend):
        ex = DenseExchange(backend, SHAPES, get_compressor(spec), error_feedback=True)
        applied, sent = torch.zeros(sum(NUMELS)), []
        for s in range(steps):
            backend.traffic.take()
            applied += _flat(ex.exchange(_grads(backend.rank, s)))
            sent.append(backend.traffic.take()["comm_breakdown"]["mlp/allgather"]["sent"])
        residual = _flat({n: r.clone() for n, r in ex.memory.residuals.items()})
        backend.traffic.take()
        ex.exchange(_grads(backend.rank, 0), step=5)  # a global step given (after --resume)
        resumed = backend.traffic.take()["comm_breakdown"]["mlp/allgather"]["sent"]
        return applied, residual, sent, resumed

    results = run_ranks(size, rank_main)
    c = get_compressor(spec)
    expected = [c.message_nbytes(c.kept(layout, s), len(NUMELS)) + 8 for s in range(steps)]
    assert all(res[2] == expected for res in results)  # the same schedule on every rank
    assert expected[0] > expected[4] > expected[8] == expected[11]  # decays, then stays at 2 %
    assert all(res[3] == expected[5] for res in results)
    true = sum(_flat(_grads(r, s)) for r in range(size) for s in range(steps)) / size
    mean_residual = sum(res[1] for res in results) / size
    torch.testing.assert_close(results[0][0] + mean_residual, true, rtol=0, atol=1e-4)
    assert all(torch.equal(res[0], results[0][0]) for res in results[1:]), "ranks differ"


def test_a_rank_with_another_ratio_is_refused_with_a_message():
    def rank_main(backend):
        spec = "topk:0.1+int8" if backend.rank == 1 else "topk:0.01+int8"
        return DenseExchange(backend, SHAPES, get_compressor(spec)).exchange(_grads(backend.rank, 0))

    # each rank refuses the other's payload; whichever raises first is reported
    with pytest.raises(ValueError, match=r"(rank 1 sent a topk:0.1\+int8 payload, this rank runs topk:0.01\+int8|"
                                         r"rank 0 sent a topk:0.01\+int8 payload, this rank runs topk:0.1\+int8) "
                                         r"at step 0: every rank must use the same --mlp-compress"):
        run_ranks(2, rank_main)


def test_dlrm_replicas_stay_identical_with_topk_int8_and_error_feedback():
    cards = (30, 20, 50, 40, 10, 24, 35, 25, 3, 45, 15, 50, 22, 27, 40, 48, 10, 30, 20, 4, 50, 18, 15, 33, 21, 19)
    torch.manual_seed(0)
    base = DLRM(model_config_from_preset("tiny", cards))
    models = [copy.deepcopy(base) for _ in range(3)]
    cfg = CompressionConfig(emb="int8", mlp="topk:0.01+int8", collective="two-phase")  # MLP still allgathers

    def rank_main(backend):
        model = models[backend.rank]
        sync = GradientSynchronizer(backend, model, model.embedding_parameter_names(), cfg)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(4):
            gen = torch.Generator().manual_seed(100 * step + backend.rank)
            sparse = torch.stack([torch.randint(0, c, (32,), generator=gen) for c in cards], dim=1)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.binary_cross_entropy_with_logits(
                model(torch.rand(32, 13, generator=gen), sparse), torch.randint(0, 2, (32,), generator=gen).float()
            ).backward()
            backend.traffic.take()
            sync.synchronize()
            kinds = set(backend.traffic.take()["comm_breakdown"])
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), kinds

    results = run_ranks(3, rank_main)
    assert all(torch.equal(res[0], results[0][0]) for res in results[1:]), "replicas differ"
    assert results[0][1] == {"mlp/allgather", "emb/alltoall", "emb/allgather"}
    assert not torch.equal(results[0][0], torch.cat([p.detach().reshape(-1) for p in base.parameters()]))
