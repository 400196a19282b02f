"""FP32 training throughput at Kaggle dimensions, 1 and 2 ranks, side by side.

    python benchmarks/train_throughput.py [--cap 1000000] [--steps 300] [--batch-size 256]

The Kaggle architecture (dim 16, 13-512-256-64-16, 367-512-256-1) over the real Kaggle
cardinalities capped at --cap rows per table (the full 33.8 M rows need 2.2 GB per rank),
on synthetic planted data.  Both runs use the same global batch (strong scaling).
Prints JSON: samples/s and ms/step per world size, the 2-vs-1 ratio and the machine.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import KAGGLE_CARDINALITIES, VENV_BIN, emit, launch, machine

from dqrm_mpi.data.synthetic import PlantedClickModel, write_synthetic_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cap", type=int, default=1_000_000, help="max rows per embedding table")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256, help="global batch")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    a = p.parse_args()
    cards = tuple(min(c, a.cap) if c > 2 else 3 for c in KAGGLE_CARDINALITIES)
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        data = Path(tmp) / "data"
        rows = a.batch_size * (a.steps + 10)
        write_synthetic_dataset(data, {"train": rows, "val": 2048, "test": 2048}, PlantedClickModel(cards, seed=0))
        results = {}
        for np_ in (int(x) for x in a.ranks.split(",")):
            out = Path(tmp) / f"run{np_}"
            launch(np_, [str(VENV_BIN / "dqrm-train"), "--data", str(data), "--out", str(out), "--preset", "kaggle",
                         "--batch-size", str(a.batch_size), "--max-steps", str(a.steps)],
                   threads=max(1, (machine()["cpus"] or 1) // np_))
            s = json.loads((out / "summary.json").read_text())
            results[f"np{np_}"] = {"samples_per_second": round(s["samples_per_second"], 1),
                                   "ms_per_step": round(1e3 * s["train_seconds"] / s["steps"], 3),
                                   "comm_bytes_sent_per_step": s["comm_bytes_sent_per_step"]["mean"],
                                   "comm_ms_per_step": round(1e3 * s["comm_seconds_per_step"]["mean"], 3)}
    if "np1" in results and "np2" in results:
        results["np2_over_np1_samples_per_second"] = round(
            results["np2"]["samples_per_second"] / results["np1"]["samples_per_second"], 3)
    emit({"benchmark": "train_throughput", "precision": "fp32", "preset": "kaggle", "global_batch": a.batch_size,
          "steps": a.steps, "cardinality_cap": a.cap, "embedding_rows": sum(cards), "results": results,
          "machine": machine()})


if __name__ == "__main__":
    main()
