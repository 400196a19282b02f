"""``dqrm-train``: data-parallel DLRM training under horovodrun / mpirun."""
from __future__ import annotations

import click

from ..data.schema import SchemaError
from ..model.config import NUM_DENSE, PRESETS
from ..train.config import DEVICES, FLOAT32_MAX, IN_MEMORY_AUTO_BYTES, IN_MEMORY_MODES, RESUME_MODES, TrainConfig
from .compression_options import compression_options, pop_compression_config
from .log_options import log_options, pop_log_config
from .optim_options import optim_options, pop_optim_config
from .options import LayerWidths, in_flags, version_option
from .quant_options import pop_quant_config, qat_options


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data", type=click.Path(exists=True, file_okay=False), required=True,
              help="Dataset directory written by `dqrm-prep` (meta.json + train/val/test shards).")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Run directory: config.json, metrics.jsonl, summary.json, checkpoint.pt.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="kaggle",
              help="Architecture: kaggle (dim 16, 13-512-256-64-16, 367-512-256-1), "
                   "terabyte (dim 64, 13-512-256-64, 415-512-512-256-1), tiny (tests).")
@click.option("--embedding-dim", type=click.IntRange(min=1), default=None, help="Override the preset's embedding dim.")
@click.option("--bottom-mlp", type=LayerWidths(inputs=NUM_DENSE), default=None,
              help="Override bottom-MLP widths after the 13 inputs, e.g. 512-256-64-16 (last = embedding dim); "
                   "the reference DLRM's 13-512-256-64-16 means the same.")
@click.option("--top-mlp", type=LayerWidths(), default=None,
              help="Override top-MLP widths after the interaction, e.g. 512-256-1 (last = 1).")
@click.option("--epochs", type=click.IntRange(min=1), default=1, help="Passes over the training split.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128,
              help="GLOBAL batch, split evenly across ranks (must be divisible by the number of ranks).")
@click.option("--lr", type=click.FloatRange(min=0, max=FLOAT32_MAX, min_open=True), default=0.1,
              help="Learning rate of both optimizers (a float32: > 0 and at most 3.4e38); --emb-lr / --mlp-lr "
                   "set their own, --lr-scaling, --lr-warmup-steps and --lr-decay-steps shape it.")
@click.option("--eval-every", type=click.IntRange(min=0), default=0,
              help="Evaluate on test and val every N steps (0: only at the end of each epoch).")
@click.option("--eval-batch-size", type=click.IntRange(min=1), default=16384, help="Rows per evaluation batch per rank.")
@click.option("--eval-splits", type=click.Choice(["test", "val"]), multiple=True, default=("test", "val"),
              help="Splits to evaluate (repeat the option for both); best_test is tracked on test.")
@click.option("--seed", type=int, default=0, help="Seeds initialisation (rank 0's, broadcast) and batch order.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps in all.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0,
              help="Also write OUT/checkpoint.pt every N steps (0: not by steps).")
@click.option("--checkpoint-minutes", type=click.FloatRange(min=0), default=30.0,
              help="Also write OUT/checkpoint.pt every this many minutes of wall time (rank 0's clock, "
                   "checked every few steps; 0: not by time).  The last step is always checkpointed, and "
                   "on SIGUSR1 or SIGTERM every rank stops at a checkpoint and exits with code 75.")
@click.option("--resume", type=click.Choice(RESUME_MODES), is_flag=False, flag_value="yes", default="no",
              help="Continue the run in --out from its checkpoint.pt (same data, architecture, batch size, "
                   "seed and quantization; lr, epochs, max-steps, evaluation and compression may change). "
                   "Error-feedback residuals start from zero.  --resume alone (or yes) needs the checkpoint; "
                   "--resume auto continues when it exists and starts afresh otherwise (a requeued job).")
@click.option("--overwrite", is_flag=True, help="Replace the run already in --out (refused otherwise).")
@click.option("--device", type=click.Choice(DEVICES), default="auto",
              help="auto: one GPU per local rank when torch sees CUDA, else CPU.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads per rank [default: OMP_NUM_THREADS, else this rank's share of the cores it may "
                   "use (sched_getaffinity) among the ranks on its node].")
@click.option("--data-in-memory", type=click.Choice(IN_MEMORY_MODES), default="auto",
              help="Read the training and evaluated splits into memory once (each checked as it is read), "
                   "then copy batches from there: every rank holds all of them, 160 bytes a row.  auto: when "
                   f"they take at most {IN_MEMORY_AUTO_BYTES >> 30} GiB together (a few million rows; the "
                   "Kaggle and Terabyte datasets stay on disk).")
@click.option("--prefetch", type=click.IntRange(min=0), default=None,
              help="Training batches a background thread reads ahead; 0: each batch is read in the training "
                   "thread [default: 0 for splits in memory, and on a CPU rank whose torch threads use its whole "
                   "share of the cores (a reading thread would take CPU from them in mid-step: 9 % slower "
                   "steps at batch 128 on 2 cores), else 4 (--threads below that share, or a GPU rank)].  "
                   "Raise it when the data sits on slow storage and a core is free.")
@optim_options
@qat_options
@compression_options
@click.option("--stall-timeout", type=click.FloatRange(min=0), default=600.0,
              help="Seconds a rank may wait in one collective for the others (a stopped or hung rank) "
                   "before the job is ended with exit code 124; a warning naming the silent ranks comes "
                   "every quarter of it.  0: wait forever.")
@log_options
@version_option
def main(**options) -> None:
    """Train a DLRM click model data-parallel with Horovod.

    Run one process per rank under horovodrun (or mpirun); a plain `dqrm-train`
    is a single rank.  Rank 0 writes the run directory and shows progress.

    \b
    Example (2 ranks on this machine, then 8 ranks on two nodes):
      horovodrun -np 2 -H localhost:2 dqrm-train --data data/kaggle --out runs/fp32
      horovodrun -np 8 -H a:4,b:4 dqrm-train --data data/kaggle --out runs/fp32 --batch-size 512
    """
    try:
        quant = pop_quant_config(options)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        compression = pop_compression_config(options)
        log = pop_log_config(options)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        optim = pop_optim_config(options)
        config = TrainConfig(**options, quant=quant, compression=compression, log=log, optim=optim)
    except ValueError as e:
        raise click.UsageError(in_flags(str(e))) from None
    # imports Horovod: after the options are known to be good
    from ..comm.backend import HorovodBackend
    from ..train.failures import RankFailure
    from ..train.loop import train
    from ..train.preemption import Preempted, exit_all_ranks

    backend = HorovodBackend()
    try:
        train(config, backend)
    except Preempted as stop:
        if backend.rank == 0:
            click.echo(str(stop), err=True)
        exit_all_ranks(backend)
    except (SchemaError, ValueError, OSError, FloatingPointError, RankFailure) as e:
        raise click.ClickException(str(e)) from None
