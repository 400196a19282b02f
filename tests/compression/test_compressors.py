"""In-process tests of the compressors, the registry, the configuration and error feedback."""
from __future__ import annotations

import pytest
import torch

from dqrm_mpi.compression import (ALLGATHER, ALLREDUCE, Compressed, CompressionConfig, ResidualMemory,
                                  compressor_names, get_compressor)
from dqrm_mpi.compression.layout import Layout
from dqrm_mpi.qcore import pack

QUANTIZED = {"int16": 32767, "int8": 127, "int4": 7}


def test_registry_names_and_unknown_name():
    assert set(compressor_names()) >= {"none", "fp16", "int16", "int8", "int4"}
    with pytest.raises(ValueError, match="unknown compressor 'int3'.*int8"):
        get_compressor("int3")


@pytest.mark.parametrize("name", ["none", "fp16", "int16", "int8", "int4"])
def test_declared_collective_matches_whether_payloads_can_be_summed(name):
    """allreduce only for payloads whose sum decodes to the sum of the values; two ranks'
    quantized payloads (different scales) summed as they are decode to something else."""
    c = get_compressor(name)
    a, b = torch.linspace(-1, 1, 64), torch.linspace(-3, 2, 64) ** 3
    ca, cb = c.compress(a), c.compress(b)
    exact = c.decompress(ca) + c.decompress(cb)
    summed = c.decompress(Compressed(ca.data + cb.data, ca.scales, ca.numel))  # as a sum collective would
    sums_correctly = bool(torch.allclose(summed, exact, atol=1e-2))
    assert c.linear == sums_correctly
    assert c.collective == (ALLREDUCE if sums_correctly else ALLGATHER)


@pytest.mark.parametrize("name", ["none", "fp16", "int16", "int8", "int4"])
def test_lossless_is_declared_exactly_when_round_trips_are_exact(name):
    c = get_compressor(name)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2)) * 1e-3 + 1 / 3
    assert c.lossless == torch.equal(c.decompress(c.compress(x)), x)


@pytest.mark.parametrize("name", ["none", "fp16", "int16", "int8", "int4"])
@pytest.mark.parametrize("sizes", [[7] * 5 + [3, 1], [1001], [4, 0, 4]])
def test_buffer_forms_equal_compress_and_decompress(name, sizes):
    """encode_into / decode_many (what the exchanges run) produce the bytes and values of
    compress / to_bytes / decompress for the same scale groups."""
    c = get_compressor(name)
    layout = Layout.from_sizes(sizes)
    x = torch.randn(layout.numel, generator=torch.Generator().manual_seed(len(sizes))) * 3
    groups = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    ref = c.compress(x, groups, len(sizes))
    out = torch.empty(c.nbytes(x.numel(), layout.num_groups), dtype=torch.uint8)
    transmitted = torch.empty_like(x)
    c.encode_into(x.clone(), layout, out, transmitted, torch.empty_like(x))
    assert torch.equal(out, c.to_bytes(ref))
    expected = c.decompress(ref, groups)
    assert torch.equal(transmitted, expected)
    decoded = c.decode_many(torch.stack([out, out]), layout, torch.empty(2, x.numel()))
    assert torch.equal(decoded, expected.expand(2, -1))


@pytest.mark.parametrize("name", ["none", "fp16", "int16", "int8", "int4"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "row"])
def test_round_trip_with_bounded_error(name, granularity):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 11, generator=gen) * torch.logspace(-3, 1, 37).unsqueeze(1)  # rows of very different size
    flat = x.reshape(-1)
    if granularity == "tensor":
        groups, k = None, 1
    else:  # one scale per row (an output channel of a weight, or an embedding row)
        groups, k = torch.arange(37).repeat_interleave(11), 37
    c = get_compressor(name)
    packed = c.compress(flat, groups, k)
    wire = c.to_bytes(packed)
    assert wire.dtype == torch.uint8 and wire.numel() == c.nbytes(flat.numel(), k)
    y = c.decompress(c.from_bytes(wire, flat.numel(), k), groups).view_as(x)
    err = (y - x).abs()
    if name == "none":
        assert torch.equal(y, x)
    elif name == "fp16":
        assert bool((err <= 1e-3 * x.abs() + 6e-8).all())  # half precision; subnormals below 6e-5
    else:
        scale = (x.abs().amax() if groups is None else x.abs().amax(dim=1, keepdim=True)) / QUANTIZED[name]
        assert bool((err <= scale * 0.51 + 1e-12).all())  # half a quantum (plus float32 rounding)


def test_per_channel_scales_beat_one_scale_for_uneven_rows():
    x = torch.randn(16, 64) * torch.logspace(-4, 0, 16).unsqueeze(1)
    c = get_compressor("int4")
    per_tensor = c.decompress(c.compress(x.reshape(-1))).view_as(x)
    groups = torch.arange(16).repeat_interleave(64)
    per_row = c.decompress(c.compress(x.reshape(-1), groups, 16), groups).view_as(x)
    rel = lambda y: float(((y - x).norm(dim=1) / x.norm(dim=1)).mean())  # noqa: E731
    assert rel(per_row) < rel(per_tensor) / 2


def test_int4_payload_is_the_packed_int4_of_the_core():
    x = torch.tensor([-8.0, 7.0, 0.0, -1.0, 3.0])  # max |x| 8 -> scale 8/7: integers -7, 6, 0, -1, 3
    c = get_compressor("int4")
    packed = c.compress(x)
    q = torch.round(x / (8 / 7)).clamp(-8, 7).to(torch.int16)
    assert torch.equal(packed.data, pack(q.reshape(1, -1), 4).reshape(-1)) and packed.data.numel() == 3
    assert c.nbytes(1001, 1) == 501 + 4


def test_zero_and_empty_inputs():
    for name in compressor_names():
        c = get_compressor(name)
        for x in (torch.zeros(10), torch.empty(0)):
            assert torch.equal(c.decompress(c.compress(x)), x)


def test_error_feedback_residual_invariant_in_process():
    """Sum of transmitted == sum of gradients - residual; the residual stays below one quantum."""
    c = get_compressor("int4")
    mem = ResidualMemory()
    gen = torch.Generator().manual_seed(1)
    sent, true = torch.zeros(200), torch.zeros(200)
    for _ in range(100):
        g = torch.randn(200, generator=gen) * 0.01 + 0.003
        comp = mem.compensate("w", g)
        tx = c.decompress(c.compress(comp))
        mem.update("w", comp, tx)
        sent += tx
        true += g
        assert float(mem.residuals["w"].abs().max()) <= float(comp.abs().max()) / 7 / 2 + 1e-9
    torch.testing.assert_close(sent, true - mem.residuals["w"], atol=1e-5, rtol=0)


def test_row_error_feedback_touches_only_the_rows_sent():
    mem = ResidualMemory()
    rows = torch.tensor([1, 4])
    comp = mem.compensate_rows("t", (6, 2), rows, torch.ones(2, 2))
    mem.update_rows("t", rows, comp, torch.zeros(2, 2))
    assert mem.nbytes() == 6 * 2 * 4
    assert torch.equal(mem.residuals["t"][[0, 2, 3, 5]], torch.zeros(4, 2))
    assert torch.equal(mem.compensate_rows("t", (6, 2), rows, torch.ones(2, 2)), torch.full((2, 2), 2.0))


def test_config_validation_and_defaults():
    cfg = CompressionConfig()
    assert (cfg.emb, cfg.mlp, cfg.error_feedback, cfg.collective) == ("none", "none", "mlp", "auto")
    assert not cfg.mlp_error_feedback  # nothing to feed back for a lossless compressor
    assert CompressionConfig(mlp="int8").mlp_error_feedback
    assert CompressionConfig(emb="int8", error_feedback="both").emb_error_feedback
    assert not CompressionConfig(emb="int8").emb_error_feedback
    switch = cfg.two_phase_min_ranks  # the scaling model's answer (tests/unit/test_scaling_model.py)
    assert cfg.use_two_phase(switch, "int8") and not cfg.use_two_phase(switch - 1, "int8")
    # auto: FP32 / FP16 rows stay allgathered at any size (the scaling model never finds two-phase faster)
    assert not CompressionConfig().use_two_phase(64, "none") and not CompressionConfig().use_two_phase(64, "fp16")
    assert CompressionConfig(collective="two-phase").use_two_phase(2, "none")
    for bad in (dict(emb="int2"), dict(error_feedback="all"), dict(collective="allreduce"),
                dict(emb_scale="channel"), dict(mlp_scale="row")):
        with pytest.raises(ValueError):
            CompressionConfig(**bad)
    assert CompressionConfig(emb="int4").to_dict()["emb"] == "int4"


@pytest.mark.parametrize("name", ["int16", "int8", "int4"])
def test_integers_stay_in_range_without_a_clamp(name):
    """The exchanges' encoder does not clamp (|x| / scale rounds to at most qmax): on values at
    the group maximum, near float32's limits, subnormal and zero, its bytes equal those of a
    clamped reference, and every integer lies in [-qmax - 1, qmax]."""
    c, qmax = get_compressor(name), QUANTIZED[name]
    tiny = torch.finfo(torch.float32).tiny
    rows = [torch.linspace(-1, 1, 9) * m for m in (3.0e38, 1.0, 1 / 3, 7.0, 1e-30, tiny, tiny / 64, 0.0)]
    rows += [torch.tensor([1.0, -1.0, 0.5, -0.5, 1 / 3, 2 / 3, -0.999999, 0.0, 1e-7]) * m for m in (6.5, 1e-38)]
    x = torch.cat(rows)
    layout = Layout.from_sizes([9] * len(rows))
    out = torch.empty(c.nbytes(x.numel(), layout.num_groups), dtype=torch.uint8)
    c.encode_into(x, layout, out)
    scales = (x.view(-1, 9).abs().amax(dim=1) / qmax).clamp_min(tiny)
    q = torch.round(x.view(-1, 9) / scales.unsqueeze(1)).clamp(-qmax - 1, qmax).reshape(-1)
    assert torch.equal(out, c.to_bytes(Compressed(c._pack(q.to(torch.int16)), scales, x.numel())))
    assert int(q.abs().max()) == qmax  # every group's maximum reaches qmax


@pytest.fixture
def torch_threads():
    """Set torch's thread count for one test (``torch_threads(n)``), restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["int16", "int8", "int4"])
@pytest.mark.parametrize("ranks", [2, 3, 4])
@pytest.mark.parametrize("threads", [1, 2], ids=["unit-by-unit", "whole-vector"])
def test_decode_mean_is_the_rank_order_sum_of_the_decoded_payloads(name, ranks, threads, torch_threads):
    """decode_mean (the exchanges' reduce: unit by unit with one thread, whole-vector passes
    with more) equals every payload decoded, summed in rank order and divided by the rank
    count, bit for bit."""
    torch_threads(threads)
    c = get_compressor(name)
    layout = Layout.from_sizes([13] * 40 + [40, 2500] + [7000] * 20 + [7, 1])  # a block split into units
    gen = torch.Generator().manual_seed(ranks)
    bufs = torch.empty(ranks, c.nbytes(layout.numel, layout.num_groups), dtype=torch.uint8)
    for buf in bufs:
        c.encode_into(torch.randn(layout.numel, generator=gen) * torch.rand(layout.numel, generator=gen), layout, buf)
    deq = c.decode_many(bufs, layout, torch.empty(ranks, layout.numel))
    expected = deq[0].clone()
    for r in range(1, ranks):
        expected += deq[r]
    assert torch.equal(c.decode_mean(bufs, layout, ranks), expected / ranks)
