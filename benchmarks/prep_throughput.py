"""Throughput and peak memory of `dqrm-prep criteo` on a Criteo-like file.

Generates (once, cached in ``--workdir``) a raw Kaggle-format file of ``--rows`` lines
with `dqrm-prep synth --profile criteo-like` (cardinalities that grow with the rows as
Criteo's do: about 3 M distinct values in 2 M rows), then runs `dqrm-prep criteo` in a
fresh process for each configuration: hash mode (``--max-ind-range``, as users do for
Kaggle and Terabyte) and contiguous mode (vocabulary), with each worker count.  For each
run: wall time, rows/s, CPU seconds and peak memory of the whole process tree, sampled
every 50 ms from /proc: the largest process's RSS, the sum of all processes' RSS (pages
shared between processes, like the spilled files they map, counted in each) and the sum
of their PSS (shared pages divided among their users: what the tree really holds).
Prints JSON.

``--compare-to DIR`` runs the same commands with the checkout in DIR as well (for example
a detached worktree of an older commit), interleaved with this checkout's (each repeat
runs every configuration with both, back to back), and reports new/base ratios per
repeat: on a shared machine a busy spell then hurts both alike.

    python benchmarks/prep_throughput.py                       # 2 M rows, 2 workers, both modes
    python benchmarks/prep_throughput.py --compare-to /work/wt/prep-base --repeat 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGETS = {("hash", 2): 400_000, ("contiguous", 2): 300_000}  # rows/s with 2 workers (issue 10)
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree(pid: int) -> list[int]:
    """pid and its descendants (Linux /proc)."""
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
    return pids


def _sample(pid: int, cpu: dict[int, float]) -> tuple[int, int, int]:
    """(sum of RSS, sum of PSS, largest RSS) in bytes over the process tree of pid;
    records each process's CPU seconds so far in ``cpu``."""
    rss = pss = biggest = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                one = int(f.read().split()[1]) * _PAGE
            rss += one
            biggest = max(biggest, one)
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                        break
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu[p] = max(cpu.get(p, 0.0), (int(fields[11]) + int(fields[12])) / _TICK)
        except (OSError, IndexError, ValueError):
            continue
    return rss, pss, biggest


def run_measured(cmd: list[str], checkout: Path) -> dict:
    """Run ``cmd`` with ``checkout`` first on the Python path; its wall time, CPU and memory."""
    env = dict(os.environ, PYTHONPATH=str(checkout))
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=checkout, env=env)
        peak = [0, 0, 0]
        cpu: dict[int, float] = {}
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[:] = [max(a, b) for a, b in zip(peak, _sample(proc.pid, cpu))]
                done.wait(0.05)

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        _, status, usage = os.wait4(proc.pid, 0)  # usage: this process and the descendants it waited for
        wall = time.perf_counter() - t0
        done.set()
        th.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail[-30:]))
    # Fork-server workers are not reaped by the main process: their CPU comes from the samples.
    return {"wall_s": round(wall, 3), "cpu_s": round(max(sum(cpu.values()), usage.ru_utime + usage.ru_stime), 2),
            "loadavg_1m_before": round(load, 2),
            "peak_rss_max_process_mb": round(max(peak[2], usage.ru_maxrss * 1024) / 2**20, 1),
            "peak_rss_tree_mb": round(peak[0] / 2**20, 1), "peak_pss_tree_mb": round(peak[1] / 2**20, 1),
            "stderr_tail": tail[-1:]}


def machine() -> dict:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    info["loadavg_before"] = os.getloadavg()
    return info


def summarize(runs: list[dict], impls: list[str], modes: list[str], workers: list[int]) -> dict:
    out: dict = {}
    for mode in modes:
        for w in workers:
            key, m = f"{mode}_workers_{w}", {}
            for impl in impls:
                rs = [r for r in runs if (r["impl"], r["mode"], r["workers"]) == (impl, mode, w)]
                rate = [r["rows_per_s"] for r in rs]
                m[impl] = {"best_rows_per_s": max(rate), "median_rows_per_s": round(statistics.median(rate)),
                           "min_cpu_s": min(r["cpu_s"] for r in rs),
                           "max_peak_rss_max_process_mb": max(r["peak_rss_max_process_mb"] for r in rs),
                           "max_peak_rss_tree_mb": max(r["peak_rss_tree_mb"] for r in rs),
                           "max_peak_pss_tree_mb": max(r["peak_pss_tree_mb"] for r in rs)}
                if (mode, w) in TARGETS:
                    m[impl]["target_rows_per_s"] = TARGETS[(mode, w)]
                    m[impl]["target_met_best"] = max(rate) >= TARGETS[(mode, w)]
            if "base" in impls:
                pairs = {}
                for r in runs:
                    if (r["mode"], r["workers"]) == (mode, w):
                        pairs.setdefault(r["repeat"], {})[r["impl"]] = r["rows_per_s"]
                per = [round(p["new"] / p["base"], 3) for _, p in sorted(pairs.items()) if len(p) == 2]
                m["speedup_new_over_base_per_repeat"] = per
                m["speedup_new_over_base_median"] = round(statistics.median(per), 3)
            out[key] = m
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--workdir", default="/tmp/dqrm-prep-bench")
    ap.add_argument("--workers", default="2", help="comma-separated worker counts")
    ap.add_argument("--modes", default="hash,contiguous")
    ap.add_argument("--max-ind-range", type=int, default=10_000_000,
                    help="hash mode's --max-ind-range (10 M: the reference DLRM's Terabyte setting)")
    ap.add_argument("--profile", default="criteo-like", choices=["criteo-like", "planted"])
    ap.add_argument("--preset", default="large", help="planted profile's cardinality preset")
    ap.add_argument("--shard-rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=1, help="run every configuration this many times, interleaved")
    ap.add_argument("--compare-to", type=Path, default=None,
                    help="another checkout of the project (e.g. a worktree of the base commit) to run interleaved")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    name = args.profile if args.profile == "criteo-like" else f"planted-{args.preset}"
    raw = work / f"synth_{args.rows}_{name}.txt"
    exe = [sys.executable, "-m", "data_prep.cli"]
    checkouts = {"new": REPO}
    if args.compare_to is not None:
        checkouts["base"] = args.compare_to.resolve()
    result = {"benchmark": "prep_throughput", "rows": args.rows, "profile": args.profile,
              "max_ind_range": args.max_ind_range, "shard_rows": args.shard_rows,
              "checkouts": {k: str(v) for k, v in checkouts.items()}, "machine": machine(), "runs": []}
    if not raw.is_file():
        synth = ["synth", str(raw), "--rows", str(args.rows), "--seed", "0", "--profile", args.profile, "--no-progress"]
        if args.profile == "planted":
            synth += ["--preset", args.preset]
        g = run_measured(exe + synth, REPO)
        result["synth"] = {"wall_s": g["wall_s"], "rows_per_s": round(args.rows / g["wall_s"])}
    result["raw_bytes"] = raw.stat().st_size
    workers = [int(x) for x in args.workers.split(",")]
    modes = args.modes.split(",")
    for rep in range(args.repeat):
        for mode in modes:
            for w in workers:
                for impl, checkout in checkouts.items():
                    out = work / f"out_{impl}_{mode}_{w}"
                    cmd = exe + ["criteo", str(raw), str(out), "--workers", str(w), "--overwrite", "--no-progress",
                                 "--shard-rows", str(args.shard_rows)]
                    if mode == "hash":
                        cmd += ["--max-ind-range", str(args.max_ind_range)]
                    r = run_measured(cmd, checkout)
                    with open(out / "meta.json") as f:
                        meta = json.load(f)
                    r.update({"impl": impl, "mode": mode, "workers": w, "repeat": rep,
                              "rows_per_s": round(args.rows / r["wall_s"]),
                              "mb_per_s": round(raw.stat().st_size / 2**20 / r["wall_s"], 1),
                              "embedding_rows": sum(meta["cardinalities"]),
                              "distinct_values": sum(meta["extra"]["distinct_values"]),
                              "stage_seconds": meta["extra"].get("stage_seconds")})
                    result["runs"].append(r)
                    print(json.dumps({k: r[k] for k in ("impl", "mode", "workers", "repeat", "wall_s", "cpu_s",
                                                        "rows_per_s", "peak_pss_tree_mb", "loadavg_1m_before")}),
                          file=sys.stderr, flush=True)
                    shutil.rmtree(out, ignore_errors=True)
    result["summary"] = summarize(result["runs"], list(checkouts), modes, workers)
    result["machine"]["loadavg_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
