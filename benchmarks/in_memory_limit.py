"""Is reading from the shards what costs the medium runs' speed?  The same short dqrm-train run
with --data-in-memory yes and no, interleaved, on a prepared 10 M-row dataset.

    python benchmarks/in_memory_limit.py --data reports/medium/data
        [--steps 3000] [--warmup 500] [--rounds 3] [--threads 1] [--batch-size 128] [--side-by-side]

At 10 M rows the training and test splits (about 1.5 GB) exceed --data-in-memory auto's limit
(config.IN_MEMORY_AUTO_BYTES, 1 GiB), so the medium profile's runs read their batches from the
shards.  Each round runs every variant once, one process each, the order reversed every other
round (the machine's speed drifts over minutes).  One rank, FP32, the Kaggle preset, evaluation
on the test split only at the end (not timed).  Samples/s are wall clock over the steps after
the warm-up, data wait included (metrics.jsonl's windows); ``outside_run_seconds`` is the
process's wall time outside summary.json's ``wall_seconds`` (imports, writing the final
checkpoint and, with ``yes``, reading the splits into memory: compare the two); the shards are read once before the first round, so ``no`` reads them through a warm
page cache, as a long run does after its first epoch.

--side-by-side also runs, per setting, two processes at once with --threads 1 each (the
profile's other option: two runs side by side on one core each) and reports their summed
samples/s beside one process with --threads 2.

Prints JSON: per variant the median samples/s and ms/step over the rounds, each round's, the
step-time parts of its fastest round, the seconds outside the run's clock, and the machine.

The dataset: the medium profile's first two steps (`make repro-medium` starts with them), or
    dqrm-prep synth raw.txt --rows 10000000 --profile criteo-like --seed 3 --no-progress
    dqrm-prep criteo raw.txt data --workers 1 --no-progress
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import VENV_BIN, emit, env, machine


def train_command(data: Path, out: Path, a, in_memory: str, threads: int) -> list[str]:
    return [str(VENV_BIN / "dqrm-train"), "--data", str(data), "--out", str(out), "--preset", "kaggle",
            "--batch-size", str(a.batch_size), "--max-steps", str(a.warmup + a.steps), "--log-every", str(a.warmup),
            "--threads", str(threads), "--progress", "none", "--eval-splits", "test", "--checkpoint-minutes", "0",
            "--data-in-memory", in_memory]


def measured(out: Path, a, start_seconds: float) -> dict:
    """The run's figures from its files (then removed: the checkpoint holds every table)."""
    summary = json.loads((out / "summary.json").read_text())
    windows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if r.get("event") == "step" and r["first_step"] > a.warmup]
    steps = sum(w["steps"] for w in windows)
    if steps != a.steps:
        sys.exit(f"{out}/metrics.jsonl: expected {a.steps} steps after the {a.warmup} warm-up steps, found {steps}")
    seconds = sum(w["seconds"] * w["steps"] for w in windows)
    parts = {p: sum(w["step_time"][p] * w["steps"] for w in windows) / steps * 1e3 for p in windows[0]["step_time"]}
    config = json.loads((out / "config.json").read_text())
    shutil.rmtree(out)
    return {"samples_per_second": steps * a.batch_size / seconds, "ms_per_step": 1e3 * seconds / steps,
            "ms_per_step_by_part": {p: round(v, 3) for p, v in parts.items()},
            "outside_run_seconds": round(start_seconds - summary["wall_seconds"], 1),
            "data_in_memory": config["train"]["data_in_memory"], "threads": config["threads"]}


def run_processes(data: Path, tmp: Path, a, in_memory: str, threads: int, processes: int) -> dict:
    """``processes`` dqrm-train runs started together; their figures summed (samples/s) or averaged."""
    outs = [tmp / f"run{i}" for i in range(processes)]
    e = env()
    e["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    procs = [subprocess.Popen(train_command(data, out, a, in_memory, threads), env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for out in outs]
    results = []
    for proc, out in zip(procs, outs):
        stdout, stderr = proc.communicate()
        if proc.returncode:
            sys.exit(f"dqrm-train --out {out} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
        results.append(measured(out, a, time.perf_counter() - start))
    return {"samples_per_second": sum(r["samples_per_second"] for r in results),
            "ms_per_step": statistics.mean(r["ms_per_step"] for r in results),
            "ms_per_step_by_part": results[0]["ms_per_step_by_part"],
            "outside_run_seconds": max(r["outside_run_seconds"] for r in results),
            "data_in_memory": results[0]["data_in_memory"], "threads": results[0]["threads"]}


def warm_page_cache(data: Path) -> None:
    for path in sorted(data.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a prepared dataset (meta.json and its shards)")
    p.add_argument("--batch-size", type=int, default=128, help="default: %(default)s")
    p.add_argument("--steps", type=int, default=3000, help="measured steps per process (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=500, help="steps before the measured ones (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="processes per variant (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--side-by-side", action="store_true",
                   help="also two processes at once with 1 thread each vs one with 2 threads")
    a = p.parse_args()
    if min(a.batch_size, a.steps, a.warmup, a.rounds, a.threads) < 1:
        p.error("--batch-size, --steps, --warmup, --rounds and --threads must be at least 1")
    if not (a.data / "meta.json").exists():
        p.error(f"--data {a.data}: no meta.json (prepare the dataset first: see --help)")
    meta = json.loads((a.data / "meta.json").read_text())
    variants = [(m, a.threads, 1) for m in ("yes", "no")]
    if a.side_by_side:
        variants = [(m, t, n) for m in ("yes", "no") for t, n in ((2, 1), (1, 2))]
    warm_page_cache(a.data)
    runs: list[list[dict]] = [[] for _ in variants]
    with tempfile.TemporaryDirectory() as tmp:
        order = list(range(len(variants)))
        for r in range(a.rounds):
            for i in (order if r % 2 == 0 else order[::-1]):
                runs[i].append(run_processes(a.data, Path(tmp), a, *variants[i]))
    result = {"benchmark": "in_memory_limit", "data": str(a.data), "rows": meta.get("rows"),
              "batch_size": a.batch_size, "steps": a.steps, "warmup": a.warmup, "rounds": a.rounds, "variants": []}
    for (in_memory, threads, processes), xs in zip(variants, runs):
        fastest = min(xs, key=lambda x: x["ms_per_step"])
        result["variants"].append({
            "data_in_memory": in_memory, "threads": threads, "processes": processes,
            "samples_per_second": round(statistics.median(x["samples_per_second"] for x in xs), 1),
            "rounds_samples_per_second": [round(x["samples_per_second"], 1) for x in xs],
            "ms_per_step": round(statistics.median(x["ms_per_step"] for x in xs), 3),
            "fastest_round_ms_per_step_by_part": fastest["ms_per_step_by_part"],
            "outside_run_seconds": statistics.median(x["outside_run_seconds"] for x in xs),
            "resolved_data_in_memory": sorted({x["data_in_memory"] for x in xs})})
    result["machine"] = machine()
    emit(result)


if __name__ == "__main__":
    main()
