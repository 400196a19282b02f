"""Time per training step at Kaggle dimensions: FP32, INT4 QAT with scale period 1 and 200.

All three models train side by side in one process on the same random batches, in
interleaved rounds (so machine noise hits them alike).  INT4 QAT = embeddings INT4 with
per-table scales + MLP INT4 per channel (DQRM's configuration).  A step is forward,
backward and a plain-SGD update with sparse embedding gradients, one process (no
communication).  Cardinalities are Kaggle's capped at --cap rows per table.

Prints JSON: ms per step (mean and median per round), ratio to FP32, the share of
QAT step time spent in full-table scale passes, and machine info.

    python benchmarks/qat_step.py --cap 1000000 --steps 50 --rounds 12
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from dqrm_mpi.model import DLRM, model_config_from_preset
from dqrm_mpi.quant import QuantConfig, prepare_qat
from dqrm_mpi.train.sgd import PlainSGD

KAGGLE = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992, 5461306,
          10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap", type=int, default=1_000_000, help="max rows per table")
    ap.add_argument("--batch-size", type=int, default=128, help="DQRM's Kaggle batch")
    ap.add_argument("--steps", type=int, default=50, help="steps per round and mode (period 1: a quarter)")
    ap.add_argument("--rounds", type=int, default=12, help="interleaved rounds (short rounds: noise hits all modes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cards = tuple(min(c, args.cap) for c in KAGGLE)
    config = model_config_from_preset("kaggle", cards)
    modes = {"fp32": None, "int4_period1": QuantConfig(emb_bits=4, mlp_bits=4, scale_period=1),
             "int4_period200": QuantConfig(emb_bits=4, mlp_bits=4, scale_period=200)}
    models, states, opts = {}, {}, {}
    for name, quant in modes.items():
        torch.manual_seed(0)
        models[name] = DLRM(config)
        states[name] = prepare_qat(models[name], quant) if quant else None
        opts[name] = PlainSGD(models[name].parameters(), lr=0.1)  # as dqrm-train steps
    gen = torch.Generator().manual_seed(0)
    n_batches = 64
    batches = [(torch.rand(args.batch_size, 13, generator=gen),
                torch.stack([torch.randint(0, c, (args.batch_size,), generator=gen) for c in cards], dim=1),
                (torch.rand(args.batch_size, generator=gen) < 0.25).float()) for _ in range(n_batches)]
    loss_fn = torch.nn.BCEWithLogitsLoss()
    step_of = {name: 0 for name in modes}
    times = {name: [] for name in modes}

    def run(name: str, steps: int) -> None:
        model, qat, opt = models[name], states[name], opts[name]
        for _ in range(steps):
            dense, sparse, label = batches[step_of[name] % n_batches]
            t0 = time.perf_counter()
            if qat is not None:
                qat.on_step(step_of[name])
            opt.zero_grad()  # gradients become None
            loss_fn(model(dense, sparse), label).backward()
            opt.step()
            times[name].append(time.perf_counter() - t0)
            step_of[name] += 1

    for name in modes:  # warm-up (also the first scale pass)
        run(name, 10)
        times[name].clear()
        if states[name] is not None:
            states[name].scale_seconds = 0.0
    per_round = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name in modes:
            steps = max(10, args.steps // 4) if name == "int4_period1" else args.steps
            start = len(times[name])
            run(name, steps)
            per_round[name].append(1e3 * statistics.fmean(times[name][start:]))
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": args.threads},
              "config": {"cardinalities": cards, "rows": sum(cards), "embedding_dim": config.embedding_dim,
                         "bottom_mlp": config.bottom_mlp, "top_mlp": config.top_mlp,
                         "batch_size": args.batch_size, "steps_per_round": args.steps, "rounds": args.rounds,
                         "int4": "emb INT4 per table + MLP INT4 per channel"},
              "modes": {}}
    fp32 = statistics.fmean(times["fp32"])
    fp32_median = statistics.median(times["fp32"])
    for name in modes:
        mean = statistics.fmean(times[name])
        total = sum(times[name])
        qat = states[name]
        result["modes"][name] = {
            "ms_per_step_mean": 1e3 * mean, "ms_per_step_median": 1e3 * statistics.median(times[name]),
            "ms_per_step_by_round": per_round[name], "steps_timed": len(times[name]),
            "ratio_to_fp32": mean / fp32,
            "ratio_to_fp32_median": statistics.median(times[name]) / fp32_median,
            "scale_pass_share": (qat.scale_seconds / total) if qat else 0.0,
            "table_passes_timed": None if qat is None else qat.table_passes - 1,
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
