"""Helpers shared by the benchmarks: machine facts and launching real ranks."""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

VENV_BIN = Path(sys.executable).parent
KAGGLE_CARDINALITIES = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
                        27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)


def add_step_worker_options(p) -> None:
    """The options step_ab.py and qat_step.py share: threads, table cap, clock, the hidden --worker."""
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cap", type=int, default=1_000_000, help="max rows per embedding table")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="wall: time.perf_counter; thread: the worker's CPU time (only with --threads 1)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def check_step_worker_options(p, a) -> None:
    if a.clock == "thread" and a.threads != 1:
        p.error("--clock thread counts one thread's CPU time: use it with --threads 1")


def random_batches(batch: int, cards: tuple[int, ...], seed: int, count: int = 32) -> list:
    """``count`` (dense [batch, 13], sparse int64 [batch, 26], label [batch]) training batches."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, 13, generator=gen),
             torch.stack([torch.randint(0, c, (batch,), generator=gen) for c in cards], dim=1),
             (torch.rand(batch, generator=gen) < 0.25).float()) for _ in range(count)]


def one_rank_run(config, precision: str, sgd) -> dict:
    """A freshly seeded DLRM for ``one_rank_steps``: FP32, or "int4" (DQRM's INT4 QAT: embeddings
    per table, scale period 200, MLP per channel), with the optimizer class ``sgd`` (lr 0.1)."""
    from dqrm_mpi.model import DLRM
    from dqrm_mpi.quant import QuantConfig, prepare_qat
    torch.manual_seed(0)
    model = DLRM(config)
    qat = prepare_qat(model, QuantConfig(emb_bits=4, mlp_bits=4, scale_period=200)) if precision == "int4" else None
    params = [p for p in model.parameters() if p.requires_grad]
    return {"model": model, "params": params, "qat": qat, "opt": sgd(params, lr=0.1), "step": 0}


def one_rank_steps(run: dict, batches: list, steps: int, loss_fn) -> None:
    """``steps`` training steps as ``dqrm-train`` takes them on one rank (QAT's on_step, forward,
    backward, the finite check, the SGD step), no data loading, no communication: ``run`` holds
    the "model", its "params", "qat" (or None), "opt" and the "step" counter (advanced); batches: (dense,
    sparse, label) tuples, used in turn.  dqrm_mpi comes from the checkout the worker runs."""
    from dqrm_mpi.train.agreement import local_flags
    # a checkout from before local_flags took the parameters takes the model
    checked = run["params"] if "params" in inspect.signature(local_flags).parameters else run["model"]
    for _ in range(steps):
        dense, sparse, label = batches[run["step"] % len(batches)]
        if run["qat"] is not None:
            run["qat"].on_step(run["step"])
        run["opt"].zero_grad()  # gradients become None (torch.optim.SGD: set_to_none by default)
        loss = loss_fn(run["model"](dense, sparse), label)
        loss.backward()
        if bool(local_flags(loss, checked, dense).any()):
            raise SystemExit("non-finite step")
        run["opt"].step()
        float(loss.detach())
        run["step"] += 1


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             PATH=f"{VENV_BIN}{os.pathsep}{e.get('PATH', '')}")
    return e


def launch(np_: int, args: list[str], threads: int) -> None:
    """Run ``args`` on ``np_`` ranks of this machine (a plain process when np_ == 1)."""
    e = env()
    e["OMP_NUM_THREADS"] = str(threads)
    cmd = args if np_ == 1 else [shutil.which("horovodrun", path=e["PATH"]), "-np", str(np_),
                                  "-H", f"localhost:{np_}", *args]
    run_checked(cmd, e)


def run_checked(cmd: list[str], env: dict[str, str], timeout: float | None = None) -> None:
    """Run ``cmd``; exit with the tail of its output when it fails."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def emit(result: dict) -> None:
    print(json.dumps(result, indent=2))


def dqrm_run(data: Path, out: Path, batch: int, warmup: int, steps: int, threads: int,
             extra: tuple[str, ...]) -> dict:
    """One dqrm-train process; samples/s over the steps after ``warmup`` (from metrics.jsonl's
    windows of ``warmup`` steps, data wait included) and summary.json's whole-run figure."""
    e = env()
    e["OMP_NUM_THREADS"] = str(threads)
    run_checked([str(VENV_BIN / "dqrm-train"), "--data", str(data), "--out", str(out), "--preset", "kaggle",
                 "--batch-size", str(batch), "--max-steps", str(warmup + steps), "--log-every", str(warmup),
                 "--threads", str(threads), "--progress", "none", "--eval-splits", "test",
                 "--checkpoint-minutes", "0", *extra], e)
    summary = json.loads((out / "summary.json").read_text())
    windows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if r.get("event") == "step" and r["first_step"] > warmup]
    measured = sum(w["steps"] for w in windows)
    if measured != steps:
        sys.exit(f"{out}/metrics.jsonl: expected {steps} steps after the {warmup} warm-up steps, found {measured}")
    seconds = sum(w["seconds"] * w["steps"] for w in windows)
    parts = {p: sum(w["step_time"][p] * w["steps"] for w in windows) / steps * 1e3 for p in windows[0]["step_time"]}
    shutil.rmtree(out)  # the checkpoint holds every table
    return {"samples_per_second": steps * batch / seconds, "ms_per_step": 1e3 * seconds / steps,
            "ms_per_step_by_part": {p: round(v, 3) for p, v in parts.items()},
            "summary_samples_per_second": summary["samples_per_second"]}
