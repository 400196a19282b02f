"""Accuracy against the global batch: the recipes that keep it, measured (one JSON).

Data parallelism grows the global batch with every node.  With the same global batch and
seed, N ranks end with the parameters of one rank (tests/integration), so each setting
here is one ``dqrm-train`` process (one thread) at that global batch: batch 128 stands for
one node at 128, 8,192 for 64 nodes at 128 each.  On criteo-like data (``dqrm-prep synth
--profile criteo-like``), Kaggle architecture, per recipe and global batch:

  a  plain SGD at the reference's constant lr 0.1
  b  SGD, lr scaled linearly from 0.1 at batch 128 (--lr-scaling linear), linear warm-up over
     the first 5 % of the steps and polynomial decay (power 2) to 0 over the last 40 %
  c  b's MLP recipe, row-wise Adagrad for the tables (--emb-optimizer rowwise-adagrad) at a
     constant --emb-lr (Adagrad's steps do not grow with the gradient: no batch scaling)

Test (and val) AUC and log loss every quarter epoch; per epoch the test AUC with its
Hanley-McNeil standard error.  Then DQRM INT4 QAT (embeddings per table, MLP per channel,
scale period 200) at the recipe with the best val AUC seen at batch 4,096, against its FP32 run.
Runs resume (each run directory keeps its checkpoint; a finished run is not run again), so
an interrupted benchmark continues where it stopped.

    python benchmarks/large_batch.py --work bench_out/large_batch --jobs 2 > large_batch.json
    python benchmarks/large_batch.py --work bench_out/large_batch --calibrate   # the emb-lr of c
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import VENV_BIN, emit, env, machine  # noqa: E402

from dqrm_mpi.repro.findings import auc_standard_error  # noqa: E402

BASE_LR, BASE_BATCH = 0.1, 128
WARMUP_SHARE, DECAY_SHARE = 0.05, 0.40
INT4 = ("--emb-bits", "4", "--mlp-bits", "4", "--mlp-scale", "channel", "--scale-period", "200")


@dataclass(frozen=True)
class Run:
    name: str
    recipe: str
    batch: int
    flags: tuple[str, ...]


def recipe_flags(recipe: str, batch: int, total_steps: int, emb_lr: float) -> tuple[str, ...]:
    """dqrm-train's optimizer options of ``recipe`` at global batch ``batch`` over ``total_steps``."""
    if recipe == "a":
        return ("--lr", str(BASE_LR))
    schedule = ("--lr-warmup-steps", str(max(1, round(WARMUP_SHARE * total_steps))),
                "--lr-decay-steps", str(max(1, round(DECAY_SHARE * total_steps))))
    if recipe == "b":
        return ("--lr", str(BASE_LR), "--lr-scaling", "linear", "--lr-base-batch", str(BASE_BATCH), *schedule)
    if recipe == "c":  # the MLP's rate scaled here, the tables' left as given
        return ("--lr", str(BASE_LR), "--mlp-lr", f"{BASE_LR * batch / BASE_BATCH:g}", "--emb-optimizer",
                "rowwise-adagrad", "--emb-lr", str(emb_lr), *schedule)
    raise ValueError(f"unknown recipe {recipe!r}")


def prepare(work: Path, rows: int, seed: int) -> Path:
    """The criteo-like dataset in work/data (made once)."""
    data = work / "data"
    if not (data / "meta.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        raw = work / "raw.txt"
        subprocess.run([str(VENV_BIN / "dqrm-prep"), "synth", str(raw), "--rows", str(rows), "--profile",
                        "criteo-like", "--seed", str(seed), "--no-progress", "--overwrite"], check=True, env=env())
        subprocess.run([str(VENV_BIN / "dqrm-prep"), "criteo", str(raw), str(data), "--workers", "1",
                        "--no-progress"], check=True, env=env())
        raw.unlink()
    return data


def train(data: Path, out: Path, run: Run, epochs: int, max_steps: int | None, log) -> dict:
    """One dqrm-train (resumed if interrupted; skipped when finished); its summary."""
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    meta = json.loads((data / "meta.json").read_text())
    per_epoch = meta["rows"]["train"] // run.batch
    e = env()
    e["OMP_NUM_THREADS"] = "1"
    cmd = [str(VENV_BIN / "dqrm-train"), "--data", str(data), "--out", str(out), "--preset", "kaggle",
           "--batch-size", str(run.batch), "--epochs", str(epochs), "--eval-every", str(max(1, per_epoch // 4)),
           "--threads", "1", "--seed", "0", "--progress", "log", "--progress-seconds", "300",
           "--checkpoint-minutes", "5", "--resume", "auto", *run.flags]
    if max_steps:
        cmd += ["--max-steps", str(max_steps)]
    started = time.time()
    log(f"{run.name}: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, env=e, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{run.name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    log(f"{run.name}: done in {time.time() - started:.0f} s")
    return json.loads((out / "summary.json").read_text())


def curves(out: Path, batch: int) -> dict:
    """Per evaluation (samples seen, test and val metrics) and per complete epoch the test
    metrics with the AUC's standard error, from the run's metrics.jsonl."""
    evals: dict[int, dict] = {}
    epochs_ended = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("event") == "eval":
            evals.setdefault(r["step"], {"step": r["step"], "samples": r["step"] * batch, "epoch": r["epoch"]})[
                r["split"]] = {k: r[k] for k in ("auc", "log_loss", "accuracy", "rows", "ctr")}
        elif r.get("event") == "epoch" and r["complete"]:
            epochs_ended[r["step"]] = r
    points = [evals[s] for s in sorted(evals)]
    per_epoch = []
    for step in sorted(epochs_ended):
        test = evals[step]["test"]
        positives = round(test["rows"] * test["ctr"])
        per_epoch.append({"epoch": epochs_ended[step]["epoch"] + 1, "step": step,
                          "train_loss": epochs_ended[step]["loss"], "test_auc": test["auc"],
                          "test_auc_se": auc_standard_error(test["auc"], positives, test["rows"] - positives),
                          "test_log_loss": test["log_loss"], "val_auc": evals[step].get("val", {}).get("auc")})
    return {"per_epoch": per_epoch,
            "curve": [{"samples": p["samples"], "epoch": p["epoch"], "test_auc": p["test"]["auc"],
                       "test_log_loss": p["test"]["log_loss"], "val_auc": p.get("val", {}).get("auc")}
                      for p in points]}


def result(out: Path, run: Run, summary: dict) -> dict:
    return {"recipe": run.recipe, "batch": run.batch, "flags": list(run.flags), **curves(out, run.batch),
            "samples_per_second": summary["samples_per_second"], "train_seconds": summary["train_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench_out/large_batch"))
    ap.add_argument("--rows", type=int, default=4_000_000, help="criteo-like rows in all (train: 6/7)")
    ap.add_argument("--seed", type=int, default=3, help="the generator's seed")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batches", default="128,1024,4096,8192", help="global batches")
    ap.add_argument("--recipes", default="a,b,c")
    ap.add_argument("--skip", default="b-b128,c-b128",
                    help="runs left out (at batch 128 the baseline is a; b and c matter where the batch grows)")
    ap.add_argument("--emb-lr", type=float, default=0.03,
                    help="recipe c's row-wise Adagrad rate (--calibrate's best val AUC: 0.03)")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side (one thread each)")
    ap.add_argument("--calibrate", action="store_true",
                    help="instead: recipe c at batch 4,096 for a quarter epoch (warm-up, no decay) at --emb-lr "
                         "0.003, 0.01, 0.03, 0.1, and recipe b with sqrt instead of linear scaling; val AUC of each")
    args = ap.parse_args()
    data = prepare(args.work, args.rows, args.seed)
    meta = json.loads((data / "meta.json").read_text())
    batches = [int(b) for b in args.batches.split(",")]

    def log(text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} [large_batch] {text}", file=sys.stderr, flush=True)

    def total(batch: int) -> int:
        return meta["rows"]["train"] // batch * args.epochs

    if args.calibrate:
        batch = 4096
        steps = meta["rows"]["train"] // batch // 4
        def warmup_only(flags: tuple[str, ...]) -> tuple[str, ...]:  # the run stops before any decay
            i = flags.index("--lr-decay-steps")
            return flags[:i] + flags[i + 2:]

        runs = [Run(f"cal-c-emb{lr:g}", "c", batch, warmup_only(recipe_flags("c", batch, steps, lr)))
                for lr in (0.003, 0.01, 0.03, 0.1)]
        b_linear = warmup_only(recipe_flags("b", batch, steps, 0.0))
        b_sqrt = tuple("sqrt" if f == "linear" else f for f in b_linear)
        runs += [Run("cal-b-linear", "b", batch, b_linear), Run("cal-b-sqrt", "b", batch, b_sqrt)]
        with ThreadPoolExecutor(args.jobs) as pool:
            done = list(pool.map(lambda r: (r, train(data, args.work / "calibrate" / r.name, r, 1, steps, log)), runs))
        emit({"benchmark": "large_batch --calibrate", "machine": machine(), "batch": batch, "steps": steps,
              "val_auc": {r.name: s["final"]["val"]["auc"] for r, s in done},
              "test_auc": {r.name: s["final"]["test"]["auc"] for r, s in done}})
        return

    runs = [Run(f"{recipe}-b{batch}", recipe, batch, recipe_flags(recipe, batch, total(batch), args.emb_lr))
            for batch in batches for recipe in args.recipes.split(",")
            if f"{recipe}-b{batch}" not in args.skip.split(",")]
    runs.sort(key=lambda r: r.batch)  # the long small-batch runs first, so two jobs end together
    started = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        summaries = dict(pool.map(lambda r: (r.name, train(data, args.work / "runs" / r.name, r, args.epochs,
                                                            None, log)), runs))
    results = {r.name: result(args.work / "runs" / r.name, r, summaries[r.name]) for r in runs}

    report = {"benchmark": "large_batch", "machine": machine(), "rows": meta["rows"],
              "generator": {"profile": "criteo-like", "seed": args.seed,
                            "planted_test_auc": meta.get("extra", {}).get("planted", {}).get("test", {}).get("auc")},
              "architecture": "kaggle", "epochs": args.epochs, "emb_lr_c": args.emb_lr, "results": results}
    if 4096 in batches and 128 in batches and "a" in args.recipes:
        # the recipe of the best val AUC seen at batch 4,096 (a user keeps that model: --keep-best val)
        best = max((r for r in runs if r.batch == 4096),
                   key=lambda r: max(p["val_auc"] for p in results[r.name]["curve"]))
        int4 = Run(f"int4-{best.recipe}-b4096", best.recipe, 4096, (*best.flags, *INT4))
        results[int4.name] = result(args.work / "runs" / int4.name, int4,
                                    train(data, args.work / "runs" / int4.name, int4, args.epochs, None, log))
        baseline = results["a-b128"]["per_epoch"]
        at_4096 = [r for r in runs if r.batch == 4096]

        def best_at_epoch(i: int) -> Run:  # the recipe a user would pick after i + 1 epochs: best val AUC
            return max(at_4096, key=lambda r: results[r.name]["per_epoch"][i]["val_auc"])

        report["target"] = {
            "best_recipe_at_4096_by_best_val_seen": best.recipe,
            "per_epoch": [{"epoch": e["epoch"], "b128_a_test_auc": e["test_auc"],
                           "b4096_best_recipe": (r := best_at_epoch(i)).recipe,
                           "b4096_best_test_auc": (auc := results[r.name]["per_epoch"][i]["test_auc"]),
                           "gap": e["test_auc"] - auc, "within_0.003": e["test_auc"] - auc <= 0.003}
                          for i, e in enumerate(baseline)],
            "int4_vs_fp32_at_4096": [{"epoch": e["epoch"], "fp32": results[best.name]["per_epoch"][i]["test_auc"],
                                      "int4": e["test_auc"],
                                      "gap": results[best.name]["per_epoch"][i]["test_auc"] - e["test_auc"]}
                                     for i, e in enumerate(results[int4.name]["per_epoch"])]}
    report["wall_seconds_this_invocation"] = time.time() - started
    emit(report)


if __name__ == "__main__":
    main()
