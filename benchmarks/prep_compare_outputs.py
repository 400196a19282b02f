"""Does this checkout's `dqrm-prep criteo` write the same datasets as another checkout's?

Makes a few small inputs in ``--workdir`` (Criteo-like rows from `dqrm-prep synth`: a
Kaggle file, the same gzip-compressed, a Terabyte directory of days, and a file with
odd lines: upper-case and short hex values, bad lines), runs both checkouts on each
set-up (hash and contiguous mode, frequency threshold, sub-sampling, several workers and
piece sizes) and compares every output file byte for byte; meta.json is compared as
JSON without the fields that record timings.  Prints JSON; exits 1 on a difference.

    python benchmarks/prep_compare_outputs.py --base /work/wt/prep-base
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMING_FIELDS = ("stage_seconds", "wall_time_s")
LOCK_FILE = ".dqrm-prep.lock"  # holds the process id of the run that made it

SETUPS = {  # name: (input, options)
    "kaggle-contiguous-1w": ("kaggle.txt", ["--workers", "1"]),
    "kaggle-hash10M-2w-pieces": ("kaggle.txt", ["--workers", "2", "--max-ind-range", "10000000",
                                                "--piece-bytes", "3000000"]),
    "kaggle-hash2^32-2w": ("kaggle.txt", ["--workers", "2", "--max-ind-range", str(2**32)]),
    "kaggle-gz-hash1000-2w": ("kaggle.txt.gz", ["--workers", "2", "--max-ind-range", "1000"]),
    "kaggle-gz-contiguous-1w": ("kaggle.txt.gz", ["--workers", "1"]),
    "terabyte-contiguous-t2-3w": ("terabyte", ["--workers", "3", "--freq-threshold", "2"]),
    "terabyte-hash-subsample-2w": ("terabyte", ["--workers", "2", "--max-ind-range", "100000",
                                                "--sub-sample-rate", "0.5", "--seed", "3"]),
    "kaggle-threshold3-subsample-float-2w": ("kaggle.txt", ["--workers", "2", "--freq-threshold", "3",
                                                            "--sub-sample-rate", "0.3", "--label-dtype", "float32",
                                                            "--piece-bytes", "5000000"]),
    "odd-lines-skip-contiguous-2w": ("odd.txt", ["--workers", "2", "--bad-lines", "skip",
                                                 "--piece-bytes", "2000000"]),
    "odd-lines-skip-hash-t1-1w": ("odd.txt", ["--workers", "1", "--bad-lines", "skip", "--max-ind-range", "5000",
                                              "--freq-threshold", "1"]),
}


def run(checkout: Path, args: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    proc = subprocess.run([sys.executable, "-m", "data_prep.cli", *args], cwd=checkout, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{checkout}: {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def make_inputs(work: Path, rows: int) -> None:
    kaggle = work / "kaggle.txt"
    if not kaggle.is_file():
        run(REPO, ["synth", str(kaggle), "--rows", str(rows), "--profile", "criteo-like", "--seed", "5",
                   "--no-progress"])
    if not (work / "kaggle.txt.gz").is_file():
        with open(kaggle, "rb") as src, gzip.open(work / "kaggle.txt.gz", "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst)
    lines = kaggle.read_bytes().splitlines(keepends=True)
    tb = work / "terabyte"
    if not tb.is_dir():
        tb.mkdir()
        third = len(lines) // 3
        with gzip.open(tb / "day_0.gz", "wb", compresslevel=1) as f:
            f.writelines(lines[:third])
        (tb / "day_1").write_bytes(b"".join(lines[third:2 * third]))
        (tb / "day_2").write_bytes(b"".join(lines[2 * third:]))
    odd = work / "odd.txt"
    if not odd.is_file():
        out = []
        for i, line in enumerate(lines[: len(lines) // 2]):
            f = line.rstrip(b"\n").split(b"\t")
            if i % 97 == 5:
                f[15] = f[15].upper()  # upper-case hex: the same value as lower case
            if i % 89 == 7 and f[20]:
                f[20] = f[20].lstrip(b"0") or b"0"  # fewer than 8 digits
                f[21] = f[21][2:]
            if i % 1009 == 11:
                f[30] = b"xyz"  # not hexadecimal: a bad line
            if i % 1013 == 12:
                f = f[:-1]  # 39 fields: a bad line
            if i % 1019 == 13:
                f[3] = b"12a"  # dense not an integer: a bad line
            out.append(b"\t".join(f) + b"\n")
        odd.write_bytes(b"".join(out))


def same_output(a: Path, b: Path) -> list[str]:
    """The differences between datasets a and b (empty when they are the same)."""
    diffs = []
    files_a, files_b = (sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file() and p.name != LOCK_FILE)
                        for d in (a, b))
    if files_a != files_b:
        return [f"files differ: {[str(p) for p in files_a]} vs {[str(p) for p in files_b]}"]
    for rel in files_a:
        if rel.name == "meta.json":
            ma, mb = (json.loads((d / rel).read_text()) for d in (a, b))
            for m in (ma, mb):
                for k in TIMING_FIELDS:
                    m["extra"].pop(k, None)
            if ma != mb:
                diffs.append(f"{rel}: " + ", ".join(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k)))
        elif (a / rel).read_bytes() != (b / rel).read_bytes():
            diffs.append(f"{rel}: bytes differ")
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="the other checkout (e.g. a worktree of the base commit)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dqrm-prep-compare"))
    ap.add_argument("--rows", type=int, default=150_000)
    ap.add_argument("--only", default=None, help="comma-separated set-up names")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    make_inputs(args.workdir, args.rows)
    names = args.only.split(",") if args.only else list(SETUPS)
    result = {"base": str(args.base.resolve()), "new": str(REPO), "rows": args.rows, "setups": {}}
    for name in names:
        inp, opts = SETUPS[name]
        outs = {}
        for impl, checkout in (("base", args.base.resolve()), ("new", REPO)):
            outs[impl] = args.workdir / f"out_{impl}_{name}"
            run(checkout, ["criteo", str(args.workdir / inp), str(outs[impl]), "--overwrite", "--no-progress",
                           "--shard-rows", "20000", *opts])
        diffs = same_output(outs["base"], outs["new"])
        n_files = sum(1 for p in outs["new"].rglob("*") if p.is_file())
        result["setups"][name] = {"same": not diffs, "files": n_files, "diffs": diffs[:10]}
        print(json.dumps({name: result["setups"][name]}), file=sys.stderr, flush=True)
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)
    result["all_same"] = all(s["same"] for s in result["setups"].values())
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["all_same"] else 1)


if __name__ == "__main__":
    main()
