"""``dqrm-eval``: metrics of a packed model (or a checkpoint) on a dataset split."""
from __future__ import annotations

import json

import click

from ..data.schema import SchemaError
from .options import version_option


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", type=click.Path(exists=True, file_okay=False), required=True,
              help="Dataset directory written by `dqrm-prep` (meta.json + shards).")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", help="Split to evaluate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16384, help="Rows per inference batch.")
@click.option("--predictions", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also save the click probabilities (float64, file order) to this .npy file.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads [default: torch's].")
@version_option
def main(model: str, data: str, split: str, batch_size: int, predictions: str | None, threads: int | None) -> None:
    """Evaluate MODEL on a split: accuracy, ROC AUC, log loss and the model size.

    MODEL is a packed file from dqrm-export (inference from the packed integers,
    embedding rows dequantized at lookup) or a dqrm-train checkpoint.pt (the
    fake-quantized QAT model itself; the size reported is then its packed size).
    The size is the model's: without the input map a packed file may carry.

    \b
    Example:
      dqrm-export runs/int4/checkpoint.pt int4.dqrm
      dqrm-eval int4.dqrm --data data/kaggle
    """
    import numpy as np
    import torch

    from ..quant.packed import load_packed, model_bytes, packed_size
    from ..quant.packfile import is_packed_file
    from ..data.schema import read_meta
    from ..train.checkpoint import load_checkpoint
    from ..train.evaluation import predict
    from ..train.metrics import binary_metrics
    from ..train.run_dir import json_safe

    if threads:
        torch.set_num_threads(threads)
    try:
        if is_packed_file(model):
            net, source, size = load_packed(model), "packed", model_bytes(model)
        else:
            net, quant, _ = load_checkpoint(model)
            source, size = "checkpoint", packed_size(net.config, quant)
        check_cardinalities(net.config.cardinalities, read_meta(data).cardinalities, model, data)
        prob, label = predict(net, data, split, batch_size)
        metrics = binary_metrics(label, prob)
    except (SchemaError, ValueError, OSError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    if predictions:
        np.save(predictions, prob)
    if metrics.get("auc_undefined"):
        click.echo(f"dqrm-eval: --split {split}: ROC AUC is undefined ({metrics['auc_undefined']}); "
                   "written as null", err=True)
    click.echo(json.dumps(json_safe({"model": model, "source": source, "split": split, **metrics,
                                     "model_bytes": size, "model_mb": size / 2**20}), allow_nan=False))


def check_cardinalities(model_cards: list[int], data_cards: list[int], model: str, data: str) -> None:
    """The data's ids must index the model's tables: the same rows per table, else ValueError
    naming the first table that differs (fewer rows: the ids mean other categories; more: out
    of range)."""
    if len(model_cards) != len(data_cards):
        raise ValueError(f"--data {data} has {len(data_cards)} embedding tables, {model} {len(model_cards)}")
    for t, (m, d) in enumerate(zip(model_cards, data_cards)):
        if m != d:
            raise ValueError(f"--data {data} does not match {model}: embedding table {t} has {d} rows in the "
                             f"data, {m} in the model (data cardinalities {list(data_cards)}, model "
                             f"{list(model_cards)}); evaluate on the dataset the model was trained on")
