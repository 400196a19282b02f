"""Training throughput at Kaggle dimensions: FP32 and INT4 QAT, 1 and 2 ranks, and
optionally this checkout against another one, interleaved.

    python benchmarks/train_throughput.py [--cap 1000000] [--steps 300] [--batch-size 256]
        [--ranks 1,2] [--precision fp32,int4] [--compare-to DIR] [--repeats 3]

The Kaggle architecture (dim 16, 13-512-256-64-16, 367-512-256-1) over the real Kaggle
cardinalities capped at --cap rows per table (the full 33.8 M rows need 2.2 GB per rank),
on synthetic planted data.  All runs use the same global batch (strong scaling).  INT4 is
DQRM's QAT: embeddings INT4 with per-table scales refreshed every 200 steps, MLP INT4 per
channel.  ``--compare-to DIR`` runs ``dqrm-train`` from that checkout (another version of
this repository, e.g. a ``git worktree``) as well: each repeat runs every configuration
of both checkouts back to back (alternating which goes first), so machine drift hits
both alike; compare the ratios.

Prints JSON: per checkout, precision and world size the median samples/s (wall clock
including data wait, as summary.json has it) and ms/step over the repeats; the 2-vs-1
ratio; the INT4-vs-FP32 step-time ratio; with --compare-to, this checkout's samples/s
over the other's; and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from _common import KAGGLE_CARDINALITIES, VENV_BIN, emit, launch, machine

from dqrm_mpi.data.synthetic import PlantedClickModel, write_synthetic_dataset

HERE = Path(__file__).resolve().parents[1]  # this checkout
PRECISIONS = {"fp32": [], "int4": ["--emb-bits", "4", "--mlp-bits", "4", "--mlp-scale", "channel",
                                   "--scale-period", "200"]}


def run_once(checkout: Path, data: Path, out: Path, np_: int, precision: str, a: argparse.Namespace) -> dict:
    """One ``dqrm-train`` run with ``checkout``'s package first on the path; its figures."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(checkout), *([saved] if saved else [])])
    try:
        launch(np_, [str(VENV_BIN / "dqrm-train"), "--data", str(data), "--out", str(out), "--overwrite",
                     "--preset", "kaggle", "--batch-size", str(a.batch_size), "--max-steps", str(a.steps),
                     *PRECISIONS[precision]],
               threads=max(1, (machine()["cpus"] or 1) // np_))
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    s = json.loads((out / "summary.json").read_text())
    return {"samples_per_second": s["samples_per_second"], "ms_per_step": 1e3 * s["train_seconds"] / s["steps"],
            "comm_bytes_sent_per_step": s["comm_bytes_sent_per_step"]["mean"],
            "comm_ms_per_step": 1e3 * s["comm_seconds_per_step"]["mean"]}


def median_of(runs: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cap", type=int, default=1_000_000, help="max rows per embedding table")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256, help="global batch")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, int4")
    p.add_argument("--compare-to", type=Path, default=None, help="another checkout of this repository")
    p.add_argument("--repeats", type=int, default=1, help="rounds over every configuration (medians reported)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    a = p.parse_args()
    precisions = a.precision.split(",")
    if unknown := set(precisions) - set(PRECISIONS):
        p.error(f"--precision: unknown {sorted(unknown)}, expected some of {sorted(PRECISIONS)}")
    checkouts = {"this": HERE}
    if a.compare_to is not None:
        if not (a.compare_to / "dqrm_mpi" / "__init__.py").is_file():
            p.error(f"--compare-to {a.compare_to}: not a checkout of dqrm_mpi (no dqrm_mpi/__init__.py)")
        checkouts["other"] = a.compare_to.resolve()
    ranks = [int(x) for x in a.ranks.split(",")]
    cards = tuple(min(c, a.cap) if c > 2 else 3 for c in KAGGLE_CARDINALITIES)
    runs: dict[tuple[str, str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        data = Path(tmp) / "data"
        rows = a.batch_size * (a.steps + 10)
        write_synthetic_dataset(data, {"train": rows, "val": 2048, "test": 2048}, PlantedClickModel(cards, seed=0))
        for repeat in range(a.repeats):
            order = list(checkouts) if repeat % 2 == 0 else list(checkouts)[::-1]
            for precision in precisions:
                for np_ in ranks:
                    for name in order:
                        key = (name, precision, np_)
                        out = Path(tmp) / f"run-{name}-{precision}-np{np_}"
                        runs.setdefault(key, []).append(run_once(checkouts[name], data, out, np_, precision, a))
    results: dict[str, dict] = {}
    for (name, precision, np_), rs in runs.items():
        results.setdefault(name, {}).setdefault(precision, {})[f"np{np_}"] = median_of(rs)
    ratios: dict[str, float] = {}
    for name, by_precision in results.items():
        for precision, r in by_precision.items():
            if "np1" in r and "np2" in r:
                ratios[f"{name}.{precision}.np2_over_np1_samples_per_second"] = round(
                    r["np2"]["samples_per_second"] / r["np1"]["samples_per_second"], 3)
        if "fp32" in by_precision and "int4" in by_precision:
            for np_ in ranks:
                int4, fp32 = by_precision["int4"][f"np{np_}"], by_precision["fp32"][f"np{np_}"]
                ratios[f"{name}.np{np_}.int4_over_fp32_ms_per_step"] = round(
                    int4["ms_per_step"] / fp32["ms_per_step"], 3)
    if "other" in results:
        for precision in precisions:
            for np_ in ranks:
                pairs = zip(runs[("this", precision, np_)], runs[("other", precision, np_)])  # per repeat
                ratios[f"this_over_other.{precision}.np{np_}_samples_per_second"] = round(
                    statistics.median(t["samples_per_second"] / o["samples_per_second"] for t, o in pairs), 3)
    emit({"benchmark": "train_throughput", "preset": "kaggle", "global_batch": a.batch_size, "steps": a.steps,
          "repeats": a.repeats, "cardinality_cap": a.cap, "embedding_rows": sum(cards),
          "checkouts": {k: str(v) for k, v in checkouts.items()}, "results": results, "ratios": ratios,
          "machine": machine()})


if __name__ == "__main__":
    main()
