"""``dqrm-predict``: click probabilities of raw Criteo rows from a packed model with its input map."""
from __future__ import annotations

import json

import click

from .options import version_option


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("raw", nargs=-1, required=True, type=click.Path(allow_dash=True))
@click.option("--out", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Scores file: one probability per line in input order (text), or float64 [n] when it ends "
                   "in .npy; - writes text to standard output.  Written under a temporary name and renamed "
                   "at the end: on an error nothing is left under this name.")
@click.option("--format", "out_format", type=click.Choice(["auto", "text", "npy"]), default="auto",
              help="auto: npy when --out ends in .npy, else text.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16384, help="Rows per model call.")
@click.option("--mlp", type=click.Choice(["fp32", "int8-dynamic"]), default="fp32",
              help="fp32: the MLPs from the dequantized weights (dqrm-eval's scores); int8-dynamic: torch's "
                   "INT8 dynamic quantized linear layers (faster on x86, scores change slightly).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads [default: torch's].")
@click.option("--progress/--no-progress", default=True, help="A progress line on stderr.")
@version_option
def main(model: str, raw: tuple[str, ...], out: str, out_format: str, batch_size: int, mlp: str,
         threads: int | None, progress: bool) -> None:
    """Score the raw Criteo rows of RAW... (plain or .gz; - for standard input) with MODEL.

    MODEL is a packed file written by `dqrm-export --data DATA`: it carries the input
    map of DATA (raw value -> id; a value not in it gets the OOV id 0, see the
    README).  A line has the 40 fields of dqrm-prep's input (label first) or 39 (no
    label).  A bad line stops the run, named as dqrm-prep names it (file, line, field).
    When every row is labeled, prints AUC and log loss too (with the row counts and
    the unseen values per column, as JSON on stdout, or stderr with --out -).

    \b
    Example:
      dqrm-export runs/int4/checkpoint.pt int4.dqrm --data data/kaggle
      dqrm-predict int4.dqrm day_7.gz --out scores.txt
      zcat day_7.gz | cut -f2- | dqrm-predict int4.dqrm - --out scores.npy
    """
    import torch

    from data_prep.errors import PrepError
    from data_prep.input_map import InputMap

    from ..quant.packed import load_packed_with_map
    from ..quant.packfile import is_packed_file
    from ..quant.serving import set_mlp_mode
    from ..serve.predict import PredictConfig, predict_raw

    if threads:
        torch.set_num_threads(threads)
    fmt = ("npy" if out.endswith(".npy") else "text") if out_format == "auto" else out_format
    try:
        if not is_packed_file(model):
            raise ValueError(f"{model}: not a packed model; export it with dqrm-export CHECKPOINT OUT --data DATA")
        net, parts = load_packed_with_map(model)
        if parts is None:
            raise ValueError(f"{model}: has no input map (raw value -> id), so raw rows cannot be scored; "
                             f"export it again with dqrm-export CHECKPOINT OUT --data DATA")
        imap = InputMap.from_parts(parts, model)
        if imap.cardinalities != list(net.config.cardinalities):
            raise ValueError(f"{model}: its input map has tables of {imap.cardinalities} rows, the model "
                             f"{list(net.config.cardinalities)}")
        set_mlp_mode(net, mlp)
        config = PredictConfig(tuple(raw), out, fmt, batch_size, progress)
        summary = predict_raw(net, imap, config)
    except (PrepError, ValueError, OSError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    report = {"model": model, "out": out, "mlp": mlp, "rows": summary.rows, "files": summary.files,
              "unseen_values": sum(summary.unseen), "unseen_per_column": summary.unseen,
              **(summary.metrics or {}), "seconds": summary.seconds}
    click.echo(json.dumps(report), err=out == "-")
