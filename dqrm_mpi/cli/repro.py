"""``dqrm-repro``: the DQRM paper's tables and figures from ordinary dqrm-prep / dqrm-train /
dqrm-export / dqrm-eval runs (a thin Click layer over dqrm_mpi.repro)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

from ..repro.plan import make_plan, ranks_of, specs_runs, steps_for
from ..repro.profiles import PROFILES, Profile
from ..repro.specs import FIGURES, TABLES
from .options import version_option

SETTINGS = "repro.json"  # in the report dir: the profile and options `report` re-renders with
ITEMS = TABLES + FIGURES


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@version_option
def main() -> None:
    """Reproduce the DQRM paper's Tables 1-8 and Figures 1-2 with one command.

    \b
    Example:
      dqrm-repro run smoke --out reports/smoke          # minutes, tiny planted data
      dqrm-repro run small --out reports/small          # <= 2 h on 2 cores
      dqrm-repro run medium --out reports/medium        # 10 M rows, 4 epochs: hours (make repro-medium)
      dqrm-repro run kaggle --out reports/kaggle --raw /data/criteo/train.txt --only T2 --only F2a
      dqrm-repro report reports/small                   # re-render from the finished runs
    """


@main.command()
@click.argument("profile", type=click.Choice(sorted(PROFILES)))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Report directory: data/, runs/<run>/, report.md, tables/*.csv, figures/*.png.")
@click.option("--only", multiple=True, help="Run only what these tables / figures need (T1..T8, F1a, F1cd, "
                                            "F2a..F2d, F8; repeat or comma-separate). The report shows every table.")
@click.option("--dry-run", is_flag=True, help="Print the commands (marking finished and blocked ones); run nothing.")
@click.option("--np", "np_", type=click.IntRange(min=2), default=None,
              help="Ranks of the communication experiments [default: the profile's].")
@click.option("--raw", type=click.Path(exists=True, path_type=Path), default=None,
              help="Criteo input for the kaggle (train.txt) and terabyte (day_* folder) profiles.")
@click.option("--hosts", default=None, help="horovodrun host list (e.g. a:4,b:4) for multi-rank runs; on the "
                                            "terabyte profile this runs the suite instead of writing scripts.")
@click.option("--jobs", type=click.IntRange(min=1), default=1,
              help="Steps run at once, each with its share of the cores as OMP_NUM_THREADS (unless set): e.g. "
                   "2 runs two one-rank trainings side by side on one core each instead of one after another.")
def run(profile: str, out: Path, only: tuple[str, ...], dry_run: bool, np_: int | None, raw: Path | None,
        hosts: str | None, jobs: int) -> None:
    """Run PROFILE's experiments (skipping finished runs) and write the report into OUT."""
    from ..repro.report import render
    from ..repro.runner import Interrupted, execute, is_finished, write_batch_script, write_json

    keys = [k.strip() for item in only for k in item.split(",") if k.strip()]
    unknown = [k for k in keys if k not in {i.key for i in ITEMS}]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: expected table/figure keys among "
                                 f"{', '.join(i.key for i in ITEMS)}", param_hint="--only")
    prof = PROFILES[profile]
    if prof.needs_raw and raw is None:
        raise click.UsageError(f"the {profile} profile needs --raw (Criteo "
                               f"{'train.txt' if prof.paper == 'kaggle' else 'day_0..day_23 folder'})")
    settings = {"profile": profile, "np": np_, "raw": str(raw.resolve()) if raw else None, "hosts": hosts}
    previous = _settings(out, missing_ok=True)
    if previous and previous["profile"] != profile:
        raise click.UsageError(f"{out} holds a reproduction of profile {previous['profile']!r}: use another --out")
    plan = _plan(settings)
    todo = steps_for(plan, [i for i in ITEMS if not keys or i.key in keys])
    if dry_run:
        click.echo(f"# commands run inside {out}")
        for key in todo:
            step = plan.steps[key]
            state = (f"# not run: {step.blocked}\n# " if step.blocked
                     else "# finished\n# " if is_finished(out, step, plan) else "")
            click.echo(f"{state}{step.shell()}")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SETTINGS, settings)
    if prof.cluster and not hosts:
        script = write_batch_script(plan, out)
        click.echo(f"{profile} runs on a cluster: wrote {script} (sbatch it from {out}, or run it inside an "
                   f"allocation; then `dqrm-repro report {out}`)")
    start = time.perf_counter()
    try:
        failed = execute(plan, out, todo, echo=click.echo, jobs=jobs)
    except Interrupted as e:
        click.echo(f"dqrm-repro: {e}", err=True)
        sys.exit(130)
    counts = render(plan, out, TABLES, FIGURES)
    click.echo(f"wrote {out / 'report.md'} ({_counts(counts)}) in {time.perf_counter() - start:.0f} s")
    if failed:
        click.echo(f"{len(failed)} step(s) failed: {', '.join(failed)}", err=True)
        sys.exit(1)


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(out: Path) -> None:
    """Re-render OUT's report.md, tables and figures from its finished runs (runs nothing)."""
    from ..repro.report import render

    counts = render(_plan(_settings(out)), out, TABLES, FIGURES)
    click.echo(f"wrote {out / 'report.md'} ({_counts(counts)})")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="The prepared dataset the run was trained on.")
@click.option("--bits", type=click.IntRange(2, 8), default=4, help="PTQ bit width to diagnose.")
@click.option("--splits", default="train,test", help="Splits each epoch's FP32 model is evaluated on.")
def diagnose(run_dir: Path, data: Path, bits: int, splits: str) -> None:
    """Why PTQ loses (or not): print JSON for RUN_DIR, an FP32 dqrm-train run.

    Per epoch (from the run's --keep-epoch-checkpoints files): train and test AUC, and test
    AUC after vanilla PTQ at --bits.  Per embedding table of the final model: max|W| /
    median|W| and the share of the test split's lookups whose row rounds to all zeros.

    \b
    Example:
      dqrm-train --data data --out runs/fp32 --keep-epoch-checkpoints --epochs 3
      dqrm-repro diagnose runs/fp32 --data data > diagnosis.json
    """
    from ..repro.diagnosis import diagnose as run_diagnosis

    chosen = tuple(s.strip() for s in splits.split(",") if s.strip())
    bad = [s for s in chosen if s not in ("train", "val", "test")]
    if bad or not chosen:
        raise click.BadParameter(f"{splits!r}: expected a comma-separated list of train, val, test",
                                 param_hint="--splits")
    try:
        result = run_diagnosis(run_dir, data, bits=bits, splits=chosen)
    except (ValueError, OSError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(result, indent=1))


@main.command(name="list")
@click.option("--profile", type=click.Choice(sorted(PROFILES)), default="small",
              help="Profile whose runs (names, ranks) are listed.")
def list_(profile: str) -> None:
    """The profiles, the tables and figures, and the runs each needs."""
    prof = PROFILES[profile]
    plan = _plan({"profile": profile, "np": None, "raw": "RAW", "hosts": None})
    click.echo("Profiles:")
    for p in PROFILES.values():
        click.echo(f"  {p.name:<9} {p.description}")
    click.echo(f"\nTables and figures (runs on the {profile} profile):")
    for item in ITEMS:
        names = dict.fromkeys(plan.names[r] for r in specs_runs([item]))
        click.echo(f"  {item.key:<5} {item.title}\n        {' '.join(names)}")
    click.echo(f"\nRuns ({profile}; a run whose command equals an earlier one's is that run):")
    first: dict[str, object] = {}
    for run in specs_runs(ITEMS):
        first.setdefault(plan.names[run], run)
    for name, run in first.items():
        note = f"   [not run: {plan.blocked[name]}]" if name in plan.blocked else ""
        click.echo(f"  {name:<18} {ranks_of(run, prof)} rank(s){note}\n"
                   f"        {plan.steps[f'train:{name}'].shell()}")


def _plan(settings: dict):
    prof: Profile = PROFILES[settings["profile"]]
    if settings.get("np"):
        prof = prof.with_comm_ranks(settings["np"])
    if settings.get("hosts"):
        try:
            prof = prof.on_hosts(settings["hosts"])
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--hosts") from None
    return make_plan(prof, ITEMS, raw=settings.get("raw"), hosts=settings.get("hosts"),
                     train_options=_train_options())


def _train_options() -> frozenset[str]:
    """The options of the dqrm-train on PATH (runs needing a missing one are not made)."""
    exe = shutil.which("dqrm-train")
    if exe is None:
        return frozenset()
    text = subprocess.run([exe, "--help"], capture_output=True, text=True).stdout
    return frozenset(re.findall(r"--[a-z][a-z0-9-]*", text))


def _settings(out: Path, missing_ok: bool = False) -> dict | None:
    path = out / SETTINGS
    if not path.exists():
        if missing_ok:
            return None
        raise click.UsageError(f"{path} not found: {out} is not a dqrm-repro report directory")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise click.UsageError(f"{path}: not JSON ({e})") from None


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in counts.items())


if __name__ == "__main__":
    main()
