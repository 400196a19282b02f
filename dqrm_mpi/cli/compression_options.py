"""``dqrm-train`` options for compressed gradient communication (a shared option bundle)."""
from __future__ import annotations

from typing import Any, Callable

import click

from ..compression import CompressionConfig, compressor_names, get_compressor
from ..compression.config import (BUCKET_BYTES, COLLECTIVES, DENSE_EMB_MAX_BYTES, EMB_EXCHANGES, EMB_SCALES,
                                  ERROR_FEEDBACK, MLP_SCALES)
from ..compression.sparse import SPEC_FORM
from .options import apply_options


def _check_mlp_spec(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        get_compressor(value)
    except ValueError:
        raise click.BadParameter(f"expected one of {', '.join(compressor_names())}, or {SPEC_FORM}; "
                                 f"got {value!r}") from None
    return value


_OPTIONS = [
    click.option("--emb-compress", type=click.Choice(compressor_names()), default="none",
                 help="Embedding gradients always travel sparse: each rank merges duplicate rows, then "
                      "sends row ids (int32) plus the values compressed with this codec: none (FP32, "
                      "lossless), fp16, int16, int8 or int4 (two values per byte).  Received rows are "
                      "summed per id and averaged."),
    click.option("--emb-grad-scale", type=click.Choice(EMB_SCALES), default="table",
                 help="Scale granularity of quantized embedding gradients: one FP32 scale per table "
                      "(DQRM; 104 bytes a message), per row (4 bytes a row) or per message."),
    click.option("--mlp-compress", callback=_check_mlp_spec, default="none", metavar="CODEC",
                 help="MLP gradients: none or fp16 are averaged by allreduce; int16/int8/int4 are "
                      "quantized and never summed as integers (see --collective).  topk:RATIO sends each "
                      "tensor's ceil(RATIO x size) largest |values| as (int32 index, value), "
                      "threshold:VALUE every |value| >= VALUE; append +int8 (or +fp16, +int16, +int4) to "
                      "quantize the kept values with one scale per tensor, e.g. topk:0.01+int8.  Append "
                      "@warmup=STEPS to a topk spec for Deep Gradient Compression's sparsity warm-up: the "
                      "kept ratio decays exponentially from 0.25 to RATIO over the first STEPS global "
                      "steps (e.g. topk:0.01+int8@warmup=200; default: no warm-up).  What is not sent "
                      "stays in the error-feedback residual (--error-feedback mlp).  Sparse payloads are "
                      "always allgathered."),
    click.option("--mlp-grad-scale", type=click.Choice(MLP_SCALES), default="channel",
                 help="Scale granularity of quantized MLP gradients: one per output channel (row of "
                      "a weight; a bias gets one) or one per tensor."),
    click.option("--error-feedback", type=click.Choice(ERROR_FEEDBACK), default="mlp",
                 help="Which quantized gradients keep a residual (what compression dropped is added "
                      "to the next step's gradient).  mlp costs one FP32 copy of the MLP (about 2 MB "
                      "for Kaggle).  emb costs one FP32 copy of EVERY embedding table per rank (the "
                      "size of the model: 2.16 GB for Kaggle, 12.6 GB for Terabyte), allocated as "
                      "tables are touched.  Ignored for none."),
    click.option("--emb-exchange", type=click.Choice(EMB_EXCHANGES), default="sparse",
                 help="sparse: each rank sends the embedding rows it touched (lossless).  dense: whole "
                      "table-sized FP32 gradients averaged by allreduce, the paper's uncompressed baseline "
                      f"(with --emb-compress none or fp16; refused above {DENSE_EMB_MAX_BYTES / 2**30:g} GiB "
                      "of tables)."),
    click.option("--collective", type=click.Choice(COLLECTIVES), default="auto",
                 help="How quantized payloads are reduced: allgather (every rank decodes every "
                      "rank's payload: receive grows with ranks), two-phase (alltoall of one chunk "
                      "per rank, the owner decodes, averages and re-quantizes it, allgather of the "
                      "chunks: about 2x the payload per rank at any world size, one extra "
                      "quantization) or auto (two-phase for INT16/INT8/INT4 payloads from 7 ranks, where "
                      "benchmarks/scaling.py's model finds it pays; allgather otherwise)."),
    click.option("--overlap/--no-overlap", default=True, show_default=True,
                 help="Overlap the gradient exchange with backward: each bucket of MLP gradients (see "
                      "--bucket-mb; the top MLP's first) is compressed and its collective started as soon "
                      "as backward has produced it, the embedding exchange as soon as the embedding "
                      "gradient exists; the step then waits only for what is still in flight.  Same "
                      "numbers bit for bit.  Applies to the allgather/allreduce exchanges on 2+ ranks; "
                      "two-phase (--collective), top-k/threshold --mlp-compress, --emb-exchange dense and "
                      "1-rank runs always exchange after backward.  It pays where Horovod's background thread has "
                      "a core to move the bytes while backward computes (README: Gradient compression)."),
    click.option("--bucket-mb", type=click.FloatRange(min=0), default=BUCKET_BYTES / 2**20, show_default=True,
                 help="--overlap: MiB of FP32 MLP gradients per bucket (whole tensors; 0: one per tensor). "
                      "Smaller buckets start earlier, each costs one more collective."),
]


def compression_options(fn: Callable) -> Callable:
    return apply_options(fn, _OPTIONS)


def pop_compression_config(options: dict[str, Any]) -> CompressionConfig:
    """Remove the compression options from ``options`` and build the validated config (the
    overlap options, when absent, keep the config's defaults)."""
    return CompressionConfig(
        emb=options.pop("emb_compress"), mlp=options.pop("mlp_compress"),
        error_feedback=options.pop("error_feedback"), collective=options.pop("collective"),
        emb_scale=options.pop("emb_grad_scale"), mlp_scale=options.pop("mlp_grad_scale"),
        emb_exchange=options.pop("emb_exchange"), overlap=options.pop("overlap", True),
        bucket_bytes=int(options.pop("bucket_mb", BUCKET_BYTES / 2**20) * 2**20))
