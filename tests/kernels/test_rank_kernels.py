"""The rank's fused CPU kernels (dqrm_mpi/csrc/embedding.cpp) give the PyTorch path's bits:
the interaction's pair gather and backward, the sparse SGD row update, the finite check, and
the parameters after training steps."""
import pytest
import torch

from dqrm_mpi import kernels
from dqrm_mpi.model import model_config_from_preset
from dqrm_mpi.model.dlrm import PairwiseDotInteraction
from dqrm_mpi.quant import QuantConfig
from dqrm_mpi.train.agreement import local_flags
from dqrm_mpi.train.sgd import PlainSGD

from .bits import same_bits
from .paths import PATHS, assert_same_states, states_after_training

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="the kernels are not built, or DQRM_KERNELS=0")

SPECIAL = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, 3e38, -3e38, 0.5, -2.5, 1.0])


def special_values(shape, gen: torch.Generator, nonfinite: bool = False) -> torch.Tensor:
    """Random normal values of mixed magnitudes with zeros, -0.0, tiny and huge values sprinkled in."""
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen) * 3)
    pool = torch.cat([SPECIAL, torch.tensor([float("nan"), float("inf"), -float("inf")])]) if nonfinite else SPECIAL
    mask = torch.rand(shape, generator=gen) < 0.2
    picks = pool[torch.randint(0, len(pool), shape, generator=gen)]
    return torch.where(mask, picks, x)


def interaction_both_ways(vectors: int, batch: int, dim: int, seed: int, nonfinite: bool = False,
                          strided: bool = False):
    gen = torch.Generator().manual_seed(seed)
    inter = PairwiseDotInteraction(vectors)
    bottom = special_values((batch, dim), gen, nonfinite)
    emb = special_values((batch, vectors - 1, dim), gen, nonfinite)
    grad = special_values((batch, dim + vectors * (vectors - 1) // 2), gen, nonfinite)
    if strided:  # non-contiguous inputs: every other column of wider tensors
        bottom = torch.stack([bottom, bottom], dim=-1)[..., 0]
        emb = emb.transpose(0, 1).contiguous().transpose(0, 1)
        grad = torch.stack([grad, grad], dim=-1)[..., 1]
    results = []
    for context in PATHS:
        with context():
            b, e = bottom.clone().requires_grad_(), emb.clone().requires_grad_()
            out = inter(b, e)
            out.backward(grad)
            results.append((out, b.grad, e.grad))
    return results


@pytest.mark.parametrize("vectors,batch,dim", [(27, 64, 16), (27, 3, 16), (4, 5, 3), (2, 7, 1), (27, 0, 16)])
def test_interaction_forward_and_backward_bits(vectors, batch, dim):
    (out0, b0, e0), (out1, b1, e1) = interaction_both_ways(vectors, batch, dim, seed=vectors * 100 + batch)
    assert same_bits(out1, out0) and same_bits(b1, b0) and same_bits(e1, e0)


@pytest.mark.parametrize("threads", [1, 2])
def test_interaction_split_over_threads_bits(threads, set_threads):
    """512 samples: the kernels split the batch over two threads; the same bits as with one."""
    set_threads(threads)
    (out0, b0, e0), (out1, b1, e1) = interaction_both_ways(27, 512, 16, seed=threads)
    assert same_bits(out1, out0) and same_bits(b1, b0) and same_bits(e1, e0)


def test_interaction_without_grad_and_after_a_batch_size_change():
    """Evaluation (no grad: fresh memory) and training batches of another size (new scratch)."""
    gen = torch.Generator().manual_seed(9)
    inter = PairwiseDotInteraction(27)
    for batch, grad_mode in ((32, True), (5, False), (7, True), (7, True)):
        bottom, emb = special_values((batch, 16), gen), special_values((batch, 26, 16), gen)
        with torch.set_grad_enabled(grad_mode):
            with kernels.disabled():
                reference = inter(bottom, emb)
            assert same_bits(inter(bottom, emb), reference)


def test_interaction_propagates_nan_and_inf_like_pytorch():
    (out0, b0, e0), (out1, b1, e1) = interaction_both_ways(27, 16, 16, seed=5, nonfinite=True)
    assert torch.isnan(out0).any() and torch.isinf(out0).any()
    assert same_bits(out1, out0) and same_bits(b1, b0) and same_bits(e1, e0)


def test_pairs_gradient_is_index_select_backward_bit_for_bit():
    """-0.0 becomes +0.0 there (zeros + g); the bmm after it would hide a wrong sign."""
    gen = torch.Generator().manual_seed(2)
    inter = PairwiseDotInteraction(27)
    grad = special_values((8, 16 + 351), gen, nonfinite=True)
    grad[:, 16::3] = -0.0
    dots = torch.zeros(8, 27 * 27, requires_grad=True)
    dots.index_select(1, inter.pairs).backward(grad[:, 16:])
    fused = torch.full((8, 27, 27), 7.0)  # overwritten
    kernels.ops.emb_pairs_backward(grad, inter.pairs, fused)
    assert same_bits(fused.view(8, -1), dots.grad)


def test_interaction_non_contiguous_inputs():
    (out0, b0, e0), (out1, b1, e1) = interaction_both_ways(27, 9, 16, seed=3, strided=True)
    assert same_bits(out1, out0) and same_bits(b1, b0) and same_bits(e1, e0)


def sparse_grad(rows: int, dim: int, nnz: int, seed: int, nonfinite: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, rows, (1, nnz), generator=gen)  # many duplicates: nnz >> rows
    return torch.sparse_coo_tensor(ids, special_values((nnz, dim), gen, nonfinite), (rows, dim), check_invariants=True)


def sgd_both_ways(weight: torch.Tensor, grad: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    for context in PATHS:
        with context():
            p = torch.nn.Parameter(weight.clone())
            p.grad = grad
            PlainSGD([p], lr=lr).step()
            out.append(p.detach())
    return out[0], out[1]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows,dim,nnz", [(7, 16, 500), (300, 16, 700), (5, 3, 41), (9, 1, 30), (4, 16, 0)])
def test_sparse_sgd_update_bits(rows, dim, nnz, threads, set_threads):
    set_threads(threads)
    gen = torch.Generator().manual_seed(rows + nnz)
    weight = special_values((rows, dim), gen)
    for lr in (0.1, 1.0, 3e-7):
        reference, fused = sgd_both_ways(weight, sparse_grad(rows, dim, nnz, seed=nnz + dim), lr)
        assert same_bits(fused, reference)


def test_sparse_sgd_coalesced_and_nonfinite_gradients():
    gen = torch.Generator().manual_seed(1)
    weight = special_values((50, 16), gen, nonfinite=True)
    grad = sparse_grad(50, 16, 400, seed=2, nonfinite=True)
    for g in (grad, grad.coalesce()):
        reference, fused = sgd_both_ways(weight, g, 0.05)
        assert same_bits(fused, reference)


def test_sparse_sgd_rejects_rows_outside_the_table():
    weight = torch.zeros(4, 2)
    with pytest.raises(IndexError, match="row 4 out of range for 4 rows"):
        kernels.ops.emb_sgd_sparse_(weight, torch.tensor([[0, 4]]), torch.ones(2, 2), -0.1)


def test_sparse_sgd_non_contiguous_weight_takes_the_pytorch_path():
    gen = torch.Generator().manual_seed(4)
    base = special_values((16, 10), gen)
    outs = []
    for context in PATHS:
        with context():
            p = torch.nn.Parameter(base.clone().t())  # [10, 16], not contiguous
            p.grad = sparse_grad(10, 16, 60, seed=5)
            PlainSGD([p], lr=0.1).step()
            outs.append(p.detach())
    assert same_bits(outs[1], outs[0])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 1000, 4099, 300_001])
def test_nonfinite_flags_every_tensor_exactly(n, threads, set_threads):
    """300 001 values: split over two threads (the kernel's grain is 65 536), the bad value in any share."""
    set_threads(threads)
    gen = torch.Generator().manual_seed(n)
    tensors = []
    for bad in (None, float("nan"), float("inf"), -float("inf"), 3e38):
        t = special_values((n,), gen)
        if bad is not None and n:
            t[int(torch.randint(0, n, (), generator=gen))] = bad
        tensors.append(t)
    tensors.append(torch.full((n, 3), 3e38)[:, ::2])  # non-contiguous, finite, its sum overflows
    tensors.append(torch.tensor([float("nan")] * min(n, 1), dtype=torch.float64))  # another dtype
    expected = [bool((~torch.isfinite(t)).any()) for t in tensors]
    assert kernels.ops.emb_nonfinite(tensors).tolist() == expected


@pytest.mark.parametrize("qat", [False, True])
def test_training_steps_give_the_same_parameters(qat):
    """Steps of the tiny DLRM (FP32, and INT4 QAT) with the kernels and without: torch.equal."""
    cards = [5, 7, 3] + [4] * 23  # small tables: most rows repeat within a batch
    config = model_config_from_preset("tiny", cards)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.rand(16, 13, generator=gen),
                torch.stack([torch.randint(0, c, (16,), generator=gen) for c in cards], dim=1),
                (torch.rand(16, generator=gen) < 0.3).float()) for _ in range(4)]
    quant = QuantConfig(emb_bits=4, mlp_bits=4, scale_period=3) if qat else None

    def finite(loss, model, dense):
        assert local_flags(loss, model.parameters(), dense).tolist() == [0.0, 0.0, 0.0]
    assert_same_states(states_after_training(config, quant, batches, steps=6, optimizer=PlainSGD,
                                             after_backward=finite))
