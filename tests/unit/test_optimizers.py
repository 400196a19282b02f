"""The tables' and MLPs' optimizers (train/optimizers.py) against independent references,
the kernel against its PyTorch path bit for bit, and their state across a checkpoint."""
from __future__ import annotations

import copy

import pytest
import torch

from dqrm_mpi import kernels
from dqrm_mpi.model import DLRM, model_config_from_preset
from dqrm_mpi.quant import QuantConfig, prepare_qat
from dqrm_mpi.train.optimizers import (ADAGRAD_EPS, LAMB_EPS, ROWWISE_ADAGRAD_EPS, Lamb, OptimConfig, TableAdagrad,
                                       TrainingOptimizer, adagrad_rows_)
from dqrm_mpi.train.schedule import LRSchedule
from dqrm_mpi.train.sgd import PlainSGD

CARDS = [5, 7, 3] + [4] * 23
needs_kernels = pytest.mark.skipif(not kernels.BUILT, reason="the CPU kernels are not built")


def _sparse_grad(rows: int, dim: int, ids: list[int], seed: int) -> torch.Tensor:
    """An uncoalesced sparse gradient [rows, dim]: one row of values per id, duplicates kept."""
    values = torch.randn(len(ids), dim, generator=torch.Generator().manual_seed(seed))
    return torch.sparse_coo_tensor(torch.tensor([ids]), values, (rows, dim))


@pytest.mark.parametrize("rowwise", [True, False])
def test_sparse_adagrad_equals_a_dense_float64_reference(rowwise):
    rows, dim, lr = 12, 5, 0.3
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(rows, dim))
    opt = TableAdagrad(param, lr, rowwise=rowwise)
    w = param.detach().double().clone()
    acc = torch.zeros(rows if rowwise else (rows, dim), dtype=torch.float64)
    eps = ROWWISE_ADAGRAD_EPS if rowwise else ADAGRAD_EPS
    batches = [[3, 1, 3, 3, 7], [7, 0, 1], [3, 11, 11]]  # duplicates; rows 2, 4-6, 8-10 never looked up
    before = param.detach().clone()
    for step, ids in enumerate(batches):
        grad = _sparse_grad(rows, dim, ids, step)
        param.grad = grad
        opt.step()
        g = grad.to_dense().double()  # duplicates summed, as the exact optimizer must
        seen = torch.tensor(sorted(set(ids)))
        if rowwise:
            acc[seen] += (g[seen] ** 2).mean(dim=1)
            w[seen] -= lr * g[seen] / (acc[seen].sqrt() + eps).unsqueeze(1)
        else:
            acc[seen] += g[seen] ** 2
            w[seen] -= lr * g[seen] / (acc[seen].sqrt() + eps)
    torch.testing.assert_close(param.detach().double(), w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(opt.state.double(), acc, rtol=1e-6, atol=1e-7)
    untouched = [2, 4, 5, 6, 8, 9, 10]
    assert torch.equal(param.detach()[untouched], before[untouched])  # bit for bit
    assert not opt.state[untouched].any()
    assert opt.state.shape == ((rows,) if rowwise else (rows, dim))  # row-wise: one float per row


def test_elementwise_table_adagrad_follows_torch_optim_adagrad():
    torch.manual_seed(1)
    ours = torch.nn.Parameter(torch.randn(9, 4))
    ref = torch.nn.Parameter(ours.detach().clone())
    opt, torch_opt = TableAdagrad(ours, 0.2, rowwise=False), torch.optim.Adagrad([ref], lr=0.2, eps=ADAGRAD_EPS)
    for step, ids in enumerate([[0, 2, 2, 5], [5, 5, 8], [1, 0]]):
        ours.grad = _sparse_grad(9, 4, ids, step)
        ref.grad = ours.grad.clone()
        opt.step()
        torch_opt.step()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


@needs_kernels
@pytest.mark.parametrize("rowwise", [True, False])
@pytest.mark.parametrize("dim", [1, 7, 16, 64])
def test_adagrad_kernel_equals_the_pytorch_path_bit_for_bit(rowwise, dim):
    gen = torch.Generator().manual_seed(dim)
    rows = 3000
    weight = torch.randn(rows, dim, generator=gen)
    state = torch.rand(rows if rowwise else (rows, dim), generator=gen)
    state[:10] = 0  # first updates: sqrt(0 + g^2)
    ids = torch.randperm(rows, generator=gen)[:2000].sort().values
    values = torch.randn(2000, dim, generator=gen)
    values[::97] = 0.0
    w_kernel, s_kernel = weight.clone(), state.clone()
    kernels.ops.emb_adagrad_sparse_(w_kernel, s_kernel, ids, values, 0.37, 1e-8)
    adagrad_rows_(weight, state, ids, values, 0.37, 1e-8)
    assert torch.equal(w_kernel, weight) and torch.equal(s_kernel, state)


@needs_kernels
def test_adagrad_kernel_refuses_unsorted_or_out_of_range_rows():
    weight, state = torch.zeros(5, 2), torch.zeros(5)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        kernels.ops.emb_adagrad_sparse_(weight, state, torch.tensor([1, 1]), torch.ones(2, 2), 0.1, 1e-8)
    with pytest.raises(IndexError, match="out of range"):
        kernels.ops.emb_adagrad_sparse_(weight, state, torch.tensor([5]), torch.ones(1, 2), 0.1, 1e-8)
    with pytest.raises(RuntimeError, match="state must be"):
        kernels.ops.emb_adagrad_sparse_(weight, torch.zeros(4), torch.tensor([1]), torch.ones(1, 2), 0.1, 1e-8)


def test_lamb_equals_a_float64_reference():
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(6, 3))
    zero = torch.nn.Parameter(torch.zeros(4))  # ||w|| = 0: trust ratio 1
    opt = Lamb([p, zero], lr=0.05)
    w, z = p.detach().double().clone(), zero.detach().double().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    mz, vz = torch.zeros_like(z), torch.zeros_like(z)
    for t in range(1, 4):
        g = torch.randn(6, 3)
        gz = torch.randn(4)
        p.grad, zero.grad = g, gz
        opt.step()
        for x, grad, m_, v_, trust_norm in ((w, g.double(), m, v, True), (z, gz.double(), mz, vz, False)):
            m_.mul_(0.9).add_(0.1 * grad)
            v_.mul_(0.999).add_(0.001 * grad * grad)
            u = (m_ / (1 - 0.9 ** t)) / ((v_ / (1 - 0.999 ** t)).sqrt() + LAMB_EPS)
            trust = x.norm() / u.norm() if x.norm() > 0 else 1.0
            x -= 0.05 * trust * u
    torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zero.detach().double(), z, rtol=1e-5, atol=1e-6)


def _batches(count: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):  # small tables: every batch repeats ids
        yield (torch.rand(16, 13, generator=gen),
               torch.stack([torch.randint(0, c, (16,), generator=gen) for c in CARDS], dim=1),
               (torch.rand(16, generator=gen) < 0.3).float())


def _train(model: DLRM, opt, batches, first_step: int = 0, qat=None) -> None:
    for step, (dense, sparse, label) in enumerate(batches, start=first_step):
        if qat:
            qat.on_step(step)
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), label).backward()
        opt.step(step) if isinstance(opt, TrainingOptimizer) else opt.step()


def test_default_optimizers_are_plain_sgd_bit_for_bit():
    torch.manual_seed(0)
    ours = DLRM(model_config_from_preset("tiny", CARDS))
    ref = copy.deepcopy(ours)
    _train(ours, TrainingOptimizer(ours, ours.embedding_parameter_names(), OptimConfig(), 0.3, 16, 100), _batches(4))
    _train(ref, PlainSGD(ref.parameters(), lr=0.3), _batches(4))
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("emb, mlp", [("rowwise-adagrad", "adam"), ("adagrad", "lamb"), ("sgd", "adagrad")])
@pytest.mark.parametrize("quant", [None, QuantConfig(emb_bits=4, mlp_bits=4, scale_period=2)])
@pytest.mark.parametrize("stop", [2, 7])  # in the warm-up (steps 0-2), in the decay (5-8)
def test_optimizer_state_round_trip_continues_bit_for_bit(emb, mlp, quant, stop):
    config = OptimConfig(emb_optimizer=emb, mlp_optimizer=mlp, emb_lr=0.05, mlp_lr=0.01,
                         schedule=LRSchedule(warmup_steps=3, decay_start=5, decay_steps=4))
    torch.manual_seed(0)
    whole = DLRM(model_config_from_preset("tiny", CARDS))
    split = copy.deepcopy(whole)
    qats = [prepare_qat(m, quant) if quant else None for m in (whole, split)]
    batches = list(_batches(8))
    opt = TrainingOptimizer(whole, whole.embedding_parameter_names(), config, 0.1, 16, 9)
    _train(whole, opt, batches, qat=qats[0])
    first = TrainingOptimizer(split, split.embedding_parameter_names(), config, 0.1, 16, 9)
    _train(split, first, batches[:stop], qat=qats[1])
    saved = copy.deepcopy({"model": split.state_dict(), "optimizer": first.state_dict()})
    torch.manual_seed(123)
    resumed = DLRM(model_config_from_preset("tiny", CARDS))
    qat = prepare_qat(resumed, quant) if quant else None
    resumed.load_state_dict(saved["model"])
    second = TrainingOptimizer(resumed, resumed.embedding_parameter_names(), config, 0.1, 16, 9)
    second.load_state_dict(saved["optimizer"])
    _train(resumed, second, batches[stop:], first_step=stop, qat=qat)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    torch.manual_seed(0)
    start = DLRM(model_config_from_preset("tiny", CARDS))
    assert not torch.equal(whole.embeddings.weight, start.embeddings.weight)


def test_a_stateful_optimizer_needs_its_state():
    model = DLRM(model_config_from_preset("tiny", CARDS))
    opt = TrainingOptimizer(model, model.embedding_parameter_names(), OptimConfig(emb_optimizer="rowwise-adagrad"),
                            0.1, 16, 10)
    with pytest.raises(ValueError, match="no state for the emb optimizer"):
        opt.load_state_dict({})


def test_rates_scale_with_the_batch_and_follow_the_schedule():
    model = DLRM(model_config_from_preset("tiny", CARDS))
    config = OptimConfig(emb_lr=0.02, lr_scaling="linear", lr_base_batch=128,
                         schedule=LRSchedule(warmup_steps=4, decay_steps=10, end_factor=0.1))
    opt = TrainingOptimizer(model, model.embedding_parameter_names(), config, 0.1, 1024, 30)
    assert opt.base == pytest.approx({"emb": 0.16, "mlp": 0.8})
    assert opt.schedule.decay_start == 20  # the run's last 10 steps
    assert opt.learning_rates(0) == pytest.approx({"emb": 0.04, "mlp": 0.2})
    assert opt.learning_rates(29)["mlp"] == pytest.approx(0.8 * (0.1 + 0.9 * 0.1 ** 2))
    assert opt.describe()["schedule"]["decay_start"] == 20
    assert "tables sgd lr 0.16, MLPs sgd lr 0.8 (linear scaling from batch 128); warm-up 4 steps" in opt.summary_line()
