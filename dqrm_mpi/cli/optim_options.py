"""``dqrm-train`` options for the optimizers and the learning-rate schedule (a shared option
bundle).  The reference DLRM's spellings of the schedule (``--lr-num-warmup-steps``,
``--lr-decay-start-step``, ``--lr-num-decay-steps``) are accepted as well."""
from __future__ import annotations

from typing import Any, Callable

import click

from ..train.optimizers import EMB_OPTIMIZERS, MLP_OPTIMIZERS, OptimConfig
from ..train.schedule import LR_SCALING, LRSchedule
from .options import apply_options

_OPTIONS = [
    click.option("--emb-optimizer", type=click.Choice(EMB_OPTIMIZERS), default="sgd",
                 help="Optimizer of the embedding tables, applied to the looked-up rows only.  sgd: the reference "
                      "DLRM's.  rowwise-adagrad: fbgemm/torchrec's EXACT_ROWWISE_ADAGRAD (duplicate ids summed, "
                      "one accumulator per row, the mean of its squared gradient: 4 bytes a row), the usual "
                      "choice at large batches; try --emb-lr 0.01-0.1.  adagrad: one accumulator per value "
                      "(as large as the tables)."),
    click.option("--mlp-optimizer", type=click.Choice(MLP_OPTIMIZERS), default="sgd",
                 help="Optimizer of the bottom and top MLPs: sgd, adagrad (torch.optim.Adagrad), adam "
                      "(torch.optim.Adam) or lamb (Adam with a per-tensor trust ratio, MLPerf's choice at "
                      "very large batches)."),
    click.option("--emb-lr", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="Base learning rate of the tables' optimizer [default: --lr]."),
    click.option("--mlp-lr", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="Base learning rate of the MLPs' optimizer [default: --lr]."),
    click.option("--lr-scaling", type=click.Choice(LR_SCALING), default="none",
                 help="Scale every base rate for the global --batch-size: linear multiplies it by "
                      "batch-size / --lr-base-batch, sqrt by the square root of that (usual with Adagrad/Adam); "
                      "pair linear with a warm-up."),
    click.option("--lr-base-batch", type=click.IntRange(min=1), default=128,
                 help="The global batch the base rates were tuned for (with --lr-scaling)."),
    click.option("--lr-warmup-steps", "--lr-num-warmup-steps", "lr_warmup_steps", type=click.IntRange(min=0),
                 default=0, help="Linear warm-up: step s (from 0) of the first N takes (s + 1) / N of the rate."),
    click.option("--lr-decay-start", "--lr-decay-start-step", "lr_decay_start", type=click.IntRange(min=0),
                 default=None,
                 help="Global step where the polynomial decay starts [default: the run's last --lr-decay-steps "
                      "steps, of --epochs epochs (--max-steps stops a run early without changing its schedule)]."),
    click.option("--lr-decay-steps", "--lr-num-decay-steps", "lr_decay_steps", type=click.IntRange(min=0),
                 default=0, help="Length of the decay in steps (0: no decay); it must end within --epochs."),
    click.option("--lr-decay-power", type=click.FloatRange(min=0, min_open=True), default=2.0,
                 help="Power of the decay: rate = end + (base - end) * (1 - t / steps)^power (2: the reference "
                      "DLRM's and MLPerf's)."),
    click.option("--lr-end", type=click.FloatRange(min=0), default=0.0,
                 help="The rate --lr decays to, kept after the decay (at most --lr; --emb-lr and --mlp-lr decay "
                      "to the same fraction of theirs)."),
]


def optim_options(fn: Callable) -> Callable:
    return apply_options(fn, _OPTIONS)


def pop_optim_config(options: dict[str, Any]) -> OptimConfig:
    """Remove the optimizer and schedule options from ``options`` (not --lr, a TrainConfig
    field) and build the validated config (ValueError naming the flags if bad)."""
    lr, lr_end = options["lr"], options.pop("lr_end")
    if lr_end > lr:
        raise ValueError(f"--lr-end ({lr_end:g}) must not exceed --lr ({lr:g}): the decay goes down to it")
    schedule = LRSchedule(warmup_steps=options.pop("lr_warmup_steps"), decay_start=options.pop("lr_decay_start"),
                          decay_steps=options.pop("lr_decay_steps"), decay_power=options.pop("lr_decay_power"),
                          end_factor=lr_end / lr)
    return OptimConfig(emb_optimizer=options.pop("emb_optimizer"), mlp_optimizer=options.pop("mlp_optimizer"),
                       emb_lr=options.pop("emb_lr"), mlp_lr=options.pop("mlp_lr"),
                       lr_scaling=options.pop("lr_scaling"), lr_base_batch=options.pop("lr_base_batch"),
                       schedule=schedule)
