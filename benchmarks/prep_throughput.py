"""Throughput of `dqrm-prep criteo` on a generated Kaggle-format file.

Generates (once, cached) a raw file of ``--rows`` lines with `dqrm-prep synth`, then
runs `dqrm-prep criteo` in a fresh process for each configuration (hash mode with
``--max-ind-range``, contiguous mode; 1 and 2 workers), measuring wall time, CPU time
(user + system, summed over the process tree) and the peak resident memory of the
process tree (largest process and the sum).  Prints JSON.

On a shared machine the configurations are interleaved (each repeat runs every mode
with 1 and then 2 workers back to back), so a busy spell hurts both worker counts
alike; the summary gives per configuration the best and median rows/s, the ratio of
2 to 1 workers (best and per repeat), and whether the targets are met.

    python benchmarks/prep_throughput.py --rows 2000000 --workdir /tmp/prep-bench --repeat 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


_TICK = os.sysconf("SC_CLK_TCK")


def _tree_rss(pid: int, cpu: dict[int, float] | None = None) -> tuple[int, int]:
    """(sum, max) resident bytes of pid and its descendants (Linux /proc); records each
    process's CPU seconds so far in ``cpu``."""
    pids, frontier = [pid], [pid]
    while frontier:
        nxt = []
        for p in frontier:
            try:
                with open(f"/proc/{p}/task/{p}/children") as f:
                    nxt += [int(x) for x in f.read().split()]
            except OSError:
                pass
        pids += nxt
        frontier = nxt
    total = biggest = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
        total += rss
        biggest = max(biggest, rss)
        if cpu is not None:
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                cpu[p] = max(cpu.get(p, 0.0), (int(fields[11]) + int(fields[12])) / _TICK)
            except (OSError, IndexError, ValueError):
                pass
    return total, biggest


def run_measured(cmd: list[str]) -> dict:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]
    cpu: dict[int, float] = {}

    def watch() -> None:
        while proc.poll() is None:
            s, m = _tree_rss(proc.pid, cpu)
            peak[0], peak[1] = max(peak[0], s), max(peak[1], m)
            time.sleep(0.05)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    th.join()
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    # CPU of the process tree: sampled per process (fork-server workers are not children
    # the parent waits for, so rusage would miss them); the last 50 ms may be missed.
    return {"wall_s": round(wall, 3), "cpu_s": round(sum(cpu.values()), 2), "loadavg_1m_before": round(load, 2),
            "peak_rss_tree_mb": round(peak[0] / 2**20, 1),
            "peak_rss_max_process_mb": round(peak[1] / 2**20, 1), "stderr_tail": err.strip().splitlines()[-1:]}


def machine() -> dict:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        info["cpus_available"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
        info["loadavg_before"] = os.getloadavg()
    except OSError:
        pass
    import numpy, pyarrow
    info["numpy"], info["pyarrow"] = numpy.__version__, pyarrow.__version__
    return info


TARGETS = {("hash", 2): 300_000, ("contiguous", 2): 150_000}  # rows/s on the 2-core machine


def summarize(runs: list[dict], modes: list[str], workers: list[int]) -> dict:
    out: dict = {}
    for mode in modes:
        m: dict = {}
        for w in workers:
            rs = [r for r in runs if r["mode"] == mode and r["workers"] == w]
            if not rs:
                continue
            rate = sorted(r["rows_per_s"] for r in rs)
            m[f"workers_{w}"] = {"best_rows_per_s": rate[-1], "median_rows_per_s": rate[len(rate) // 2],
                                 "min_cpu_s": min(r["cpu_s"] for r in rs),
                                 "max_peak_rss_tree_mb": max(r["peak_rss_tree_mb"] for r in rs)}
            if (mode, w) in TARGETS:
                m[f"workers_{w}"]["target_rows_per_s"] = TARGETS[(mode, w)]
                m[f"workers_{w}"]["target_met_best"] = rate[-1] >= TARGETS[(mode, w)]
        if len(workers) >= 2 and all(f"workers_{w}" in m for w in workers[:2]):
            a, b = workers[0], workers[1]
            m[f"ratio_{b}_to_{a}_workers_best"] = round(m[f"workers_{b}"]["best_rows_per_s"]
                                                        / m[f"workers_{a}"]["best_rows_per_s"], 3)
            per = []
            for rep in sorted({r["repeat"] for r in runs}):
                ra = [r for r in runs if r["mode"] == mode and r["workers"] == a and r["repeat"] == rep]
                rb = [r for r in runs if r["mode"] == mode and r["workers"] == b and r["repeat"] == rep]
                if ra and rb:
                    per.append(round(rb[0]["rows_per_s"] / ra[0]["rows_per_s"], 3))
            m[f"ratio_{b}_to_{a}_workers_per_repeat"] = per
        out[mode] = m
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--workdir", default="/tmp/dqrm-prep-bench")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--modes", default="hash,contiguous")
    ap.add_argument("--max-ind-range", type=int, default=1_000_000)
    ap.add_argument("--preset", default="large", help="synth cardinality preset (large: up to 1M values/column)")
    ap.add_argument("--shard-rows", type=int, default=500_000)
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--repeat", type=int, default=1, help="run every configuration this many times, interleaved")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    raw = work / f"synth_{args.rows}_{args.preset}.txt"
    exe = [sys.executable, "-m", "data_prep.cli"]
    result = {"benchmark": "prep_throughput", "rows": args.rows, "preset": args.preset, "machine": machine(), "runs": []}
    if not raw.is_file():
        g = run_measured(exe + ["synth", str(raw), "--rows", str(args.rows), "--seed", "0", "--preset", args.preset,
                                "--no-progress"])
        result["synth"] = {"wall_s": g["wall_s"], "rows_per_s": round(args.rows / g["wall_s"])}
    result["raw_bytes"] = raw.stat().st_size
    workers = [int(x) for x in args.workers.split(",")]
    modes = args.modes.split(",")
    for rep in range(args.repeat):
        for mode in modes:
            for w in workers:
                out = work / f"out_{mode}_{w}"
                cmd = exe + ["criteo", str(raw), str(out), "--workers", str(w), "--overwrite", "--no-progress",
                             "--shard-rows", str(args.shard_rows)]
                if mode == "hash":
                    cmd += ["--max-ind-range", str(args.max_ind_range)]
                r = run_measured(cmd)
                with open(out / "meta.json") as f:
                    meta = json.load(f)
                r.update({"mode": mode, "workers": w, "repeat": rep, "rows_per_s": round(args.rows / r["wall_s"]),
                          "mb_per_s": round(raw.stat().st_size / 2**20 / r["wall_s"], 1),
                          "embedding_rows": sum(meta["cardinalities"]),
                          "stage_seconds": meta["extra"].get("stage_seconds")})
                result["runs"].append(r)
                print(json.dumps({k: r[k] for k in ("mode", "workers", "repeat", "wall_s", "cpu_s", "rows_per_s",
                                                    "peak_rss_tree_mb", "loadavg_1m_before")}),
                      file=sys.stderr, flush=True)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
    result["summary"] = summarize(result["runs"], modes, workers)
    result["machine"]["loadavg_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
