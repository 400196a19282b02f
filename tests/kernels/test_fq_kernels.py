"""The fused fake-quant kernels (dqrm_mpi/csrc/fake_quant.cpp) give the PyTorch path's bits: outputs,
scales and gradients compared bit for bit (the sign of zero included; NaN where the other has NaN, of
any sign or payload) with ``kernels.disabled()`` on random rows with zeros, -0.0, exact .5 ties,
NaN/inf, huge and tiny values."""
from __future__ import annotations

import pytest
import torch

from dqrm_mpi import kernels
from dqrm_mpi.model import ModelConfig
from dqrm_mpi.qcore import fake_quant_own_scale
from dqrm_mpi.quant import QuantConfig
from dqrm_mpi.quant.qat import EmbeddingFakeQuant

from .bits import same_bits
from .paths import assert_same_states, states_after_training

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="CPU kernels not built or DQRM_KERNELS=0")

BITS = (2, 4, 8, 16)
INF, NAN = float("inf"), float("nan")


def with_both(fn):
    """fn() with the kernels, then with the PyTorch path."""
    fast = fn()
    with kernels.disabled():
        slow = fn()
    return fast, slow


def awkward_rows(n: int, k: int, bits: int, seed: int) -> torch.Tensor:
    """x float32 [n, k]: random rows of several magnitudes, plus (when n allows) an all-zero row, a -0.0
    row, a row of exact ties after scaling, NaN, +inf and -inf rows, huge and subnormal rows."""
    gen = torch.Generator().manual_seed(seed)
    mags = torch.tensor([1e-3, 1.0, 37.0, 1e5])[torch.randint(0, 4, (n, 1), generator=gen)]
    x = torch.randn(n, k, generator=gen) * mags
    x[torch.rand(n, k, generator=gen) < 0.1] = 0.0
    qmax = (1 << (bits - 1)) - 1
    specials = [torch.zeros(k), torch.full((k,), -0.0)]
    # scale 2^-3 exactly: the max element qmax * 2^-3, the others (m + 1/2) * 2^-3 (ties after scaling)
    ties = (torch.randint(-qmax, qmax, (k,), generator=gen).float() + 0.5) * 0.125
    ties[0] = qmax * 0.125
    specials.append(ties)
    for bad in (NAN, INF, -INF):
        row = torch.randn(k, generator=gen)
        row[k // 2] = bad
        specials.append(row)
    specials.append(torch.randn(k, generator=gen) * 3e38)
    specials.append(torch.randn(k, generator=gen) * 1e-42)  # subnormal
    for i, row in enumerate(specials[:n]):
        x[(i * 7) % n] = row
    return x


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (9, 1), (11, 13), (40, 16), (33, 67), (12, 512)])
def test_own_scale_per_row_and_per_tensor_match_the_pytorch_path(bits, shape):
    """Also without the NaN/inf rows and with the huge ones tamed, so that one scale per tensor is not
    always NaN or dominated by 3e38."""
    x = awkward_rows(*shape, bits, seed=bits * 1000 + shape[1])
    finite = x.nan_to_num(0.0, 0.0, 0.0)
    for data in (x, finite, finite.clamp(-1e4, 1e4)):
        for per_row in (True, False):
            def run():
                scale = torch.full((shape[0] if per_row else 1,), -1.0)
                return fake_quant_own_scale(data, bits, per_row, scale), scale
            (y_fast, s_fast), (y_slow, s_slow) = with_both(run)
            assert same_bits(y_fast, y_slow), (per_row, bits, shape)
            assert same_bits(s_fast, s_slow), (per_row, bits, shape)


@pytest.mark.parametrize("threads", [1, 2])
def test_own_scale_rows_split_over_threads_match_the_pytorch_path(threads, set_threads):
    """[700, 367] (the kernel splits rows into shares of about 32 k values): the same bits whatever
    the number of threads."""
    set_threads(threads)
    x = awkward_rows(700, 367, 4, seed=threads)
    (y_fast, s_fast), (y_slow, s_slow) = with_both(lambda: (
        (s := torch.empty(700)), fake_quant_own_scale(x, 4, True, s))[::-1])
    assert same_bits(y_fast, y_slow) and same_bits(s_fast, s_slow)


@pytest.mark.parametrize("threads", [1, 2])
def test_embedding_rows_split_over_threads_match_the_pytorch_path(threads, set_threads):
    """512 samples of 26 rows (split over two threads): the same bits, forward and gradient."""
    set_threads(threads)
    gen = torch.Generator().manual_seed(threads)
    rows = torch.randn(512, 26, 16, generator=gen)
    emb = EmbeddingFakeQuant(26, 4, False, period=200)
    emb.refresh([torch.randn(50, 16, generator=gen) for _ in range(26)], step=0)

    def run():
        r = rows.clone().requires_grad_(True)
        y = emb(r)
        y.sum().backward()
        return y, r.grad
    (y_fast, g_fast), (y_slow, g_slow) = with_both(run)
    assert same_bits(y_fast, y_slow) and same_bits(g_fast, g_slow)


def test_ties_round_half_to_even_and_special_rows_give_what_they_should():
    """The kernel's own numbers on hand-made rows (so agreement with the PyTorch path is not agreement on
    a wrong answer): scale 1 -> ties go to the even integer; zero rows stay zero with scale FLT_MIN."""
    x = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -3.5], [0.0] * 6, [-0.0] * 6, [1.0, NAN, 0, 0, 0, 0]])
    scale = torch.empty(4)
    y = fake_quant_own_scale(x, 4, True, scale)
    assert y[0].tolist() == [7.0, 0.0, 2.0, 2.0, -0.0, -4.0]
    assert scale[:3].tolist() == [1.0, torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).tiny]
    assert same_bits(y[1:3], x[1:3])  # zeros keep their sign
    assert y[3].isnan().all() and scale[3].isnan()


def test_empty_and_non_contiguous_inputs():
    with_rows = torch.empty(0, 5)
    fast, slow = with_both(lambda: fake_quant_own_scale(with_rows, 4, True))
    assert fast.shape == slow.shape == (0, 5)
    with pytest.raises(RuntimeError, match="rows of x are empty"):
        fake_quant_own_scale(torch.empty(3, 0), 4, True)
    with pytest.raises(RuntimeError, match="x is empty"):
        fake_quant_own_scale(torch.empty(0), 4, False)
    x = awkward_rows(20, 33, 4, seed=5).t()  # [33, 20], not contiguous
    for per_row in (True, False):
        fast, slow = with_both(lambda: fake_quant_own_scale(x, 4, per_row))
        assert same_bits(fast, slow)


def test_gradient_is_the_identity_on_both_paths():
    x = awkward_rows(16, 40, 4, seed=3)
    x = torch.where(x.isfinite(), x, torch.zeros(()))

    def grad():
        w = x.clone().requires_grad_(True)
        (fake_quant_own_scale(w, 4, True) * torch.arange(40.0)).sum().backward()
        return w.grad
    fast, slow = with_both(grad)
    assert same_bits(fast, slow) and same_bits(fast, torch.arange(40.0).expand(16, 40))


def test_ops_reject_bad_inputs_with_clear_errors():
    with pytest.raises(RuntimeError, match="float32 CPU tensor"):
        kernels.ops.fq_own_scale_rows(torch.ones(2, 3, dtype=torch.float64), 4, torch.empty(2))
    with pytest.raises(RuntimeError, match=r"shape \[2\]"):
        kernels.ops.fq_own_scale_rows(torch.ones(2, 3), 4, torch.empty(3))
    with pytest.raises(RuntimeError, match="bits must be in"):
        kernels.ops.fq_own_scale_tensor(torch.ones(2, 3), 17, torch.empty(1))
    with pytest.raises(RuntimeError, match=r"scales must have shape \[3\]"):
        kernels.ops.fq_table_rows(torch.ones(2, 3, 4), torch.ones(2), 4)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rowwise", [False, True])
def test_embedding_rows_match_the_pytorch_path(bits, rowwise):
    """Looked-up rows [B, T, d] with per-table scales (rows beyond the scale are clamped) or their own."""
    b, t, d = 37, 26, 16
    rows = awkward_rows(b * t, d, bits, seed=bits).view(b, t, d)
    emb = EmbeddingFakeQuant(t, bits, rowwise, period=200)
    gen = torch.Generator().manual_seed(bits)
    scales = rows.abs().nan_to_num(0, 0, 0).amax(dim=(0, 2)) / ((1 << (bits - 1)) - 1)
    scales = (scales * torch.rand(t, generator=gen) * 1.5).clamp_min(torch.finfo(torch.float32).tiny)
    scales[14] = 0.125  # the scale of awkward_rows' row of ties (row 14: table 14 of the first sample)
    emb.refresh([torch.stack([scales[i] * ((1 << (bits - 1)) - 1)]) for i in range(t)], step=0)
    assert emb.scales[14] == 0.125 and (rows[0, 14] * 8 % 1 == 0.5).sum() >= d - 1
    weight = torch.randn(b, t, d, generator=gen)

    def run():
        r = rows.clone().requires_grad_(True)
        y = emb(r)
        (y.nan_to_num(0, 0, 0) * weight).sum().backward()
        return y, r.grad
    (y_fast, g_fast), (y_slow, g_slow) = with_both(run)
    assert same_bits(y_fast, y_slow)
    assert same_bits(g_fast, g_slow)


@pytest.mark.parametrize("bits", BITS)
def test_table_scales_match_the_pytorch_path(bits):
    """The full-table pass: tables of 1..40 rows (16 columns) with the awkward rows (NaN, inf, zeros, ...)."""
    gen = torch.Generator().manual_seed(bits)
    sizes = [1, 2, 3, 5, 40, 17, 1, 9]
    flat = awkward_rows(sum(sizes), 16, bits, seed=bits) * torch.rand(sum(sizes), 1, generator=gen)
    flat[:10] = 0.0  # all-zero tables
    flat[10] = -0.0
    tables = list(torch.split(flat, sizes))

    def run():
        emb = EmbeddingFakeQuant(len(sizes), bits, rowwise=False, period=200)
        emb.refresh(tables, step=0)
        return emb.scales
    fast, slow = with_both(run)
    assert same_bits(fast, slow)
    with pytest.raises(RuntimeError, match="table 1 is empty"):
        kernels.ops.fq_table_scales([flat[:1], flat[:0]], bits, torch.empty(2))


def test_a_workspace_is_reused_only_when_nothing_else_holds_it():
    """QuantLinear's fake-quantized weight goes into its workspace once the last step's graph is gone;
    while an earlier result is alive, a new one gets new memory (and both keep their values)."""
    x = awkward_rows(24, 40, 4, seed=9)
    workspace = torch.empty(24, 40)
    first = fake_quant_own_scale(x, 4, True, workspace=workspace)
    assert first.data_ptr() == workspace.data_ptr()
    second = fake_quant_own_scale(x * 2, 4, True, workspace=workspace)  # first is alive: new memory
    assert second.data_ptr() != workspace.data_ptr()
    with kernels.disabled():
        assert same_bits(first, fake_quant_own_scale(x, 4, True))
        assert same_bits(second, fake_quant_own_scale(x * 2, 4, True))
    del first
    assert fake_quant_own_scale(x, 4, True, workspace=workspace).data_ptr() == workspace.data_ptr()
    assert fake_quant_own_scale(x, 4, True, workspace=torch.empty(24, 41)).shape == (24, 40)  # wrong shape: unused


@pytest.mark.parametrize("config", [QuantConfig(emb_bits=4, mlp_bits=4, scale_period=3),
                                    QuantConfig(emb_bits=8, emb_scale="row", mlp_bits=4, mlp_scale="tensor")],
                         ids=["table-channel", "row-tensor"])
def test_training_with_the_kernels_is_bit_identical(config):
    """A DLRM with MLP rows of 13 to 300 values trained 6 steps (scale refreshes included) with the
    kernels and with the PyTorch path: every parameter and buffer equal."""
    cards = (40, 30, 25) + (12,) * 23
    model_config = ModelConfig(embedding_dim=16, bottom_mlp=(300, 64, 16), top_mlp=(80, 1), cardinalities=cards)

    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(6):  # drawn in this order: sparse, dense, label
        sparse = torch.stack([torch.randint(0, c, (32,), generator=gen) for c in cards], dim=1)
        batches.append((torch.rand(32, 13, generator=gen), sparse, (torch.rand(32, generator=gen) < 0.3).float()))
    assert_same_states(states_after_training(model_config, config, batches, steps=6))
