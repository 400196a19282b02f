"""QAT on real ranks: rank 0's scales and counters reach every rank, and replicas (parameters
and QAT buffers, activation scales included) stay identical while training on different data."""
from __future__ import annotations

import torch

from dqrm_mpi.comm.sync import GradientSynchronizer
from dqrm_mpi.model import DLRM, model_config_from_preset
from dqrm_mpi.quant import QuantConfig, prepare_qat
from dqrm_mpi.train.loop import average_activation_scales

CARDS = (30, 20, 50, 40, 10, 24, 35, 25, 3, 45, 15, 50, 22, 27, 40, 48, 10, 30, 20, 4, 50, 18, 15, 33, 21, 19)


def _flat_state(model) -> torch.Tensor:
    return torch.cat([v.detach().double().reshape(-1) for v in model.state_dict().values()])


def test_qat_state_is_broadcast_and_replicas_stay_identical(backend):
    torch.manual_seed(backend.rank)  # different initialisation on every rank before the broadcast
    model = DLRM(model_config_from_preset("tiny", CARDS))
    qat = prepare_qat(model, QuantConfig(emb_bits=4, mlp_bits=4, act_bits=8, scale_period=3))
    qat.on_step(0)
    model.embeddings.row_transform.refreshes.fill_(10 + backend.rank)  # a counter that differs per rank
    backend.broadcast_module(model)
    states = backend.allgather_array(_flat_state(model).unsqueeze(0), name="qat.after_bcast")
    assert torch.equal(states[0], states[1])
    assert int(model.embeddings.row_transform.refreshes) == 10

    sync = GradientSynchronizer(backend, model, model.embedding_parameter_names())
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    gen = torch.Generator().manual_seed(50 + backend.rank)  # different data on every rank
    for step in range(1, 8):
        qat.on_step(step)
        dense = torch.rand(32, 13, generator=gen) * (1 + backend.rank)
        sparse = torch.stack([torch.randint(0, c, (32,), generator=gen) for c in CARDS], dim=1)
        label = (torch.rand(32, generator=gen) < 0.3).float()
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), label).backward()
        sync.synchronize()
        opt.step()
        average_activation_scales(qat, backend)  # as the training loop does after every step
        states = backend.allgather_array(_flat_state(model).unsqueeze(0), name=f"qat.step{step}")
        diff = float((states - states[0]).abs().max())
        assert diff <= 1e-6, f"step {step}: replicas differ by {diff}"
    assert int(model.embeddings.row_transform.refreshes) == 10 + 2  # steps 3 and 6
