"""What to compress and how, validated on construction."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..qcore import CHANNEL, ROW, TABLE, TENSOR
from .base import compressor_names, get_compressor

ERROR_FEEDBACK = ("mlp", "emb", "both", "none")
EMB_EXCHANGES = ("sparse", "dense")
DENSE_EMB_MAX_BYTES = 1 << 30  # --emb-exchange dense: FP32 table gradients per rank and step
BUCKET_BYTES = 1 << 20  # overlapped MLP exchange: FP32 gradient bytes per bucket
COLLECTIVES = ("auto", "allgather", "two-phase")
EMB_SCALES = (TABLE, ROW, TENSOR)
MLP_SCALES = (CHANNEL, TENSOR)


@dataclass(frozen=True)
class CompressionConfig:
    """Gradient compression for the data-parallel exchange.

    emb / mlp: compressor names (``none``, ``fp16``, ``int16``, ``int8``, ``int4``) for the
      embedding gradients (sent sparse: coalesced rows, ids + values) and the MLP gradients;
      the MLP also takes the sparsifying specs ``topk:RATIO[+VALUES]`` and
      ``threshold:VALUE[+VALUES]``, a top-k spec optionally ending in ``@warmup=STEPS`` (a
      sparsity warm-up) (``compression.sparse``: always allgathered, one scale per tensor).
    emb_exchange: ``sparse`` (the touched rows, as above) or ``dense`` (whole table-sized
      gradients averaged by allreduce: the paper's uncompressed baseline; emb must be none or
      fp16, and the tables at most ``dense_emb_max_bytes`` of FP32).
    error_feedback: which gradients keep a residual (mlp, emb, both, none).  MLP residuals
      cost one FP32 copy of the MLP; embedding residuals one FP32 copy of every table.
    collective: for quantized payloads, ``allgather`` (receive grows with ranks), ``two-phase``
      (alltoall chunks, reduce, re-quantize, allgather: about 2x the payload per rank at any
      size) or ``auto`` (two-phase for quantized payloads from ``two_phase_min_ranks`` ranks,
      else allgather).  Linear MLP compressors (none, fp16) always use allreduce.
    emb_scale: one scale per table (DQRM), per row or per tensor.
    mlp_scale: one scale per output channel (row of a weight; biases one per tensor) or per tensor.
    overlap: start each bucket's exchange in backward, as soon as its gradients are ready, and
      the embedding exchange once the embedding gradient exists (bit-identical results).  Only
      for the allgather / allreduce exchanges on 2+ ranks: two-phase, top-k/threshold MLP
      compressors and emb_exchange dense exchange after backward whatever this says.
    bucket_bytes: FP32 bytes of MLP gradients per overlapped bucket (whole tensors, filled in
      reverse registration order until a bucket holds at least this much; 0: one per tensor).
    """

    emb: str = "none"
    mlp: str = "none"
    error_feedback: str = "mlp"
    collective: str = "auto"
    emb_scale: str = TABLE
    mlp_scale: str = CHANNEL
    # benchmarks/scaling.py's model: the threshold losing least over 2-64 ranks, 1-100 Gbit/s and
    # INT8/INT4 (auto keeps FP32/FP16 rows allgathered), from benchmarks/scaling_parts.json
    # (tests/unit/test_scaling_model.py pins it)
    two_phase_min_ranks: int = 7
    emb_exchange: str = "sparse"
    dense_emb_max_bytes: int = DENSE_EMB_MAX_BYTES
    overlap: bool = True
    bucket_bytes: int = BUCKET_BYTES

    def __post_init__(self) -> None:
        try:
            emb = get_compressor(self.emb)
        except ValueError as e:
            raise ValueError(f"emb: {e}") from None
        try:
            get_compressor(self.mlp)
        except ValueError as e:
            raise ValueError(f"mlp: {e}") from None
        checks = [
            (not emb.sparse, f"emb: {self.emb} sparsifies dense gradients (MLP only); embedding gradients "
                             "already travel as their touched rows"),
            (self.emb_exchange in EMB_EXCHANGES,
             f"emb_exchange must be one of {EMB_EXCHANGES}, got {self.emb_exchange!r}"),
            (self.emb_exchange == "sparse" or emb.linear,
             f"emb_exchange dense (--emb-exchange dense) averages whole tables by allreduce: emb "
             f"(--emb-compress) must be none or fp16, got {self.emb!r}"),
            (self.error_feedback in ERROR_FEEDBACK,
             f"error_feedback must be one of {ERROR_FEEDBACK}, got {self.error_feedback!r}"),
            (self.collective in COLLECTIVES, f"collective must be one of {COLLECTIVES}, got {self.collective!r}"),
            (self.emb_scale in EMB_SCALES, f"emb_scale must be one of {EMB_SCALES}, got {self.emb_scale!r}"),
            (self.mlp_scale in MLP_SCALES, f"mlp_scale must be one of {MLP_SCALES}, got {self.mlp_scale!r}"),
            (self.two_phase_min_ranks >= 2, f"two_phase_min_ranks must be >= 2, got {self.two_phase_min_ranks}"),
            (self.dense_emb_max_bytes >= 0, f"dense_emb_max_bytes must be >= 0, got {self.dense_emb_max_bytes}"),
            (self.bucket_bytes >= 0, f"bucket_bytes must be >= 0, got {self.bucket_bytes}"),
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

    def use_two_phase(self, world_size: int, codec: str) -> bool:
        """Whether the exchange of gradients compressed by ``codec`` (a compressor name) goes
        two-phase at ``world_size`` ranks.  ``auto`` picks it only for quantized payloads
        (int16/int8/int4) from ``two_phase_min_ranks`` ranks: for FP32 or FP16 rows the model
        (benchmarks/scaling.py) never finds two-phase faster."""
        if self.collective == "auto":
            return world_size >= self.two_phase_min_ranks and not get_compressor(codec).linear
        return self.collective == "two-phase"

    def single_rank_notice(self) -> str | None:
        """What to tell a 1-rank run that asked for compression (it exchanges nothing), or None."""
        asked = [f"--{k} {v}" for k, v in (("emb-compress", self.emb), ("mlp-compress", self.mlp),
                                            ("emb-exchange", self.emb_exchange))
                 if v not in ("none", "sparse")]
        if not asked:
            return None
        return f"{', '.join(asked)}: a single rank exchanges no gradients, so this does nothing here"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["CompressionConfig", "compressor_names", "ERROR_FEEDBACK", "COLLECTIVES", "EMB_SCALES", "MLP_SCALES",
           "EMB_EXCHANGES", "DENSE_EMB_MAX_BYTES", "BUCKET_BYTES"]
