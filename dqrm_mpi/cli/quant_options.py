"""The quantization options shared by ``dqrm-train`` (QAT) and ``dqrm-export`` (PTQ)."""
from __future__ import annotations

from typing import Any, Callable

import click

from ..qcore import CHANNEL, MAX_BITS, MIN_BITS, ROW, TABLE, TENSOR
from ..quant.config import QuantConfig

BITS = click.IntRange(MIN_BITS, MAX_BITS)
# The option values users type -> the granularity names in code (None: MLP weights FP32).
EMB_SCALE_CHOICES = {"table": TABLE, "rowwise": ROW}
MLP_QUANT_CHOICES = {"none": None, "matrix": TENSOR, "channel": CHANNEL}


def weight_options(fn: Callable) -> Callable:
    """--emb-bits --emb-scale --mlp-bits --mlp-quant (what is quantized, and how)."""
    options = [
        click.option("--emb-bits", type=BITS, default=None,
                     help="Quantize embedding rows to this many bits (16, 8, 4, 2; any of 2..16). Only the rows "
                          "looked up in a batch are fake-quantized; the FP32 master tables take the sparse "
                          "gradients (straight-through estimator). [default: FP32]"),
        click.option("--emb-scale", type=click.Choice(list(EMB_SCALE_CHOICES)), default="table",
                     help="table: one scale per table, max|W|/(2^(b-1)-1), refreshed every --scale-period "
                          "steps (DQRM). rowwise: one scale per row, computed from the row itself (more "
                          "accurate; the export then stores one float32 scale per row)."),
        click.option("--mlp-bits", type=BITS, default=None,
                     help="Quantize MLP weights to this many bits; biases stay FP32. [default: FP32]"),
        click.option("--mlp-quant", type=click.Choice(list(MLP_QUANT_CHOICES)), default=None,
                     help="MLP weight scales: matrix (one per weight matrix) or channel (one per output "
                          "channel; DQRM found it better at INT4). [default: channel with --mlp-bits, else none]"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def qat_options(fn: Callable) -> Callable:
    """The weight options plus --scale-period --act-bits --pretrain-epochs (training only)."""
    options = [
        click.option("--scale-period", type=click.IntRange(min=1), default=200,
                     help="Steps between full-table passes that recompute the per-table embedding scales "
                          "(the expensive part: max|W| over every table). 1 = every step. DQRM used 200 on "
                          "Kaggle, 1000 on Terabyte."),
        click.option("--act-bits", type=BITS, default=None,
                     help="Also quantize every MLP layer's input activations (running max scale). DQRM keeps "
                          "activations FP32: INT4 weights plus activations did not converge. [default: FP32]"),
        click.option("--pretrain-epochs", type=click.IntRange(min=0), default=0,
                     help="Train FP32 for this many epochs, then switch quantization on (QAT as fine-tuning). "
                          "0 = QAT from scratch, which DQRM found slightly better."),
    ]
    fn = weight_options(fn)
    for option in reversed(options):
        fn = option(fn)
    return fn


def pop_quant_config(options: dict[str, Any]) -> QuantConfig:
    """Remove the quantization options from Click's ``options`` and build a QuantConfig (ValueError if bad)."""
    names = ("emb_bits", "scale_period", "mlp_bits", "act_bits", "pretrain_epochs")
    fields = {n: options.pop(n) for n in names if n in options}
    fields["emb_scale"] = EMB_SCALE_CHOICES[options.pop("emb_scale")]
    mlp_quant = options.pop("mlp_quant")
    if mlp_quant == "none" and fields.get("mlp_bits") is not None:
        raise ValueError(f"mlp_bits={fields['mlp_bits']} and mlp_quant='none' disagree: give both (e.g. 4 and "
                         "'channel') or neither")
    return QuantConfig(**fields, mlp_scale=MLP_QUANT_CHOICES[mlp_quant] if mlp_quant else None)
