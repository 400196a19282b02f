"""The quantization options shared by ``dqrm-train`` (QAT) and ``dqrm-export`` (PTQ).

Scale granularities use qcore's words (table, row, tensor, channel), as the gradient
options do (--emb-grad-scale, --mlp-grad-scale); the older spellings (rowwise, matrix,
--mlp-quant) still work, with a warning."""
from __future__ import annotations

from typing import Any, Callable

import click

from ..qcore import CHANNEL, MAX_BITS, MIN_BITS, ROW, TABLE, TENSOR
from ..quant.config import EMB_SCALES, MLP_SCALES, QuantConfig
from .options import Words, apply_options, in_flags, warn

BITS = click.IntRange(MIN_BITS, MAX_BITS)
OLD_WORDS = {"rowwise": ROW, "matrix": TENSOR}


def _mlp_quant(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        warn(f"--mlp-quant is deprecated: use --mlp-scale {CHANNEL}|{TENSOR} (matrix is {TENSOR}; "
             "none: leave out --mlp-bits)")
    return value


def weight_options(fn: Callable) -> Callable:
    """--emb-bits --emb-scale --mlp-bits --mlp-scale (what is quantized, and how)."""
    options = [
        click.option("--emb-bits", type=BITS, default=None,
                     help="Quantize embedding rows to this many bits (16, 8, 4, 2; any of 2..16). Only the rows "
                          "looked up in a batch are fake-quantized; the FP32 master tables take the sparse "
                          "gradients (straight-through estimator). [default: FP32]"),
        click.option("--emb-scale", type=Words(list(EMB_SCALES), {"rowwise": ROW}), default=TABLE,
                     help="table: one scale per table, max|W|/(2^(b-1)-1), refreshed every --scale-period "
                          "steps (DQRM). row: one scale per row, computed from the row itself (more "
                          "accurate; the export then stores one float32 scale per row)."),
        click.option("--mlp-bits", type=BITS, default=None,
                     help="Quantize MLP weights to this many bits; biases stay FP32. [default: FP32]"),
        click.option("--mlp-scale", type=Words(list(MLP_SCALES), {"matrix": TENSOR}), default=None,
                     help="MLP weight scales: tensor (one per weight matrix) or channel (one per output "
                          "channel; DQRM found it better at INT4). Needs --mlp-bits. [default: channel]"),
        click.option("--mlp-quant", type=click.Choice(["none", "matrix", TENSOR, CHANNEL]), default=None,
                     hidden=True, callback=_mlp_quant, help="Deprecated spelling of --mlp-scale."),
    ]
    return apply_options(fn, options)


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
    return apply_options(fn, options)


def pop_quant_config(options: dict[str, Any]) -> QuantConfig:
    """Remove the quantization options from Click's ``options`` and build a QuantConfig
    (ValueError naming the options if bad)."""
    names = ("emb_bits", "emb_scale", "scale_period", "mlp_bits", "mlp_scale", "act_bits", "pretrain_epochs")
    fields = {n: options.pop(n) for n in names if n in options}
    old = options.pop("mlp_quant")
    if old == "none":
        if fields["mlp_bits"] is not None:
            raise ValueError(f"--mlp-bits {fields['mlp_bits']} and --mlp-quant none disagree: leave out --mlp-quant")
    elif old is not None:
        if fields["mlp_scale"] not in (None, OLD_WORDS.get(old, old)):
            raise ValueError(f"--mlp-scale {fields['mlp_scale']} and --mlp-quant {old} disagree: "
                             "give --mlp-scale alone")
        fields["mlp_scale"] = OLD_WORDS.get(old, old)
    if fields["mlp_scale"] is not None and fields["mlp_bits"] is None:
        raise ValueError(f"--mlp-scale {fields['mlp_scale']} needs --mlp-bits (without it the MLP stays FP32)")
    try:
        return QuantConfig(**fields)
    except ValueError as e:
        raise ValueError(in_flags(str(e))) from None
