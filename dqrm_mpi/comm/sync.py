"""Gradient synchronizer: after ``backward()`` and before ``optimizer.step()``, make every
rank's gradients the average over all ranks.

- Dense gradients (MLPs): one grouped allreduce-average.
- Embedding gradients (sparse COO from ``EmbeddingBag(sparse=True)``): duplicate rows are
  merged locally, the 26 tables are flattened into one id space (table offset + row),
  ids and values of all ranks are allgathered, summed per id and divided by the world size.

The result on every rank is the same (rank-ordered reduction), so parameters stay identical.
"""
from __future__ import annotations

import torch
from torch import nn

from .backend import HorovodBackend


class GradientSynchronizer:
    """Averages the gradients of ``model`` across ranks; parameters are keyed by name."""

    def __init__(self, backend: HorovodBackend, model: nn.Module, sparse_names: set[str]) -> None:
        params = dict(model.named_parameters())
        missing = sparse_names - set(params)
        if missing:
            raise ValueError(f"sparse parameters not in the model: {sorted(missing)}")
        self.backend = backend
        self.dense = [(n, p) for n, p in params.items() if n not in sparse_names and p.requires_grad]
        self.sparse = [(n, params[n]) for n in sorted(sparse_names, key=list(params).index)]
        dims = {p.shape[1] for _, p in self.sparse}
        if len(dims) > 1:
            raise ValueError(f"embedding tables must share one dim, got {sorted(dims)}")
        rows = [p.shape[0] for _, p in self.sparse]
        self.offsets = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], dtype=torch.int64)
        self.total_rows = int(self.offsets[-1])
        self.dim = dims.pop() if dims else 0

    def synchronize(self) -> None:
        if self.backend.size == 1:
            return
        self._dense()
        if self.sparse:
            self._sparse()

    def _dense(self) -> None:
        grads = []
        for _, p in self.dense:
            if p.grad is None:  # a parameter unused this step still takes part (as zeros)
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for g, avg in zip(grads, self.backend.allreduce_average(grads, name="grad.dense", kind="mlp")):
            g.copy_(avg)

    def local_sparse_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's embedding gradient: global row ids int64 [nnz] (unique, sorted) and values [nnz, d]."""
        ids, values = [], []
        for (name, p), offset in zip(self.sparse, self.offsets[:-1].tolist()):
            g = p.grad
            if g is None:
                continue
            if not g.is_sparse:
                raise TypeError(f"{name}: expected a sparse gradient (EmbeddingBag(sparse=True)), got dense")
            g = g.coalesce()
            ids.append(g.indices()[0] + offset)
            values.append(g.values())
        if not ids:
            return torch.empty(0, dtype=torch.int64), torch.empty(0, self.dim)
        return torch.cat(ids), torch.cat(values)

    def _sparse(self) -> None:
        ids, values = self.local_sparse_rows()
        ids_parts, value_parts = self.backend.allgather([ids, values], name="grad.emb", kind="emb")
        self.set_sparse_grads(torch.cat(ids_parts), torch.cat(value_parts) / self.backend.size)

    def set_sparse_grads(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Sum ``values`` [n, d] per global row id [n] and store them as the tables' gradients."""
        device = self.sparse[0][1].device
        merged = torch.sparse_coo_tensor(ids.unsqueeze(0), values, (self.total_rows, self.dim),
                                         check_invariants=False).coalesce()
        rows, vals = merged.indices()[0], merged.values()
        bounds = torch.searchsorted(rows, self.offsets.to(rows.device)).tolist()
        for t, (_, p) in enumerate(self.sparse):
            lo, hi = bounds[t], bounds[t + 1]
            p.grad = torch.sparse_coo_tensor(
                (rows[lo:hi] - int(self.offsets[t])).unsqueeze(0), vals[lo:hi], p.shape,
                is_coalesced=True).to(device)
