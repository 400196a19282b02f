"""DLRM (Naumov et al. 2019) as named parts: bottom MLP, embedding lookup,
pairwise dot interaction, top MLP.  Reference initialisation and layout.

The embedding lookup is a part given to ``DLRM`` (FP32 ``EmbeddingTables`` by default;
quantization-aware or packed tables from ``dqrm_mpi.quant``), and so is the factory of
the MLPs' linear layers: every variant runs the same ``DLRM.forward``.
"""
from __future__ import annotations

import math
import mmap
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .. import kernels
from .config import ModelConfig


def _init_linear(layer: nn.Linear) -> None:
    """Reference DLRM init: W ~ N(0, sqrt(2 / (fan_in + fan_out))), b ~ N(0, sqrt(1 / fan_out))."""
    fan_out, fan_in = layer.weight.shape
    with torch.no_grad():
        layer.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)))
        layer.bias.normal_(0.0, math.sqrt(1.0 / fan_out))


def table_memory(rows: int, dim: int) -> torch.Tensor:
    """Uninitialised float32 [rows, dim] on the CPU, in memory Linux may back with 2 MiB pages
    (``madvise(MADV_HUGEPAGE)`` before the first write; transparent huge pages in "madvise"
    or "always" mode).  A step reads and updates a few thousand random rows of the flat table:
    with 4 KiB pages nearly each of them also misses the TLB.  Where the kernel or Python
    offers no such advice (or below 2 MiB), ordinary memory."""
    nbytes = rows * dim * 4
    if nbytes < (2 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(rows, dim)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        memory.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: ordinary pages
        pass
    return torch.frombuffer(memory, dtype=torch.float32).view(rows, dim)  # the tensor keeps ``memory`` alive


# (in_features, out_features) -> a linear layer (nn.Linear or a subclass).
LinearFactory = Callable[[int, int], nn.Linear]


def _mlp(widths: list[int], relu_last: bool, linear: LinearFactory) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layer = linear(a, b)
        _init_linear(layer)
        layers.append(layer)
        if relu_last or i < len(widths) - 2:
            layers.append(nn.ReLU(inplace=True))  # over the linear output, which backward does not need
    return nn.Sequential(*layers)


def _fused_weights(layers: nn.Sequential, relu_last: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """The (weights, biases) that ``kernels.ops.mlp`` computes ``layers`` with, or None where it
    cannot: ``layers`` must be as ``_mlp`` built it (linear layers with biases, an in-place ReLU after
    each, or each but the last), every linear layer an ``nn.Linear`` or a ``QuantLinear`` whose
    inputs are not quantized (its weight then the fake-quantized one, ``effective_weight``).  Weights
    of another dtype or device than the float32 CPU input raise in the op, as F.linear would."""
    from ..quant.qat import QuantLinear  # (quant imports this module)

    modules = tuple(layers)
    linears, relus = modules[0::2], modules[1::2]
    if len(relus) != len(linears) - (0 if relu_last else 1) or not all(
            type(r) is nn.ReLU and r.inplace for r in relus):
        return None
    biases = [layer.bias for layer in linears]
    if any(b is None for b in biases) or not all(
            type(layer) is nn.Linear or (type(layer) is QuantLinear and not (layer._enabled and layer.a_bits))
            for layer in linears):
        return None
    return [layer.effective_weight() if type(layer) is QuantLinear else layer.weight for layer in linears], biases


def _mlp_forward(layers: nn.Sequential, relu_last: bool, x: torch.Tensor) -> torch.Tensor:
    """``layers(x)``; with the CPU kernels one autograd node for the whole MLP (the same bits)."""
    if kernels.enabled() and x.is_cpu and x.dtype == torch.float32:
        fused = _fused_weights(layers, relu_last)
        if fused is not None:
            return kernels.ops.mlp(x, *fused, relu_last)
    return layers(x)


class BottomMLP(nn.Module):
    """dense float32 [B, 13] -> [B, d]; ReLU after every layer (as the reference).  With the CPU
    kernels the layers run as one autograd node (``_mlp_forward``); ``layers`` stays the model."""

    def __init__(self, in_features: int, widths: tuple[int, ...], linear: LinearFactory = nn.Linear) -> None:
        super().__init__()
        self.layers = _mlp([in_features, *widths], relu_last=True, linear=linear)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return _mlp_forward(self.layers, True, dense)


class TopMLP(nn.Module):
    """interaction [B, F] -> logit [B]; ReLU between layers, none after the last (fused as BottomMLP's)."""

    def __init__(self, in_features: int, widths: tuple[int, ...], linear: LinearFactory = nn.Linear) -> None:
        super().__init__()
        self.layers = _mlp([in_features, *widths], relu_last=False, linear=linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mlp_forward(self.layers, False, x).squeeze(-1)


class EmbeddingTables(nn.Module):
    """The embedding tables stored as one flat table, one id per sample per table:
    sparse int [B, T] -> float32 [B, T, d] in one lookup (ids + table offsets).

    weight: float32 [sum n_t, d], table t at rows offsets[t] .. offsets[t] + n_t; its
    gradient is one sparse tensor (one row per sample and table, duplicates not merged).
    ``weight`` may be a Parameter already (kept as it is, ``freeze`` then does not apply).
    The state dict keeps one entry per table, ``tables.{t}.weight`` [n_t, d] (views of the
    flat table), as checkpoints of the per-table layout have it; ``table(t)`` is that view.
    """

    def __init__(self, weight: torch.Tensor, cardinalities: tuple[int, ...], freeze: bool = False) -> None:
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] != sum(cardinalities):
            raise ValueError(f"the flat table must be [{sum(cardinalities)}, d], got {tuple(weight.shape)}")
        self.cardinalities = tuple(int(n) for n in cardinalities)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=not freeze)
        starts = [0]
        for n in self.cardinalities[:-1]:
            starts.append(starts[-1] + n)
        self._starts = starts
        self.register_buffer("offsets", torch.tensor(starts, dtype=torch.int64), persistent=False)

    @classmethod
    def initialised(cls, cardinalities: tuple[int, ...], dim: int) -> "EmbeddingTables":
        """Reference initialisation: rows of table t uniform in +-sqrt(1 / n_t).  Each table
        first draws the N(0, 1) values ``nn.EmbeddingBag`` would (then overwritten), so the
        random stream, and every parameter initialised after the tables, is as before."""
        weight = table_memory(sum(cardinalities), dim)
        tables = torch.split(weight, list(cardinalities))
        for table in tables:
            table.normal_()
        for table, n in zip(tables, cardinalities):
            bound = math.sqrt(1.0 / n)
            table.uniform_(-bound, bound)
        return cls(weight, cardinalities)

    @classmethod
    def from_tables(cls, weights: list[torch.Tensor], freeze: bool = False) -> "EmbeddingTables":
        """Tables float32 [n_t, d] (copied into one flat table)."""
        return cls(torch.cat(weights), tuple(w.shape[0] for w in weights), freeze)

    @property
    def num_tables(self) -> int:
        return len(self.cardinalities)

    def table(self, t: int) -> torch.Tensor:
        """Table t, a view [n_t, d] of the flat weight."""
        return self.weight[self._starts[t]:self._starts[t] + self.cardinalities[t]]

    def table_weights(self) -> list[torch.Tensor]:
        """Every table, views [n_t, d] of the flat weight (detached)."""
        return list(torch.split(self.weight.detach(), self.cardinalities))

    def lookup(self, sparse: torch.Tensor) -> torch.Tensor:
        """sparse int [B, T] -> the rows float32 [B, T, d], one embedding call."""
        rows = F.embedding((sparse + self.offsets).reshape(-1), self.weight, sparse=True)
        return rows.view(*sparse.shape, self.weight.shape[1])

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        return self.lookup(sparse)

    def _table_keys(self, prefix: str) -> list[str]:
        return [f"{prefix}tables.{t}.weight" for t in range(self.num_tables)]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = destination.pop(prefix + "weight")
        for key, n, start in zip(self._table_keys(prefix), self.cardinalities, self._starts):
            destination[key] = weight[start:start + n]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = self._table_keys(prefix)
        for t, key in enumerate(keys):
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value, expected = state_dict[key], (self.cardinalities[t], self.weight.shape[1])
            if tuple(value.shape) != expected:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
                                  f"checkpoint, the shape in current model is {expected}.")
                continue
            with torch.no_grad():
                self.table(t).copy_(value)
        if strict:
            known = set(keys)
            for key in state_dict:
                if (key.startswith(prefix) and key not in known
                        and key[len(prefix):].split(".", 1)[0] not in self._modules):
                    unexpected_keys.append(key)


class _PairwiseDots(torch.autograd.Function):
    """``PairwiseDotInteraction.forward`` as one autograd node: the same cat and bmm, the pair
    gather fused with the final cat; backward runs the two bmm autograd would, around one
    kernel that places the pairs' gradient and one that adds and splits the vectors' gradient."""

    @staticmethod
    def forward(ctx, bottom: torch.Tensor, embeddings: torch.Tensor, pairs: torch.Tensor,
                owner: "PairwiseDotInteraction | None") -> torch.Tensor:
        """owner: the module whose scratch memory the dots use (None: fresh memory, e.g. evaluation)."""
        vectors = torch.cat([bottom.unsqueeze(1), embeddings], dim=1)  # [B, V, d]
        out = owner.scratch(vectors) if owner is not None else None
        dots = torch.bmm(vectors, vectors.transpose(1, 2), out=out)  # [B, V, V]
        ctx.save_for_backward(vectors, pairs)
        ctx.owner = owner
        return kernels.ops.emb_pairs_forward(bottom, dots, pairs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        vectors, pairs = ctx.saved_tensors
        dots_grad = ctx.owner.scratch(vectors)  # [B, V, V], the forward's dots are no longer needed
        kernels.ops.emb_pairs_backward(grad, pairs, dots_grad)
        # bmm's backward for its two inputs (both ``vectors``), as autograd forms them
        g1 = torch.bmm(dots_grad, vectors)
        g2 = torch.bmm(vectors.transpose(1, 2), dots_grad)
        bottom_grad, embeddings_grad = kernels.ops.emb_interaction_grads(grad, g1, g2)
        return bottom_grad, embeddings_grad, None, None


class PairwiseDotInteraction(nn.Module):
    """bottom [B, d] and embeddings [B, 26, d] -> [B, 27*26/2 + d].

    Dot products of every pair of the 27 vectors without self pairs (strict lower
    triangle, reference order), concatenated after the bottom-MLP output.
    """

    def __init__(self, num_vectors: int) -> None:
        super().__init__()
        rows, cols = torch.tril_indices(num_vectors, num_vectors, offset=-1)
        # positions of the pairs in the flattened [27 * 27] dot products: one index_select picks them
        # (several times faster than indexing with rows and cols, forward and backward; same values)
        self.register_buffer("pairs", rows * num_vectors + cols, persistent=False)
        self._scratch: torch.Tensor | None = None

    def scratch(self, vectors: torch.Tensor) -> torch.Tensor:
        """float32 [B, V, V] memory kept from step to step for the kernel path's dots and their
        gradient (each used and done with inside one forward or one backward): fresh 1.5 MB
        tensors each step cost page faults at batch 512."""
        shape = (vectors.shape[0], vectors.shape[1], vectors.shape[1])
        if self._scratch is None or self._scratch.shape != shape or self._scratch.device != vectors.device:
            self._scratch = torch.empty(shape, dtype=vectors.dtype, device=vectors.device)
        return self._scratch

    def forward(self, bottom: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        if (kernels.enabled() and bottom.is_cpu and bottom.dtype == torch.float32
                and embeddings.dtype == torch.float32):
            # training keeps one scratch tensor for the dots and their gradient; evaluation's
            # large batches allocate theirs and free them
            return _PairwiseDots.apply(bottom, embeddings, self.pairs, self if torch.is_grad_enabled() else None)
        vectors = torch.cat([bottom.unsqueeze(1), embeddings], dim=1)  # [B, 27, d]
        dots = torch.bmm(vectors, vectors.transpose(1, 2))  # [B, 27, 27]
        return torch.cat([bottom, dots.flatten(1).index_select(1, self.pairs)], dim=1)


class DLRM(nn.Module):
    """(dense [B, 13] float32, sparse [B, 26] int) -> click logit [B].

    embeddings: the lookup sparse int [B, 26] -> float32 [B, 26, d]; None builds FP32
      ``EmbeddingTables`` (initialised between the bottom and top MLPs, the reference order).
    linear: builds each MLP layer (``nn.Linear`` or a subclass); its weights are then
      initialised as the reference does.
    """

    def __init__(self, config: ModelConfig, embeddings: nn.Module | None = None,
                 linear: LinearFactory = nn.Linear) -> None:
        super().__init__()
        self.config = config
        self.bottom = BottomMLP(config.dense_inputs, config.bottom_mlp, linear)
        self.embeddings = (embeddings if embeddings is not None else
                           EmbeddingTables.initialised(config.cardinalities, config.embedding_dim))
        self.interaction = PairwiseDotInteraction(len(config.cardinalities) + 1)
        self.top = TopMLP(config.num_interactions, config.top_mlp, linear)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        bottom = self.bottom(dense)
        return self.top(self.interaction(bottom, self.embeddings(sparse)))

    def embedding_parameter_names(self) -> set[str]:
        """Names of the parameters with sparse gradients: the flat table."""
        return {"embeddings.weight"}

    def embedding_tables(self) -> list[tuple[str, int]]:
        """(name, rows) of each table, in the flat table's order: the exchange scales and
        remembers embedding gradients per table under these names (the state dict's keys)."""
        return [(f"embeddings.tables.{t}.weight", n) for t, n in enumerate(self.embeddings.cardinalities)]
