"""INT4 QAT step time over the FP32 step time, with the fused CPU kernels (DQRM_KERNELS=1) and
without them (DQRM_KERNELS=0), interleaved in one invocation, at Kaggle dimensions.

    python benchmarks/qat_step.py [--batch-sizes 128,512] [--rounds 10] [--steps 20] [--clock thread]

INT4 QAT = embeddings INT4 with per-table scales refreshed every 200 steps + MLP INT4 per
channel (DQRM's configuration).  A step is what ``dqrm-train`` does on one rank (QAT's on_step,
forward, backward, the finite check, the SGD step with sparse embedding gradients) on random
batches; no data loading, no communication.  Cardinalities are Kaggle's capped at --cap rows.

One worker process per side (kernels on / off), each with an FP32 and an INT4 QAT model per batch
size; each round runs --steps steps of every (side, batch size, precision) in turn, the order
reversed every other round, so machine drift hits all alike.  With --threads 1, ``--clock
thread`` times the worker's CPU time (time slices lost to other processes do not count).
Prints JSON: median ms/step per (side, batch, precision); per side and batch the median of the
per-round INT4/FP32 ratios and of the QAT overhead (INT4 - FP32 ms), and the ratio over all
steps (with the scale passes, one per 200 steps: run rounds * steps >= 200); the kernels' speedup.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import (KAGGLE_CARDINALITIES, add_step_worker_options, check_step_worker_options, machine,
                     one_rank_run, one_rank_steps, random_batches)

SIDES = {"kernels": "1", "pytorch": "0"}  # DQRM_KERNELS of each worker
PRECISIONS = ("fp32", "int4")


def worker(batch_sizes: list[int], threads: int, cap: int, clock: str) -> None:
    """Builds the models; answers 'batch precision steps' lines with the seconds they took."""
    import torch

    from dqrm_mpi import kernels
    from dqrm_mpi.model import model_config_from_preset
    from dqrm_mpi.train.sgd import PlainSGD

    torch.set_num_threads(threads)
    cards = tuple(min(c, cap) for c in KAGGLE_CARDINALITIES)
    config = model_config_from_preset("kaggle", cards)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    runs = {}
    for batch in batch_sizes:
        batches = random_batches(batch, cards, seed=batch)
        for precision in PRECISIONS:
            runs[(batch, precision)] = {**one_rank_run(config, precision, PlainSGD), "batches": batches}
    now = time.thread_time if clock == "thread" else time.perf_counter

    def run(key: tuple[int, str], steps: int) -> float:
        r = runs[key]
        t0 = now()
        one_rank_steps(r, r["batches"], steps, loss_fn)
        return now() - t0

    for key in runs:  # warm-up (and the first scale pass)
        run(key, 5)
    print(f"ready {int(kernels.enabled())}", flush=True)
    for line in sys.stdin:
        batch, precision, steps = line.split()
        print(run((int(batch), precision), int(steps)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="128,512", help="comma-separated")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="steps per round, side, batch size and precision")
    add_step_worker_options(p)
    a = p.parse_args()
    try:
        batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {a.batch_sizes!r}")
    if a.worker:
        return worker(batch_sizes, a.threads, a.cap, a.clock)
    check_step_worker_options(p, a)
    procs = {}
    for side, flag in SIDES.items():
        env = dict(os.environ, DQRM_KERNELS=flag, OMP_NUM_THREADS=str(a.threads))
        procs[side] = subprocess.Popen(
            [sys.executable, __file__, "--worker", "--batch-sizes", a.batch_sizes, "--threads", str(a.threads),
             "--cap", str(a.cap), "--clock", a.clock], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=env)
        if procs[side].stdout.readline().strip() != f"ready {flag}":
            sys.exit(f"the worker with DQRM_KERNELS={flag} did not start (or its kernels are not built)")
    keys = [(side, b, pr) for side in SIDES for b in batch_sizes for pr in PRECISIONS]
    ms: dict[tuple[str, int, str], list[float]] = {k: [] for k in keys}
    for r in range(a.rounds):
        for side, batch, precision in (keys if r % 2 == 0 else keys[::-1]):
            proc = procs[side]
            proc.stdin.write(f"{batch} {precision} {a.steps}\n")
            proc.stdin.flush()
            ms[(side, batch, precision)].append(1e3 * float(proc.stdout.readline()) / a.steps)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()

    def median_of(f) -> float:
        return round(statistics.median(f(i) for i in range(a.rounds)), 3)

    result = {"benchmark": "qat_step", "threads": a.threads, "rounds": a.rounds, "steps_per_round": a.steps,
              "cardinality_cap": a.cap, "clock": a.clock,
              "int4": "emb INT4 per table (scale period 200) + MLP INT4 per channel",
              "ms_per_step_median": {f"{s}.b{b}.{pr}": round(statistics.median(v), 3)
                                     for (s, b, pr), v in ms.items()}}
    for batch in batch_sizes:
        for side in SIDES:
            fp32, int4 = ms[(side, batch, "fp32")], ms[(side, batch, "int4")]
            result[f"{side}.b{batch}.int4_over_fp32"] = median_of(lambda i: int4[i] / fp32[i])
            result[f"{side}.b{batch}.qat_extra_ms"] = median_of(lambda i: int4[i] - fp32[i])
            # all rounds together: includes the full-table scale passes (one per 200 steps), which the
            # per-round medians mostly leave out
            result[f"{side}.b{batch}.int4_over_fp32_all_steps"] = round(sum(int4) / sum(fp32), 3)
        for precision in PRECISIONS:
            result[f"kernel_speedup.b{batch}.{precision}"] = median_of(
                lambda i: ms[("pytorch", batch, precision)][i] / ms[("kernels", batch, precision)][i])
    result["machine"] = machine()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
