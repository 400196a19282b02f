import copy

import pytest
import torch

from dqrm_mpi.model import DLRM, model_config_from_preset
from dqrm_mpi.quant import QuantConfig, prepare_qat
from dqrm_mpi.train.sgd import PlainSGD

CARDS = [5, 7, 3] + [4] * 23


@pytest.mark.parametrize("quant", [None, QuantConfig(emb_bits=4, mlp_bits=4, scale_period=2)])
def test_plain_sgd_equals_torch_sgd_bit_for_bit_with_sparse_embedding_gradients(quant):
    torch.manual_seed(0)
    ours = DLRM(model_config_from_preset("tiny", CARDS))
    ref = copy.deepcopy(ours)
    qats = [prepare_qat(m, quant) if quant else None for m in (ours, ref)]
    opts = [PlainSGD(ours.parameters(), lr=0.3), torch.optim.SGD(ref.parameters(), lr=0.3)]
    gen = torch.Generator().manual_seed(1)
    for step in range(4):  # small tables: every batch repeats ids
        dense = torch.rand(16, 13, generator=gen)
        sparse = torch.stack([torch.randint(0, c, (16,), generator=gen) for c in CARDS], dim=1)
        label = (torch.rand(16, generator=gen) < 0.3).float()
        for model, qat, opt in zip((ours, ref), qats, opts):
            if qat:
                qat.on_step(step)
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), label).backward()
            opt.step()
        assert ours.embeddings.weight.grad.is_sparse
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    torch.manual_seed(0)
    start = DLRM(model_config_from_preset("tiny", CARDS))
    assert not torch.equal(ours.embeddings.table(0), start.embeddings.table(0))  # the tables did train


def test_parameters_without_gradient_stay_and_zero_grad_drops_gradients():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = PlainSGD([a, b], lr=0.5)
    (2 * a).sum().backward()
    opt.step()
    assert a.tolist() == [0.0] * 3 and b.tolist() == [1.0] * 2
    opt.zero_grad()
    assert a.grad is None and b.grad is None
    with pytest.raises(ValueError, match="learning rate must be positive"):
        PlainSGD([a], lr=0.0)
