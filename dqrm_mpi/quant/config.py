"""QuantConfig: what to quantize and how (validated on construction, no torch import)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

EMB_SCALES = ("table", "rowwise")
MLP_QUANTS = ("none", "matrix", "channel")
BITS_RANGE = (2, 16)


def _check_bits(name: str, bits: int | None) -> None:
    lo, hi = BITS_RANGE
    if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or not lo <= bits <= hi):
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}] (or unset for FP32), got {bits!r}")


@dataclass(frozen=True)
class QuantConfig:
    """Quantization-aware training (DQRM).  The default quantizes nothing (FP32).

    emb_bits: bit width of embedding rows (None: FP32 tables).
    emb_scale: "table" (one scale per table, DQRM) or "rowwise" (one per row).
    scale_period: steps between full-table passes that refresh the per-table scales
        (1: every step).  Rowwise scales need no pass: they come from the looked-up row.
    mlp_bits: bit width of MLP weights (None: FP32).
    mlp_quant: "matrix" (one scale per weight matrix) or "channel" (one per output
        channel); None picks "channel" when mlp_bits is set, else "none".
    act_bits: bit width of every MLP layer's input activations (None: FP32, DQRM's choice).
    pretrain_epochs: train FP32 for this many epochs, then switch quantization on.
    """

    emb_bits: int | None = None
    emb_scale: str = "table"
    scale_period: int = 200
    mlp_bits: int | None = None
    mlp_quant: str | None = None
    act_bits: int | None = None
    pretrain_epochs: int = 0

    def __post_init__(self) -> None:
        if self.mlp_quant is None:
            object.__setattr__(self, "mlp_quant", "channel" if self.mlp_bits is not None else "none")
        _check_bits("emb_bits", self.emb_bits)
        _check_bits("mlp_bits", self.mlp_bits)
        _check_bits("act_bits", self.act_bits)
        if self.emb_scale not in EMB_SCALES:
            raise ValueError(f"emb_scale must be one of {EMB_SCALES}, got {self.emb_scale!r}")
        if self.mlp_quant not in MLP_QUANTS:
            raise ValueError(f"mlp_quant must be one of {MLP_QUANTS}, got {self.mlp_quant!r}")
        if (self.mlp_bits is None) != (self.mlp_quant == "none"):
            raise ValueError(f"mlp_bits={self.mlp_bits} and mlp_quant={self.mlp_quant!r} disagree: give both "
                             "(e.g. 4 and 'channel') or neither")
        if not isinstance(self.scale_period, int) or self.scale_period < 1:
            raise ValueError(f"scale_period must be an integer >= 1 (1: refresh every step), got {self.scale_period!r}")
        if not isinstance(self.pretrain_epochs, int) or self.pretrain_epochs < 0:
            raise ValueError(f"pretrain_epochs must be an integer >= 0, got {self.pretrain_epochs!r}")
        if self.pretrain_epochs and not self.enabled:
            raise ValueError("pretrain_epochs needs something to quantize afterwards: set emb_bits, mlp_bits "
                             "or act_bits")

    @property
    def enabled(self) -> bool:
        """True when anything is quantized."""
        return any(b is not None for b in (self.emb_bits, self.mlp_bits, self.act_bits))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "QuantConfig":
        return cls(**(d or {}))
