"""Scaling model of data-parallel DQRM training, built from measured parts, checked against
the emulated cluster, then used to predict 2-64 nodes (formulas: ``scaling_model.py``).

Parts, measured on this machine (or read back with ``--parts FILE``):
  compute   forward + backward + SGD step of one rank, FP32 and INT4 QAT (embeddings per
            table + MLP per channel, scale period 200), Kaggle dimensions with tables capped
            at --cap rows, at several batch sizes, --threads (default: all cores here; the
            predicted node computes as this machine does): fixed + per-sample seconds
  codec     the real MLP and embedding exchanges (comm/sync.py) over an in-process stand-in
            of W ranks (benchmarks/comm.py's), FP32 / INT8 / INT4: seconds per value encoded
            and decoded (error feedback as comm.py's configurations), per message, per call
  rows      unique embedding rows (all 26 tables) per batch, as a function of the batch: on
            criteo-like rows (data_prep.criteo_like, what ``dqrm-prep synth --profile
            criteo-like`` writes) and on comm.py's Zipf(1.1) ids at Kaggle cardinalities
  link      root only: on the emulated cluster (launch/netns_cluster.sh, 2 ranks) the fixed
            seconds per Horovod call (allreduce, allgather, alltoall) and the payload rate of
            a large allgather at each --rates (efficiency = achieved / nominal)
Check (root): benchmarks/comm.py's exchange on the emulated cluster at 2, 3 and 4 ranks and
each --rates (128 samples per rank, sparse FP32 / INT8 / INT4 allgather, INT8 two-phase):
measured ms per step (slowest rank) and bytes sent per rank against the model's.  Ranks
share this machine's cores there: the model stretches codec time by ranks / cores, and the
ranks run with OMPI_MCA_mpi_yield_when_idle=1 (unless set) so that MPI's busy polling does not
take the cores (at 4 ranks on 2 cores it made the exchange 3-5x slower in a trial).
Prediction: nodes 2-64 at 1/10/25/100 Gbit/s, global batch fixed (--global-batch, default
512: DQRM's Kaggle runs, 128 per worker on 4), criteo-like unique rows, one rank per node:
samples/s and bytes per rank per step for FP32 sparse, INT8 and INT4 exchange (both
collectives), and where two-phase starts to beat allgather.  The predicted links take the
emulated 1 Gbit/s link's efficiency and per-call costs and --latency-us one way.  The switch
of ``--collective auto`` (two_phase_min_ranks; quantized payloads only: FP32 rows stay
allgathered) is the threshold that loses least against always picking the faster collective,
over 2-64 ranks, every link speed and the INT8 and INT4 schemes.

    python benchmarks/scaling.py --out bench_out/scaling          # as root: everything (~10 min quiet)
    python benchmarks/scaling.py --parts bench_out/scaling/parts.json --no-check   # re-predict only
Writes OUT/parts.json, OUT/scaling.json, OUT/scaling.md, OUT/scaling.png; prints scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import scaling_model as sm  # noqa: E402
from benchmarks._common import KAGGLE_CARDINALITIES, env, machine, run_checked  # noqa: E402

NODES = (2, 4, 8, 16, 32, 64)
GBITS = (1, 10, 25, 100)
CHECK_RANKS = (2, 3, 4)
CHECK_CONFIGS = {  # benchmarks/comm.py configuration -> (scheme codec, two-phase)
    "sparse_fp32": ("none", False), "sparse_int8": ("int8", False), "sparse_int4": ("int4", False),
    "sparse_int8_two_phase": ("int8", True)}
EF = {"none": False, "int8": True, "int4": True}  # MLP error feedback, as comm.py's configurations
KAGGLE_ROWS = 45_840_617  # lines of Criteo Kaggle's train.txt: the criteo-like file's length


def _lstsq(columns: list[list[float]], y: list[float]) -> list[float]:
    """Non-negative least squares by dropping negative coefficients and refitting."""
    import numpy as np
    keep = list(range(len(columns)))
    while True:
        a = np.array([columns[i] for i in keep]).T
        coef, *_ = np.linalg.lstsq(a, np.array(y), rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            out = [0.0] * len(columns)
            for i, c in zip(keep, coef):
                out[i] = max(0.0, float(c))
            return out
        keep = [i for i, c in zip(keep, coef) if c >= 0] or keep[:1]


def _dims():
    import torch

    from dqrm_mpi.model.config import model_config_from_preset
    from dqrm_mpi.model.dlrm import BottomMLP, TopMLP
    cfg = model_config_from_preset("kaggle", KAGGLE_CARDINALITIES)
    shapes = {f"bottom.{n}": p.shape for n, p in BottomMLP(13, cfg.bottom_mlp).named_parameters()}
    shapes.update({f"top.{n}": p.shape for n, p in TopMLP(cfg.num_interactions, cfg.top_mlp).named_parameters()})
    values = sum(torch.Size(s).numel() for s in shapes.values())
    groups = sum(s[0] if len(s) >= 2 else 1 for s in shapes.values())  # per channel; biases one each
    return shapes, sm.Dims(values, groups, cfg.embedding_dim, len(KAGGLE_CARDINALITIES))


# -- parts ------------------------------------------------------------------------------------
def measure_compute(batches: list[int], steps: int, cap: int) -> dict:
    """Seconds per step of FP32 and INT4 QAT (period 200) training, torch's threads as set, fitted as
    fixed + per_sample * batch; modes interleaved per batch size."""
    import torch

    from dqrm_mpi.model import DLRM, model_config_from_preset
    from dqrm_mpi.quant import QuantConfig, prepare_qat
    cards = tuple(min(c, cap) for c in KAGGLE_CARDINALITIES)
    config = model_config_from_preset("kaggle", cards)
    modes = {"fp32": None, "qat_int4": QuantConfig(emb_bits=4, mlp_bits=4, scale_period=200)}
    models = {}
    for name, quant in modes.items():
        torch.manual_seed(0)
        model = DLRM(config)
        qat = prepare_qat(model, quant) if quant else None
        models[name] = (model, qat, torch.optim.SGD(model.parameters(), lr=0.01), [0])
    loss_fn = torch.nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(0)
    per_batch: dict[str, list[float]] = {m: [] for m in modes}
    for b in batches:
        data = [(torch.rand(b, 13, generator=gen),
                 torch.stack([torch.randint(0, c, (b,), generator=gen) for c in cards], dim=1),
                 (torch.rand(b, generator=gen) < 0.25).float()) for _ in range(4)]
        times: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(steps + 3):
            for name in modes:
                model, qat, opt, step = models[name]
                dense, sparse, label = data[i % len(data)]
                t0 = time.perf_counter()
                if qat is not None:
                    qat.on_step(step[0])
                opt.zero_grad(set_to_none=True)
                loss_fn(model(dense, sparse), label).backward()
                opt.step()
                if i >= 3:
                    times[name].append(time.perf_counter() - t0)
                step[0] += 1
        for name in modes:
            per_batch[name].append(statistics.median(times[name]))
    out = {"batches": batches, "cap_rows_per_table": cap, "threads": torch.get_num_threads()}
    for name in modes:
        fixed, per_sample = _lstsq([[1.0] * len(batches), [float(b) for b in batches]], per_batch[name])
        out[name] = {"fixed_s": fixed, "per_sample_s": per_sample, "step_s_measured": per_batch[name]}
    return out


def measure_codec(steps: int) -> dict:
    """CodecCost per (kind, codec) from the real exchanges over comm.py's in-process stand-in
    of W ranks (its collectives return W copies of this rank's payload)."""
    import torch

    from benchmarks.comm import _LocalBackend, _zipf_ids
    from dqrm_mpi.comm.sync import DenseExchange, SparseExchange
    from dqrm_mpi.compression import get_compressor
    shapes, dims = _dims()
    cards = KAGGLE_CARDINALITIES
    offsets = torch.tensor([0, *torch.tensor(cards).cumsum(0).tolist()])
    names = [f"embeddings.tables.{t}.weight" for t in range(len(cards))]
    worlds, batches = (1, 2, 4, 8), (16, 128, 512)
    out = {"worlds": list(worlds), "emb_batches": list(batches), "mlp": {}, "emb": {}}
    for codec in sm.BITS:
        c = get_compressor(codec)
        mlp_t, emb_rows = [], []
        for w in worlds:
            backend = _LocalBackend(w)
            mlp = DenseExchange(backend, shapes, c, "channel", EF[codec])
            emb = SparseExchange(backend, names, list(cards), dims.emb_dim, c, "table", False)
            times = []
            for step in range(steps + 2):
                gen = torch.Generator().manual_seed(step)
                grads = {n: torch.randn(s, generator=gen) * 1e-3 for n, s in shapes.items()}
                t0 = time.perf_counter()
                mlp.exchange(grads)
                if step >= 2:
                    times.append(time.perf_counter() - t0)
            mlp_t.append(statistics.median(times))
            for b in batches:
                times, rows = [], []
                for step in range(steps + 2):
                    gen = torch.Generator().manual_seed(step)
                    gid = torch.unique(torch.stack([_zipf_ids(gen, k, b) for k in cards], dim=1) + offsets[:-1])
                    vals = torch.randn(gid.numel(), dims.emb_dim, generator=gen) * 1e-3
                    t0 = time.perf_counter()
                    emb.exchange(gid, vals)
                    if step >= 2:
                        times.append(time.perf_counter() - t0)
                        rows.append(gid.numel())
                emb_rows.append((w, statistics.fmean(rows), statistics.median(times)))
            backend.traffic.take()
        v = dims.mlp_values
        a, d = _lstsq([[1.0] * len(worlds), [float(w) for w in worlds]], mlp_t)
        out["mlp"][codec] = {"encode": a / v, "decode": d / v, "message": 0.0, "fixed": 0.0,
                             "seconds_by_world": mlp_t}
        cols = [[r * dims.emb_dim for _, r, _ in emb_rows], [w * r * dims.emb_dim for w, r, _ in emb_rows],
                [float(w) for w, _, _ in emb_rows], [1.0] * len(emb_rows)]
        enc, dec, msg, fixed = _lstsq(cols, [t for _, _, t in emb_rows])
        out["emb"][codec] = {"encode": enc, "decode": dec, "message": msg, "fixed": fixed,
                             "points": [{"world": w, "rows": round(r), "seconds": t} for w, r, t in emb_rows]}
    return out


def unique_rows_criteo_like(batches: list[int], samples: int = 8, seed: int = 0) -> list[float]:
    """Mean distinct (table, value) pairs in ``samples`` batches of consecutive criteo-like
    rows (the first day of a Kaggle-length file; a missing value is one row)."""
    import numpy as np

    from data_prep.criteo_like import CriteoLikeModel
    model = CriteoLikeModel(KAGGLE_ROWS, seed=seed)
    out = []
    for b in batches:
        counts = []
        for s in range(samples):
            ids = model.sample_rows(s * max(batches), b).ids  # [b, 26]
            counts.append(sum(len(np.unique(ids[:, t])) for t in range(ids.shape[1])))
        out.append(statistics.fmean(counts))
    return out


def unique_rows_kaggle_zipf(batches: list[int], samples: int = 8) -> list[float]:
    """The same for benchmarks/comm.py's ids (Zipf(1.1) at Kaggle cardinalities)."""
    import torch

    from benchmarks.comm import _zipf_ids
    out = []
    for b in batches:
        counts = []
        for s in range(samples):
            gen = torch.Generator().manual_seed(1000 + s)
            counts.append(sum(len(torch.unique(_zipf_ids(gen, c, b))) for c in KAGGLE_CARDINALITIES))
        out.append(statistics.fmean(counts))
    return out


def link_worker(out: str, nominal_gbit: float, reps: int) -> None:
    """Under the emulated cluster: fixed seconds per Horovod call and the large-allgather payload rate."""
    import torch

    from dqrm_mpi.comm.backend import HorovodBackend
    backend = HorovodBackend()
    n = backend.size

    def timed(fn, k: int) -> float:
        times = []
        for _ in range(k + 2):
            backend.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:])

    tiny = torch.zeros(2, dtype=torch.uint8)
    calls = {"allreduce": timed(lambda: backend.allreduce_average([torch.zeros(1)], "t.ar", "x"), reps),
             "allgather": timed(lambda: backend.allgather_stacked(tiny, "t.ag", "x"), reps),
             "alltoall": timed(lambda: backend.alltoall(torch.zeros(n, dtype=torch.uint8), [1] * n, "t.a2a", "x"),
                               reps)}
    small, large = 1 << 19, 1 << 22 if nominal_gbit < 5 else 1 << 24
    t_small = timed(lambda: backend.allgather_stacked(torch.zeros(small, dtype=torch.uint8), "t.bw1", "x"), reps)
    t_large = timed(lambda: backend.allgather_stacked(torch.zeros(large, dtype=torch.uint8), "t.bw2", "x"), reps)
    rate = (n - 1) * (large - small) / max(1e-9, t_large - t_small)
    result = {"ranks": n, "calls_s": calls, "payload_bytes_per_s": rate,
              "efficiency": rate / (nominal_gbit * 1e9 / 8), "allgather_s": {str(small): t_small, str(large): t_large}}
    res = backend.allgather_object(result, name="link.result")
    if backend.rank == 0:
        Path(out).write_text(json.dumps(res[0]))


def _gbit(rate: str) -> float:
    units = {"gbit": 1.0, "mbit": 1e-3}
    for u, f in units.items():
        if rate.endswith(u):
            return float(rate[:-len(u)]) * f
    raise ValueError(f"rate {rate!r}: expected e.g. 1gbit, 10gbit, 500mbit")


def measure_link(rate: str, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "link.json"
        e = env()
        e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        run_checked(["bash", str(ROOT / "launch/netns_cluster.sh"), "session", "2", rate, "0", "--",
                     sys.executable, str(Path(__file__).resolve()), "--link-worker", "--json", str(out),
                     "--link-gbit", str(_gbit(rate)), "--reps", str(reps)], e, timeout=900)
        return json.loads(out.read_text())


def measure_parts(a) -> dict:
    import torch
    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    _, dims = _dims()
    parts = {"machine": machine(), "dims": vars(dims)}
    steps = a.steps
    print("measuring: unique rows", file=sys.stderr)
    parts["rows"] = {"batches": batches, "criteo_like": unique_rows_criteo_like(batches),
                     "kaggle_zipf": unique_rows_kaggle_zipf(batches)}
    print("measuring: compute", file=sys.stderr)
    torch.set_num_threads(a.threads)
    parts["compute"] = measure_compute([32, 128, 512], steps, a.cap)
    print("measuring: codec", file=sys.stderr)
    torch.set_num_threads(1)  # as the ranks of the check (comm.py runs them with OMP_NUM_THREADS=1)
    parts["codec"] = measure_codec(steps)
    if a.check or a.link:
        parts["link"] = {}
        for rate in a.rates:
            print(f"measuring: link {rate}", file=sys.stderr)
            parts["link"][rate] = measure_link(rate, max(10, steps))
    return parts


# -- the model over the parts ------------------------------------------------------------------
def model_from(parts: dict):
    dims = sm.Dims(**parts["dims"])
    codec = {kind: {c: sm.CodecCost(*(v[k] for k in ("encode", "decode", "message", "fixed")))
                    for c, v in parts["codec"][kind].items()} for kind in ("mlp", "emb")}
    rows = parts["rows"]
    return dims, codec, rows


def calls_from(link: dict) -> sm.CallCost:
    return sm.CallCost(**link["calls_s"])


def exchange(codec_name: str, n: int, rows_local: float, rows_global: float, two_phase: bool, dims, codec,
             link: sm.Link, calls: sm.CallCost, cpu_slowdown: float = 1.0) -> dict:
    """Model seconds and bytes of the MLP + embedding exchange of one rank among n."""
    out = {"network": 0.0, "codec": 0.0, "total": 0.0, "sent_bytes": 0.0, "link_bytes": 0.0}
    for kind, plan in (("mlp", sm.mlp_plan(codec_name, n, dims, two_phase)),
                       ("emb", sm.emb_plan(codec_name, n, rows_local, rows_global, dims, two_phase))):
        s = sm.exchange_seconds(plan, link, calls, codec[kind][codec_name], cpu_slowdown)
        for k in ("network", "codec", "total"):
            out[k] += s[k]
        out["sent_bytes"] += plan.sent_bytes
        out["link_bytes"] += plan.link_bytes
    return out


def check(parts: dict, rates: list[str], steps: int) -> dict:
    """The model against benchmarks/comm.py's exchange on the emulated cluster."""
    from benchmarks.comm import launch_worker
    dims, codec, rows = model_from(parts)
    cores = os.cpu_count() or 1
    points = []
    for rate in rates:
        lk = parts["link"][rate]
        link = sm.Link(_gbit(rate), lk["efficiency"], 0.0)
        calls = calls_from(lk)
        for n in CHECK_RANKS:
            measured = launch_worker(n, "emulated", rate, steps, list(CHECK_CONFIGS))
            local = sm.interpolate_rows(rows["batches"], rows["kaggle_zipf"], 128)
            glob = sm.interpolate_rows(rows["batches"], rows["kaggle_zipf"], 128 * n)
            for name, (c, two) in CHECK_CONFIGS.items():
                m = measured[name]
                pred = exchange(c, n, local, glob, two, dims, codec, link, calls, max(1.0, n / cores))
                points.append({"rate": rate, "ranks": n, "config": name,
                               "measured_ms": m["step_ms_slowest_rank"], "model_ms": round(pred["total"] * 1e3, 3),
                               "model_network_ms": round(pred["network"] * 1e3, 3),
                               "model_codec_ms": round(pred["codec"] * 1e3, 3),
                               "measured_codec_ms": m["codec_ms_mean"],
                               "error": round(pred["total"] * 1e3 / m["step_ms_slowest_rank"] - 1, 4),
                               "measured_sent_bytes": m["sent_bytes_per_rank"],
                               "model_sent_bytes": round(pred["sent_bytes"]),
                               "bytes_error": round(pred["sent_bytes"] / m["sent_bytes_per_rank"] - 1, 4)})
                print(f"check {rate} n={n} {name}: measured {m['step_ms_slowest_rank']:.1f} ms, "
                      f"model {pred['total'] * 1e3:.1f} ms", file=sys.stderr)
    errs = [abs(p["error"]) for p in points]
    return {"per_rank_batch": 128, "ids": "Zipf(1.1) at Kaggle cardinalities (benchmarks/comm.py)",
            "cpu_slowdown": f"codec x max(1, ranks / {cores} cores)", "steps": steps, "points": points,
            "max_abs_error": max(errs), "mean_abs_error": round(statistics.fmean(errs), 4),
            "max_abs_bytes_error": max(abs(p["bytes_error"]) for p in points)}


def predict(parts: dict, global_batch: int = 512, latency_us: float = 25.0) -> dict:
    """The grid of predictions; links as the emulated 1 Gbit/s one (efficiency, call costs)."""
    link1 = (parts.get("link") or {}).get("1gbit")
    if link1 is None:
        raise ValueError("the parts have no emulated 1gbit link measurement (call costs, efficiency): run as root "
                         "with --rates 1gbit ... (or --link), or pass --parts with one")
    efficiency, calls, latency_s = link1["efficiency"], calls_from(link1), latency_us * 1e-6
    dims, codec, rows = model_from(parts)
    glob = sm.interpolate_rows(rows["batches"], rows["criteo_like"], global_batch)
    nodes_all = list(range(2, max(NODES) + 1))
    grid, switch, step_times = [], {}, {}
    auto = parts["compute"]["qat_int4"]
    for gbit in GBITS:
        link = sm.Link(gbit, efficiency, latency_s)
        for scheme, c in sm.SCHEMES.items():
            faster = {}
            for n in nodes_all:
                b = global_batch / n
                local = sm.interpolate_rows(rows["batches"], rows["criteo_like"], b)
                ex = {coll: exchange(c, n, local, glob, coll == "two-phase", dims, codec, link, calls)
                      for coll in sm.COLLECTIVES}
                faster[n] = sm.better_collective({k: v["total"] for k, v in ex.items()})
                comp = sm.compute_seconds(b, auto["fixed_s"], auto["per_sample_s"])
                if c != "none":  # auto goes two-phase only for quantized payloads (CompressionConfig.use_two_phase)
                    step_times[(f"{scheme}@{gbit}gbit", n)] = {k: comp + v["total"] for k, v in ex.items()}
                if n not in NODES:
                    continue
                for mode in ("fp32", "qat_int4"):
                    cp = parts["compute"][mode]
                    comp = sm.compute_seconds(b, cp["fixed_s"], cp["per_sample_s"])
                    for coll, e in ex.items():
                        step = comp + e["total"]
                        grid.append({"gbit": gbit, "nodes": n, "scheme": scheme, "collective": coll,
                                     "compute": mode, "local_batch": b, "unique_rows_per_rank": round(local),
                                     "compute_ms": round(comp * 1e3, 3), "exchange_ms": round(e["total"] * 1e3, 3),
                                     "codec_ms": round(e["codec"] * 1e3, 3),
                                     "samples_per_s": round(global_batch / step, 1),
                                     "sent_bytes_per_rank": round(e["sent_bytes"]),
                                     "link_bytes_per_rank": round(e["link_bytes"])})
            switch[f"{scheme}@{gbit}gbit"] = sm.switch_point(faster)
    return {"global_batch": global_batch, "unique_rows_global_batch": round(glob),
            "link": {"efficiency": efficiency, "latency_s": latency_s, "calls_s": vars(calls)},
            "one_rank_per_node": True, "grid": grid, "two_phase_from_ranks": switch,
            "auto_two_phase_min_ranks": sm.best_threshold(step_times, nodes_all)}


def best(grid: list[dict], gbit, n, scheme, mode) -> dict:
    rows = [r for r in grid if (r["gbit"], r["nodes"], r["scheme"], r["compute"]) == (gbit, n, scheme, mode)]
    return max(rows, key=lambda r: r["samples_per_s"])


def markdown(pred: dict, mode: str) -> str:
    g = pred["grid"]
    lines = [f"Predicted, global batch {pred['global_batch']} (criteo-like ids), compute {mode}, one rank per "
             "node, each scheme with its faster collective (ag = allgather, 2p = two-phase); bytes = "
             "leaving each rank's link per step.", "",
             "| Gbit/s | nodes | FP32 sparse samples/s | INT8 samples/s | INT4 samples/s | "
             "FP32 MB/rank | INT8 MB/rank | INT4 MB/rank |", "|---|---|---|---|---|---|---|---|"]
    short = {"allgather": "ag", "two-phase": "2p"}
    for gbit in GBITS:
        for n in NODES:
            r = {s: best(g, gbit, n, s, mode) for s in sm.SCHEMES}
            lines.append(f"| {gbit} | {n} | " + " | ".join(
                f"{r[s]['samples_per_s']:,.0f} ({short[r[s]['collective']]})" for s in sm.SCHEMES) + " | " +
                " | ".join(f"{r[s]['link_bytes_per_rank'] / 1e6:.3f}" for s in sm.SCHEMES) + " |")
    lines += ["", "Two-phase faster than allgather from (ranks): " + ", ".join(
        f"{k} {v if v is not None else 'never (<= 64)'}" for k, v in pred["two_phase_from_ranks"].items()),
        "", f"`--collective auto` switch losing least over all of these (INT4 QAT step time, 2-64 ranks): "
        f"two-phase from {pred['auto_two_phase_min_ranks']} ranks"]
    return "\n".join(lines) + "\n"


def plot(pred: dict, mode: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(GBITS), figsize=(4 * len(GBITS), 3.6), sharey=True)
    for ax, gbit in zip(axes, GBITS):
        for scheme in sm.SCHEMES:
            ax.plot(NODES, [best(pred["grid"], gbit, n, scheme, mode)["samples_per_s"] for n in NODES],
                    marker="o", label=scheme)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{gbit} Gbit/s")
        ax.set_xlabel("nodes")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("samples/s (model)")
    axes[0].legend()
    fig.suptitle(f"DQRM data-parallel, global batch {pred['global_batch']}, compute {mode}")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench_out/scaling"))
    ap.add_argument("--parts", help="read the measured parts from this JSON (a parts.json written before)")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                    help="run the emulated-cluster check (root)")
    ap.add_argument("--link", action="store_true", help="measure the emulated link even with --no-check")
    ap.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    ap.add_argument("--cap", type=int, default=1_000_000, help="rows per table in the compute measurement")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of the compute measurement (the predicted node's compute)")
    ap.add_argument("--global-batch", type=int, default=512)
    ap.add_argument("--latency-us", type=float, default=25.0, help="one-way link latency of the predicted clusters")
    ap.add_argument("--link-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--link-gbit", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.link_worker:
        link_worker(a.json, a.link_gbit, a.reps)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # The emulated hosts share this machine's cores: MPI's busy polling while waiting (harmless
    # on hosts with cores of their own) would take them from the ranks that have work.
    os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    if a.parts:
        try:
            parts = json.loads(Path(a.parts).read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"--parts {a.parts}: cannot read a parts JSON ({e})")
    else:
        parts = measure_parts(a)
        _write(out / "parts.json", json.dumps(parts, indent=2))
    result = {"benchmark": "scaling", "machine": machine(), "parts_file": a.parts or str(out / "parts.json")}
    try:
        result["prediction"] = predict(parts, a.global_batch, a.latency_us)
    except ValueError as e:
        sys.exit(str(e))
    if a.check:
        result = {**result, "check": check(parts, a.rates, a.steps), "prediction": result["prediction"]}
    _write(out / "scaling.json", json.dumps(result, indent=2))
    _write(out / "scaling.md", markdown(result["prediction"], "qat_int4"))
    plot(result["prediction"], "qat_int4", out / "scaling.png")
    summary = {k: v for k, v in result.items() if k != "prediction"}
    summary["prediction"] = {k: v for k, v in result["prediction"].items() if k != "grid"}
    if "check" in summary:
        summary["check"] = {k: v for k, v in result["check"].items() if k != "points"} | {
            "points": [{k: p[k] for k in ("rate", "ranks", "config", "measured_ms", "model_ms", "error", "bytes_error")}
                       for p in result["check"]["points"]]}
    print(json.dumps(summary, indent=2))
    print(f"full results: {out / 'scaling.json'}, {out / 'scaling.md'}, {out / 'scaling.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
