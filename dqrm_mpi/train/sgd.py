"""Plain SGD, the reference DLRM's optimizer (no momentum, no weight decay), with the least
work per step: ``p -= lr * grad`` for every parameter that has a gradient, dense or sparse
(the flat embedding table's sparse gradient updates only the looked-up rows).

The same arithmetic as ``torch.optim.SGD(params, lr)`` (``p.add_(grad, alpha=-lr)``), bit
for bit, without its per-step bookkeeping (hooks, profiler ranges, option checks).  With the
CPU kernels the flat table's sparse update is one single-threaded pass (``emb_sgd_sparse_``:
row after row in the gradient's order, a fused multiply-add per value, as torch's CPU add_).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .. import kernels


def _flat_rows(p: torch.Tensor) -> bool:
    """Whether ``emb_sgd_sparse_`` takes p and its sparse gradient: float32 contiguous [rows, d]
    on the CPU, gradient rows float32 [nnz, d]."""
    return (p.is_cpu and p.dtype == torch.float32 and p.dim() == 2 and p.is_contiguous()
            and p.grad.sparse_dim() == 1 and p.grad.dtype == torch.float32)


class PlainSGD:
    """``step()`` updates every parameter with a gradient; ``zero_grad()`` drops the gradients."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float) -> None:
        if lr <= 0:
            raise ValueError(f"the learning rate must be positive, got {lr}")
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr

    @torch.no_grad()
    def step(self) -> None:
        dense, grads = [], []
        for p in self.params:
            if p.grad is None:
                continue
            if p.grad.is_sparse:  # the looked-up rows only, duplicates added one after another
                if kernels.enabled() and _flat_rows(p):  # the same add_, one thread, no dispatch per row
                    kernels.ops.emb_sgd_sparse_(p, p.grad._indices(), p.grad._values(), -self.lr)
                else:
                    p.add_(p.grad, alpha=-self.lr)
            else:
                dense.append(p)
                grads.append(p.grad)
        if dense and dense[0].is_cpu:  # on the CPU one call runs this add_ per tensor: same bits, less overhead
            torch._foreach_add_(dense, grads, alpha=-self.lr)
        else:
            for p, grad in zip(dense, grads):
                p.add_(grad, alpha=-self.lr)

    def zero_grad(self) -> None:
        """Gradients become None (the next backward stores fresh ones, sparse ones included)."""
        for p in self.params:
            p.grad = None
