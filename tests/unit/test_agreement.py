import contextlib

import pytest
import torch

from dqrm_mpi import kernels
from dqrm_mpi.model import DLRM, model_config_from_preset
from dqrm_mpi.train.agreement import local_flags

CARDS = [5, 7, 3] + [4] * 23


@pytest.fixture(autouse=True, params=["kernel", "pytorch"])
def finite_check_path(request):
    """Every test runs the fused check (emb_nonfinite) and the PyTorch sums with their fallback."""
    if request.param == "kernel" and not kernels.enabled():
        pytest.skip("the kernels are not built, or DQRM_KERNELS=0")
    with kernels.disabled() if request.param == "pytorch" else contextlib.nullcontext():
        yield


def _stepped(seed: int = 0) -> tuple[DLRM, torch.Tensor, torch.Tensor]:
    """A tiny DLRM after one backward (sparse embedding gradient included), its loss and dense inputs."""
    torch.manual_seed(seed)
    model = DLRM(model_config_from_preset("tiny", CARDS))
    dense = torch.rand(8, 13)
    sparse = torch.stack([torch.randint(0, c, (8,)) for c in CARDS], dim=1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), torch.ones(8))
    loss.backward()
    return model, loss, dense


def test_finite_step_raises_no_flag():
    model, loss, dense = _stepped()
    assert model.embeddings.weight.grad.is_sparse
    assert local_flags(loss, model.parameters(), dense).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["loss", "dense", "mlp gradient", "embedding gradient"])
def test_each_non_finite_value_sets_its_own_flag(bad, where):
    model, loss, dense = _stepped()
    if where == "loss":
        loss = torch.tensor(bad)
    elif where == "dense":
        dense[3, 5] = bad
    elif where == "mlp gradient":
        model.top.layers[0].weight.grad[7, 11] = bad
    else:
        model.embeddings.weight.grad._values()[-1, 0] = bad
    expected = {"loss": [1.0, 0.0, 0.0], "dense": [0.0, 0.0, 1.0]}.get(where, [0.0, 1.0, 0.0])
    assert local_flags(loss, model.parameters(), dense).tolist() == expected


def test_finite_values_whose_sum_overflows_are_not_flagged():
    model, loss, dense = _stepped()
    for p in model.parameters():  # every sum, and the sum of the sums, overflows float32 to inf
        values = p.grad._values() if p.grad.is_sparse else p.grad
        values.fill_(3e38)
    assert local_flags(loss, model.parameters(), dense).tolist() == [0.0, 0.0, 0.0]
