"""Where the model's tensors live: --device, and the gradient exchange on the model's device.

The exchange is run by two simulated ranks (threads) with the model on each available
device: on the CPU everywhere, on a GPU only where torch sees one (the host-staged Horovod
path of a CPU-only Horovod build: ids and values come back in host memory and must be
moved to the tables' device together)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dqrm_mpi.comm.inprocess import run_ranks
from dqrm_mpi.comm.sync import GradientSynchronizer
from dqrm_mpi.compression import CompressionConfig
from dqrm_mpi.data.reader import Batch
from dqrm_mpi.model import DLRM, model_config_from_preset
from dqrm_mpi.train.loop import select_device

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="torch sees no CUDA device"))]
CARDINALITIES = [30 + 7 * t for t in range(26)]


def _batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(64, 13, generator=g),
                 torch.stack([torch.randint(0, n, (64,), generator=g) for n in CARDINALITIES], dim=1),
                 torch.randint(0, 2, (64,), generator=g).float())


def _step(device: str, compression: CompressionConfig):
    """Per rank: (local gradients, exchanged gradients, devices of the exchanged gradients)."""
    def rank(backend):
        torch.manual_seed(0)
        model = DLRM(model_config_from_preset("tiny", CARDINALITIES)).to(device)
        b = _batch(backend.rank).to(torch.device(device))
        nn.BCEWithLogitsLoss()(model(b.dense, b.sparse), b.label).backward()
        local = {n: p.grad.to_dense().cpu() for n, p in model.named_parameters()}
        GradientSynchronizer(backend, model, model.embedding_parameter_names(), compression).synchronize()
        return (local, {n: p.grad.to_dense().cpu() for n, p in model.named_parameters()},
                {p.grad.device for p in model.parameters()})
    return run_ranks(2, rank)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("emb", ["none", "int8"])
def test_exchanged_gradients_are_averages_on_the_models_device(device, emb):
    results = _step(device, CompressionConfig(emb=emb, mlp="fp16" if emb == "none" else "int8"))
    (local0, synced0, devices0), (local1, synced1, devices1) = results
    assert devices0 == devices1 == {torch.device(device, 0) if device == "cuda" else torch.device(device)}
    for name, g in synced0.items():
        assert torch.equal(g, synced1[name]), name  # every rank holds the same gradient
        tol = dict(rtol=0, atol=1e-7) if emb == "none" and "emb" in name else dict(rtol=0.02, atol=0.02)
        torch.testing.assert_close(g, (local0[name] + local1[name]) / 2, **tol, msg=name)


def test_select_device():
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        assert select_device("auto", 3) == select_device("cuda", 3) == torch.device("cuda", 3 % count)
    else:
        assert select_device("auto", 3) == torch.device("cpu")
        with pytest.raises(ValueError, match="--device cuda: torch sees no CUDA device"):
            select_device("cuda", 0)
    assert select_device("cpu", 1) == torch.device("cpu")
