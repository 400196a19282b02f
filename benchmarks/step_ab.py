"""Training-step time of this checkout against another one, interleaved in short rounds:
FP32 and INT4 QAT at Kaggle dimensions, one process per checkout, never both at once.

    python benchmarks/step_ab.py --compare-to DIR [--batch-size 128] [--rounds 10] [--steps 20] [--clock thread]
    python benchmarks/step_ab.py --kernels-off [...]   (this checkout with DQRM_KERNELS=1 against =0)

A step is what ``dqrm-train`` does on one rank (QAT's on_step, forward, backward, the
finite check, the SGD step), on random batches; no data loading, no communication.
INT4 QAT = embeddings INT4 per table (scales refreshed every 200 steps) + MLP INT4 per
channel.  Each round runs --steps steps of every (checkout, precision) in turn (order
reversed every other round), so machine drift hits all alike: on a shared machine quote
the ratios; with --threads 1, ``--clock thread`` times the steps in the worker's CPU time
(time.thread_time), which time slices lost to other processes do not inflate.  Prints
JSON: median ms/step per checkout and precision, and the medians of
the per-round ratios (other/this step time, int4/fp32 per checkout).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import (KAGGLE_CARDINALITIES, add_step_worker_options, check_step_worker_options, machine,
                     one_rank_run, one_rank_steps, random_batches)

HERE = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "int4")


def worker(batch_size: int, threads: int, cap: int, clock: str) -> None:
    """Builds both models from the dqrm_mpi on the path; answers 'precision steps' lines with seconds."""
    import torch

    from dqrm_mpi.model import model_config_from_preset
    try:
        from dqrm_mpi.train.sgd import PlainSGD as SGD
    except ImportError:  # a checkout from before PlainSGD: what its dqrm-train used
        SGD = torch.optim.SGD
    torch.set_num_threads(threads)
    cards = tuple(min(c, cap) for c in KAGGLE_CARDINALITIES)
    config = model_config_from_preset("kaggle", cards)
    batches = random_batches(batch_size, cards, seed=0)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    runs = {precision: one_rank_run(config, precision, SGD) for precision in PRECISIONS}

    now = time.thread_time if clock == "thread" else time.perf_counter

    def run(precision: str, steps: int) -> float:
        r = runs[precision]
        t0 = now()
        one_rank_steps(r, batches, steps, loss_fn)
        return now() - t0

    for precision in PRECISIONS:  # warm-up (and the first scale pass)
        run(precision, 5)
    print("ready", flush=True)
    for line in sys.stdin:
        precision, steps = line.split()
        print(run(precision, int(steps)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare-to", type=Path, help="another checkout of this repository")
    p.add_argument("--kernels-off", action="store_true",
                   help="instead of another checkout: this one without its CPU kernels (DQRM_KERNELS=0)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="steps per round, checkout and precision")
    add_step_worker_options(p)
    a = p.parse_args()
    if a.worker:
        return worker(a.batch_size, a.threads, a.cap, a.clock)
    check_step_worker_options(p, a)
    if (a.compare_to is None) == (not a.kernels_off):
        p.error("give one of --compare-to DIR and --kernels-off")
    other = HERE if a.kernels_off else a.compare_to.resolve()
    if not (other / "dqrm_mpi" / "__init__.py").is_file():
        p.error(f"--compare-to {a.compare_to}: not a checkout of dqrm_mpi (no dqrm_mpi/__init__.py)")
    procs = {}
    for name, checkout in (("this", HERE), ("other", other)):
        env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS=str(a.threads),
                   DQRM_KERNELS="0" if name == "other" and a.kernels_off else os.environ.get("DQRM_KERNELS", "1"))
        procs[name] = subprocess.Popen(
            [sys.executable, __file__, "--worker", "--compare-to", str(checkout), "--batch-size", str(a.batch_size),
             "--threads", str(a.threads), "--cap", str(a.cap), "--clock", a.clock],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if procs[name].stdout.readline().strip() != "ready":
            sys.exit(f"the worker for {checkout} did not start")
    ms: dict[tuple[str, str], list[float]] = {(n, pr): [] for n in procs for pr in PRECISIONS}
    for r in range(a.rounds):
        for name, precision in (list(ms) if r % 2 == 0 else list(ms)[::-1]):
            proc = procs[name]
            proc.stdin.write(f"{precision} {a.steps}\n")
            proc.stdin.flush()
            ms[(name, precision)].append(1e3 * float(proc.stdout.readline()) / a.steps)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()

    def ratio(num: tuple[str, str], den: tuple[str, str]) -> float:
        return round(statistics.median(x / y for x, y in zip(ms[num], ms[den])), 3)

    print(json.dumps({
        "benchmark": "step_ab", "batch_size": a.batch_size, "threads": a.threads, "rounds": a.rounds,
        "steps_per_round": a.steps, "cardinality_cap": a.cap, "clock": a.clock,
        "checkouts": {"this": str(HERE), "other": str(other) + (" (DQRM_KERNELS=0)" if a.kernels_off else "")},
        "ms_per_step_median": {f"{n}.{pr}": round(statistics.median(v), 3) for (n, pr), v in ms.items()},
        "speedup_fp32": ratio(("other", "fp32"), ("this", "fp32")),
        "speedup_int4": ratio(("other", "int4"), ("this", "int4")),
        "this_int4_over_fp32": ratio(("this", "int4"), ("this", "fp32")),
        "other_int4_over_fp32": ratio(("other", "int4"), ("other", "fp32")),
        "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
