"""The codec kernels (csrc/codec.cpp) against the PyTorch path (``kernels.disabled()``), bit for
bit: INT8 / INT4 payload bytes, scales, residuals and transmitted values of ``encode_into`` /
``encode_feedback_into``, ``decode_many`` and ``decode_mean`` over random layouts (odd sizes, rows
longer than a unit, rows sharing groups, empty blocks) and values (all-zero rows, -0.0, .5 ties,
huge, subnormal, NaN and inf), 1-4 ranks; and a few error-feedback steps of the real exchanges."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from dqrm_mpi import kernels
from dqrm_mpi.comm.inprocess import run_ranks
from dqrm_mpi.comm.sync import GradientSynchronizer
from dqrm_mpi.compression import CompressionConfig, get_compressor, quantize
from dqrm_mpi.compression.layout import Block, Layout
from dqrm_mpi.compression.quantize import UNIT, kernel_layout
from dqrm_mpi.model import DLRM, model_config_from_preset

from .bits import same_bits

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason=f"codec kernels not built or off ({kernels.WHY_NOT})")


def _refuse(*args, **kwargs):
    raise AssertionError("the PyTorch path ran")


@contextlib.contextmanager
def _kernels_only():
    """Inside, the PyTorch path's functions raise: what runs is the kernels."""
    with pytest.MonkeyPatch.context() as m:
        for name in ("quantize_units_into", "quantize_into", "mean_of_payloads", "scale_rows_", "scale_rows_into",
                     "_pack_int4_from_int8"):
            m.setattr(quantize, name, _refuse)
        yield


def _layout(gen: torch.Generator, kind: int) -> Layout:
    """Random layouts: rows their own groups (several widths, some rows longer than a unit), rows
    sharing groups (tables, unsorted), several blocks with shared groups, and an empty block."""
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))  # noqa: E731
    if kind == 0:
        sizes = [r(1, 40) for _ in range(r(1, 30))]
        sizes += [sizes[-1]] * r(0, 5)
        return Layout.from_sizes(sizes)
    if kind == 1:
        return Layout.from_sizes([r(1, 9), UNIT + r(1, 999), r(1, 300)] + [r(1, 5)] * r(1, 4))
    if kind == 2:
        n, groups = r(1, 200), r(1, 30)
        return Layout.rows(n, r(1, 20), torch.randint(0, groups, (n,), generator=gen), groups)
    if kind == 3:
        return Layout.single(r(1, 3000))
    # two blocks sharing groups, an empty one between them, and a block of its own groups
    a, c = r(1, 50), r(1, 50)
    b1 = Block(0, a, 7, 0, torch.randint(0, 5, (a,), generator=gen))
    b2 = Block(7 * a, 0, 3, 0)
    b3 = Block(7 * a, c, 5, 0, torch.randint(2, 8, (c,), generator=gen))
    b4 = Block(7 * a + 5 * c, 3, 9, 8)
    return Layout((b1, b2, b3, b4), 7 * a + 5 * c + 27, 11)


def _values(gen: torch.Generator, layout: Layout, bits: int, specials: bool) -> torch.Tensor:
    """float32 [numel]: Gaussian rows at scales from subnormal to huge, all-zero rows, -0.0, exact
    .5 ties (a row whose absmax is qmax * 2^k holds k-scaled halves) and, with ``specials``, NaN and inf."""
    x = torch.randn(layout.numel, generator=gen)
    qmax = 2 ** (bits - 1) - 1
    for b in layout.blocks:
        for i in range(b.rows):
            row = x[b.lo + i * b.cols:b.lo + (i + 1) * b.cols]
            kind = int(torch.randint(0, 6, (1,), generator=gen))
            if kind == 0:
                row.zero_()
            elif kind == 1:
                row.mul_(float(torch.tensor(10.0) ** torch.randint(-44, 38, (1,), generator=gen)))
            elif kind == 2:  # ties: halves times 2^k, with the row's absmax qmax * 2^k
                k = float(2.0 ** int(torch.randint(-20, 20, (1,), generator=gen)))
                row.copy_((torch.randint(-2 * qmax, 2 * qmax + 1, (row.numel(),), generator=gen) / 2) * k)
                row[0] = qmax * k
            elif kind == 3:
                row[torch.rand(row.numel(), generator=gen) < 0.5] = -0.0
    if specials and layout.numel:
        at = torch.randint(0, layout.numel, (3,), generator=gen)
        x[at[0]], x[at[1]], x[at[2]] = float("nan"), float("inf"), -float("inf")
    return x


def _encode(codec, x, layout, mode):
    """(payload uint8, x afterwards, transmitted or None) of one encode."""
    x = x.clone()
    out = torch.full((codec.nbytes(layout.numel, layout.num_groups) + 3,), 0xAB, dtype=torch.uint8)
    transmitted = torch.full_like(x, 7.0) if mode == "transmitted" else None
    if mode == "feedback":
        codec.encode_feedback_into(x, layout, out, torch.empty_like(x))
    else:
        codec.encode_into(x, layout, out, transmitted, torch.empty_like(x))
    return out, x, transmitted


@pytest.mark.parametrize("mode", ["plain", "transmitted", "feedback"])
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_encode_matches_the_pytorch_path(name, mode):
    codec = get_compressor(name)
    gen = torch.Generator().manual_seed(codec.bits * 10 + len(mode))
    for trial in range(25):
        layout = _layout(gen, trial % 5)
        x = _values(gen, layout, codec.bits, specials=trial % 3 == 0)
        with _kernels_only():
            got = _encode(codec, x, layout, mode)
        with kernels.disabled():
            want = _encode(codec, x, layout, mode)
        for g, w, what in zip(got, want, ("payload", "x", "transmitted")):
            assert (g is None and w is None) or same_bits(g, w), f"trial {trial}: {what} differs"


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_empty_vector_sends_only_scales(name):
    codec, layout = get_compressor(name), Layout.from_sizes([0, 0])
    got = _encode(codec, torch.empty(0), layout, "feedback")[0]
    with kernels.disabled():
        want = _encode(codec, torch.empty(0), layout, "feedback")[0]
    assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning")  # NumPy on NaN
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_decode_matches_the_pytorch_path(name, threads):
    codec = get_compressor(name)
    gen = torch.Generator().manual_seed(7 + threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # decode_mean's PyTorch path differs with one thread (same numbers)
    try:
        for trial in range(20):
            layout, ranks = _layout(gen, trial % 5), 1 + trial % 4
            bufs = torch.stack([_encode(codec, _values(gen, layout, codec.bits, trial % 3 == 0), layout, "plain")[0]
                                for _ in range(ranks)])
            with _kernels_only():  # rows of a wider matrix: strided rows, each contiguous
                many = codec.decode_many(bufs, layout, torch.empty(ranks, layout.numel + 5)[:, 2:2 + layout.numel])
                mean = codec.decode_mean(bufs, layout, ranks)
            with kernels.disabled():
                assert same_bits(many, codec.decode_many(bufs, layout, torch.empty(ranks, layout.numel))), trial
                assert same_bits(mean, codec.decode_mean(bufs, layout, ranks)), trial
    finally:
        torch.set_num_threads(before)


def test_decode_mean_divides_by_a_size_of_three():
    codec = get_compressor("int8")
    gen = torch.Generator().manual_seed(3)
    layout = _layout(gen, 0)
    bufs = torch.stack([_encode(codec, _values(gen, layout, 8, False), layout, "plain")[0] for _ in range(3)])
    got = codec.decode_mean(bufs, layout, 3)
    with kernels.disabled():
        want = codec.decode_mean(bufs, layout, 3)
    assert same_bits(got, want)
    assert not same_bits(got, codec.decode_mean(bufs, layout, 4))  # the size matters


def test_the_ops_refuse_bad_layouts_and_buffers():
    x, out = torch.randn(10), torch.empty(100, dtype=torch.uint8)
    blocks, row_group = kernel_layout(Layout.from_sizes([5, 5]))
    with pytest.raises(RuntimeError, match="cover 10 values, the vector has 9"):
        kernels.ops.codec_encode(x[:9].clone(), blocks, row_group, 2, 8, out, None, False)
    gap = torch.tensor([[0, 1, 5, 0], [6, 1, 4, 1]])
    with pytest.raises(RuntimeError, match="starts at 6, expected 5"):
        kernels.ops.codec_encode(x, gap, row_group, 2, 8, out, None, False)
    with pytest.raises(RuntimeError, match="outside"):
        kernels.ops.codec_encode(x, blocks, torch.tensor([0, 2]), 2, 8, out, None, False)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        kernels.ops.codec_encode(torch.randn(20)[::2], blocks, row_group, 2, 8, out, None, False)
    with pytest.raises(RuntimeError, match="bits must be 8 or 4"):
        kernels.ops.codec_encode(x, blocks, row_group, 2, 16, out, None, False)
    with pytest.raises(RuntimeError, match="take 18"):
        kernels.ops.codec_decode_mean(out[:10].view(1, -1), blocks, row_group, 2, 8, 1, torch.empty(10))


@pytest.mark.parametrize("cfg", [
    CompressionConfig(emb="int8", mlp="int8", error_feedback="both", collective="allgather", overlap=False),
    CompressionConfig(emb="int4", mlp="int4", error_feedback="mlp", collective="allgather"),
    CompressionConfig(emb="int4", mlp="int8", collective="two-phase", emb_scale="row", error_feedback="both"),
], ids=["int8-ef-both", "int4-overlap", "two-phase"])
def test_synchronizer_steps_are_bit_identical(cfg):
    """Three error-feedback steps of GradientSynchronizer on 2 simulated ranks: every averaged
    gradient equal (so every residual too) with the kernels and with the PyTorch path."""
    cards = (30, 20, 50, 40, 10, 24, 35, 25, 3, 45, 15, 50, 22, 27, 40, 48, 10, 30, 20, 4, 50, 18, 15, 33, 21, 19)
    torch.manual_seed(0)
    model = DLRM(model_config_from_preset("tiny", cards))

    def run():
        models = [copy.deepcopy(model) for _ in range(2)]

        def rank_main(backend):
            m = models[backend.rank]
            sync = GradientSynchronizer(backend, m, m.embedding_parameter_names(), cfg)
            gen = torch.Generator().manual_seed(100 + backend.rank)
            grads = []
            for _ in range(3):
                m.zero_grad()
                sparse = torch.stack([torch.randint(0, c, (32,), generator=gen) for c in cards], dim=1)
                m(torch.rand(32, 13, generator=gen), sparse).sum().backward()
                sync.synchronize()
                grads.append({n: (p.grad.coalesce().to_dense() if p.grad.is_sparse else p.grad).clone()
                              for n, p in m.named_parameters()})
            return grads
        return run_ranks(2, rank_main)

    with kernels.disabled():
        want = run()
    with _kernels_only():
        got = run()
    for rank, (g, w) in enumerate(zip(got, want)):
        for step, (gs, ws) in enumerate(zip(g, w)):
            for n in gs:
                assert same_bits(gs[n], ws[n]), f"rank {rank} step {step}: {n} differs"

