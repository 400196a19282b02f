"""Inference speed and memory: the FP32 model, the packed INT4 model (FP32 MLP, INT8 dynamic
MLP) and fbgemm's INT4 table-batched embeddings with the same MLP, at Kaggle dimensions.

    python benchmarks/inference.py [--threads 1] [--seconds 3] [--cap N] [--peer-venv DIR]

Builds, in --workdir (default a temporary folder), a seeded DLRM at Kaggle dimensions (dim 16,
bottom 13-512-256-64-16, top 367-512-256-1, Kaggle's 26 cardinalities, 33.8 M rows; --cap N
caps every table at N rows for a quick run), quantizes it as INT4 QAT does (per-table scales,
MLP per channel) and writes both as packed files (dqrm-export's format).  Then, one process
per model (so that each resident memory is its own), the same random batches:

  fp32             load_packed of the FP32 file: FP32 tables and MLP (dqrm's kernels on)
  int4             load_packed of the INT4 file: the fused packed-lookup kernel, MLP in FP32
  int4_int8mlp     the same with torch's INT8 dynamic quantized linear layers (--mlp int8-dynamic)
  fbgemm_int4      fbgemm's IntNBitTableBatchedEmbeddingBagsCodegen (INT4, CPU) with the INT4
                   model's dequantized MLP weights, in the torchrec peer venv of
                   benchmarks/peer_torchrec.py (skipped, and said so, when it is not installed:
                   `python benchmarks/peer_torchrec.py --install-only` installs it, 5.5 GB)

Per model: samples/s at batch 1, 64 and 4,096 (wall clock over --seconds after a warm-up),
p50 / p99 latency of one call at batch 1 and 64, resident memory after loading and at its
peak, the file size.  Accuracy (in the main process): AUC and log loss of the INT4 model on
a planted-model test split (ids in the first 100,000 rows of each table), through dqrm-eval's ``predict`` with
the kernels and through the PyTorch path (the difference must stay within 1e-6), and with the
INT8 dynamic MLP (the change it costs; the model is untrained, so the AUC itself is near
0.5: pass --model INT4.dqrm --data DATA to measure a trained model instead).  Prints JSON with
the figures, the machine and the issue's targets: INT4 / FP32 samples/s at 4,096 >= 1.5,
INT4 / fbgemm >= 1, INT4 resident memory / file size <= 1.3.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import KAGGLE_CARDINALITIES, emit, machine

HERE = Path(__file__).resolve().parent
PEER_WORKER = HERE / "peer_inference_worker.py"
BATCHES = (1, 64, 4096)
LATENCY_BATCHES = (1, 64)
VARIANTS = ("fp32", "int4", "int4_int8mlp")
PLANTED_ROWS = 100_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_batches(cards: list[int], batch: int, count: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(batch)
    return [(torch.rand(batch, 13, generator=gen) * 4,
             torch.stack([torch.randint(0, c, (batch,), generator=gen) for c in cards], dim=1)) for _ in range(count)]


def measure(call, cards: list[int], seconds: float) -> dict:
    """samples/s per batch size and p50/p99 latency (ms) at the small ones, of ``call(dense, ids)``."""
    out: dict = {}
    for batch in BATCHES:
        data = make_batches(cards, batch)
        for d, s in data[:2]:  # warm-up
            call(d, s)
        times, n, start = [], 0, time.perf_counter()
        while time.perf_counter() - start < seconds or n < 3:
            d, s = data[n % len(data)]
            t0 = time.perf_counter()
            call(d, s)
            times.append(time.perf_counter() - t0)
            n += 1
        wall = time.perf_counter() - start
        out[f"samples_per_s_b{batch}"] = round(batch * n / wall, 1)
        if batch in LATENCY_BATCHES:
            out[f"p50_ms_b{batch}"] = round(float(np.percentile(times, 50)) * 1e3, 4)
            out[f"p99_ms_b{batch}"] = round(float(np.percentile(times, 99)) * 1e3, 4)
    return out


def worker(variant: str, model_file: str, seconds: float) -> dict:
    from dqrm_mpi.quant.packed import load_packed
    from dqrm_mpi.quant.serving import set_mlp_mode

    before = rss_bytes()
    t0 = time.perf_counter()
    model = load_packed(model_file)
    if variant == "int4_int8mlp":
        set_mlp_mode(model, "int8-dynamic")
    load_s = time.perf_counter() - t0
    loaded = rss_bytes()
    cards = list(model.config.cardinalities)

    @torch.no_grad()
    def call(dense, ids):
        return torch.sigmoid(model(dense, ids))

    result = measure(call, cards, seconds)
    return {"variant": variant, "file": model_file, "file_bytes": os.path.getsize(model_file), "load_s": round(load_s, 2),
            "rss_before_load_bytes": before, "rss_loaded_bytes": loaded, "rss_peak_bytes": peak_rss_bytes(),
            "model_rss_over_file": round((loaded - before) / os.path.getsize(model_file), 3), **result}


def build_models(work: Path, cards: tuple[int, ...]) -> dict[str, Path]:
    """The seeded FP32 model and its INT4 (QAT-style) quantization as packed files, the INT4 model's
    dequantized MLP as mlp.npz (for fbgemm's side)."""
    from dqrm_mpi.model import DLRM, model_config_from_preset
    from dqrm_mpi.quant import QuantConfig, prepare_qat
    from dqrm_mpi.quant.packed import export_packed, load_packed

    files = {"fp32": work / "fp32.dqrm", "int4": work / "int4.dqrm", "mlp": work / "mlp.npz"}
    if all(p.exists() for p in files.values()):
        return files
    torch.manual_seed(0)
    model = DLRM(model_config_from_preset("kaggle", cards))
    export_packed(model, QuantConfig(), files["fp32"])
    quant = QuantConfig(emb_bits=4, mlp_bits=4, scale_period=200)
    qat = prepare_qat(model, quant)
    qat.on_step(0)  # the per-table scales of the tables as they are
    export_packed(model, quant, files["int4"])
    del model, qat
    packed = load_packed(files["int4"])
    layers = {}
    for part in ("bottom", "top"):
        linears = [m for m in getattr(packed, part).layers if isinstance(m, torch.nn.Linear)]
        for i, m in enumerate(linears):
            layers[f"{part}_{i}_weight"] = m.weight.detach().numpy()
            layers[f"{part}_{i}_bias"] = m.bias.detach().numpy()
    np.savez(files["mlp"], **layers)
    return files


def accuracy(int4_file: Path, data: Path | None, work: Path, cards: tuple[int, ...]) -> dict:
    """AUC / log loss of the INT4 model: kernels, PyTorch path, INT8 dynamic MLP."""
    from dqrm_mpi import kernels
    from dqrm_mpi.data.synthetic import PlantedClickModel, write_synthetic_dataset
    from dqrm_mpi.quant.packed import load_packed
    from dqrm_mpi.quant.serving import set_mlp_mode
    from dqrm_mpi.train.evaluation import predict
    from dqrm_mpi.train.metrics import binary_metrics

    if data is None:  # ids of a planted model over the first 100,000 rows of each table (light to draw)
        data = work / "planted"
        if not (data / "meta.json").exists():
            write_synthetic_dataset(data, {"train": 16, "val": 16, "test": 20_000},
                                    PlantedClickModel(tuple(min(c, PLANTED_ROWS) for c in cards), seed=0))
    model = load_packed(int4_file)
    prob, label = predict(model, data, "test")
    with kernels.disabled():
        ref, _ = predict(model, data, "test")
    set_mlp_mode(model, "int8-dynamic")
    int8, _ = predict(model, data, "test")
    m, r, q = binary_metrics(label, prob), binary_metrics(label, ref), binary_metrics(label, int8)
    return {"data": str(data), "rows": m["rows"], "auc_kernels": m["auc"], "auc_pytorch_path": r["auc"],
            "auc_abs_diff": abs(m["auc"] - r["auc"]), "max_abs_prob_diff": float(np.abs(prob - ref).max()),
            "log_loss_kernels": m["log_loss"], "auc_int8_dynamic_mlp": q["auc"],
            "auc_change_int8_dynamic_mlp": q["auc"] - m["auc"], "log_loss_int8_dynamic_mlp": q["log_loss"]}


def peer_python(venv: Path) -> Path | None:
    from peer_torchrec import MARKER

    python = venv / "bin" / "python"
    return python if python.exists() and (venv / MARKER).exists() else None


def run_json(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads of every model's process")
    p.add_argument("--seconds", type=float, default=3.0, help="measured wall time per batch size and model")
    p.add_argument("--cap", type=int, default=None, help="at most this many rows per table (quick runs)")
    p.add_argument("--workdir", type=Path, default=None, help="where the model files go (kept; reused when there)")
    p.add_argument("--model", type=Path, default=None, help="a trained INT4 .dqrm for the accuracy figures")
    p.add_argument("--data", type=Path, default=None, help="its dataset (dqrm-prep), test split")
    p.add_argument("--peer-venv", type=Path, default=None,
                   help="the torchrec peer venv [default: benchmarks/peer_torchrec.py's]")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--file", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(worker(a.worker, a.file, a.seconds)))
        return
    if (a.model is None) != (a.data is None):
        p.error("--model and --data go together")
    cards = tuple(KAGGLE_CARDINALITIES if a.cap is None else (min(c, a.cap) for c in KAGGLE_CARDINALITIES))
    work = a.workdir or Path(tempfile.mkdtemp(prefix="dqrm-inference-"))
    work.mkdir(parents=True, exist_ok=True)
    files = build_models(work, cards)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    results = {}
    for variant in VARIANTS:
        file = files["fp32" if variant == "fp32" else "int4"]
        results[variant] = run_json([sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--file",
                                     str(file), "--seconds", str(a.seconds), "--threads", str(a.threads)], env)
    from peer_torchrec import default_peer_venv

    venv = a.peer_venv or default_peer_venv()
    python = peer_python(venv)
    if python is None:
        results["fbgemm_int4"] = {"skipped": f"the torchrec peer venv is not installed at {venv}: "
                                             "`python benchmarks/peer_torchrec.py --install-only` installs it"}
    else:
        peer_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        results["fbgemm_int4"] = run_json([str(python), str(PEER_WORKER), "--cardinalities", ",".join(map(str, cards)),
                                           "--mlp", str(files["mlp"]), "--seconds", str(a.seconds),
                                           "--threads", str(a.threads)], peer_env)
    acc = accuracy(a.model or files["int4"], a.data, work, cards)
    b = BATCHES[-1]
    int4, fp32, fb = results["int4"], results["fp32"], results["fbgemm_int4"]
    targets = {
        f"int4_over_fp32_samples_per_s_b{b} (>= 1.5)": int4[f"samples_per_s_b{b}"] / fp32[f"samples_per_s_b{b}"],
        f"int4_over_fbgemm_samples_per_s_b{b} (>= 1)": (int4[f"samples_per_s_b{b}"] / fb[f"samples_per_s_b{b}"]
                                                         if "skipped" not in fb else None),
        "int4_rss_over_file (<= 1.3)": int4["model_rss_over_file"],
        "int4_auc_kernels_minus_pytorch_path (|.| <= 1e-6)": acc["auc_kernels"] - acc["auc_pytorch_path"],
    }
    emit({"benchmark": "inference", "machine": machine(), "threads": a.threads, "seconds": a.seconds,
          "cardinalities": list(cards), "table_rows": sum(cards), "workdir": str(work),
          "command": " ".join([Path(sys.executable).name, *sys.argv]), "results": results, "accuracy": acc,
          "targets": targets})


if __name__ == "__main__":
    main()
