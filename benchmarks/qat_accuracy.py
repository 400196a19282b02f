"""Accuracy of QAT variants on planted synthetic data (one JSON).

Rows: FP32; embedding-only QAT INT16 / INT8 / INT4; INT4 embeddings + INT4 MLP
matrix-wise and channel-wise; vanilla PTQ INT4 (the FP32 run's checkpoint quantized
after training, embeddings and MLP channel-wise).  Every run is a real ``dqrm-train``
(one process, tiny preset) on the same data and seed; PTQ goes through
``dqrm-export --bits 4`` and ``dqrm-eval``.  Reported: test accuracy, ROC AUC, log loss,
AUC minus FP32's, and the packed model size.

    python benchmarks/qat_accuracy.py --out bench_out/qat_accuracy.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dqrm_mpi.data.synthetic import DEFAULT_CARDINALITIES, PlantedClickModel, write_synthetic_dataset

BIN = Path(sys.executable).parent
RUNS = {
    "fp32": [],
    "qat_emb_int16": ["--emb-bits", "16"],
    "qat_emb_int8": ["--emb-bits", "8"],
    "qat_emb_int4": ["--emb-bits", "4"],
    "qat_emb_int4_mlp_int4_matrix": ["--emb-bits", "4", "--mlp-bits", "4", "--mlp-scale", "tensor"],
    "qat_emb_int4_mlp_int4_channel": ["--emb-bits", "4", "--mlp-bits", "4", "--mlp-scale", "channel"],
}


def _run(args: list[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="training rows (val and test: a tenth each)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--work", default=None, help="directory for the dataset and runs [default: a temporary one]")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="qat_acc_"))
    data = work / "data"
    if not (data / "meta.json").exists():
        write_synthetic_dataset(data, {"train": args.rows, "val": args.rows // 10, "test": args.rows // 10},
                                PlantedClickModel(DEFAULT_CARDINALITIES, seed=1))
    common = ["--data", str(data), "--preset", args.preset, "--batch-size", str(args.batch_size),
              "--lr", str(args.lr), "--epochs", str(args.epochs), "--seed", "0", "--overwrite"]
    results = {}
    for name, extra in RUNS.items():
        out = work / name
        t0 = time.perf_counter()
        _run([str(BIN / "dqrm-train"), *common, "--out", str(out), *extra])
        summary = json.loads((out / "summary.json").read_text())
        packed = json.loads(_run([str(BIN / "dqrm-export"), str(out / "checkpoint.pt"), str(out / "model.dqrm")]))
        results[name] = {**{k: summary["final"]["test"][k] for k in ("accuracy", "auc", "log_loss")},
                         "best_test_auc": summary["best_test"]["auc"], "model_bytes": packed["bytes"],
                         "seconds": time.perf_counter() - t0}
    fp32 = work / "fp32"
    _run([str(BIN / "dqrm-export"), str(fp32 / "checkpoint.pt"), str(work / "ptq4.dqrm"), "--bits", "4"])
    ptq = json.loads(_run([str(BIN / "dqrm-eval"), str(work / "ptq4.dqrm"), "--data", str(data)]))
    results["ptq_int4_emb_mlp_channel"] = {k: ptq[k] for k in ("accuracy", "auc", "log_loss")}
    results["ptq_int4_emb_mlp_channel"]["model_bytes"] = ptq["model_bytes"]
    base = results["fp32"]["auc"]
    for r in results.values():
        r["auc_minus_fp32"] = r["auc"] - base
    meta = json.loads((data / "meta.json").read_text())
    report = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
              "setup": {"train_rows": args.rows, "epochs": args.epochs, "batch_size": args.batch_size,
                        "lr": args.lr, "preset": args.preset, "planted_test_auc": meta["extra"]["planted"]["test"]["auc"],
                        "metric": "test split after the last epoch"},
              "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
