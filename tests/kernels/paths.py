"""The two paths the kernels' tests compare, and a short DLRM training run on each."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.nn import functional as F

from dqrm_mpi import kernels
from dqrm_mpi.model import DLRM, ModelConfig
from dqrm_mpi.quant import QuantConfig, prepare_qat

PATHS = (kernels.disabled, contextlib.nullcontext)  # the PyTorch path, then the kernels


def states_after_training(config: ModelConfig, quant: QuantConfig | None, batches: list, steps: int,
                          optimizer: Callable = torch.optim.SGD,
                          after_backward: Callable | None = None) -> list[dict[str, torch.Tensor]]:
    """The state dicts of ``DLRM(config)`` (seeded with 0; quantization-aware with ``quant``, None:
    FP32) after ``steps`` steps of ``optimizer`` (lr 0.5; QAT's on_step first) on ``batches``
    (dense, sparse, label) in turn, on each of PATHS.  after_backward(loss, model, dense) runs
    after each backward."""
    states = []
    for context in PATHS:
        with context():
            torch.manual_seed(0)
            model = DLRM(config)
            qat = prepare_qat(model, quant) if quant is not None else None
            opt = optimizer(model.parameters(), lr=0.5)
            for step in range(steps):
                dense, sparse, label = batches[step % len(batches)]
                if qat is not None:
                    qat.on_step(step)
                opt.zero_grad()
                loss = F.binary_cross_entropy_with_logits(model(dense, sparse), label)
                loss.backward()
                if after_backward is not None:
                    after_backward(loss, model, dense)
                opt.step()
            states.append(model.state_dict())
    return states


def assert_same_states(states: list[dict[str, torch.Tensor]]) -> None:
    """Both paths' state dicts hold the same keys and equal tensors."""
    first, second = states
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
