"""QuantConfig: what to quantize and how (validated on construction)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..qcore import CHANNEL, ROW, TABLE, TENSOR, check_bits, check_granularity

EMB_SCALES = (TABLE, ROW)
MLP_SCALES = (CHANNEL, TENSOR)
# Older spellings, still read from saved config dicts (checkpoints, config.json) and the
# packed-file header: "rowwise" = ROW, "matrix" = TENSOR, "none" = no MLP quantization.
LEGACY_NAMES = {"rowwise": ROW, "matrix": TENSOR, "none": None}


@dataclass(frozen=True)
class QuantConfig:
    """Quantization-aware training (DQRM).  The default quantizes nothing (FP32).

    emb_bits: bit width of embedding rows (None: FP32 tables).
    emb_scale: TABLE (one scale per table, DQRM) or ROW (one per row).
    scale_period: steps between full-table passes that refresh the per-table scales
        (1: every step).  Per-row scales need no pass: they come from the looked-up row.
    mlp_bits: bit width of MLP weights (None: FP32).
    mlp_scale: TENSOR (one scale per weight matrix) or CHANNEL (one per output channel);
        None picks CHANNEL when mlp_bits is set; always None without mlp_bits.
    act_bits: bit width of every MLP layer's input activations (None: FP32, DQRM's choice).
    pretrain_epochs: train FP32 for this many epochs, then switch quantization on.
    """

    emb_bits: int | None = None
    emb_scale: str = TABLE
    scale_period: int = 200
    mlp_bits: int | None = None
    mlp_scale: str | None = None
    act_bits: int | None = None
    pretrain_epochs: int = 0

    def __post_init__(self) -> None:
        if self.mlp_scale is None and self.mlp_bits is not None:
            object.__setattr__(self, "mlp_scale", CHANNEL)
        for name in ("emb_bits", "mlp_bits", "act_bits"):
            if getattr(self, name) is not None:
                check_bits(getattr(self, name), name)
        check_granularity("emb_scale", self.emb_scale, EMB_SCALES)
        if self.mlp_scale is not None:
            check_granularity("mlp_scale", self.mlp_scale, MLP_SCALES)
            if self.mlp_bits is None:
                raise ValueError(f"mlp_bits=None and mlp_scale={self.mlp_scale!r} disagree: give both "
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
        """The inverse of ``to_dict``; also reads the older spellings (``mlp_quant``, "rowwise", "matrix")."""
        d = dict(d or {})
        if "mlp_quant" in d:
            d["mlp_scale"] = d.pop("mlp_quant")
        for key in ("emb_scale", "mlp_scale"):
            if d.get(key) in LEGACY_NAMES:
                d[key] = LEGACY_NAMES[d[key]]
        return cls(**d)
