"""Runs a plan's steps as ordinary subprocesses inside the report directory.

A step is finished when the files it produces exist and its record (written after it
succeeded) holds the same command line and the same records of the steps it needs, so
an interrupted suite resumes and a changed command or a re-run input re-runs it.  A
failed step leaves ``<record>.failed.json`` (exit code and the end of its log); the
steps after it are skipped and the suite goes on.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable

from .plan import Plan, Step, cluster_reason


class Interrupted(Exception):
    """Ctrl-C (SIGINT) stopped the suite in the middle of ``steps``: nothing of them counts
    (they have no record; a re-run redoes them)."""

    def __init__(self, steps: list[Step]) -> None:
        which = ", ".join(f"{s.key} (its log: {s.log})" for s in steps) or "none (between steps)"
        super().__init__(f"interrupted during step {which}; nothing of it is used: run the same command again "
                         "to continue (finished steps are skipped, an interrupted one is redone)")
        self.keys = [s.key for s in steps]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def failure_path(out: Path, step: Step) -> Path:
    return out / (step.record.removesuffix(".json") + ".failed.json")


def is_finished(out: Path, step: Step, plan: Plan) -> bool:
    record = read_json(out / step.record)
    return (record is not None and record.get("argv") == list(step.argv)
            and record.get("after") == _after_stamps(out, step, plan)
            and all((out / p).exists() for p in step.produces))


def _after_stamps(out: Path, step: Step, plan: Plan) -> dict[str, str | None]:
    return {key: (read_json(out / plan.steps[key].record) or {}).get("finished") for key in step.after}


def execute(plan: Plan, out: Path, keys: list[str], echo: Callable[[str], None] = print, jobs: int = 1) -> list[str]:
    """Run the steps ``keys`` that are not blocked or finished; returns the keys of the failed ones.

    ``jobs``: steps run at once (each started in order as soon as the steps it needs are
    done), every one with OMP_NUM_THREADS set to its share of the cores unless the
    environment sets it (torch threads: dqrm-train's default follows it)."""
    failed: dict[str, str] = {}  # key -> why
    todo = [plan.steps[k] for k in keys if not plan.steps[k].blocked]
    heads = {step.key: f"[{i}/{len(todo)}] {step.key}" for i, step in enumerate(todo, 1)}
    waiting, done = list(todo), set()
    threads = None if jobs == 1 else str(max(1, len(os.sched_getaffinity(0)) // jobs))
    running: dict[Future, Step] = {}
    try:  # Ctrl-C reaches this thread (and the steps, which end): no record for what ran
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            while waiting or running:
                # the first step (in order) whose steps are done, while a job is free
                while len(running) < jobs and (step := next(
                        (s for s in waiting if all(k in done or k not in heads for k in s.after)), None)):
                    waiting.remove(step)
                    if is_finished(out, step, plan):
                        echo(f"{heads[step.key]}: finished before, skipped")
                        done.add(step.key)
                        continue
                    broken = [k for k in step.after if k in failed]
                    if broken:
                        cause = failed[broken[0]]
                        why = cause if cause.startswith("not run:") else f"not run: {broken[0]} failed: {cause}"
                        failed[step.key] = why
                        _fail(out, step, None, why, log=plan.steps[broken[0]].log)
                        echo(f"{heads[step.key]}: {why}")
                        done.add(step.key)
                        continue
                    echo(f"{heads[step.key]}: {step.shell()}")
                    running[pool.submit(_timed_run, out, step, threads)] = step
                if not running:
                    if waiting:
                        raise AssertionError(f"{waiting[0].key} needs steps that come after it")
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in sorted(finished, key=lambda f: todo.index(running[f])):
                    step = running.pop(future)
                    rc, error, seconds = future.result()
                    head = heads[step.key]
                    if rc == 0:
                        failure_path(out, step).unlink(missing_ok=True)
                        write_json(out / step.record, {"argv": list(step.argv),
                                                       "after": _after_stamps(out, step, plan),
                                                       "finished": datetime.now(timezone.utc).isoformat(),
                                                       "seconds": round(seconds, 3)})
                        echo(f"{head}: done in {seconds:.1f} s")
                    else:
                        _fail(out, step, rc, error)
                        failed[step.key] = error
                        echo(f"{head}: FAILED (exit {rc}): {error}  [log: {step.log}]")
                    done.add(step.key)
    except KeyboardInterrupt:
        raise Interrupted(list(running.values())) from None
    return [s.key for s in todo if s.key in failed]


def _timed_run(out: Path, step: Step, threads: str | None) -> tuple[int, str, float]:
    start = time.perf_counter()
    rc, error = _run(out, step, threads)
    return rc, error, time.perf_counter() - start


def _run(out: Path, step: Step, threads: str | None = None) -> tuple[int, str]:
    """Run one step (``threads``: its OMP_NUM_THREADS unless set); returns (exit code, the last
    lines of its log when it failed)."""
    log = out / step.log
    log.parent.mkdir(parents=True, exist_ok=True)
    (out / step.record).unlink(missing_ok=True)  # unfinished until it succeeds again
    if shutil.which(step.argv[0]) is None:
        return 127, f"{step.argv[0]} not found on PATH (activate the virtual environment)"
    stdout_tmp = out / (step.stdout + ".tmp") if step.stdout else None
    with open(log, "w") as err:
        err.write(f"$ {step.shell()}\n")
        err.flush()
        with open(stdout_tmp, "w") if stdout_tmp else open(os.devnull, "w") as stdout:
            proc = subprocess.run(step.argv, cwd=out, stdin=subprocess.DEVNULL, env=_env(step, threads),
                                  stdout=stdout if stdout_tmp else err, stderr=err)
    if proc.returncode == 0:
        if stdout_tmp:
            os.replace(stdout_tmp, out / step.stdout)
        return 0, ""
    if stdout_tmp:
        stdout_tmp.unlink(missing_ok=True)
    return proc.returncode, last_error(log)


def _env(step: Step, threads: str | None = None) -> dict[str, str]:
    """The environment of a step.  MPI launches get Open MPI's yield-when-idle unless it is set:
    a profile may place more ranks than cores on one machine (4 on 2 cores), where ranks that
    busy-poll for messages take the cores the other ranks need (3-5x slower exchanges here).
    ``threads``: OMP_NUM_THREADS unless it is set (steps run side by side)."""
    env = dict(os.environ)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", threads)
    if step.argv[0] in ("horovodrun", "mpirun"):
        env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    return env


def last_error(log: Path) -> str:
    """The most telling line at the end of a log (an 'Error' line if there is one)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-40:]
    errors = [ln for ln in lines if "error" in ln.lower() or "Error" in ln]
    return (errors or lines or ["(empty log)"])[-1][:300]


def _fail(out: Path, step: Step, rc: int | None, error: str, log: str | None = None) -> None:
    """Record why ``step`` failed and remove what an earlier run of it left (no stale cells)."""
    for path in (step.record, *step.produces):
        (out / path).unlink(missing_ok=True)
    write_json(failure_path(out, step), {"argv": list(step.argv), "exit_code": rc, "error": error,
                                         "log": log or step.log})


def write_batch_script(plan: Plan, out: Path) -> Path:
    """``scripts/run_all.sh``: every step of the plan, in order, for a cluster allocation."""
    nodes = max([int(s.argv[2]) for s in plan.steps.values() if s.argv[0] == "mpirun"] or [1])
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name=dqrm-repro-{plan.profile.name}",
             f"#SBATCH --ntasks={nodes}",
             "#SBATCH --output=scripts/run_all.%j.log",
             f"# {plan.profile.description}",
             "# Submit from the report directory (sbatch scripts/run_all.sh) or run it inside an allocation;",
             "# then `dqrm-repro report .` fills the tables.  Multi-rank runs use mpirun, which takes its",
             "# hosts from the allocation.",
             "# A failed step is reported at the end; the steps after it still run.",
             "set -uo pipefail",
             'cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"',
             "failed=0"]
    dirs: set[str] = set()
    for step in plan.steps.values():
        if step.blocked not in (None, cluster_reason(plan.profile)):
            lines.append(f"# {step.key}: {step.blocked}")
            continue
        folder = str(Path(step.log).parent)
        if folder not in dirs:
            dirs.add(folder)
            lines.append(f"mkdir -p {folder}")
        lines.append(f"{step.shell()} || {{ echo 'FAILED: {step.key}'; failed=1; }}")
    lines += ["dqrm-repro report .", 'exit "$failed"']
    path = out / "scripts" / "run_all.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path
