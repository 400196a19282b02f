"""Top-k MLP gradients with INT8 values and error feedback over real Horovod ranks: replicas in
separate processes stay identical (the rest of the top-k matrix runs on simulated ranks,
tests/comm/test_topk.py)."""
from __future__ import annotations

from dqrm_mpi.compression import CompressionConfig
from tests.mpi.test_compression import _check_replicas_identical


def test_replicas_identical_with_topk_int8(backend):
    _check_replicas_identical(backend, CompressionConfig(emb="int8", mlp="topk:0.01+int8", error_feedback="mlp"))
