"""``dqrm-export``: write a trained model as a packed file (its real size), with the input map
of its dataset, or as a TorchScript / torch.export file for a serving stack."""
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
@click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
              help="Dataset directory (dqrm-prep criteo) whose input map (raw value -> id) goes into OUT, so "
                   "that dqrm-predict scores raw rows.  [default: the dataset the checkpoint was trained on, "
                   "when it has an input map]")
@click.option("--format", "fmt", type=click.Choice(["packed", "torchscript", "export"]), default="packed",
              help="packed: the .dqrm file (dqrm-eval, dqrm-predict); torchscript: a torch.jit.load file; "
                   "export: a torch.export.load file (.pt2).  The last two run without dqrm_mpi: dense "
                   "float32 [B, 13] and ids int64 [B, 26] in, probabilities [B] out.")
@weight_options
@version_option
def main(checkpoint: str, out: str, bits: int | None, data: str | None, fmt: str, **options) -> None:
    """Pack CHECKPOINT (a dqrm-train checkpoint.pt) into OUT.

    A QAT checkpoint is written at the bit widths it was trained with: embedding rows
    and MLP weights as packed integers (INT4 two per byte, INT2 four) with their
    scales.  An FP32 checkpoint is written as FP32, or, given bit widths, quantized
    after training first (vanilla post-training quantization, PTQ).  Prints the model's
    size ("bytes", without the input map; "file_bytes" with it) and its ratio to the
    FP32 model in the same format.

    \b
    With the input map of the dataset (--data, or the checkpoint's own dataset) the
    packed file scores raw Criteo rows on its own (dqrm-predict).  --format torchscript
    or export writes the same model (same numbers) for torch.jit.load /
    torch.export.load, its input map as the extra file input_map.npz.

    
    Example:
      dqrm-export runs/int4/checkpoint.pt int4.dqrm --data data/kaggle
      dqrm-export runs/fp32/checkpoint.pt ptq4.dqrm --bits 4      # vanilla PTQ INT4
      dqrm-eval int4.dqrm --data data/kaggle
      dqrm-predict int4.dqrm day_7.gz --out scores.txt
      dqrm-export runs/int4/checkpoint.pt int4.pt --format torchscript
    """
    from ..quant.config import QuantConfig
    from ..quant.packed import export_packed, model_bytes, packed_size
    from ..quant.ptq import post_training_quantize
    from ..train.checkpoint import model_from_checkpoint, read_checkpoint

    if bits is not None:
        options["emb_bits"] = options["emb_bits"] or bits
        options["mlp_bits"] = options["mlp_bits"] or bits
    try:
        requested = pop_quant_config(options)
        ckpt = read_checkpoint(checkpoint)
        model, trained, _ = model_from_checkpoint(ckpt)
        imap = _input_map(model, data, (ckpt.get("train_config") or {}).get("data"), checkpoint)
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
        parts = imap.parts() if imap is not None else None
        if fmt == "packed":
            file_bytes = export_packed(model, quant, out, parts)
            size = model_bytes(out)
        else:
            file_bytes = size = _export_serving(model, quant, out, fmt, imap)
    except (ValueError, OSError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    fp32 = packed_size(model.config, QuantConfig())
    click.echo(json.dumps({"out": out, "format": fmt, "mode": mode, "quant": _describe(quant), "bytes": size,
                           "fp32_bytes": fp32, "ratio_to_fp32": size / fp32, "file_bytes": file_bytes,
                           "input_map": imap.digest[:16] if imap is not None else None}))


def _input_map(model, data: str | None, recorded: str | None, checkpoint: str):
    """The input map to ship: --data's (checked against the model's tables), else that of the
    dataset the checkpoint records when it has one, else None."""
    import os

    from data_prep.input_map import load_input_map

    from .evaluate import check_cardinalities

    if data is None:
        if not recorded or not os.path.isfile(os.path.join(recorded, "input_map.npz")):
            return None
        data = recorded
    imap = load_input_map(data)
    check_cardinalities(list(model.config.cardinalities), imap.cardinalities, checkpoint, data)
    return imap


def _export_serving(model, quant, out: str, fmt: str, imap) -> int:
    """The packed model (written to a temporary file and read back: the same numbers as the
    .dqrm file's) as a TorchScript or torch.export file."""
    import os
    import tempfile

    from ..quant.packed import export_packed, load_packed
    from ..quant.serving import export_serving

    fd, tmp = tempfile.mkstemp(suffix=".dqrm", dir=os.path.dirname(os.path.abspath(out)))
    os.close(fd)
    try:
        export_packed(model, quant, tmp)
        packed = load_packed(tmp)
    finally:
        os.unlink(tmp)
    return export_serving(packed, out, fmt, imap.to_bytes() if imap is not None else None)


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
