"""The sparsifying compressors (topk, threshold) in process: which values they keep, ties,
the payload, error feedback and refusing a payload another compressor built."""
from __future__ import annotations

import math
import struct

import pytest
import torch

from dqrm_mpi.compression import CompressionConfig, ResidualMemory, get_compressor
from dqrm_mpi.compression.layout import Layout
from dqrm_mpi.compression.sparse import (HEADER, WARMUP_START, parse_spec, select_topk, select_topk_segments,
                                         warmup_ratio)
from dqrm_mpi.qcore import group_scales, pack_int4_into, qrange

SIZES = [600, 37, 5000, 1]  # the tensors of one flat vector


def _x(seed: int, n: int = sum(SIZES)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * torch.logspace(-3, 0, n)[torch.randperm(n, generator=gen)]


def _encode(c, x: torch.Tensor, layout: Layout, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(message, the dense vector the receivers decode)."""
    msg, idx, sent = c.encode(x, layout, step)
    assert bool((idx[1:] > idx[:-1]).all())
    return msg, torch.zeros_like(x).index_put_((idx,), sent)


def _reference_topk(a: torch.Tensor, k: int) -> set[int]:
    """The k largest, ties to the lowest index: sort by (-value, index)."""
    order = sorted(range(a.numel()), key=lambda i: (-float(a[i]), i))
    return set(order[:k])


@pytest.mark.parametrize("method", ["exact", "sample"])
@pytest.mark.parametrize("n,k", [(50, 1), (50, 7), (200_000, 20), (200_000, 2_000), (10, 10), (10, 12)])
def test_topk_keeps_exactly_the_k_largest(method, n, k):
    a = _x(n + k, n).abs()
    idx = select_topk(a, k, method, torch.Generator().manual_seed(0))
    assert idx.numel() == min(k, n) and bool((idx[1:] > idx[:-1]).all())  # ascending, no repeats
    if n <= 1000:
        assert set(idx.tolist()) == _reference_topk(a, k)
    else:  # every kept value >= every dropped one
        kept = torch.zeros(n, dtype=torch.bool)
        kept[idx] = True
        assert float(a[kept].min()) >= float(a[~kept].max())


@pytest.mark.parametrize("method", ["exact", "sample"])
def test_ties_at_the_kth_value_go_to_the_lowest_indices(method):
    a = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0, 0.5, 3.0])
    assert select_topk(a, 3, method).tolist() == [1, 3, 4]
    assert select_topk(a, 5, method).tolist() == [1, 2, 3, 4, 6]
    flat = torch.ones(100_000)  # all tied (sampling, then the candidates, meet the same rule)
    for k in (40, 1000):  # a k-th value from torch.topk, then from a sample
        assert select_topk(flat, k, method, torch.Generator().manual_seed(1)).tolist() == list(range(k))
    spiky = torch.zeros(100_000)
    spiky[[5, 70_000, 99_999]] = 2.0
    assert select_topk(spiky, 5, method, torch.Generator().manual_seed(1)).tolist() == [0, 1, 5, 70_000, 99_999]


def test_sample_selection_equals_exact_on_gradient_like_vectors():
    for seed in range(5):
        x = _x(seed, 150_000)  # signed: both rank |x|
        for k in (15, 150, 1500, 15_000):
            exact = select_topk(x.abs(), k, "exact")
            assert torch.equal(select_topk(x, k, "sample", torch.Generator().manual_seed(seed)), exact)
            assert torch.equal(select_topk(x, k, "exact"), exact)


def test_sampled_selection_of_mixed_tensors_equals_exact():
    """Sampled tensors and tensors taking their exact top-k (k < 512, small) in one call."""
    sizes = [200_000, 6000, 50, 70_000, 1]
    a = _x(9, sum(sizes)).abs()
    a[200_000:206_000] = torch.round(a[200_000:206_000] * 4) / 4  # many ties in one tensor
    for ratio in (0.01, 0.05):
        ks = [math.ceil(ratio * n) for n in sizes]
        exact = select_topk_segments(a, sizes, ks, "exact")
        assert exact.numel() == sum(ks)
        assert torch.equal(select_topk_segments(a, sizes, ks, "sample", torch.Generator().manual_seed(2)), exact)


def test_chunk_selection_keeps_each_chunks_largest():
    a = _x(3, 10_000).abs()
    idx = select_topk(a, 100, "chunk")
    kc = math.ceil(100 * 4096 / 10_000)  # two chunks of 4096, a tail of 1808
    assert idx.numel() == 2 * kc + math.ceil(100 * 1808 / 10_000)
    for lo, hi in ((0, 4096), (4096, 8192), (8192, 10_000)):
        inside = idx[(idx >= lo) & (idx < hi)]
        assert set(inside.tolist()) == {lo + i for i in _reference_topk(a[lo:hi], inside.numel())}


@pytest.mark.parametrize("spec", ["topk:0.01", "topk:0.1+int8", "topk:0.003+int4", "topk:1+fp16",
                                  "threshold:0.05", "threshold:0.2+int8"])
def test_round_trip_keeps_the_selected_values_per_tensor(spec):
    c = get_compressor(spec)
    layout = Layout.from_sizes(SIZES)
    x = _x(7)
    msg, transmitted = _encode(c, x, layout)
    decoded = torch.zeros_like(x)
    c.decode_add(msg, layout, decoded)
    assert torch.equal(decoded, transmitted)
    kind, param, values, _ = parse_spec(spec)
    lo = 0
    for n in SIZES:
        xs, ts = x[lo:lo + n], transmitted[lo:lo + n]
        sent = ts != 0
        if kind == "topk":
            assert int(sent.sum()) <= math.ceil(param * n) and set(torch.nonzero(sent).view(-1).tolist()) <= \
                _reference_topk(xs.abs(), math.ceil(param * n))
        else:
            assert torch.equal(sent, xs.abs() >= param) or values != "none"
        if values == "none":
            assert torch.equal(ts[sent], xs[sent])
        elif values.startswith("int"):  # one scale per tensor: half a quantum
            qmax = {"int8": 127, "int4": 7}[values]
            kept = xs[ts != 0] if kind == "threshold" else xs[sorted(_reference_topk(xs.abs(), math.ceil(param * n)))]
            bound = float(kept.abs().max()) / qmax / 2 * 1.001 if kept.numel() else 0.0
            assert float((ts - torch.where(ts != 0, xs, 0)).abs().max()) <= bound
        lo += n
    k = int(torch.tensor(msg[24:32].tolist(), dtype=torch.uint8).view(torch.int64))
    bits = {"none": 32, "fp16": 16, "int8": 8, "int4": 4}[values]
    scales = 0 if values in ("none", "fp16") else 4 * len(SIZES)
    assert msg.numel() == HEADER + 4 * k + (k * bits + 7) // 8 + scales
    if kind == "topk":
        assert k == c.kept(layout) == sum(math.ceil(param * n) for n in SIZES)


def test_payload_bytes_at_one_percent_with_int8_values():
    """5 bytes per kept value plus a header and a scale per tensor: ~0.0126x of FP32."""
    c, layout = get_compressor("topk:0.01+int8"), Layout.from_sizes(SIZES)
    msg, _ = _encode(c, _x(1), layout)
    assert msg.numel() <= 0.03 * 4 * sum(SIZES) + HEADER + 4 * len(SIZES) + 5 * len(SIZES)


@pytest.mark.parametrize("spec", ["topk:0.05+int8", "topk:0.01", "threshold:0.3+int4"])
def test_error_feedback_sent_plus_residual_is_the_sum_of_gradients(spec):
    c, layout, memory = get_compressor(spec), Layout.from_sizes(SIZES), ResidualMemory()
    sent, true = torch.zeros(sum(SIZES)), torch.zeros(sum(SIZES))
    for step in range(40):
        g = _x(100 + step)
        comp = memory.compensate("mlp", g)
        _, tx = _encode(c, comp, layout)
        memory.update("mlp", comp, tx)
        sent += tx
        true += g
    torch.testing.assert_close(sent + memory.residuals["mlp"], true, rtol=0, atol=1e-5)
    assert int((sent != 0).sum()) > 0.3 * sum(SIZES)  # the residual brings small values out in time


def test_a_payload_of_another_ratio_codec_or_size_is_refused():
    layout = Layout.from_sizes(SIZES)
    msg, _ = _encode(get_compressor("topk:0.1+int8"), _x(0), layout)
    out = torch.zeros(sum(SIZES))
    with pytest.raises(ValueError, match=r"rank 3 sent a topk:0.1\+int8 payload, this rank runs topk:0.01\+int8"):
        get_compressor("topk:0.01+int8").decode_add(msg, layout, out, source="rank 3")
    with pytest.raises(ValueError, match=r"topk:0.1\+int8 payload, this rank runs topk:0.1\+none"):
        get_compressor("topk:0.1").decode_add(msg, layout, out)
    with pytest.raises(ValueError, match=r"this rank runs threshold:0.1\+int8"):
        get_compressor("threshold:0.1+int8").decode_add(msg, layout, out)
    with pytest.raises(ValueError, match="expects 5639 values in 5 tensors"):
        get_compressor("topk:0.1+int8").decode_add(msg, Layout.from_sizes([*SIZES, 1]), torch.zeros(5639))
    assert torch.equal(out, torch.zeros(sum(SIZES)))  # nothing added from a refused payload


def test_compress_decompress_interface():
    c = get_compressor("topk:0.2+int16")
    x = _x(4, 100)
    groups = torch.arange(4).repeat_interleave(25)
    y = c.decompress(c.compress(x, groups, 4), groups)
    assert int((y != 0).sum()) == 20 and c.sparse and c.collective == "allgather" and not c.linear
    assert torch.equal(c.decompress(c.compress(torch.zeros(10))), torch.zeros(10))
    assert torch.equal(c.decompress(c.compress(torch.empty(0))), torch.empty(0))


@pytest.mark.parametrize("bad", ["topk", "topk:", "topk:0", "topk:1.5", "topk:-0.1", "topk:nan", "topk:0.1+int3",
                                 "topk:0.1+int8+x", "threshold:0", "threshold:inf", "threshold:x", "top:0.1",
                                 "topk:0.01@warmup=", "topk:0.01@warmup=-5", "topk:0.01@warmup=1e3",
                                 "topk:0.01+int8@warmup=5000000000", "threshold:0.1@warmup=10", "topk:0.01@wu=10"])
def test_malformed_specs_say_the_expected_form(bad):
    with pytest.raises(ValueError, match=r"expected .*topk:RATIO|unknown compressor"):
        get_compressor(bad)


def test_config_takes_sparse_specs_for_the_mlp_only():
    assert CompressionConfig(mlp="topk:0.01+int8").mlp_error_feedback
    with pytest.raises(ValueError, match="emb: topk:0.01 sparsifies dense gradients"):
        CompressionConfig(emb="topk:0.01")
    with pytest.raises(ValueError, match="mlp: expected"):
        CompressionConfig(mlp="topk:2")
    with pytest.raises(ValueError, match=r"emb \(--emb-compress\) must be none or fp16"):
        CompressionConfig(emb="int8", emb_exchange="dense")
    with pytest.raises(ValueError, match="emb_exchange must be one of"):
        CompressionConfig(emb_exchange="both")


def test_single_rank_notice_names_what_does_nothing():
    assert CompressionConfig().single_rank_notice() is None
    notice = CompressionConfig(mlp="topk:0.01+int8", emb_exchange="dense").single_rank_notice()
    assert "--mlp-compress topk:0.01+int8" in notice and "--emb-exchange dense" in notice
    assert "does nothing" in notice and "--emb-compress" not in notice


def test_warmup_decays_the_ratio_exponentially_from_a_quarter_to_the_target():
    assert parse_spec("topk:0.01+int8@warmup=200") == ("topk", 0.01, "int8", 200)
    assert parse_spec("topk:0.01") == ("topk", 0.01, "none", 0)
    ratios = [warmup_ratio(0.01, 100, s) for s in range(0, 130)]
    assert ratios[0] == WARMUP_START == 0.25
    assert math.isclose(ratios[50], 0.05)  # halfway: the geometric mean of 0.25 and 0.01
    assert all(a > b for a, b in zip(ratios[:100], ratios[1:101]))
    assert ratios[100:] == [0.01] * 30
    assert warmup_ratio(0.5, 100, 0) == 0.5 and warmup_ratio(0.01, 0, 0) == 0.01  # nothing to warm up
    c, layout = get_compressor("topk:0.01+int8@warmup=100"), Layout.from_sizes(SIZES)
    for step in (0, 30, 99, 100, 1000):
        _, idx, _ = c.encode(_x(step), layout, step)
        expected = sum(min(n, math.ceil(warmup_ratio(0.01, 100, step) * n)) for n in SIZES)
        assert idx.numel() == c.kept(layout, step) == expected
    assert c.kept(layout) == get_compressor("topk:0.01+int8").kept(layout)  # after the warm-up


def test_error_feedback_through_a_warmup_sent_plus_residual_is_the_sum_of_gradients():
    c, layout, memory = get_compressor("topk:0.01+int8@warmup=20"), Layout.from_sizes(SIZES), ResidualMemory()
    sent, true = torch.zeros(sum(SIZES)), torch.zeros(sum(SIZES))
    for step in range(30):
        g = _x(200 + step)
        comp = memory.compensate("mlp", g)
        msg, tx = _encode(c, comp, layout, step)
        memory.update("mlp", comp, tx)
        sent += tx
        true += g
    torch.testing.assert_close(sent + memory.residuals["mlp"], true, rtol=0, atol=1e-5)


def test_a_payload_of_another_step_or_warmup_is_refused():
    layout, out = Layout.from_sizes(SIZES), torch.zeros(sum(SIZES))
    c = get_compressor("topk:0.01+int8@warmup=20")
    msg, _, _ = c.encode(_x(0), layout, 3)
    c.decode_add(msg, layout, torch.zeros(sum(SIZES)), step=3)
    with pytest.raises(ValueError, match=r"rank 1 sent a topk:0.\d+\+int8 \(ratio in force of a 20-step warm-up\) "
                                         r"payload, this rank runs topk:0.\d+\+int8 \(.*\) at step 4"):
        c.decode_add(msg, layout, out, source="rank 1", step=4)
    late, _, _ = c.encode(_x(0), layout, 50)  # warm-up over: the same ratio, still another warm-up
    with pytest.raises(ValueError, match=r"20-step warm-up\) payload, this rank runs topk:0.01\+int8 at step 50"):
        get_compressor("topk:0.01+int8").decode_add(late, layout, out, step=50)
    with pytest.raises(ValueError, match=r"this rank runs topk:0.01\+int8 \(ratio in force of a 10-step warm-up\)"):
        get_compressor("topk:0.01+int8@warmup=10").decode_add(late, layout, out, step=50)
    assert torch.equal(out, torch.zeros(sum(SIZES)))


def _torch_reference_message(c, x: torch.Tensor, sizes: list[int], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The payload as the torch codec built it before the NumPy one (exact top-k, qcore's
    group_scales, torch rounding): (message uint8, the values the receivers decode float32 [k])."""
    ratio = c.ratio_at(step)
    idx = select_topk_segments(x.abs(), sizes, [math.ceil(ratio * n) for n in sizes], "exact")
    seg = torch.searchsorted(torch.tensor(sizes).cumsum(0), idx, right=True)
    v, codec = x[idx], c.value_codec
    header = torch.frombuffer(bytearray(struct.pack("<BBxxIdqq", 1, ["none", "fp16", "int16", "int8", "int4"].index(
        codec.name), c.warmup, ratio, x.numel(), idx.numel())), dtype=torch.uint8)
    if codec.name == "none":
        return torch.cat([header, idx.to(torch.int32).view(torch.uint8), v.view(torch.uint8)]), v
    if codec.name == "fp16":
        return torch.cat([header, idx.to(torch.int32).view(torch.uint8), v.half().view(torch.uint8)]), v.half().float()
    qmin, qmax = qrange(codec.bits)
    scales = group_scales(v, seg, len(sizes), codec.bits)
    q = torch.div(v, scales[seg]).round_().clamp_(qmin, qmax)
    data = torch.empty(codec.data_nbytes(v.numel()), dtype=torch.uint8)
    if codec.bits == 4:
        pack_int4_into(q, data)
    else:
        data = q.to(torch.int8 if codec.bits == 8 else torch.int16).view(torch.uint8)
    return torch.cat([header, idx.to(torch.int32).view(torch.uint8), data, scales.view(torch.uint8)]), q * scales[seg]


@pytest.mark.parametrize("spec", ["topk:0.01+int8", "topk:0.05+int4", "topk:0.02+int16", "topk:0.02+fp16",
                                  "topk:0.01", "topk:0.01+int8@warmup=3"])
def test_payload_and_decoded_sum_equal_the_torch_reference_through_error_feedback(spec):
    """Sampled tensors (k >= 512), exactly-thresholded and small ones, ties, over steps of error
    feedback: the same bytes, the same decoded sum (three ranks' payloads) and residual."""
    sizes = [6656, 512, 70_000, 16, 1, 16_384, 1024]
    c, layout = get_compressor(spec), Layout.from_sizes(sizes)
    residual = torch.zeros(sum(sizes))
    for step in range(4):
        residual += _x(300 + step, sum(sizes)) * 1e-3
        if step == 2:  # ties at the k-th |value| of the sampled tensor
            k = math.ceil(c.ratio_at(step) * 70_000)
            residual[7168:7468] = torch.topk(residual[7168:77_168].abs(), k).values[-1]
        expected_msg, expected_sent = _torch_reference_message(c, residual, sizes, step)
        msg, idx, sent = c.encode(residual, layout, step)
        assert torch.equal(msg, expected_msg) and torch.equal(sent, expected_sent)
        out, reference = torch.zeros(sum(sizes)), torch.zeros(sum(sizes))
        for _ in range(3):
            c.decode_add(msg, layout, out, step=step)
            reference.index_add_(0, idx, expected_sent)
        assert torch.equal(out, reference)
        residual.index_add_(0, idx, sent, alpha=-1)
