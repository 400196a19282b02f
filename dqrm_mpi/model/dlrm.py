"""DLRM (Naumov et al. 2019) as named parts: bottom MLP, embedding lookup,
pairwise dot interaction, top MLP.  Reference initialisation and layout.

The embedding lookup is a part given to ``DLRM`` (FP32 ``EmbeddingTables`` by default;
quantization-aware or packed tables from ``dqrm_mpi.quant``), and so is the factory of
the MLPs' linear layers: every variant runs the same ``DLRM.forward``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .config import ModelConfig


def _init_linear(layer: nn.Linear) -> None:
    """Reference DLRM init: W ~ N(0, sqrt(2 / (fan_in + fan_out))), b ~ N(0, sqrt(1 / fan_out))."""
    fan_out, fan_in = layer.weight.shape
    with torch.no_grad():
        layer.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)))
        layer.bias.normal_(0.0, math.sqrt(1.0 / fan_out))


# (in_features, out_features) -> a linear layer (nn.Linear or a subclass).
LinearFactory = Callable[[int, int], nn.Linear]


def _mlp(widths: list[int], relu_last: bool, linear: LinearFactory) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layer = linear(a, b)
        _init_linear(layer)
        layers.append(layer)
        if relu_last or i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BottomMLP(nn.Module):
    """dense float32 [B, 13] -> [B, d]; ReLU after every layer (as the reference)."""

    def __init__(self, in_features: int, widths: tuple[int, ...], linear: LinearFactory = nn.Linear) -> None:
        super().__init__()
        self.layers = _mlp([in_features, *widths], relu_last=True, linear=linear)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return self.layers(dense)


class TopMLP(nn.Module):
    """interaction [B, F] -> logit [B]; ReLU between layers, none after the last."""

    def __init__(self, in_features: int, widths: tuple[int, ...], linear: LinearFactory = nn.Linear) -> None:
        super().__init__()
        self.layers = _mlp([in_features, *widths], relu_last=False, linear=linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


def fp32_tables(cardinalities: tuple[int, ...], dim: int) -> nn.ModuleList:
    """One ``EmbeddingBag`` per table with sparse gradients, reference initialisation
    (rows of table t uniform in +-sqrt(1 / n_t))."""
    tables = nn.ModuleList(nn.EmbeddingBag(n, dim, mode="sum", sparse=True) for n in cardinalities)
    with torch.no_grad():
        for table, n in zip(tables, cardinalities):
            bound = math.sqrt(1.0 / n)
            table.weight.uniform_(-bound, bound)
    return tables


class EmbeddingTables(nn.Module):
    """FP32 tables (``fp32_tables``), one id per sample per table: sparse int [B, 26] ->
    float32 [B, 26, d].  ``lookup(t, ids)`` gives one table's rows [B, d]."""

    def __init__(self, tables: nn.ModuleList) -> None:
        super().__init__()
        self.tables = tables

    def lookup(self, t: int, ids: torch.Tensor) -> torch.Tensor:
        return self.tables[t](ids.unsqueeze(1))  # [B, d]: a bag of one id per sample

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.lookup(t, sparse[:, t]) for t in range(len(self.tables))], dim=1)


class PairwiseDotInteraction(nn.Module):
    """bottom [B, d] and embeddings [B, 26, d] -> [B, 27*26/2 + d].

    Dot products of every pair of the 27 vectors without self pairs (strict lower
    triangle, reference order), concatenated after the bottom-MLP output.
    """

    def __init__(self, num_vectors: int) -> None:
        super().__init__()
        rows, cols = torch.tril_indices(num_vectors, num_vectors, offset=-1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, bottom: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        vectors = torch.cat([bottom.unsqueeze(1), embeddings], dim=1)  # [B, 27, d]
        dots = torch.bmm(vectors, vectors.transpose(1, 2))  # [B, 27, 27]
        return torch.cat([bottom, dots[:, self.rows, self.cols]], dim=1)


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
                           EmbeddingTables(fp32_tables(config.cardinalities, config.embedding_dim)))
        self.interaction = PairwiseDotInteraction(len(config.cardinalities) + 1)
        self.top = TopMLP(config.num_interactions, config.top_mlp, linear)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        bottom = self.bottom(dense)
        return self.top(self.interaction(bottom, self.embeddings(sparse)))

    def embedding_parameter_names(self) -> set[str]:
        """Names of the parameters with sparse gradients (the tables)."""
        return {f"embeddings.tables.{i}.weight" for i in range(len(self.embeddings.tables))}
