"""``dqrm-train`` options for what a run reports while it runs (progress, metrics.jsonl
windows, TensorBoard) and the per-epoch and best checkpoints it keeps."""
from __future__ import annotations

from typing import Any, Callable

import click

from ..train.best_checkpoint import KEEP_BEST
from ..train.log_config import LogConfig
from ..train.progress import MODES
from .options import apply_options

_OPTIONS = [
    click.option("--progress", type=click.Choice(MODES), default="auto",
                 help="bar: a progress bar (and one during evaluation); log: for job files, one timestamped "
                      "line every --progress-seconds on stderr (step/total, loss, samples/s, communication "
                      "ms per step, ETA); none; auto: bar when stderr is a terminal, else log."),
    click.option("--progress-seconds", type=click.FloatRange(min=0), default=60.0,
                 help="Seconds between progress lines with --progress log."),
    click.option("--log-every", type=click.IntRange(min=1), default=None,
                 help="Steps per metrics.jsonl window: one step line (loss averaged over all ranks, "
                      "step-time breakdown, communication) and one comm line (every rank) per window, "
                      "figures as means per step. [default: steps per epoch / 100, between 1 and 1000; "
                      "a Kaggle epoch at batch 128 writes about 300 windows]"),
    click.option("--tensorboard", type=click.Path(file_okay=False), default=None,
                 help="Also write TensorBoard scalars here (train loss, samples/s, bytes and ms of "
                      "communication per step, test/val AUC, accuracy, log loss). Needs the tensorboard "
                      "package: pip install 'dqrm_mpi[tensorboard]'."),
    click.option("--keep-epoch-checkpoints", is_flag=True,
                 help="Also keep the model of every epoch's end as OUT/checkpoint-epoch{N}.pt (N as in "
                      "metrics.jsonl's epoch, from 0), e.g. to apply dqrm-export's PTQ to any epoch."),
    click.option("--keep-best", type=click.Choice(KEEP_BEST), default="none",
                 help="val: also keep the model of the evaluation with the best val AUC as "
                      "OUT/checkpoint-best.pt (replaced at each new best), and give that evaluation's step and "
                      "metrics on every evaluated split in summary.json's selected_by_val: a model chosen "
                      "without looking at the test split (best_test is the best test value seen).  test: "
                      "the same by test AUC.  The split must be among --eval-splits; on --resume the "
                      "selection continues from checkpoint-best.pt."),
]


def log_options(fn: Callable) -> Callable:
    return apply_options(fn, _OPTIONS)


def pop_log_config(options: dict[str, Any]) -> LogConfig:
    """Remove the reporting options from ``options`` (not --keep-epoch-checkpoints and
    --keep-best, TrainConfig fields) and build the validated config (ValueError if bad)."""
    return LogConfig(progress=options.pop("progress"), progress_seconds=options.pop("progress_seconds"),
                     log_every=options.pop("log_every"), tensorboard=options.pop("tensorboard"))
