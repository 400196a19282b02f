"""Communication benchmark: bytes and time per step of the gradient exchange at Kaggle
dimensions (26 tables with Kaggle's cardinalities, dim 16, MLPs 13-512-256-64-16 and
367-512-256-1, 128 samples per rank and step, Zipf(1.1) ids), 2 and 4 ranks, on loopback
and on the emulated cluster (launch/netns_cluster.sh, one rank per network namespace).

Configurations: uncompressed dense embedding gradients (tables up to 100k rows only: the
whole Kaggle model is 2.16 GB a step), sparse FP32, sparse + INT8, sparse + INT4 (MLP at
the same width, with error feedback), MLP INT8 with and without error feedback, MLP top-k
at ratios 0.1, 0.01 and 0.001 with FP32 or INT8 values (error feedback).  Bytes are
measured (TrafficMeter: tensors handed to Horovod); time is the wall time of the exchange
(collectives + compression), mean over steps, slowest rank.  ``--accuracy`` adds 4-rank
dqrm-train runs on planted synthetic data (uncompressed / INT8 + MLP error feedback / INT8
without / MLP top-k 0.01 + INT8 with error feedback, without and with a sparsity warm-up of
100 or 200 steps; ``--accuracy-runs`` picks some).
``--codec`` times the codecs in process and compares the top-k selection methods (sample,
chunk, exact: torch.topk with the tie rule) with plain ``torch.topk`` on the Kaggle MLP's
tensors and on one flat vector; it uses the fused CPU kernels unless DQRM_KERNELS=0 (the JSON
says which).  ``benchmarks/codec_ab.py`` runs the kernels and the PyTorch path interleaved in
one process and prints both and their ratios.

    python benchmarks/comm.py --np 2 4 --net loopback
    python benchmarks/comm.py --np 4 --net emulated --rates 1gbit 10gbit     # as root
    python benchmarks/comm.py --np 4 --accuracy
    python benchmarks/comm.py --codec --np 2 4 --out bench_out/comm_codec.json   # codec only, in-process
Writes bench_out/comm.json (override with --out) and prints it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import KAGGLE_CARDINALITIES, VENV_BIN, env, machine, run_checked  # noqa: E402

CONFIGS = {  # name -> (emb, mlp, error_feedback, collective)
    "dense_emb_small_tables": None,
    "sparse_fp32": ("none", "none", "none", "allgather"),
    "sparse_int8": ("int8", "int8", "mlp", "allgather"),
    "sparse_int4": ("int4", "int4", "mlp", "allgather"),
    "mlp_int8_ef": ("none", "int8", "mlp", "allgather"),
    "mlp_int8_no_ef": ("none", "int8", "none", "allgather"),
    "sparse_int8_two_phase": ("int8", "int8", "mlp", "two-phase"),
    **{f"mlp_topk{r}{v.replace('+', '_')}_ef": ("none", f"topk:{r}{v}", "mlp", "allgather")
       for r in ("0.1", "0.01", "0.001") for v in ("", "+int8")},
}
TOPK_RATIOS = (0.1, 0.01, 0.001)
SMALL_TABLE_ROWS = 100_000


def _zipf_ids(gen, card: int, n: int, a: float = 1.1):
    """n ids in [0, card) with P(rank r) ~ r^-a, scattered over the table by a fixed bijection."""
    import torch
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    hi = card ** (1 - a)
    r = torch.floor((1 + u * (hi - 1)) ** (1 / (1 - a))).clamp(1, card).to(torch.int64) - 1
    return (r * 2654435761 + 12345) % card


def worker(steps: int, out: str, configs: list[str]) -> None:
    import torch

    from dqrm_mpi.comm.backend import HorovodBackend
    from dqrm_mpi.comm.sync import DenseExchange, SparseExchange
    from dqrm_mpi.compression import get_compressor
    from dqrm_mpi.model.dlrm import BottomMLP, TopMLP
    from dqrm_mpi.model.config import model_config_from_preset

    backend = HorovodBackend()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = model_config_from_preset("kaggle", KAGGLE_CARDINALITIES)
    mlp_shapes = {f"bottom.{n}": p.shape for n, p in BottomMLP(13, cfg.bottom_mlp).named_parameters()}
    mlp_shapes.update({f"top.{n}": p.shape for n, p in TopMLP(cfg.num_interactions, cfg.top_mlp).named_parameters()})
    dim, batch, cards = cfg.embedding_dim, 128, KAGGLE_CARDINALITIES
    offsets = torch.tensor([0, *torch.tensor(cards).cumsum(0).tolist()])
    names = [f"embeddings.tables.{t}.weight" for t in range(26)]
    results = {}
    for name in configs:
        spec = CONFIGS[name]
        if spec is None:
            small = [t for t, c in enumerate(cards) if c <= SMALL_TABLE_ROWS]
            mlp = DenseExchange(backend, mlp_shapes, get_compressor("none"))
        else:
            emb_c, mlp_c, ef, collective = spec
            two = collective == "two-phase"
            mlp = DenseExchange(backend, mlp_shapes, get_compressor(mlp_c), "channel", ef in ("mlp", "both"), two)
            emb = SparseExchange(backend, names, list(cards), dim, get_compressor(emb_c), "table",
                                 ef in ("emb", "both"), two)
        backend.traffic.take()
        backend.barrier()
        per_step = []
        for step in range(steps + 2):  # 2 warm-up steps
            gen = torch.Generator().manual_seed(10_000 * step + backend.rank)
            grads = {n: torch.randn(s, generator=gen) * 1e-3 for n, s in mlp_shapes.items()}
            ids = torch.stack([_zipf_ids(gen, c, batch) for c in cards], dim=1)  # [batch, 26]
            backend.barrier()
            t0 = time.perf_counter()
            if spec is None:
                tables = [torch.zeros(cards[t], dim) for t in small]
                for tab, t in zip(tables, small):
                    tab.index_add_(0, ids[:, t], torch.randn(batch, dim, generator=gen) * 1e-3)
                t0 = time.perf_counter()
                backend.allreduce_average(tables, name="grad.emb.dense", kind="emb")
                mlp.exchange(grads)
            else:
                gid = torch.unique(ids + offsets[:-1])  # coalesced rows, sorted
                vals = torch.randn(gid.numel(), dim, generator=gen) * 1e-3
                t0 = time.perf_counter()
                mlp.exchange(grads)
                emb.exchange(gid, vals)
            wall = time.perf_counter() - t0
            t = backend.traffic.take()
            if step >= 2:
                br = t["comm_breakdown"]
                kind = lambda k, f: sum(v[f] for key, v in br.items() if key.startswith(k + "/"))  # noqa: E731
                per_step.append({"wall": wall, "comm_seconds": t["comm_seconds"], "codec_seconds": t["codec_seconds"],
                                 "sent": t["comm_bytes_sent"], "received": t["comm_bytes_received"],
                                 "emb_sent": kind("emb", "sent"), "mlp_sent": kind("mlp", "sent"),
                                 "emb_received": kind("emb", "received"), "mlp_received": kind("mlp", "received")})
        mean = {k: sum(s[k] for s in per_step) / len(per_step) for k in per_step[0]}
        results[name] = backend.allgather_object(mean, name=f"bench.{name}")
    if backend.rank == 0:
        Path(out).write_text(json.dumps(results))


class _LocalBackend:
    """In-process stand-in for ``world`` ranks (codec micro benchmark): collectives return
    ``world`` copies of this rank's payload, so the codec does every rank's decoding work.
    The copying is recorded as collective seconds, so the exchanges' codec clock (wall time
    minus collectives, as in the comm log) leaves it out."""

    def __init__(self, world: int) -> None:
        from dqrm_mpi.comm.traffic import TrafficMeter
        self.rank, self.size, self.traffic = 0, world, TrafficMeter()

    def _collective(self, kind, collective, tensors, make):
        """make() the result; record what this rank hands over (no dim-0 counts) and the time."""
        t0 = time.perf_counter()
        out = make()
        self.traffic.record(kind, collective, sum(t.numel() * t.element_size() for t in tensors), 0,
                            time.perf_counter() - t0)
        return out

    def allgather_stacked(self, t, name, kind):
        return self._collective(kind, "allgather", [t], lambda: t.unsqueeze(0).expand(self.size, *t.shape).clone())

    def allgather(self, tensors, name, kind):
        return self._collective(kind, "allgather", tensors,
                                lambda: [[t.clone() for _ in range(self.size)] for t in tensors])

    def allreduce_average(self, tensors, name, kind):
        return self._collective(kind, "allreduce", tensors, lambda: [t.clone() for t in tensors])

    # the exchanges' start / wait form: the collective is done at start, wait hands the result back
    def allgather_stacked_start(self, t, name, kind):
        return self.allgather_stacked(t, name, kind)

    def allgather_start(self, tensors, name, kind):
        return self.allgather(tensors, name, kind)

    def allreduce_start(self, tensors, name, kind):
        return self.allreduce_average(tensors, name, kind)

    def wait(self, inflight):
        return inflight


def codec(world: int, steps: int, configs: list[str], batch: int) -> dict:
    """Codec seconds per step (compress + decompress + error feedback, no network) at Kaggle
    dimensions, in this process, as one of ``world`` ranks; OMP threads as set.  Top-k rows
    run once per selection method (``name`` is the default, sample; ``name[exact]``, ``name[chunk]``)."""
    import torch

    from dqrm_mpi.compression import get_compressor
    from dqrm_mpi.compression.sparse import SELECT_METHODS, SparseCompressor
    from dqrm_mpi.model.config import model_config_from_preset
    from dqrm_mpi.model.dlrm import BottomMLP, TopMLP

    cfg = model_config_from_preset("kaggle", KAGGLE_CARDINALITIES)
    mlp_shapes = {f"bottom.{n}": p.shape for n, p in BottomMLP(13, cfg.bottom_mlp).named_parameters()}
    mlp_shapes.update({f"top.{n}": p.shape for n, p in TopMLP(cfg.num_interactions, cfg.top_mlp).named_parameters()})
    backend = _LocalBackend(world)
    out = {"world": world, "batch": batch, "threads": torch.get_num_threads(),
           "mlp_params": sum(torch.Size(s).numel() for s in mlp_shapes.values()), "configs": {}}
    for name in configs:
        spec = CONFIGS[name]
        if spec is None or spec[3] == "two-phase":
            continue  # dense tables: no codec; two-phase needs a real alltoall
        emb_c, mlp_c, ef, _ = spec
        for select in (SELECT_METHODS if mlp_c.startswith("topk") else (None,)):
            mlp = get_compressor(mlp_c) if select is None else SparseCompressor(mlp_c, select)
            key = name if select in (None, "sample") else f"{name}[{select}]"
            out["configs"][key] = _codec_steps(backend, mlp_shapes, mlp, get_compressor(emb_c), ef, steps, batch)
    out["topk_selection"] = selection(mlp_shapes, steps)
    return out


def _codec_steps(backend, mlp_shapes: dict, mlp_c, emb_c, ef: str, steps: int, batch: int) -> dict:
    """Median codec ms per step of the MLP and embedding exchanges over ``backend`` (no network),
    by the exchanges' own codec clock (as logged in training), and the exchanges' wall time."""
    import torch

    from dqrm_mpi.comm.sync import DenseExchange, SparseExchange

    cards, dim = KAGGLE_CARDINALITIES, 16
    offsets = torch.tensor([0, *torch.tensor(cards).cumsum(0).tolist()])
    names = [f"embeddings.tables.{t}.weight" for t in range(26)]
    mlp = DenseExchange(backend, mlp_shapes, mlp_c, "channel", ef in ("mlp", "both"))
    emb = SparseExchange(backend, names, list(cards), dim, emb_c, "table", ef in ("emb", "both"))
    times: dict[str, list[float]] = {"mlp": [], "emb": [], "wall": [], "cpu": []}
    rows, mlp_bytes = [], []
    for step in range(steps + 2):
        gen = torch.Generator().manual_seed(step)
        grads = {n: torch.randn(s, generator=gen) * 1e-3 for n, s in mlp_shapes.items()}
        gid = torch.unique(torch.stack([_zipf_ids(gen, c, batch) for c in cards], dim=1) + offsets[:-1])
        vals = torch.randn(gid.numel(), dim, generator=gen) * 1e-3
        backend.traffic.take()
        t0, c0 = time.perf_counter(), time.thread_time()
        mlp.exchange(grads)
        emb.exchange(gid, vals)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        if step >= 2:  # the codec clock of the exchanges (what the comm log reports)
            times["mlp"].append(backend.traffic.codec["mlp"])
            times["emb"].append(backend.traffic.codec["emb"])
            times["wall"].append(wall)
            times["cpu"].append(cpu)
            rows.append(gid.numel())
            mlp_bytes.append(sum(v for k, v in backend.traffic.sent.items() if k.startswith("mlp/")))
    backend.traffic.take()
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"mlp_codec_ms_p50": round(med(times["mlp"]) * 1e3, 3),
            "emb_codec_ms_p50": round(med(times["emb"]) * 1e3, 3),
            "codec_ms_p50": round(med([a + b for a, b in zip(times["mlp"], times["emb"])]) * 1e3, 3),
            "exchange_wall_ms_p50": round(med(times["wall"]) * 1e3, 3),
            # this thread's CPU time in both exchanges (with the stand-in collectives): steadier
            # than wall time on a shared machine
            "exchange_cpu_ms_p50": round(med(times["cpu"]) * 1e3, 3),
            "emb_rows_per_rank": round(sum(rows) / len(rows)),
            "mlp_sent_bytes_per_step": round(sum(mlp_bytes) / len(mlp_bytes))}


def selection(mlp_shapes: dict, steps: int, flat_numel: int = 4_000_000) -> dict:
    """ms per step selecting the top-k of every Kaggle MLP tensor (one flat vector of all of
    them, as the compressor does) and of one flat vector of ``flat_numel`` values, by each
    method and by plain ``torch.topk`` per tensor (no tie rule), with ratios to torch.topk
    from the same run."""
    import torch

    from dqrm_mpi.compression.sparse import SELECT_METHODS, select_topk_segments

    gen = torch.Generator().manual_seed(0)
    mlp_sizes = [torch.Size(s).numel() for s in mlp_shapes.values()]
    targets = {"kaggle_mlp": (torch.randn(sum(mlp_sizes), generator=gen).abs(), mlp_sizes),
               "flat": (torch.randn(flat_numel, generator=gen).abs(), [flat_numel])}

    def torch_topk(a, sizes, ks):
        lo = 0
        for n, k in zip(sizes, ks):
            torch.topk(a[lo:lo + n], k, sorted=False)
            lo += n

    out = {"mlp_numel": sum(mlp_sizes), "flat_numel": flat_numel}
    for target, (a, sizes) in targets.items():
        for ratio in TOPK_RATIOS:
            ks = [math.ceil(ratio * n) for n in sizes]
            fns = {"torch.topk": lambda: torch_topk(a, sizes, ks),
                   **{m: (lambda m=m: select_topk_segments(a, sizes, ks, m, gen)) for m in SELECT_METHODS}}
            row = {}
            for name, fn in fns.items():
                times: list[float] = []
                for step in range(steps + 2):
                    t0 = time.perf_counter()
                    fn()
                    if step >= 2:
                        times.append(time.perf_counter() - t0)
                row[f"{name}_ms_p50"] = round(sorted(times)[len(times) // 2] * 1e3, 3)
            for name in fns:
                row[f"{name}_vs_torch.topk"] = round(row[f"{name}_ms_p50"] / row["torch.topk_ms_p50"], 3)
            out[f"{target} ratio {ratio}"] = row
    return out


def summarize(per_rank: dict[str, list[dict]]) -> dict:
    out = {}
    for name, ranks in per_rank.items():
        mean = lambda k: sum(r[k] for r in ranks) / len(ranks)  # noqa: E731
        out[name] = {"step_ms_slowest_rank": round(max(r["wall"] for r in ranks) * 1e3, 3),
                     "comm_ms_mean": round(mean("comm_seconds") * 1e3, 3),
                     "codec_ms_mean": round(mean("codec_seconds") * 1e3, 3),
                     **{f"{k}_bytes_per_rank": round(mean(k)) for k in
                        ("sent", "received", "emb_sent", "mlp_sent", "emb_received", "mlp_received")}}
    base = out.get("sparse_fp32")
    if base:
        for name, r in out.items():
            r["sent_ratio_vs_sparse_fp32"] = round(r["sent_bytes_per_rank"] / base["sent_bytes_per_rank"], 4)
            r["emb_sent_ratio_vs_sparse_fp32"] = round(r["emb_sent_bytes_per_rank"] / base["emb_sent_bytes_per_rank"], 4)
            r["mlp_sent_ratio_vs_fp32"] = round(r["mlp_sent_bytes_per_rank"] / base["mlp_sent_bytes_per_rank"], 4)
    return out


def launch_worker(np_: int, net: str, rate: str | None, steps: int, configs: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        args = [sys.executable, str(Path(__file__).resolve()), "--worker", "--steps", str(steps),
                "--json", str(out), "--configs", *configs]
        e = env()
        e["OMP_NUM_THREADS"] = "1"
        e["PYTHONPATH"] = str(ROOT)
        if net == "loopback":
            cmd = [str(VENV_BIN / "horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}", *args]
        else:
            cmd = ["bash", str(ROOT / "launch/netns_cluster.sh"), "session", str(np_), rate, "0", "--", *args]
        run_checked(cmd, e, timeout=1800)
        return summarize(json.loads(out.read_text()))


ACCURACY_RUNS = {
    "uncompressed": [],
    "int8_mlp_ef": ["--emb-compress", "int8", "--mlp-compress", "int8"],
    "int8_no_ef": ["--emb-compress", "int8", "--mlp-compress", "int8", "--error-feedback", "none"],
    "mlp_topk0.01_int8_ef": ["--mlp-compress", "topk:0.01+int8"],
    "mlp_topk0.01_int8_warmup100_ef": ["--mlp-compress", "topk:0.01+int8@warmup=100"],
    "mlp_topk0.01_int8_warmup200_ef": ["--mlp-compress", "topk:0.01+int8@warmup=200"],
}


def accuracy(np_: int, rows: int, epochs: int, names: list[str]) -> dict:
    """Test AUC of dqrm-train on planted synthetic data: uncompressed vs INT8 +/- MLP error
    feedback vs MLP top-k 0.01 with INT8 values and error feedback, +/- warm-up (``names``: which runs)."""
    from dqrm_mpi.data.synthetic import PlantedClickModel, write_synthetic_dataset

    cards = (1460, 583, 5000, 5000, 305, 24, 5000, 633, 3, 5000, 5000, 5000, 3194, 27, 5000, 5000, 10,
             5000, 2173, 4, 5000, 18, 15, 5000, 105, 5000)
    runs = {name: extra for name, extra in ACCURACY_RUNS.items() if name == "uncompressed" or name in names}
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic_dataset(data, {"train": rows, "val": rows // 10, "test": rows // 5},
                                PlantedClickModel(cards, seed=5))
        e = env()
        e["OMP_NUM_THREADS"] = "1"
        for name, extra in runs.items():
            out = Path(tmp) / name
            cmd = [str(VENV_BIN / "horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}", str(VENV_BIN / "dqrm-train"),
                   "--data", str(data), "--out", str(out), "--preset", "kaggle", "--batch-size", "512",
                   "--epochs", str(epochs), "--eval-splits", "test", *extra]
            t0 = time.time()
            run_checked(cmd, e, timeout=3600)
            s = json.loads((out / "summary.json").read_text())
            res[name] = {"test_auc": s["final"]["test"]["auc"], "best_test_auc": s["best_test"]["auc"],
                         "steps": s["steps"], "seconds": round(time.time() - t0, 1),
                         "comm_bytes_sent_per_step_rank0": s["comm_bytes_sent_per_step"]["mean"],
                         # from the run's comm log (rank 0's figures per step)
                         "mlp_bytes_sent_per_step_rank0": s["comm_per_rank"]["per_rank"]["0"]["mlp.sent"]["mean"],
                         "codec_ms_per_step_rank0": round(
                             s["comm_per_rank"]["per_rank"]["0"]["codec_seconds"]["mean"] * 1e3, 3)}
    base = res["uncompressed"]["test_auc"]
    for r in res.values():
        r["auc_delta_vs_uncompressed"] = round(r["test_auc"] - base, 5)
    res["setup"] = {"ranks": np_, "train_rows": rows, "epochs": epochs, "preset": "kaggle (small tables)",
                    "batch": 512, "dataset": "planted synthetic"}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--np", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--net", choices=["loopback", "emulated", "both", "none"], default="loopback")
    ap.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--accuracy-rows", type=int, default=200_000)
    ap.add_argument("--accuracy-epochs", type=int, default=1)
    ap.add_argument("--accuracy-runs", nargs="+", default=list(ACCURACY_RUNS), choices=list(ACCURACY_RUNS),
                    help="which accuracy runs (uncompressed always runs: the reference)")
    ap.add_argument("--out", default=str(ROOT / "bench_out/comm.json"))
    ap.add_argument("--codec", action="store_true",
                    help="codec micro benchmark only: in-process, no network, seconds per step spent "
                         "compressing/decompressing at Kaggle dimensions as one of each --np ranks")
    ap.add_argument("--batch", type=int, default=128, help="per-rank batch of the --codec benchmark")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.steps, a.json, a.configs)
        return
    if a.codec:
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        from dqrm_mpi import kernels
        res = {"benchmark": "comm --codec", "machine": machine(), "kernels": kernels.enabled(),
               "runs": [codec(np_, a.steps, a.configs, a.batch) for np_ in a.np]}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
        print(json.dumps(res, indent=2))
        return
    result = {"benchmark": "comm", "machine": machine(), "steps": a.steps, "per_rank_batch": 128,
              "note": "bytes per step and rank; sent = tensors handed to Horovod", "runs": []}
    nets = {"both": ["loopback", "emulated"], "none": []}.get(a.net, [a.net])
    for net in nets:
        for rate in ([None] if net == "loopback" else a.rates):
            for np_ in a.np:
                r = launch_worker(np_, net, rate, a.steps, a.configs)
                result["runs"].append({"net": net if rate is None else f"emulated {rate}", "ranks": np_, "configs": r})
                print(f"{net} {rate or ''} np={np_} done", file=sys.stderr)
    if a.accuracy:
        result["accuracy"] = accuracy(max(a.np), a.accuracy_rows, a.accuracy_epochs, a.accuracy_runs)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
