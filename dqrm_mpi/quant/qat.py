"""Quantization-aware training of a DLRM (DQRM).

``prepare_qat(model, config)`` gives an initialised FP32 ``DLRM`` its quantization-aware
parts, which take over the model's parameters (so initialisation, parameter names and
optimizers are those of the FP32 model):

- ``QuantEmbeddingTables`` as ``model.embeddings``: the same tables, whose looked-up rows
  go through ``EmbeddingFakeQuant`` (its ``row_transform``): only the rows looked up
  in the batch are fake-quantized; the FP32 master tables keep receiving sparse
  gradients through the straight-through estimator.  Per-table scales (DQRM) are
  refreshed by a full pass over every table only at steps that are multiples of
  ``scale_period``; between refreshes a step fake-quantizes the [B, 26, d] rows in three
  vectorized passes (one scale per table).  Rowwise scales come from the looked-up rows
  themselves (no table pass).
- ``QuantLinear`` in place of every ``nn.Linear`` of the bottom and top MLPs (same
  ``weight``/``bias`` parameters, so parameter names and optimizers are unchanged):
  weights fake-quantized per matrix or per output channel at every forward, with scales
  from the weights themselves (one autograd node per layer, an identity STE: nothing is
  clamped); the bias stays FP32 (in integer inference it would be INT32 at
  scale s_w * s_x, a negligible share of the model); inputs optionally fake-quantized
  with a running scale (``act_bits``).

Scales, counters and modes are registered buffers: they are in ``state_dict()`` (so
checkpoints restore them and ``broadcast_module`` copies rank 0's), and loading a state
whose modes (bits, granularity) differ from the prepared model's is an error.
"""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F

from .. import kernels
from ..model import EmbeddingTables
from ..qcore import CHANNEL, ROW, check_bits, fake_quant, fake_quant_own_scale, qrange, row_scales, tensor_scale
from .config import QuantConfig

# Activation scales: exponential moving average of the batch max, this weight on the new batch.
ACT_MOMENTUM = 0.1


class _ModeChecked(nn.Module):
    """Buffers listed in ``_modes`` describe how the module quantizes; a state_dict that
    disagrees with them cannot be loaded.  ``_flags`` buffers mirror into Python bools
    (read on every forward without a tensor read)."""

    _modes: tuple[str, ...] = ()
    _flags: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in self._modes:
            key = prefix + name
            if key in state_dict and int(state_dict[key]) != int(getattr(self, name)):
                error_msgs.append(f"{key}: the state has {int(state_dict[key])}, this model is prepared with "
                                  f"{int(getattr(self, name))} (quantization settings differ)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._sync_flags()

    def _sync_flags(self) -> None:
        for name in self._flags:
            setattr(self, "_" + name, bool(getattr(self, name)))

    def set_enabled(self, on: bool) -> None:
        self.enabled.fill_(int(on))
        self._sync_flags()


class EmbeddingFakeQuant(_ModeChecked):
    """Looked-up rows float32 [B, T, d] -> fake-quantized rows [B, T, d].

    Buffers: scales float32 [T] (per-table scale, table mode), scales_valid uint8,
    refreshes int64 (full-table passes so far), last_refresh_step int64 (-1: none),
    enabled uint8; modes bits, rowwise, period.
    """

    _modes = ("bits", "rowwise", "period")
    _flags = ("enabled", "scales_valid")

    def __init__(self, num_tables: int, bits: int, rowwise: bool, period: int) -> None:
        super().__init__()
        check_bits(bits, "emb_bits")
        self.num_bits = bits
        self.is_rowwise = rowwise
        self.register_buffer("bits", torch.tensor(bits, dtype=torch.int64))
        self.register_buffer("rowwise", torch.tensor(int(rowwise), dtype=torch.uint8))
        self.register_buffer("period", torch.tensor(period, dtype=torch.int64))
        self.register_buffer("enabled", torch.tensor(1, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(num_tables, dtype=torch.float32))
        self.register_buffer("scales_valid", torch.tensor(0, dtype=torch.uint8))
        self.register_buffer("refreshes", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("last_refresh_step", torch.tensor(-1, dtype=torch.int64))
        self._qmin, self._qmax = qrange(bits)
        self._sync_flags()

    @torch.no_grad()
    def refresh(self, weights: list[torch.Tensor], step: int) -> None:
        """The full-table pass: scales[t] = max|W_t| / (2^(b-1) - 1) for every table."""
        if kernels.enabled() and all(w.device.type == "cpu" and w.dtype == torch.float32 for w in weights):
            kernels.ops.fq_table_scales(weights, self.num_bits, self.scales)
        else:
            for t, w in enumerate(weights):
                self.scales[t] = tensor_scale(w, self.num_bits)[0]
        self.scales_valid.fill_(1)
        self.refreshes += 1
        self.last_refresh_step.fill_(step)
        self._sync_flags()

    def invalidate(self) -> None:
        """Force a refresh at the next ``QATState.on_step``."""
        self.scales_valid.fill_(0)
        self._sync_flags()

    def table_scale(self, t: int) -> torch.Tensor:
        """float32 [1], the scale table t is quantized with now."""
        return self.scales[t:t + 1]

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """rows float32 [B, T, d] (table t's rows at [:, t]) -> fake-quantized rows [B, T, d]."""
        if not self._enabled:
            return rows
        if self.is_rowwise:
            return fake_quant_own_scale(rows.reshape(-1, rows.shape[-1]), self.num_bits, True).view(rows.shape)
        if not self._scales_valid:
            raise RuntimeError("embedding scales were never computed: call QATState.on_step(step) before the "
                               "forward pass (or refresh() them)")
        # The hot path: all tables' rows at once, each with its table's scale (axis 1), with the
        # arithmetic of PyTorch's fused fake-quant kernels (round half-to-even of x * (1/scale), clamp,
        # times scale; the same bits as quantizer.fake_quant) in three passes (one with the CPU kernel),
        # and an identity STE: between refreshes rows may outgrow the stored scale and are clamped in the
        # forward pass, but they keep their gradient (a masked STE would freeze them until the next
        # refresh; as in DQRM).
        if kernels.enabled() and rows.device.type == "cpu" and rows.dtype == torch.float32:
            return kernels.ops.fq_table_rows(rows, self.scales, self.num_bits)  # its own identity STE
        detached = rows.detach()
        scales = self.scales.view(1, -1, 1)
        quantized = torch.mul(detached, torch.reciprocal(scales)).round_().clamp_(self._qmin, self._qmax)
        quantized.mul_(scales)
        return rows + quantized.sub_(detached)


class QuantEmbeddingTables(EmbeddingTables):
    """FP32 tables (the same flat ``weight`` Parameter) whose looked-up rows are fake-quantized
    by ``row_transform`` (an ``EmbeddingFakeQuant``): sparse int [B, 26] -> float32 [B, 26, d]."""

    def __init__(self, tables: EmbeddingTables, row_transform: EmbeddingFakeQuant) -> None:
        super().__init__(tables.weight, tables.cardinalities)
        self.row_transform = row_transform

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        return self.row_transform(self.lookup(sparse))


class QuantLinear(nn.Linear, _ModeChecked):
    """``nn.Linear`` with fake-quantized weights and optionally fake-quantized inputs.

    input [B, in] -> [B, out].  Buffers: weight_scale float32 [out] (channel) or [1]
    (matrix), the last scale used; act_scale float32 [1] (0: not observed yet), a running
    max of |input| / qmax updated in training mode and frozen in eval mode; enabled
    uint8; modes weight_bits (0: FP32), per_channel, act_bits (0: FP32).
    """

    _modes = ("weight_bits", "per_channel", "act_bits")
    _flags = ("enabled",)

    def __init__(self, in_features: int, out_features: int, weight_bits: int | None, per_channel: bool,
                 act_bits: int | None, device=None) -> None:
        super().__init__(in_features, out_features, device=device)
        for name, b in (("mlp_bits", weight_bits), ("act_bits", act_bits)):
            if b is not None:
                check_bits(b, name)
        self.w_bits = weight_bits
        self.a_bits = act_bits
        self.is_per_channel = per_channel
        self.register_buffer("weight_bits", torch.tensor(weight_bits or 0, dtype=torch.int64))
        self.register_buffer("per_channel", torch.tensor(int(per_channel), dtype=torch.uint8))
        self.register_buffer("act_bits", torch.tensor(act_bits or 0, dtype=torch.int64))
        self.register_buffer("enabled", torch.tensor(1, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.zeros(out_features if per_channel else 1))
        self.register_buffer("act_scale", torch.zeros(1))
        self._weight_workspace: torch.Tensor | None = None  # memory for the fake-quantized weight (CPU kernel)
        self._sync_flags()

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_bits: int | None, per_channel: bool,
                    act_bits: int | None) -> "QuantLinear":
        """A QuantLinear sharing ``linear``'s weight and bias Parameters."""
        q = cls(linear.in_features, linear.out_features, weight_bits, per_channel, act_bits, device="meta")
        q.weight, q.bias = linear.weight, linear.bias
        q._init_buffers(linear.weight.device)
        return q

    def _init_buffers(self, device: torch.device) -> None:
        self.weight_bits = torch.tensor(self.w_bits or 0, dtype=torch.int64, device=device)
        self.per_channel = torch.tensor(int(self.is_per_channel), dtype=torch.uint8, device=device)
        self.act_bits = torch.tensor(self.a_bits or 0, dtype=torch.int64, device=device)
        self.enabled = torch.tensor(1, dtype=torch.uint8, device=device)
        self.weight_scale = torch.zeros(self.out_features if self.is_per_channel else 1, device=device)
        self.act_scale = torch.zeros(1, device=device)
        self._sync_flags()

    @torch.no_grad()
    def quantized_weight_scale(self) -> torch.Tensor:
        """float32 [out] or [1]: the scale of the current weights."""
        if self.is_per_channel:
            return row_scales(self.weight, self.w_bits)
        return tensor_scale(self.weight, self.w_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._enabled:
            return F.linear(x, self.weight, self.bias)
        if self.a_bits:
            observed = bool(self.act_scale[0] > 0)
            if self.training:
                batch_scale = tensor_scale(x, self.a_bits)
                scale = self.act_scale if observed else batch_scale
                x_q = fake_quant(x, scale, self.a_bits)
                with torch.no_grad():
                    self.act_scale.copy_(batch_scale if not observed else
                                         (1 - ACT_MOMENTUM) * self.act_scale + ACT_MOMENTUM * batch_scale)
                x = x_q
            else:
                if not observed:
                    raise RuntimeError("activation scale never observed: train (or calibrate) before evaluating")
                x = fake_quant(x, self.act_scale, self.a_bits)
        return F.linear(x, self.effective_weight(), self.bias)

    def effective_weight(self) -> torch.Tensor:
        """[out, in], the weight the layer multiplies by: fake-quantized (one autograd node, an
        identity STE; the scales written to weight_scale on the way) while weight quantization is on,
        else ``weight`` itself.  The fused MLP kernel (``dqrm_mpi.model.dlrm``) takes it from here."""
        w = self.weight
        if self._enabled and self.w_bits:
            if self._weight_workspace is None or self._weight_workspace.device != w.device:
                self._weight_workspace = torch.empty(w.shape, device=w.device)
            w = fake_quant_own_scale(w, self.w_bits, self.is_per_channel, self.weight_scale, self._weight_workspace)
        return w


class QATState:
    """What the training loop drives: ``on_epoch(epoch)`` at the start of each epoch,
    ``on_step(step)`` before each step's forward pass (step counts from 0 over the run).

    ``scale_seconds`` accumulates the wall time of full-table scale passes.
    """

    def __init__(self, model: nn.Module, config: QuantConfig, emb: EmbeddingFakeQuant | None,
                 linears: list[QuantLinear]) -> None:
        self.model = model
        self.config = config
        self.emb = emb
        self.linears = linears
        self.scale_seconds = 0.0

    @property
    def modules(self) -> list[_ModeChecked]:
        return ([self.emb] if self.emb is not None else []) + list(self.linears)

    @property
    def enabled(self) -> bool:
        return any(m._enabled for m in self.modules)

    @property
    def table_passes(self) -> int:
        """Full-table scale passes so far (0 without per-table embedding scales)."""
        return int(self.emb.refreshes) if self.emb is not None else 0

    def set_enabled(self, on: bool) -> None:
        for m in self.modules:
            m.set_enabled(on)
        if on and self.emb is not None:
            self.emb.invalidate()

    def on_epoch(self, epoch: int) -> None:
        """FP32 for the first ``pretrain_epochs`` epochs, quantization-aware from then on."""
        on = epoch >= self.config.pretrain_epochs
        if on != self.enabled:
            self.set_enabled(on)

    def on_step(self, step: int) -> None:
        """Refresh per-table embedding scales at multiples of the period (and when none are valid)."""
        emb = self.emb
        if emb is None or emb.is_rowwise or not emb._enabled:
            return
        if step % self.config.scale_period == 0 or not emb._scales_valid:
            t0 = time.perf_counter()
            emb.refresh(self.model.embeddings.table_weights(), step)
            self.scale_seconds += time.perf_counter() - t0

    def activation_scales(self) -> list[torch.Tensor]:
        """The running activation scales (float32 [1] each, the buffers themselves) while
        quantization is on, else []: the training loop averages them across ranks in place
        after each step, so every replica quantizes the next batch with the same scales."""
        return [m.act_scale for m in self.linears if m.a_bits] if self.enabled else []

    def summary(self) -> dict[str, object]:
        """For summary.json: the configuration, full-table passes and their seconds."""
        return {**self.config.to_dict(), "enabled": self.enabled, "table_passes": self.table_passes,
                "scale_seconds": self.scale_seconds}


def _swap_linears(seq: nn.Sequential, config: QuantConfig) -> list[QuantLinear]:
    out = []
    for i, layer in enumerate(seq):
        if isinstance(layer, nn.Linear) and not isinstance(layer, QuantLinear):
            q = QuantLinear.from_linear(layer, config.mlp_bits, config.mlp_scale == CHANNEL, config.act_bits)
            seq[i] = q
            out.append(q)
    return out


def prepare_qat(model: nn.Module, config: QuantConfig) -> QATState:
    """Make ``model`` (a DLRM) quantization-aware in place as ``config`` says; returns its QATState.

    Call it after building the model and before broadcasting it or creating the optimizer
    (parameters stay the same objects, so either order works for the optimizer).
    Quantization starts switched off when ``config.pretrain_epochs`` > 0.
    """
    if any(isinstance(m, (QuantEmbeddingTables, QuantLinear)) for m in model.modules()):
        raise ValueError("the model is already prepared for quantization-aware training")
    emb = None
    if config.emb_bits is not None:
        tables = model.embeddings
        emb = EmbeddingFakeQuant(tables.num_tables, config.emb_bits, config.emb_scale == ROW,
                                 config.scale_period).to(tables.weight.device)
        model.embeddings = QuantEmbeddingTables(tables, emb)
    linears: list[QuantLinear] = []
    if config.mlp_bits is not None or config.act_bits is not None:
        linears = _swap_linears(model.bottom.layers, config) + _swap_linears(model.top.layers, config)
    state = QATState(model, config, emb, linears)
    state.set_enabled(config.pretrain_epochs == 0)
    return state
