"""What to compress and how, validated on construction."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..qcore import CHANNEL, ROW, TABLE, TENSOR
from .base import compressor_names, get_compressor

ERROR_FEEDBACK = ("mlp", "emb", "both", "none")
COLLECTIVES = ("auto", "allgather", "two-phase")
EMB_SCALES = (TABLE, ROW, TENSOR)
MLP_SCALES = (CHANNEL, TENSOR)


@dataclass(frozen=True)
class CompressionConfig:
    """Gradient compression for the data-parallel exchange.

    emb / mlp: compressor names (``none``, ``fp16``, ``int16``, ``int8``, ``int4``) for the
      embedding gradients (sent sparse: coalesced rows, ids + values) and the MLP gradients.
    error_feedback: which gradients keep a residual (mlp, emb, both, none).  MLP residuals
      cost one FP32 copy of the MLP; embedding residuals one FP32 copy of every table.
    collective: for quantized payloads, ``allgather`` (receive grows with ranks), ``two-phase``
      (alltoall chunks, reduce, re-quantize, allgather: about 2x the payload per rank at any
      size) or ``auto`` (allgather below ``two_phase_min_ranks`` ranks).  Linear MLP
      compressors (none, fp16) always use allreduce.
    emb_scale: one scale per table (DQRM), per row or per tensor.
    mlp_scale: one scale per output channel (row of a weight; biases one per tensor) or per tensor.
    """

    emb: str = "none"
    mlp: str = "none"
    error_feedback: str = "mlp"
    collective: str = "auto"
    emb_scale: str = TABLE
    mlp_scale: str = CHANNEL
    two_phase_min_ranks: int = 5

    def __post_init__(self) -> None:
        for field_name in ("emb", "mlp"):
            get_compressor(getattr(self, field_name))  # raises for unknown names
        checks = [
            (self.error_feedback in ERROR_FEEDBACK,
             f"error_feedback must be one of {ERROR_FEEDBACK}, got {self.error_feedback!r}"),
            (self.collective in COLLECTIVES, f"collective must be one of {COLLECTIVES}, got {self.collective!r}"),
            (self.emb_scale in EMB_SCALES, f"emb_scale must be one of {EMB_SCALES}, got {self.emb_scale!r}"),
            (self.mlp_scale in MLP_SCALES, f"mlp_scale must be one of {MLP_SCALES}, got {self.mlp_scale!r}"),
            (self.two_phase_min_ranks >= 2, f"two_phase_min_ranks must be >= 2, got {self.two_phase_min_ranks}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def emb_error_feedback(self) -> bool:
        return self.error_feedback in ("emb", "both") and not get_compressor(self.emb).lossless

    @property
    def mlp_error_feedback(self) -> bool:
        return self.error_feedback in ("mlp", "both") and not get_compressor(self.mlp).lossless

    def use_two_phase(self, world_size: int) -> bool:
        if self.collective == "auto":
            return world_size >= self.two_phase_min_ranks
        return self.collective == "two-phase"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["CompressionConfig", "compressor_names", "ERROR_FEEDBACK", "COLLECTIVES", "EMB_SCALES", "MLP_SCALES"]
