"""Helpers shared by the benchmarks: machine facts and launching real ranks."""
from __future__ import annotations

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


def one_rank_steps(run: dict, batches: list, steps: int, loss_fn) -> None:
    """``steps`` training steps as ``dqrm-train`` takes them on one rank (QAT's on_step, forward,
    backward, the finite check, the SGD step), no data loading, no communication: ``run`` holds
    the "model", its "qat" (or None), "opt" and the "step" counter (advanced); batches: (dense,
    sparse, label) tuples, used in turn.  dqrm_mpi comes from the checkout the worker runs."""
    from dqrm_mpi.train.agreement import local_flags
    for _ in range(steps):
        dense, sparse, label = batches[run["step"] % len(batches)]
        if run["qat"] is not None:
            run["qat"].on_step(run["step"])
        run["opt"].zero_grad()  # gradients become None (torch.optim.SGD: set_to_none by default)
        loss = loss_fn(run["model"](dense, sparse), label)
        loss.backward()
        if bool(local_flags(loss, run["model"], dense).any()):
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
