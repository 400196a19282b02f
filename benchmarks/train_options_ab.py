"""dqrm-train under different option sets, interleaved: which is faster, and where the time goes.

    python benchmarks/train_options_ab.py --variant "--prefetch 0" --variant "--prefetch 4"
        [--batch-size 128] [--steps 150] [--warmup 30] [--rounds 4] [--threads 2] [--cap 1000000]

One rank, FP32 unless a variant says otherwise, Kaggle dimensions (dim 16, 13-512-256-64-16,
367-512-256-1, Kaggle's cardinalities capped at --cap rows) on a synthetic planted dataset of
warm-up + steps batches.  Each round runs every variant once, one process each, the order
reversed every other round (the machine's speed drifts over minutes).  Samples/s and ms/step
are wall clock over the steps after the warm-up, data wait included (metrics.jsonl's windows).
Prints JSON: per variant the median ms/step over the rounds, samples/s and ms per step part
(from its fastest round), and each variant's per-round step-time ratio to the first variant
with their median.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import tempfile
from pathlib import Path

from _common import KAGGLE_CARDINALITIES, dqrm_run, emit, machine

from dqrm_mpi.data.synthetic import PlantedClickModel, write_synthetic_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True,
                   help="dqrm-train options of one variant, quoted (give two or more; \"\" is the defaults)")
    p.add_argument("--batch-size", type=int, default=128, help="default: %(default)s")
    p.add_argument("--steps", type=int, default=150, help="measured steps per process (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=30, help="steps before the measured ones (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=4, help="processes per variant (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--cap", type=int, default=1_000_000, help="max rows per embedding table (default: %(default)s)")
    a = p.parse_args()
    if len(a.variant) < 2:
        p.error("give at least two --variant option sets to compare")
    if min(a.batch_size, a.steps, a.warmup, a.rounds, a.threads, a.cap) < 1:
        p.error("--batch-size, --steps, --warmup, --rounds, --threads and --cap must be at least 1")
    variants = [tuple(shlex.split(v)) for v in a.variant]
    cards = tuple(min(c, a.cap) for c in KAGGLE_CARDINALITIES)
    runs: list[list[dict]] = [[] for _ in variants]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic_dataset(data, {"train": a.batch_size * (a.warmup + a.steps), "val": 2048, "test": 2048},
                                PlantedClickModel(cards, seed=0))
        order = list(range(len(variants)))
        for r in range(a.rounds):
            for i in (order if r % 2 == 0 else order[::-1]):
                runs[i].append(dqrm_run(data, Path(tmp) / "run", a.batch_size, a.warmup, a.steps, a.threads,
                                        variants[i]))
    ms = [[x["ms_per_step"] for x in xs] for xs in runs]
    result = {"benchmark": "train_options_ab", "batch_size": a.batch_size, "steps": a.steps, "warmup": a.warmup,
              "rounds": a.rounds, "threads": a.threads, "cardinality_cap": a.cap, "variants": []}
    for v, xs, times in zip(a.variant, runs, ms):
        fastest = min(xs, key=lambda x: x["ms_per_step"])
        ratios = [t / t0 for t, t0 in zip(times, ms[0])]
        result["variants"].append({
            "options": v, "ms_per_step": round(statistics.median(times), 3),
            "rounds_ms_per_step": [round(t, 3) for t in times],
            "samples_per_second": round(a.batch_size / statistics.median(times) * 1e3, 1),
            "fastest_round_ms_per_step_by_part": fastest["ms_per_step_by_part"],
            "step_time_over_first": round(statistics.median(ratios), 3),
            "rounds_step_time_over_first": [round(x, 3) for x in ratios]})
    result["machine"] = machine()
    emit(result)


if __name__ == "__main__":
    main()
