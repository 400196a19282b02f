"""Time to a target test AUC on 2-64 nodes: measured accuracy per sample joined with the
scaling model's step time (one JSON, a markdown table and a PNG).

Measured (``benchmarks/large_batch.py``'s JSON): test AUC against samples seen, every quarter
epoch, for each recipe (a, b, c, INT4) at each global batch, on one rank (N ranks at the same
global batch give the same parameters, as tested).  Measured too (``benchmarks/scaling_parts.json``,
``benchmarks/scaling.py``): one rank's compute per step as fixed + per-sample seconds, the
codec's seconds per value and message, unique embedding rows per batch, Horovod's per-call cost
and a link's payload efficiency.  Modelled (``benchmarks/scaling_model.py``): the step of N
nodes, one rank each, at local batch G / N: compute + the gradient exchange (FP32 sparse, INT8
or INT4 values, the faster collective) over a 1, 10 or 25 Gbit/s link.  Assumed: the exchange's
codec does not change the accuracy curve (INT8 with MLP error feedback; the paper's Table 3
finds a small drop), and a recipe's optimizer costs what SGD's does per step times
--step-ratio (row-wise Adagrad against SGD, benchmarks/step_ab.py-style).

For each (link, nodes, scheme) the prediction picks the global batch and recipe whose curve
reaches the target in the least wall time: samples to the target (linear between evaluations)
/ samples per second.  Target: the best test AUC of batch 128 with constant SGD (recipe a)
minus --margin.

    python benchmarks/time_to_auc.py --large-batch bench_out/large_batch/large_batch.json \\
        --out bench_out/time_to_auc
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import scaling_model as sm  # noqa: E402
from benchmarks._common import machine  # noqa: E402
from benchmarks.scaling import calls_from, exchange, model_from  # noqa: E402

NODES = (1, 2, 4, 8, 16, 32, 64)
GBITS = (1, 10, 25)
LATENCY_S = 25e-6


def samples_to(curve: list[dict], target: float) -> float | None:
    """Samples seen when the test AUC first reaches ``target``, linear between evaluations
    (None when it never does)."""
    prev = None
    for point in curve:
        if point["test_auc"] >= target:
            if prev is None:
                return float(point["samples"])
            frac = (target - prev["test_auc"]) / (point["test_auc"] - prev["test_auc"])
            return prev["samples"] + frac * (point["samples"] - prev["samples"])
        prev = point
    return None


def step_seconds(parts: dict, nodes: int, global_batch: int, scheme: str, gbit: float, compute: str,
                 step_ratio: float) -> dict:
    """The model's step of ``nodes`` ranks at ``global_batch``: compute and exchange seconds."""
    dims, codec, rows = model_from(parts)
    local = global_batch / nodes
    cp = parts["compute"][compute]
    comp = sm.compute_seconds(local, cp["fixed_s"], cp["per_sample_s"]) * step_ratio
    if nodes == 1:
        return {"compute": comp, "exchange": 0.0, "collective": None}
    link1 = parts["link"]["1gbit"]
    link = sm.Link(gbit, link1["efficiency"], LATENCY_S)
    rl = sm.interpolate_rows(rows["batches"], rows["criteo_like"], local)
    rg = sm.interpolate_rows(rows["batches"], rows["criteo_like"], global_batch)
    times = {coll: exchange(sm.SCHEMES[scheme], nodes, rl, rg, coll == "two-phase", dims, codec, link,
                            calls_from(link1))["total"] for coll in sm.COLLECTIVES}
    coll = sm.better_collective(times)
    return {"compute": comp, "exchange": times[coll], "collective": coll}


def predict(large_batch: dict, parts: dict, margin: float, step_ratio: float) -> dict:
    results = large_batch["results"]
    target = max(p["test_auc"] for p in results["a-b128"]["curve"]) - margin
    runs = {}
    for name, r in results.items():
        need = samples_to(r["curve"], target)
        runs[name] = {"recipe": r["recipe"], "batch": r["batch"], "int4": name.startswith("int4"),
                      "samples_to_target": need, "best_test_auc": max(p["test_auc"] for p in r["curve"])}
    grid = []
    for gbit in GBITS:
        for scheme in sm.SCHEMES:
            for n in NODES:
                if n == 1 and (gbit, scheme) != (GBITS[0], "fp32_sparse"):
                    continue
                options = []
                for name, run in runs.items():
                    if run["samples_to_target"] is None or run["batch"] % n:
                        continue
                    ratio = step_ratio if run["recipe"] == "c" else 1.0
                    step = step_seconds(parts, n, run["batch"], scheme, gbit, "qat_int4" if run["int4"] else "fp32",
                                        ratio)
                    seconds = run["samples_to_target"] / run["batch"] * (step["compute"] + step["exchange"])
                    options.append({"run": name, "seconds": seconds, "local_batch": run["batch"] // n,
                                    "step_ms": round((step["compute"] + step["exchange"]) * 1e3, 3),
                                    "exchange_ms": round(step["exchange"] * 1e3, 3), "collective": step["collective"]})
                fastest = min(options, key=lambda o: o["seconds"]) if options else None
                grid.append({"gbit": gbit if n > 1 else None, "scheme": scheme if n > 1 else None, "nodes": n,
                             "fastest": fastest,
                             "per_run_seconds": {o["run"]: round(o["seconds"], 1) for o in options}})
    return {"target_test_auc": target, "margin": margin, "step_ratio_rowwise_adagrad": step_ratio, "runs": runs,
            "grid": grid}


def markdown(pred: dict) -> str:
    one = next(g for g in pred["grid"] if g["nodes"] == 1)["fastest"]
    lines = [f"Predicted wall time to test AUC {pred['target_test_auc']:.4f} (batch-128 SGD's best - "
             f"{pred['margin']}); per cell the fastest run (recipe-global batch), its seconds and its speed-up "
             f"over one node ({one['run']}, {one['seconds']:.1f} s)" if one else "one node: not reached", "",
             "| link | exchange | " + " | ".join(f"{n} nodes" for n in NODES[1:]) + " |",
             "|---|---|" + "---|" * (len(NODES) - 1)]
    for gbit in GBITS:
        for scheme in sm.SCHEMES:
            cells = []
            for n in NODES[1:]:
                g = next(x for x in pred["grid"] if (x["gbit"], x["scheme"], x["nodes"]) == (gbit, scheme, n))
                f = g["fastest"]
                cells.append((f"{f['run']} {f['seconds']:.1f} s" + (f" ({one['seconds'] / f['seconds']:.1f}x)"
                                                                      if one else "")) if f else "not reached")
            lines.append(f"| {gbit} Gbit/s | {scheme} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(pred: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(GBITS), figsize=(4.2 * len(GBITS), 3.8), sharey=True)
    one = next(g for g in pred["grid"] if g["nodes"] == 1)["fastest"]
    for ax, gbit in zip(axes, GBITS):
        for scheme in sm.SCHEMES:
            pts = [(g["nodes"], g["fastest"]["seconds"]) for g in pred["grid"]
                   if g["gbit"] == gbit and g["scheme"] == scheme and g["fastest"]]
            ax.plot([n for n, _ in pts], [m for _, m in pts], marker="o", label=scheme)
        if one:
            ax.axhline(one["seconds"], color="grey", ls="--", lw=1, label="1 node")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{gbit} Gbit/s")
        ax.set_xlabel("nodes (one rank each)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("seconds to target AUC (model)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Time to test AUC {pred['target_test_auc']:.4f}: measured AUC per sample x modelled step time",
                 fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large-batch", type=Path, required=True, help="benchmarks/large_batch.py's JSON")
    ap.add_argument("--parts", type=Path, default=ROOT / "benchmarks" / "scaling_parts.json")
    ap.add_argument("--margin", type=float, default=0.002)
    ap.add_argument("--step-ratio", type=float, default=1.0,
                    help="row-wise Adagrad's step time over SGD's (measured, benchmarks/optimizer_step.py)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "time_to_auc")
    a = ap.parse_args()
    try:
        large_batch = json.loads(a.large_batch.read_text())
        parts = json.loads(a.parts.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"cannot read the inputs: {e}")
    pred = predict(large_batch, parts, a.margin, a.step_ratio)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "time_to_auc.md").write_text(markdown(pred))
    plot(pred, a.out / "time_to_auc.png")
    print(json.dumps({"benchmark": "time_to_auc", "machine": machine(), "measured": str(a.large_batch),
                      "parts": str(a.parts), **pred}, indent=2))
    print(f"table: {a.out / 'time_to_auc.md'}, figure: {a.out / 'time_to_auc.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
