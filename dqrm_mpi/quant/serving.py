"""A packed model as a file a stock PyTorch loads without this package: TorchScript
(``torch.jit.load``) or ``torch.export`` (``torch.export.load``).

The module is the packed ``DLRM`` itself (``load_packed``: tables packed in uint8, unpacked and
scaled at lookup; MLP weights dequantized) traced through its PyTorch path, then a sigmoid:
    dense float32 [B, 13], ids int64 [B, 26] (0 <= id < cardinality) -> probabilities float32 [B]
The batch size is free.  The input map (when the packed model has one) rides along as the extra
file ``input_map.npz`` (``data_prep.input_map``'s format), for a server that maps raw rows.
"""
from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .. import kernels
from ..model import DLRM
from ..model.config import NUM_DENSE, NUM_SPARSE
from ..qcore import dequantize, quantize
from .qat import QuantLinear

FORMATS = ("torchscript", "export")
# How the MLPs of a loaded packed model run: FP32 from the dequantized weights (the numbers of
# dqrm-eval), or torch's INT8 dynamic quantized linear layers (fbgemm / oneDNN on x86: weights
# requantized to INT8 per tensor, activations per batch; scores change slightly).
MLP_MODES = ("fp32", "int8-dynamic")
INPUT_MAP_EXTRA = "input_map.npz"


class Probabilities(nn.Module):
    """(dense, ids) -> sigmoid(model(dense, ids))."""

    def __init__(self, model: DLRM) -> None:
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(dense, ids))


class _ActQuantLinear(nn.Module):
    """A ``QuantLinear`` of a loaded packed model whose inputs are fake-quantized with its trained
    scale, in its inference form: the integers and back (``quantize``, ``dequantize``: the values of
    ``fake_quant``, in operators torch.export has) and the linear, without the training-time branch
    on whether the scale was observed (a data-dependent branch torch.export cannot take)."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        if float(layer.act_scale[0]) <= 0:
            raise ValueError("activation scale never observed: train (or calibrate) before exporting")
        self.weight, self.bias, self.bits = layer.weight, layer.bias, layer.a_bits
        self.register_buffer("act_scale", layer.act_scale.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(dequantize(quantize(x, self.act_scale, self.bits), self.act_scale), self.weight, self.bias)


def _inference_form(model: DLRM) -> DLRM:
    """``model`` with its activation-quantized layers in their inference form (in place)."""
    for part in (model.bottom, model.top):
        part.layers = nn.Sequential(*(_ActQuantLinear(m) if isinstance(m, QuantLinear) and m.a_bits else m
                                      for m in part.layers))
    return model


def example_inputs(model: DLRM, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of valid inputs (id 0 of every table, dense zeros) to trace with."""
    return torch.zeros(batch, NUM_DENSE), torch.zeros(batch, NUM_SPARSE, dtype=torch.int64)


@torch.no_grad()
def export_serving(model: DLRM, path: str | Path, fmt: str, input_map: bytes | None = None) -> int:
    """Write ``model`` (a ``load_packed`` model; its activation-quantized layers are put in their
    inference form) to ``path`` as ``fmt`` ("torchscript" or "export") through a temporary name;
    returns the file size in bytes."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    path = Path(path)
    module = Probabilities(_inference_form(model.eval())).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    extra = {INPUT_MAP_EXTRA: input_map} if input_map is not None else {}
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = folder / path.name  # the archive is named after its file: the final name
    try:
        with kernels.disabled(), warnings.catch_warnings():  # the PyTorch path: plain aten operators
            # the tracer's note on the shape checks of packed rows and scales: constants of the model
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's own, asked for by --format torchscript
            if fmt == "torchscript":
                traced = torch.jit.trace(module, example_inputs(model), check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files=extra)
            else:
                batch = torch.export.Dim("batch", min=1)
                program = torch.export.export(module, example_inputs(model),
                                              dynamic_shapes={"dense": {0: batch}, "ids": {0: batch}}, strict=False)
                torch.export.save(program, str(tmp), extra_files={k: v.decode("latin-1") for k, v in extra.items()})
        tmp.replace(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path.stat().st_size


def set_mlp_mode(model: DLRM, mode: str) -> DLRM:
    """``model`` (a loaded packed model) with its MLPs run as ``mode`` says (``MLP_MODES``), in place."""
    if mode not in MLP_MODES:
        raise ValueError(f"MLP mode must be one of {MLP_MODES}, got {mode!r}")
    if mode == "int8-dynamic":
        with warnings.catch_warnings():  # torch's note that quantized tensors are deprecated
            warnings.simplefilter("ignore", UserWarning)
            for part in (model.bottom, model.top):
                torch.ao.quantization.quantize_dynamic(part, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model
