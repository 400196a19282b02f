"""``dqrm-export``: write a trained model as a packed file (its real size)."""
from __future__ import annotations

import json

import click

from .options import version_option
from .quant_options import BITS, pop_quant_config, weight_options


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False, writable=True))
@click.option("--bits", type=BITS, default=None,
              help="PTQ shorthand: --emb-bits B --mlp-bits B (MLP channel-wise unless --mlp-scale says otherwise).")
@weight_options
@version_option
def main(checkpoint: str, out: str, bits: int | None, **options) -> None:
    """Pack CHECKPOINT (a dqrm-train checkpoint.pt) into OUT.

    A QAT checkpoint is written at the bit widths it was trained with: embedding rows
    and MLP weights as packed integers (INT4 two per byte, INT2 four) with their
    scales.  An FP32 checkpoint is written as FP32, or, given bit widths, quantized
    after training first (vanilla post-training quantization, PTQ).  Prints the file
    size and its ratio to the FP32 model in the same format.

    \b
    Example:
      dqrm-export runs/int4/checkpoint.pt int4.dqrm
      dqrm-export runs/fp32/checkpoint.pt ptq4.dqrm --bits 4      # vanilla PTQ INT4
      dqrm-eval int4.dqrm --data data/kaggle
    """
    from ..quant.config import QuantConfig
    from ..quant.packed import export_packed, packed_size
    from ..quant.ptq import post_training_quantize
    from ..train.checkpoint import load_checkpoint

    if bits is not None:
        options["emb_bits"] = options["emb_bits"] or bits
        options["mlp_bits"] = options["mlp_bits"] or bits
    try:
        requested = pop_quant_config(options)
        model, trained, _ = load_checkpoint(checkpoint)
        if trained.enabled:
            if requested.enabled:
                raise click.UsageError(f"{checkpoint} was trained quantization-aware ({_describe(trained)}); "
                                       "it is exported as trained: drop the bit-width options")
            quant, mode = trained, "qat"
        elif requested.enabled:
            post_training_quantize(model, requested)
            quant, mode = requested, "ptq"
        else:
            quant, mode = QuantConfig(), "fp32"
        size = export_packed(model, quant, out)
    except (ValueError, OSError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    fp32 = packed_size(model.config, QuantConfig())
    click.echo(json.dumps({"out": out, "mode": mode, "quant": _describe(quant), "bytes": size,
                           "fp32_bytes": fp32, "ratio_to_fp32": size / fp32}))


def _describe(q) -> str:
    """The quantization in the options' words, e.g. "emb INT4 table, mlp INT4 channel"."""
    parts = []
    if q.emb_bits:
        parts.append(f"emb INT{q.emb_bits} {q.emb_scale}")
    if q.mlp_bits:
        parts.append(f"mlp INT{q.mlp_bits} {q.mlp_scale}")
    if q.act_bits:
        parts.append(f"act INT{q.act_bits}")
    return ", ".join(parts) or "fp32"
