"""dqrm-train against its peer, torchrec's DLRM with fbgemm's fused CPU kernels, in one run.

    python benchmarks/peer_torchrec.py [--batches 128,512] [--steps 200] [--warmup 30] [--rounds 3]

First (once; skipped when done) installs torchrec 1.9.2 + fbgemm-gpu-cpu 1.9.0 and the
torch 2.14.1 they need into their own virtual environment OUTSIDE this repository
(--peer-venv, default $DQRM_TORCHREC_VENV or ~/.cache/dqrm_mpi/torchrec-venv; PyPI's torch
brings its CUDA libraries: about 5.5 GB, downloaded once).  ``--install-only`` stops there.

Then, per batch size, in interleaved rounds (torchrec, dqrm FP32, dqrm INT4 QAT, then the
reverse order, ...: the machine's speed drifts over minutes, so every round hits all three
alike), one process each, FP32, the same torch thread count (--threads), Kaggle dimensions (dim 16,
bottom 13-512-256-64-16, top 367-512-256-1, Kaggle's cardinalities capped at --cap rows):

  torchrec   torchrec.models.dlrm.DLRM, embeddings in fbgemm's table-batched kernel with
             SGD fused into backward, dense part torch.optim.SGD, on the training rows
             of fp32's dataset (benchmarks/peer_torchrec_worker.py, run by the peer
             venv's python);
  fp32       dqrm-train on a synthetic (planted-model) dataset of warm-up + steps batches;
  int4_qat   dqrm-train --emb-bits 4 --mlp-bits 4 --mlp-scale channel --scale-period 200.

Each process trains --warmup + --steps steps; the warm-up is excluded.  Samples/s is wall
clock over the measured steps (dqrm-train: its metrics.jsonl step windows, data wait
included; summary.json's whole-run figure, warm-up included, is given too).  Prints JSON:
samples/s per round and the median of the rounds, and the ratios of issue 10's targets
(medians of each round's ratio): dqrm FP32 / torchrec samples/s (target >= 1.3) and
INT4 QAT / FP32 step time (target <= 1.15).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import KAGGLE_CARDINALITIES, dqrm_run, emit, machine

from dqrm_mpi.data.reader import SplitReader
from dqrm_mpi.data.synthetic import PlantedClickModel, write_synthetic_dataset

HERE = Path(__file__).resolve().parent
WORKER = HERE / "peer_torchrec_worker.py"
# torchrec itself goes in with --no-deps: it requires the CUDA package fbgemm-gpu, which
# fbgemm-gpu-cpu replaces; these are its other requirements, pinned.
PEER_REQUIREMENTS = ("torch==2.14.1", "fbgemm-gpu-cpu==1.9.0", "torchmetrics==1.0.3", "tensordict==0.15.3",
                     "tqdm==4.70.1", "pyre-extensions==0.0.32", "iopath==0.1.10", "numpy==2.4.6")
PEER_NO_DEPS = ("torchrec==1.9.2",)
MARKER = "dqrm-peer-installed.json"
QAT_OPTIONS = ("--emb-bits", "4", "--mlp-bits", "4", "--mlp-scale", "channel", "--scale-period", "200")


def default_peer_venv() -> Path:
    return Path(os.environ.get("DQRM_TORCHREC_VENV") or Path.home() / ".cache" / "dqrm_mpi" / "torchrec-venv")


def log(text: str) -> None:
    print(f"[peer_torchrec] {text}", file=sys.stderr, flush=True)


def no_network() -> str | None:
    """Why pip cannot reach PyPI, or None (also when a proxy or another index is configured)."""
    if any(os.environ.get(k) for k in ("PIP_INDEX_URL", "HTTPS_PROXY", "https_proxy")):
        return None
    try:
        socket.create_connection(("pypi.org", 443), timeout=10).close()
        return None
    except OSError as e:
        return f"pypi.org:443 is not reachable from this machine ({e})"


def ensure_peer_venv(venv: Path) -> Path:
    """The peer venv's python, installing torchrec and its pinned stack first unless done."""
    python = venv / "bin" / "python"
    wanted = {"requirements": list(PEER_REQUIREMENTS), "no_deps": list(PEER_NO_DEPS)}
    marker = venv / MARKER
    if marker.exists() and python.exists() and json.loads(marker.read_text()) == wanted:
        log(f"peer venv ready: {venv}")
        return python
    if venv.resolve().is_relative_to(HERE.parent.resolve()):
        sys.exit(f"--peer-venv {venv} is inside the repository; put it outside (it holds about 5.5 GB)")
    offline = no_network()
    if offline:
        sys.exit(f"the torchrec peer is not installed in {venv} and cannot be: {offline}.  Run this once "
                 f"where PyPI is reachable (or set pip's proxy / PIP_INDEX_URL), or pass --peer-venv (or "
                 f"DQRM_TORCHREC_VENV) pointing to an installed one.")
    log(f"installing torchrec 1.9.2 + fbgemm-gpu-cpu 1.9.0 (torch 2.14.1 with its CUDA libraries, "
        f"about 5.5 GB, once) into {venv}")
    if not python.exists():
        log("step 1/4: creating the virtual environment")
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "on"]
    steps = (("step 2/4: pip", "--upgrade", "pip"),
             ("step 3/4: torch 2.14.1, fbgemm-gpu-cpu 1.9.0 and torchrec's other requirements", *PEER_REQUIREMENTS),
             ("step 4/4: torchrec 1.9.2 without its CUDA requirement fbgemm-gpu", "--no-deps", *PEER_NO_DEPS))
    for what, *args in steps:
        log(what)
        if subprocess.run([*pip, *args], stdout=sys.stderr).returncode:
            offline = no_network()
            sys.exit(f"installing the torchrec peer into {venv} failed ({what})"
                     + (f": {offline}" if offline else "; pip's output is above"))
    check = subprocess.run([str(python), str(WORKER), "--check"], capture_output=True, text=True)
    if check.returncode:
        sys.exit(f"the torchrec peer in {venv} does not import:\n{check.stderr[-3000:]}")
    marker.write_text(json.dumps(wanted))
    log(f"peer venv ready: {venv} ({check.stdout.strip()})")
    return python


def peer_run(python: Path, data: Path, cards: tuple[int, ...], batch: int, warmup: int, steps: int,
             threads: int) -> dict:
    """One torchrec worker process (its own venv; no PYTHONPATH into this repository)."""
    e = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    e["OMP_NUM_THREADS"] = str(threads)
    cmd = [str(python), str(WORKER), "--data", str(data), "--cardinalities", ",".join(map(str, cards)),
           "--batch-size", str(batch), "--warmup", str(warmup), "--steps", str(steps), "--threads", str(threads)]
    proc = subprocess.run(cmd, env=e, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare_data(root: Path, cards: tuple[int, ...], batch: int, batches: int) -> tuple[Path, Path]:
    """A synthetic dataset of ``batches`` training batches for dqrm-train, and the same
    training rows as an .npz for the torchrec worker."""
    data = root / f"data{batch}"
    write_synthetic_dataset(data, {"train": batch * batches, "val": 2048, "test": 2048},
                            PlantedClickModel(cards, seed=0))
    reader = SplitReader(data, "train")
    rows = reader.read(0, reader.num_rows)
    reader.close()
    npz = root / f"peer{batch}.npz"
    np.savez(npz, dense=rows.dense.numpy(), sparse=rows.sparse.numpy(), label=rows.label.numpy())
    return data, npz


def median(xs: list[float], digits: int = 3) -> float:
    return round(statistics.median(xs), digits)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-venv", type=Path, default=default_peer_venv(),
                   help="torchrec's virtual environment, created when missing (default: %(default)s)")
    p.add_argument("--install-only", action="store_true", help="install the peer venv, run nothing")
    p.add_argument("--batches", default="128,512", help="batch sizes, comma separated (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="measured steps per process (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=30,
                   help="steps per process before the measurement (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds, each runs torchrec, fp32 and int4_qat (default: %(default)s)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads of every process (default: the cores this process may use, %(default)s)")
    p.add_argument("--cap", type=int, default=1_000_000, help="max rows per embedding table (default: %(default)s)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    a = p.parse_args()
    if min(a.steps, a.warmup, a.rounds, a.threads) < 1:
        p.error("--steps, --warmup, --rounds and --threads must be at least 1")
    python = ensure_peer_venv(a.peer_venv.expanduser())
    if a.install_only:
        return
    cards = tuple(min(c, a.cap) for c in KAGGLE_CARDINALITIES)
    batch_sizes = [int(b) for b in a.batches.split(",")]
    runs = {b: {"torchrec": [], "fp32": [], "int4_qat": []} for b in batch_sizes}
    peer_versions = {}
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        inputs = {}
        for b in batch_sizes:
            log(f"batch {b}: writing {a.warmup + a.steps} synthetic batches")
            inputs[b] = prepare_data(Path(tmp), cards, b, a.warmup + a.steps)
        for r in range(a.rounds):
            for b in batch_sizes:
                data, npz = inputs[b]
                order = ("torchrec", "fp32", "int4_qat")
                for name in order if r % 2 == 0 else order[::-1]:  # drift favours neither side
                    log(f"round {r + 1}/{a.rounds}, batch {b}: {name}")
                    if name == "torchrec":
                        res = peer_run(python, npz, cards, b, a.warmup, a.steps, a.threads)
                        peer_versions = {k: res.pop(k) for k in ("torch", "torchrec")}
                    else:
                        res = dqrm_run(data, Path(tmp) / "run", b, a.warmup, a.steps, a.threads,
                                       QAT_OPTIONS if name == "int4_qat" else ())
                    runs[b][name].append(res)
                    log(f"  {res['samples_per_second']:,.0f} samples/s, {res['ms_per_step']:.2f} ms/step")
    results = {}
    for b, by_name in runs.items():
        sps = {n: [x["samples_per_second"] for x in xs] for n, xs in by_name.items()}
        ms = {n: [x["ms_per_step"] for x in xs] for n, xs in by_name.items()}
        vs_peer = [f / t for f, t in zip(sps["fp32"], sps["torchrec"])]
        qat_cost = [q / f for q, f in zip(ms["int4_qat"], ms["fp32"])]
        results[str(b)] = {
            **{n: {"samples_per_second": median(sps[n], 1), "ms_per_step": median(ms[n]),
                   "rounds_samples_per_second": [round(x, 1) for x in sps[n]]} for n in by_name},
            "fp32_over_torchrec_samples_per_second": median(vs_peer),
            "int4_qat_over_fp32_step_time": median(qat_cost),
            "rounds_fp32_over_torchrec": [round(x, 3) for x in vs_peer],
            "rounds_int4_qat_over_fp32": [round(x, 3) for x in qat_cost],
        }
        for n in ("fp32", "int4_qat"):
            results[str(b)][n]["summary_samples_per_second"] = median(
                [x["summary_samples_per_second"] for x in by_name[n]], 1)
            parts = [x["ms_per_step_by_part"] for x in by_name[n]]
            results[str(b)][n]["ms_per_step_by_part"] = {k: median([x[k] for x in parts]) for k in parts[0]}
    emit({"benchmark": "peer_torchrec", "precision": "fp32 (int4_qat: --emb-bits 4 --mlp-bits 4 --mlp-scale channel "
          "--scale-period 200)", "preset": "kaggle", "cardinality_cap": a.cap, "embedding_rows": sum(cards),
          "steps": a.steps, "warmup": a.warmup, "rounds": a.rounds, "threads": a.threads,
          "targets": {"fp32_over_torchrec_samples_per_second": ">= 1.3", "int4_qat_over_fp32_step_time": "<= 1.15"},
          "results": results, "peer": {**peer_versions, "fbgemm_gpu_cpu": "1.9.0", "venv": str(python.parent.parent)},
          "machine": machine()})


if __name__ == "__main__":
    main()
