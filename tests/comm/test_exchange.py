"""The real gradient exchanges (DenseExchange, SparseExchange, GradientSynchronizer) on
2 and 3 simulated ranks: the result is the dense average of every rank's gradient within
the codec's error, identical on every rank, and the logged bytes are the analytic payload."""
from __future__ import annotations

import copy

import pytest
import torch

from dqrm_mpi.comm.inprocess import run_ranks
from dqrm_mpi.comm.sync import DenseExchange, GradientSynchronizer, SparseExchange
from dqrm_mpi.compression import ALLGATHER, ALLREDUCE, CompressionConfig, get_compressor
from dqrm_mpi.model import DLRM, model_config_from_preset

BITS = {"none": 32, "fp16": 16, "int16": 16, "int8": 8, "int4": 4}
QMAX = {"int16": 32767, "int8": 127, "int4": 7}
# widths repeat and change, so the scale groups form several layout blocks
SHAPES = {"bottom.0.weight": (12, 13), "bottom.0.bias": (12,), "bottom.1.weight": (4, 12), "bottom.1.bias": (4,),
          "top.0.weight": (6, 10), "top.0.bias": (6,), "top.1.weight": (1, 6), "top.1.bias": (1,)}


def _dense_grads(rank: int, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return {n: torch.randn(s, generator=gen) * (0.1 + i) for i, (n, s) in enumerate(SHAPES.items())}


def _bound(name: str, peak: float, two_phase: bool) -> float:
    """Worst error of the averaged gradient for gradients of magnitude <= peak."""
    if name == "none":
        return 1e-6 * (1 + peak)
    if name == "fp16":
        return 1e-3 * peak
    return (1.0 if two_phase else 0.5) * peak / QMAX[name] * 1.001  # two-phase re-quantizes once more


def _payload_nbytes(name: str, granularity: str) -> int:
    """From the shapes alone: data bits plus a float32 scale per group."""
    numel = sum(torch.Size(s).numel() for s in SHAPES.values())
    if name in ("none", "fp16"):
        return numel * BITS[name] // 8
    groups = sum(s[0] if len(s) >= 2 else 1 for s in SHAPES.values()) if granularity == "channel" else len(SHAPES)
    return (numel * BITS[name] + 7) // 8 + 4 * groups


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("two_phase", [False, True], ids=["allgather", "two-phase"])
@pytest.mark.parametrize("name", ["none", "fp16", "int16", "int8", "int4"])
def test_dense_exchange_is_the_average(name, two_phase, size):
    granularity = "tensor" if name == "int16" else "channel"

    def rank_main(backend):
        ex = DenseExchange(backend, SHAPES, get_compressor(name), granularity, two_phase=two_phase)
        backend.traffic.take()
        out = ex.exchange(_dense_grads(backend.rank, 0))
        return out, backend.traffic.take()["comm_breakdown"], ex

    results = run_ranks(size, rank_main)
    local = [_dense_grads(r, 0) for r in range(size)]
    for n in SHAPES:
        expected = sum(g[n] for g in local) / size
        peak = max(float(g[n].abs().max()) for g in local)
        got = results[0][0][n]
        assert float((got - expected).abs().max()) <= _bound(name, peak, two_phase and name.startswith("int")), n
        assert all(torch.equal(res[0][n], got) for res in results[1:]), f"{n}: ranks differ"

    payload = _payload_nbytes(name, granularity)
    for r, (_, traffic, ex) in enumerate(results):
        if name in ("none", "fp16"):  # declared allreduce: the payload itself is averaged
            assert traffic == {"mlp/allreduce": {"sent": payload, "received": payload, "seconds": pytest.approx(
                traffic["mlp/allreduce"]["seconds"]), "calls": 1}}
        elif not two_phase:
            assert traffic["mlp/allgather"]["sent"] == payload == ex.payload_nbytes()
            assert traffic["mlp/allgather"]["received"] == payload * (size - 1)
            assert set(traffic) == {"mlp/allgather"}
        else:  # chunk r: alltoall to its owner, the reduced chunks allgathered (+ 8 bytes of dim-0 count)
            chunks = [get_compressor(name).nbytes(c.hi - c.lo, c.seg_hi - c.seg_lo) for c in ex.chunks]
            assert payload <= sum(chunks) <= payload + size  # int4 rounds each chunk up to a byte
            assert traffic["mlp/alltoall"]["sent"] == sum(chunks) - chunks[r]
            assert traffic["mlp/alltoall"]["received"] == (size - 1) * chunks[r]
            assert traffic["mlp/allgather"]["sent"] == chunks[r] + 8
            assert traffic["mlp/allgather"]["received"] == sum(chunks) - chunks[r] + 8 * (size - 1)


@pytest.mark.parametrize("two_phase", [False, True], ids=["allgather", "two-phase"])
def test_dense_error_feedback_keeps_what_was_not_sent(two_phase):
    """Step 1 equals the exchange without feedback; from then on each rank's residual is its
    compensated gradient minus what it sent, and (allgather) the applied sum tracks the
    true sum up to the mean residual, while without feedback the gap grows."""
    steps = 30

    def rank_main(backend):
        runs = {}
        for ef in (True, False):
            ex = DenseExchange(backend, SHAPES, get_compressor("int4"), error_feedback=ef, two_phase=two_phase)
            outs = [ex.exchange(_dense_grads(backend.rank, s)) for s in range(steps)]
            runs[ef] = (outs, {n: r.clone() for n, r in ex.memory.residuals.items()} if ef else None)
        return runs

    results = run_ranks(2, rank_main)
    with_ef, residuals = results[0][True]
    without_ef = results[0][False][0]
    assert all(torch.equal(with_ef[0][n], without_ef[0][n]) for n in SHAPES)
    gap_ef = gap_none = 0.0
    for n in SHAPES:
        true_sum = sum(sum(_dense_grads(r, s)[n] for r in range(2)) / 2 for s in range(steps))
        gap_ef = max(gap_ef, float((sum(o[n] for o in with_ef) - true_sum).abs().max()))
        gap_none = max(gap_none, float((sum(o[n] for o in without_ef) - true_sum).abs().max()))
        assert torch.equal(results[1][True][0][-1][n], with_ef[-1][n])
        if not two_phase:
            mean_residual = sum(res[True][1][n] for res in results) / 2
            torch.testing.assert_close(sum(o[n] for o in with_ef), true_sum - mean_residual, rtol=0, atol=1e-4)
        peak = max(float(_dense_grads(r, s)[n].abs().max()) for r in range(2) for s in range(steps))
        assert float(residuals[n].abs().max()) <= 2 * peak / 7, n
    if not two_phase:
        assert gap_none > 2 * gap_ef


def test_the_declared_collective_decides_the_path():
    none = get_compressor("none")
    gathered = type("GatheredNone", (type(none),), {"collective": ALLGATHER})()

    def rank_main(backend):
        ex = DenseExchange(backend, SHAPES, gathered)
        backend.traffic.take()
        return ex.exchange(_dense_grads(backend.rank, 0)), backend.traffic.take()["comm_breakdown"]

    results = run_ranks(3, rank_main)
    for n in SHAPES:  # lossless, and summed in rank order like the reference
        torch.testing.assert_close(results[0][0][n], sum(_dense_grads(r, 0)[n] for r in range(3)) / 3,
                                   rtol=1e-6, atol=1e-7)
    assert set(results[0][1]) == {"mlp/allgather"}
    summed_ints = type("SummedInt8", (type(get_compressor("int8")),), {"collective": ALLREDUCE})()
    with pytest.raises(ValueError, match="declares allreduce"):
        run_ranks(2, lambda backend: DenseExchange(backend, SHAPES, summed_ints))


# -- embedding rows --------------------------------------------------------------------
ROWS, DIM = [7, 30, 3, 12], 4


def _sparse_grads(rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique sorted global ids (overlapping across ranks) and their rows; the last of three ranks has none."""
    if size == 3 and rank == 2:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, DIM)
    gen = torch.Generator().manual_seed(rank)
    ids = torch.unique(torch.randint(0, sum(ROWS), (25,), generator=gen))
    return ids, torch.randn(ids.numel(), DIM, generator=gen) * (1 + rank)


def _to_dense(ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.zeros(sum(ROWS), DIM).index_add_(0, ids, values)


def _sparse_payload(n: int, name: str, granularity: str) -> int:
    scales = 0 if name in ("none", "fp16") else 4 * {"table": len(ROWS), "row": n, "tensor": 1}[granularity]
    return 8 + 4 * n + (n * DIM * BITS[name] + 7) // 8 + scales  # count, int32 ids, values, scales


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("two_phase", [False, True], ids=["allgather", "two-phase"])
@pytest.mark.parametrize("name,granularity", [("none", "table"), ("fp16", "table"), ("int16", "tensor"),
                                              ("int8", "table"), ("int4", "row")])
def test_sparse_exchange_is_the_average(name, granularity, two_phase, size):
    names = [f"emb.{t}" for t in range(len(ROWS))]

    def rank_main(backend):
        ex = SparseExchange(backend, names, ROWS, DIM, get_compressor(name), granularity, two_phase=two_phase)
        backend.traffic.take()
        ids, values = ex.exchange(*_sparse_grads(backend.rank, size))
        return _to_dense(ids, values), backend.traffic.take()["comm_breakdown"]

    results = run_ranks(size, rank_main)
    local = [_sparse_grads(r, size) for r in range(size)]
    expected = sum(_to_dense(i, v) for i, v in local) / size
    peak = max(float(v.abs().max()) for _, v in local if v.numel())
    bound = _bound(name, peak, two_phase and name.startswith("int"))
    assert float((results[0][0] - expected).abs().max()) <= bound
    assert all(torch.equal(res[0], results[0][0]) for res in results[1:]), "ranks differ"
    if not two_phase:
        msgs = [_sparse_payload(i.numel(), name, granularity) for i, _ in local]
        for r, (_, traffic) in enumerate(results):
            assert traffic["emb/allgather"]["sent"] == msgs[r] + 8  # + the dim-0 count
            assert traffic["emb/allgather"]["received"] == sum(msgs) - msgs[r] + 8 * (size - 1)


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("cfg", [
    CompressionConfig(),
    CompressionConfig(emb="int8", mlp="int8", error_feedback="both", collective="allgather"),
    CompressionConfig(emb="int4", mlp="int4", collective="two-phase", emb_scale="row"),
    CompressionConfig(emb="fp16", mlp="int16", mlp_scale="tensor"),
], ids=["none", "int8-ef-both", "int4-two-phase", "fp16-int16"])
def test_synchronizer_averages_a_dlrm_and_keeps_embedding_gradients_sparse(cfg, size):
    cards = (30, 20, 50, 40, 10, 24, 35, 25, 3, 45, 15, 50, 22, 27, 40, 48, 10, 30, 20, 4, 50, 18, 15, 33, 21, 19)
    torch.manual_seed(0)
    models = [copy.deepcopy(DLRM(model_config_from_preset("tiny", cards))) for _ in range(size)]

    def rank_main(backend):
        model = models[backend.rank]
        sync = GradientSynchronizer(backend, model, model.embedding_parameter_names(), cfg)
        gen = torch.Generator().manual_seed(100 + backend.rank)  # different data on every rank
        sparse = torch.stack([torch.randint(0, c, (32,), generator=gen) for c in cards], dim=1)
        model(torch.rand(32, 13, generator=gen), sparse).sum().backward()
        local = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in model.named_parameters()}
        sync.synchronize()
        return local, {n: p.grad for n, p in model.named_parameters()}

    results = run_ranks(size, rank_main)
    emb = models[0].embedding_parameter_names()
    for n in results[0][0]:
        is_emb = n in emb
        codec = cfg.emb if is_emb else cfg.mlp
        two_phase = cfg.use_two_phase(size, codec) and codec.startswith("int")
        expected = sum(res[0][n] for res in results) / size
        peak = max(float(res[0][n].abs().max()) for res in results)
        got = results[0][1][n]
        assert got.is_sparse == is_emb, n
        got = got.to_dense() if is_emb else got
        assert float((got - expected).abs().max()) <= _bound(codec, peak, two_phase) + 1e-7, n
        for res in results[1:]:
            other = res[1][n].to_dense() if is_emb else res[1][n]
            assert torch.equal(other, got), f"{n}: ranks differ"
