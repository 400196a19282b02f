"""Training-step time per optimizer recipe against plain SGD, interleaved in short rounds (one JSON).

A step is what ``dqrm-train`` does on one rank (forward, backward, the finite check, the
optimizer step), on random batches at Kaggle dimensions (tables capped at --cap rows), no
data loading, no communication.  Recipes (tables / MLPs): sgd/sgd (the baseline),
rowwise-adagrad/sgd, rowwise-adagrad/adam, adagrad/sgd.  Each round runs --steps steps of
every recipe in turn (order reversed every other round), all in one process, so machine
drift hits all alike; the ratios are the medians of the per-round ratios to sgd/sgd.
Target: rowwise-adagrad/sgd at most 1.10x sgd/sgd at batch 128.

    python benchmarks/optimizer_step.py [--batch-size 128] [--rounds 15] [--steps 20] [--clock thread]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from _common import (KAGGLE_CARDINALITIES, add_step_worker_options, check_step_worker_options, machine,
                     one_rank_steps, random_batches)

RECIPES = {"sgd/sgd": ("sgd", "sgd"), "rowwise-adagrad/sgd": ("rowwise-adagrad", "sgd"),
           "rowwise-adagrad/adam": ("rowwise-adagrad", "adam"), "adagrad/sgd": ("adagrad", "sgd")}


class _Stepper:
    """A TrainingOptimizer driven as ``one_rank_steps`` drives an optimizer (step() without the step)."""

    def __init__(self, optimizer) -> None:
        self.optimizer, self.count = optimizer, 0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> None:
        self.optimizer.step(self.count)
        self.count += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=20, help="steps per round and recipe")
    p.add_argument("--recipes", default=",".join(RECIPES))
    add_step_worker_options(p)
    a = p.parse_args()
    check_step_worker_options(p, a)
    from dqrm_mpi.model import DLRM, model_config_from_preset
    from dqrm_mpi.train.optimizers import OptimConfig, TrainingOptimizer

    torch.set_num_threads(a.threads)
    cards = tuple(min(c, a.cap) for c in KAGGLE_CARDINALITIES)
    config = model_config_from_preset("kaggle", cards)
    batches = random_batches(a.batch_size, cards, seed=0)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    names = a.recipes.split(",")
    runs = {}
    for name in names:
        emb, mlp = RECIPES[name]
        torch.manual_seed(0)
        model = DLRM(config)
        opt = TrainingOptimizer(model, model.embedding_parameter_names(),
                                OptimConfig(emb_optimizer=emb, mlp_optimizer=mlp, emb_lr=0.03, mlp_lr=0.1 if
                                            mlp == "sgd" else 1e-3), 0.1, a.batch_size, 10**9)
        runs[name] = {"model": model, "params": opt.params, "qat": None, "opt": _Stepper(opt), "step": 0}
    now = time.thread_time if a.clock == "thread" else time.perf_counter
    for name in names:  # warm-up
        one_rank_steps(runs[name], batches, 5, loss_fn)
    ms = {name: [] for name in names}
    for r in range(a.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = now()
            one_rank_steps(runs[name], batches, a.steps, loss_fn)
            ms[name].append(1e3 * (now() - t0) / a.steps)
    base = names[0]
    print(json.dumps({
        "benchmark": "optimizer_step", "batch_size": a.batch_size, "threads": a.threads, "rounds": a.rounds,
        "steps_per_round": a.steps, "cardinality_cap": a.cap, "clock": a.clock,
        "ms_per_step_median": {n: round(statistics.median(v), 3) for n, v in ms.items()},
        f"over_{base}": {n: round(statistics.median(x / y for x, y in zip(ms[n], ms[base])), 3) for n in names[1:]},
        "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
