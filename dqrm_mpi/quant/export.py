"""The packed model file: the real size of a (quantized) DLRM, and inference from it.

Layout (all integers little-endian)::

    offset 0    8 bytes   magic b"DQRMPACK"
    offset 8    u32       format version (FORMAT_VERSION)
    offset 12   u64       H, the length of the header
    offset 20   H bytes   header, UTF-8 JSON:
                            format_version   int
                            architecture     ModelConfig fields (embedding_dim, bottom_mlp,
                                             top_mlp, cardinalities)
                            quant            emb_bits, emb_scale, mlp_bits, mlp_quant, act_bits
                                             (null bits: stored as float32)
                            tensors          [{name, dtype, shape, bits, offset, nbytes}]
    offset 20+H           payload: the tensors back to back, ``offset`` counted from here

Tensor dtypes: "float32" (little-endian IEEE, C order) or "packed": signed ``bits``-bit
integers packed by ``pack.pack`` row by row (shape = [rows, values per row]; each row
takes ceil(values * bits / 8) bytes; INT4 two values per byte, INT2 four).

Tensors, in this order:
    embeddings.{t}.q / embeddings.{t}.scale   packed [n_t, d] and float32 [1] (table) or [n_t]
                                              (rowwise); or embeddings.{t}.weight float32 [n_t, d]
    {bottom|top}.{i}.weight.q / .weight.scale packed [out, in] and float32 [1] (matrix) or [out]
                                              (channel); or {bottom|top}.{i}.weight float32
    {bottom|top}.{i}.bias                     float32 [out]
    {bottom|top}.{i}.act_scale                float32 [1] (only with act_bits)
where i is the layer's index in the model's ``layers`` Sequential.

Weights are dequantized as q * scale: embedding rows at lookup, MLP weights once at
load (they are small), so predictions equal the QAT model's fake-quantized ones.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..data.reader import SplitReader, eval_batches
from ..data.schema import NUM_DENSE
from ..model import DLRM, BottomMLP, ModelConfig, PairwiseDotInteraction, TopMLP
from .config import QuantConfig
from .pack import pack, packed_row_bytes, unpack
from .qat import EmbeddingFakeQuant, QATState, QuantLinear, prepare_qat
from .quantizer import dequantize, quantize, row_scales

MAGIC = b"DQRMPACK"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str  # "float32" | "packed"
    shape: tuple[int, ...]
    bits: int | None = None

    @property
    def nbytes(self) -> int:
        if self.dtype == "float32":
            return 4 * int(np.prod(self.shape))
        return self.shape[0] * packed_row_bytes(self.shape[1], self.bits)


def _mlp_shapes(config: ModelConfig) -> Iterator[tuple[str, int, int, int]]:
    """(part, index in its Sequential, out, in) for every linear layer, in model order."""
    for part, first, widths in (("bottom", NUM_DENSE, config.bottom_mlp), ("top", config.num_interactions,
                                                                             config.top_mlp)):
        ins = [first, *widths[:-1]]
        for k, (i, o) in enumerate(zip(ins, widths)):
            yield part, 2 * k, o, i  # Linear, ReLU, Linear, ...: linear k sits at index 2k


def _layout(config: ModelConfig, quant: QuantConfig) -> list[_Entry]:
    entries = []
    d = config.embedding_dim
    for t, n in enumerate(config.cardinalities):
        if quant.emb_bits is None:
            entries.append(_Entry(f"embeddings.{t}.weight", "float32", (n, d)))
        else:
            rows = n if quant.emb_scale == "rowwise" else 1
            entries += [_Entry(f"embeddings.{t}.q", "packed", (n, d), quant.emb_bits),
                        _Entry(f"embeddings.{t}.scale", "float32", (rows,))]
    for part, i, o, in_ in _mlp_shapes(config):
        prefix = f"{part}.{i}"
        if quant.mlp_bits is None:
            entries.append(_Entry(f"{prefix}.weight", "float32", (o, in_)))
        else:
            entries += [_Entry(f"{prefix}.weight.q", "packed", (o, in_), quant.mlp_bits),
                        _Entry(f"{prefix}.weight.scale", "float32", (o if quant.mlp_quant == "channel" else 1,))]
        entries.append(_Entry(f"{prefix}.bias", "float32", (o,)))
        if quant.act_bits is not None:
            entries.append(_Entry(f"{prefix}.act_scale", "float32", (1,)))
    return entries


def _header(config: ModelConfig, quant: QuantConfig) -> tuple[bytes, list[_Entry]]:
    entries = _layout(config, quant)
    tensors, offset = [], 0
    for e in entries:
        tensors.append({"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "bits": e.bits,
                        "offset": offset, "nbytes": e.nbytes})
        offset += e.nbytes
    header = {"format_version": FORMAT_VERSION, "architecture": config.to_dict(),
              "quant": {k: quant.to_dict()[k] for k in ("emb_bits", "emb_scale", "mlp_bits", "mlp_quant",
                                                        "act_bits")},
              "tensors": tensors}
    blob = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(blob)) + blob, entries


def packed_size(config: ModelConfig, quant: QuantConfig | None = None) -> int:
    """Bytes of the packed file for this architecture and quantization (without writing it).

    ``quant`` None (or quantizing nothing): the FP32 model's size in the same format.
    """
    head, entries = _header(config, quant or QuantConfig())
    return len(head) + sum(e.nbytes for e in entries)


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
    emb = model.embeddings.row_transform
    for t, table in enumerate(model.embeddings.tables):
        w = table.weight.detach().float().cpu()
        if quant.emb_bits is None:
            out[f"embeddings.{t}.weight"] = w
            continue
        if not isinstance(emb, EmbeddingFakeQuant) or not emb._enabled:
            raise ValueError("the model's embedding quantization is not switched on")
        scale = row_scales(w, quant.emb_bits) if emb.is_rowwise else emb.table_scale(t).cpu()
        if not emb.is_rowwise and not emb._scales_valid:
            raise ValueError("the embedding scales were never computed")
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


def export_packed(model: DLRM, quant: QuantConfig, path: str | Path) -> int:
    """Write ``model`` (prepared with ``quant``, or FP32 when quant quantizes nothing) to
    ``path`` in the packed format; returns the file size in bytes."""
    head, entries = _header(model.config, quant)
    data = _tensors(model, quant)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for e in entries:
                t = data[e.name]
                expected = (e.shape if e.dtype == "float32" else (e.shape[0], packed_row_bytes(e.shape[1], e.bits)))
                if tuple(t.shape) != tuple(expected):
                    raise AssertionError(f"{e.name}: shape {tuple(t.shape)}, layout says {expected}")
                f.write(t.contiguous().numpy().astype("<f4" if e.dtype == "float32" else np.uint8).tobytes())
        tmp.replace(path)
    except BaseException:  # no half-written .tmp left beside OUT
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def is_packed_file(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """(header dict, payload start offset); ValueError if not a packed model of this version."""
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise ValueError(f"{path}: too short to be a packed DQRM model")
        magic, version, length = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise ValueError(f"{path}: not a packed DQRM model (no {MAGIC!r} magic)")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: format version {version}, this dqrm_mpi reads {FORMAT_VERSION}")
        header = json.loads(f.read(length).decode())
    return header, _PREFIX.size + length


class PackedEmbeddingTables(nn.Module):
    """sparse int [B, 26] -> float32 [B, 26, d] from packed tables, dequantized at lookup."""

    def __init__(self, packed: list[torch.Tensor], scales: list[torch.Tensor], bits: int, dim: int,
                 rowwise: bool) -> None:
        super().__init__()
        self.packed, self.scales = packed, scales  # uint8 [n_t, row bytes]; float32 [1] or [n_t]
        self.bits, self.dim, self.rowwise = bits, dim, rowwise

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        out = []
        for t, (p, s) in enumerate(zip(self.packed, self.scales)):
            ids = sparse[:, t]
            q = unpack(p[ids], self.bits, self.dim)  # [B, d] int16
            out.append(dequantize(q, s[ids] if self.rowwise else s))
        return torch.stack(out, dim=1)


class _FloatTables(nn.Module):
    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        return torch.stack([w[sparse[:, t]] for t, w in enumerate(self.weights)], dim=1)


class PackedDLRM(nn.Module):
    """Inference from a packed file: (dense [B, 13], sparse [B, 26]) -> logit [B]."""

    def __init__(self, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.config = ModelConfig(**header["architecture"])
        q = header["quant"]
        self.quant = QuantConfig(emb_bits=q["emb_bits"], emb_scale=q["emb_scale"], mlp_bits=q["mlp_bits"],
                                 mlp_quant=q["mlp_quant"], act_bits=q["act_bits"])
        cfg, quant = self.config, self.quant
        self.bottom = BottomMLP(cfg.dense_inputs, cfg.bottom_mlp)
        self.top = TopMLP(cfg.num_interactions, cfg.top_mlp)
        with torch.no_grad():
            for part, i, o, in_ in _mlp_shapes(cfg):
                prefix = f"{part}.{i}"
                seq = getattr(self, part).layers
                if quant.mlp_bits is None:
                    w = tensors[f"{prefix}.weight"]
                else:
                    w = dequantize(unpack(tensors[f"{prefix}.weight.q"], quant.mlp_bits, in_),
                                   tensors[f"{prefix}.weight.scale"])
                layer = seq[i]
                if quant.act_bits is not None:  # inputs fake-quantized with the trained scale
                    layer = QuantLinear(in_, o, None, False, quant.act_bits)
                    layer.act_scale.copy_(tensors[f"{prefix}.act_scale"])
                    seq[i] = layer
                layer.weight.copy_(w)
                layer.bias.copy_(tensors[f"{prefix}.bias"])
        n = len(cfg.cardinalities)
        if quant.emb_bits is None:
            self.embeddings = _FloatTables([tensors[f"embeddings.{t}.weight"] for t in range(n)])
        else:
            self.embeddings = PackedEmbeddingTables([tensors[f"embeddings.{t}.q"] for t in range(n)],
                                                    [tensors[f"embeddings.{t}.scale"] for t in range(n)],
                                                    quant.emb_bits, cfg.embedding_dim, quant.emb_scale == "rowwise")
        self.interaction = PairwiseDotInteraction(n + 1)
        self.eval()

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        bottom = self.bottom(dense)
        return self.top(self.interaction(bottom, self.embeddings(sparse)))


def load_packed(path: str | Path) -> PackedDLRM:
    """Read a packed file into a PackedDLRM (tables stay packed in memory)."""
    header, start = read_header(path)
    raw = np.fromfile(path, dtype=np.uint8, offset=start)
    tensors = {}
    for e in header["tensors"]:
        chunk = raw[e["offset"]:e["offset"] + e["nbytes"]]
        if len(chunk) != e["nbytes"]:
            raise ValueError(f"{path}: truncated at tensor {e['name']}")
        if e["dtype"] == "float32":
            tensors[e["name"]] = torch.from_numpy(chunk.view("<f4").astype(np.float32).reshape(e["shape"]))
        else:
            rows, n = e["shape"]
            tensors[e["name"]] = torch.from_numpy(chunk.reshape(rows, packed_row_bytes(n, e["bits"])).copy())
    return PackedDLRM(header, tensors)


def load_checkpoint(path: str | Path) -> tuple[DLRM, QuantConfig, QATState | None]:
    """A ``dqrm-train`` checkpoint as (model in eval mode, its QuantConfig, its QATState or None)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{path}: not a dqrm-train checkpoint or packed model ({e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path}: not a dqrm-train checkpoint (no model / model_config)")
    config = ModelConfig(**ckpt["model_config"])
    quant = QuantConfig.from_dict((ckpt.get("train_config") or {}).get("quant"))
    model = DLRM(config)
    state = prepare_qat(model, quant) if quant.enabled else None
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, quant, state


@torch.no_grad()
def predict(model: nn.Module, data: str | Path, split: str = "test", batch: int = 16384
            ) -> tuple[np.ndarray, np.ndarray]:
    """(click probabilities float64 [n], labels [n]) of every row of a split, in file order."""
    model.eval()
    reader = SplitReader(data, split)
    probs, labels = [], []
    try:
        for b in eval_batches(reader, batch, 0, 1):
            probs.append(torch.sigmoid(model(b.dense, b.sparse)).double().numpy())
            labels.append(b.label.numpy())
    finally:
        reader.close()
    return np.concatenate(probs), np.concatenate(labels)
