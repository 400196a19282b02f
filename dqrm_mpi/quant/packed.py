"""A (quantized) DLRM as a packed file, and back as a ``DLRM`` whose embedding lookup
reads the packed tables.

Tensors of the file (``packfile``), in this order:
    embeddings.{t}.q / embeddings.{t}.scale   packed [n_t, d] and float32 [1] (table) or [n_t]
                                              (row); or embeddings.{t}.weight float32 [n_t, d]
    {bottom|top}.{i}.weight.q / .weight.scale packed [out, in] and float32 [1] (tensor) or [out]
                                              (channel); or {bottom|top}.{i}.weight float32
    {bottom|top}.{i}.bias                     float32 [out]
    {bottom|top}.{i}.act_scale                float32 [1] (only with act_bits)
    input_map.vocab_{j}                       uint32 [K_j] (only with an input map, j = 0..25)
where i is the layer's index in the model's ``layers`` Sequential.  With an input map (the raw
value -> id mapping of the model's dataset, ``data_prep.input_map``) the header's ``input_map``
holds its options and ``sha256`` digest, and its vocabularies follow the model's tensors.  The header also holds
``architecture`` (ModelConfig fields) and ``quant`` (emb_bits, emb_scale "table" | "rowwise",
mlp_bits, mlp_quant "none" | "matrix" | "channel", act_bits: format version 1's spelling).

Weights are dequantized as q * scale: embedding rows at lookup, MLP weights once at
load (they are small), so predictions equal the QAT model's fake-quantized ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .. import kernels
from ..model import DLRM, EmbeddingTables, ModelConfig
from ..model.config import NUM_SPARSE
from ..qcore import CHANNEL, ROW, TENSOR, dequantize, pack, quantize, row_scales, unpack
from . import packfile
from .config import QuantConfig
from .packfile import TensorEntry
from .qat import QuantLinear


def _header_quant(quant: QuantConfig) -> dict[str, Any]:
    """The header's ``quant`` in format version 1's spelling (read back by QuantConfig.from_dict)."""
    return {"emb_bits": quant.emb_bits, "emb_scale": "rowwise" if quant.emb_scale == ROW else "table",
            "mlp_bits": quant.mlp_bits, "mlp_quant": {None: "none", TENSOR: "matrix", CHANNEL: "channel"}[quant.mlp_scale],
            "act_bits": quant.act_bits}


def _mlp_shapes(config: ModelConfig) -> Iterator[tuple[str, int, int, int]]:
    """(part, index in its Sequential, out, in) for every linear layer, in model order."""
    for part, first, widths in (("bottom", config.dense_inputs, config.bottom_mlp),
                                ("top", config.num_interactions, config.top_mlp)):
        ins = [first, *widths[:-1]]
        for k, (i, o) in enumerate(zip(ins, widths)):
            yield part, 2 * k, o, i  # Linear, ReLU, Linear, ...: linear k sits at index 2k


def _layout(config: ModelConfig, quant: QuantConfig) -> list[TensorEntry]:
    entries = []
    d = config.embedding_dim
    for t, n in enumerate(config.cardinalities):
        if quant.emb_bits is None:
            entries.append(TensorEntry(f"embeddings.{t}.weight", "float32", (n, d)))
        else:
            entries += [TensorEntry(f"embeddings.{t}.q", "packed", (n, d), quant.emb_bits),
                        TensorEntry(f"embeddings.{t}.scale", "float32", (n if quant.emb_scale == ROW else 1,))]
    for part, i, o, in_ in _mlp_shapes(config):
        prefix = f"{part}.{i}"
        if quant.mlp_bits is None:
            entries.append(TensorEntry(f"{prefix}.weight", "float32", (o, in_)))
        else:
            entries += [TensorEntry(f"{prefix}.weight.q", "packed", (o, in_), quant.mlp_bits),
                        TensorEntry(f"{prefix}.weight.scale", "float32", (o if quant.mlp_scale == CHANNEL else 1,))]
        entries.append(TensorEntry(f"{prefix}.bias", "float32", (o,)))
        if quant.act_bits is not None:
            entries.append(TensorEntry(f"{prefix}.act_scale", "float32", (1,)))
    return entries


def _meta(config: ModelConfig, quant: QuantConfig) -> dict[str, Any]:
    return {"architecture": config.to_dict(), "quant": _header_quant(quant)}


def packed_size(config: ModelConfig, quant: QuantConfig | None = None) -> int:
    """Bytes of the packed file for this architecture and quantization (without writing it).

    ``quant`` None (or quantizing nothing): the FP32 model's size in the same format.
    """
    quant = quant or QuantConfig()
    return packfile.file_size(_meta(config, quant), _layout(config, quant))


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    out = {}
    for part in ("bottom", "top"):
        for i, layer in enumerate(getattr(model, part).layers):
            if isinstance(layer, nn.Linear):
                out[f"{part}.{i}"] = layer
    return out


@torch.no_grad()
def _tensors(model: DLRM, quant: QuantConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the layout, as the values to write (packed uint8 or float32)."""
    out: dict[str, torch.Tensor] = {}
    emb = getattr(model.embeddings, "row_transform", None)
    for t, table in enumerate(model.embeddings.table_weights()):
        w = table.float().cpu()
        if quant.emb_bits is None:
            out[f"embeddings.{t}.weight"] = w
            continue
        if emb is None or not emb._enabled:
            raise ValueError("the model's embedding quantization is not switched on")
        if not emb.is_rowwise and not emb._scales_valid:
            raise ValueError("the embedding scales were never computed")
        scale = row_scales(w, quant.emb_bits) if emb.is_rowwise else emb.table_scale(t).cpu()
        out[f"embeddings.{t}.q"] = pack(quantize(w, scale, quant.emb_bits), quant.emb_bits)
        out[f"embeddings.{t}.scale"] = scale
    for prefix, layer in _linears(model).items():
        w = layer.weight.detach().float().cpu()
        if quant.mlp_bits is None:
            out[f"{prefix}.weight"] = w
        else:
            if not isinstance(layer, QuantLinear) or not layer._enabled:
                raise ValueError(f"{prefix}: the model's MLP weight quantization is not switched on")
            scale = layer.quantized_weight_scale().cpu()
            out[f"{prefix}.weight.q"] = pack(quantize(w, scale, quant.mlp_bits), quant.mlp_bits)
            out[f"{prefix}.weight.scale"] = scale
        out[f"{prefix}.bias"] = layer.bias.detach().float().cpu()
        if quant.act_bits is not None:
            if not isinstance(layer, QuantLinear) or float(layer.act_scale[0]) <= 0:
                raise ValueError(f"{prefix}: no activation scale observed")
            out[f"{prefix}.act_scale"] = layer.act_scale.detach().float().cpu()
    return out


@dataclass(frozen=True, eq=False)
class InputMapParts:
    """An input map as the packed file keeps it: its options, its SHA-256 digest and its 26
    vocabularies (uint32 arrays); ``data_prep.input_map.InputMap`` gives and takes them."""

    options: dict[str, Any]
    sha256: str
    vocabs: tuple[np.ndarray, ...]


def model_bytes(path: str | Path) -> int:
    """Bytes of the packed model in ``path`` without its input map: the file's size when it has
    none, else what the file would take without it (the model's size, as the FP32 ratio counts it)."""
    header, _ = packfile.read_header(path)
    if "input_map" not in header:
        return Path(path).stat().st_size
    try:
        return packed_size(ModelConfig(**header["architecture"]), QuantConfig.from_dict(header["quant"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the header does not describe a model ({type(e).__name__}: {e})") from None


def _map_entries(parts: InputMapParts) -> list[TensorEntry]:
    return [TensorEntry(f"input_map.vocab_{j:02d}", "uint32", (len(v),)) for j, v in enumerate(parts.vocabs)]


def export_packed(model: DLRM, quant: QuantConfig, path: str | Path, input_map: InputMapParts | None = None) -> int:
    """Write ``model`` (prepared with ``quant``, or FP32 when quant quantizes nothing) to
    ``path`` in the packed format, with ``input_map`` when given; returns the file size in bytes."""
    meta, entries, tensors = _meta(model.config, quant), _layout(model.config, quant), _tensors(model, quant)
    if input_map is not None:
        meta["input_map"] = {**input_map.options, "sha256": input_map.sha256}
        entries += _map_entries(input_map)
        tensors.update({e.name: torch.from_numpy(np.ascontiguousarray(v, dtype=np.uint32))
                        for e, v in zip(_map_entries(input_map), input_map.vocabs)})
    return packfile.write(path, meta, entries, tensors)


KERNEL_BITS = (2, 4, 8)  # the widths dqrm_mpi/csrc/packed_embedding.cpp reads


class PackedEmbeddingTables(nn.Module):
    """sparse int [B, 26] -> float32 [B, 26, d] from packed tables, dequantized at lookup
    (with the CPU kernels, INT8 / INT4 / INT2 tables in one fused pass; no FP32 copy of a table).

    packed: uint8 [n_t, row bytes] per table; scales: float32 [n_t] per row (``per_row``)
    or [1] per table.
    """

    def __init__(self, packed: list[torch.Tensor], scales: list[torch.Tensor], bits: int, dim: int,
                 per_row: bool) -> None:
        super().__init__()
        self.num_tables, self.bits, self.dim, self.per_row = len(packed), bits, dim, per_row
        for t, (p, s) in enumerate(zip(packed, scales)):
            self.register_buffer(f"q_{t}", p)
            self.register_buffer(f"scale_{t}", s)

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        if kernels.enabled() and sparse.is_cpu and self.bits in KERNEL_BITS:
            # gather + unpack + scale in one pass of the CPU kernel (the same bits as below)
            return kernels.ops.packed_embedding_lookup(
                [getattr(self, f"q_{t}") for t in range(self.num_tables)],
                [getattr(self, f"scale_{t}") for t in range(self.num_tables)], sparse, self.bits, self.dim)
        out = []
        for t in range(self.num_tables):
            ids = sparse[:, t]
            p, s = getattr(self, f"q_{t}"), getattr(self, f"scale_{t}")
            q = unpack(p[ids], self.bits, self.dim)  # [B, d] int16
            out.append(dequantize(q, s[ids] if self.per_row else s))
        return torch.stack(out, dim=1)


def load_packed(path: str | Path) -> DLRM:
    """Read a packed file into a ``DLRM`` in eval mode (tables stay packed in memory)."""
    return load_packed_with_map(path)[0]


def load_packed_with_map(path: str | Path) -> tuple[DLRM, InputMapParts | None]:
    """``load_packed`` and the file's input map (None when it was exported without one)."""
    header, tensors = packfile.read(path)
    parts = None
    if "input_map" in header:
        options = dict(header["input_map"])
        sha = options.pop("sha256", "")
        names = [f"input_map.vocab_{j:02d}" for j in range(NUM_SPARSE)]
        if any(n not in tensors for n in names):
            raise ValueError(f"{path}: the header names an input map but its vocabularies are missing")
        parts = InputMapParts(options, sha, tuple(tensors.pop(n).numpy() for n in names))
    return _model_from(path, header, tensors), parts


def _model_from(path: str | Path, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> DLRM:
    try:
        config = ModelConfig(**header["architecture"])
        quant = QuantConfig.from_dict(header["quant"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the header does not describe a model ({type(e).__name__}: {e})") from None
    for e in _layout(config, quant):
        if e.name not in tensors or tuple(tensors[e.name].shape) != tuple(e.stored_shape):
            raise ValueError(f"{path}: tensor {e.name} is missing or not of shape {e.stored_shape}")
    n = len(config.cardinalities)
    if quant.emb_bits is None:
        embeddings = EmbeddingTables.from_tables([tensors[f"embeddings.{t}.weight"] for t in range(n)],
                                                 freeze=True)
    else:
        embeddings = PackedEmbeddingTables([tensors[f"embeddings.{t}.q"] for t in range(n)],
                                           [tensors[f"embeddings.{t}.scale"] for t in range(n)],
                                           quant.emb_bits, config.embedding_dim, quant.emb_scale == ROW)
    act_bits = quant.act_bits
    linear = nn.Linear if act_bits is None else (lambda i, o: QuantLinear(i, o, None, False, act_bits))
    model = DLRM(config, embeddings, linear)
    with torch.no_grad():
        for prefix, layer in _linears(model).items():
            if quant.mlp_bits is None:
                w = tensors[f"{prefix}.weight"]
            else:
                w = dequantize(unpack(tensors[f"{prefix}.weight.q"], quant.mlp_bits, layer.in_features),
                               tensors[f"{prefix}.weight.scale"])
            layer.weight.copy_(w)
            layer.bias.copy_(tensors[f"{prefix}.bias"])
            if act_bits is not None:  # inputs fake-quantized with the trained scale
                layer.act_scale.copy_(tensors[f"{prefix}.act_scale"])
    return model.eval()
