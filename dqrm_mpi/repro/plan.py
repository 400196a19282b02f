"""A profile and the specs turned into concrete command lines (steps), run inside the report dir."""
from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from typing import Iterable

from .experiment import Export, Figure, Run, Table, cell_runs
from .profiles import Profile

RUNS_DIR = "runs"


@dataclass(frozen=True)
class Step:
    """One command.  ``produces``: files (relative to the report dir) that exist once it has
    finished; ``stdout``: where its standard output (JSON) is kept; ``after``: steps it needs;
    ``blocked``: why it is not run on this profile (None: it is)."""

    key: str
    argv: tuple[str, ...]
    produces: tuple[str, ...]
    record: str
    log: str
    stdout: str | None = None
    after: tuple[str, ...] = ()
    blocked: str | None = None

    def shell(self) -> str:
        line = shlex.join(self.argv)
        return f"{line} > {self.stdout}" if self.stdout else line


@dataclass
class Plan:
    profile: Profile
    steps: dict[str, Step]      # in the order they run
    names: dict[Run, str]       # every Run of the specs -> its run directory name under runs/
    blocked: dict[str, str]     # run name -> why it is not run here


def ranks_of(run: Run, profile: Profile) -> int:
    return profile.comm_ranks if run.ranks is None else run.ranks


def specs_runs(items: Iterable[Table | Figure]) -> list[Run]:
    """Every run the tables and figures read, in order of first use."""
    runs: dict[Run, None] = {}
    for item in items:
        if isinstance(item, Table):
            for row in item.rows:
                for cell in row.cells:
                    runs.update(dict.fromkeys(cell_runs(cell)))
        else:
            runs.update(dict.fromkeys(run for _, run in item.series))
    return list(runs)


def make_plan(profile: Profile, items: tuple[Table | Figure, ...], *, raw: str | None = None,
              hosts: str | None = None, train_options: frozenset[str] = frozenset()) -> Plan:
    """Steps for every run of ``items``: data preparation, then each run's train, export, eval.

    Two runs whose command lines are the same apart from ``--out`` are one run (the
    first name wins).  ``train_options``: the options the installed dqrm-train accepts.
    """
    steps: dict[str, Step] = {}
    prep_keys = []
    on_cluster = cluster_reason(profile) if profile.cluster and not hosts else None
    for i, cmd in enumerate(profile.data):
        argv = tuple(a.format(raw=raw) for a in cmd.argv)
        key = f"prep:{i}"
        steps[key] = Step(key, argv, (cmd.produces,), f"prep/repro-prep-{i}.json", f"prep/prep-{i}.log",
                          after=tuple(prep_keys), blocked=on_cluster)
        prep_keys.append(key)

    names: dict[Run, str] = {}
    by_command: dict[tuple[str, ...], str] = {}
    blocked: dict[str, str] = {}
    in_scope = {_train_command(run, profile, hosts) for run in specs_runs(i for i in items if profile.runs_item(i.key))
                if run.name not in profile.skip_runs}
    for run in specs_runs(items):
        n = ranks_of(run, profile)
        name = run.name if n == 1 else f"{run.name}-np{n}"
        command = _train_command(run, profile, hosts)
        name = names[run] = by_command.setdefault(command, name)
        reason = (f"outside the {profile.name} profile: {profile.scope_note}" if command not in in_scope
                  else _why_not(run, n, profile, hosts, train_options))
        if reason:
            blocked.setdefault(name, reason)
        out = f"{RUNS_DIR}/{name}"
        train = steps.setdefault(f"train:{name}", Step(
            f"train:{name}", (*command, "--out", out, "--overwrite"), (f"{out}/summary.json", f"{out}/checkpoint.pt"),
            f"{out}/repro-train.json", f"{out}/train.log", after=tuple(prep_keys), blocked=reason))
        for export in run.exports:  # a run sharing an earlier one's command may add exports
            for step in _export_steps(name, export, train, profile):
                steps[step.key] = step
        if run.diagnose:
            step = _diagnose_step(name, train, profile)
            steps[step.key] = step
    return Plan(profile, steps, names, blocked)


def _train_command(run: Run, profile: Profile, hosts: str | None) -> tuple[str, ...]:
    """``run``'s dqrm-train command line on ``profile`` (without --out)."""
    flags = tuple(f.format(**asdict(profile)) for f in run.flags)
    return (*_launcher(ranks_of(run, profile), profile, hosts), "dqrm-train", *profile.train_flags(), *flags)


def _launcher(ranks: int, profile: Profile, hosts: str | None) -> tuple[str, ...]:
    if ranks == 1:
        return ()
    if hosts:
        return ("horovodrun", "-np", str(ranks), "-H", hosts)
    if profile.cluster:  # inside a SLURM / PBS allocation Open MPI places the ranks itself
        return ("mpirun", "-np", str(ranks))
    return ("horovodrun", "-np", str(ranks), "-H", f"localhost:{ranks}")


def _why_not(run: Run, ranks: int, profile: Profile, hosts: str | None, options: frozenset[str]) -> str | None:
    if run.needs and run.needs not in options:
        return f"needs `dqrm-train {run.needs}`, which this dqrm-train does not have yet"
    if profile.cluster and not hosts:
        return cluster_reason(profile)
    if ranks > profile.max_ranks:
        return f"needs {ranks} ranks; the {profile.name} profile runs at most {profile.max_ranks} on {profile.machine_note}"
    return None


def _split_reason(split: str, profile: Profile) -> str | None:
    if split == "train" and not profile.eval_train_split:
        return f"the {profile.name} profile does not evaluate models on its (very large) train split"
    return None


def cluster_reason(profile: Profile) -> str:
    return (f"not run here: the {profile.name} profile runs on a cluster "
            "(`sbatch scripts/run_all.sh` inside the report dir, or `dqrm-repro run` with --hosts)")


def _export_steps(name: str, export: Export, train: Step, profile: Profile) -> list[Step]:
    out = f"{RUNS_DIR}/{name}"
    packed = f"{out}/{export.label}.dqrm"
    step = Step(f"export:{name}/{export.label}",
                ("dqrm-export", f"{out}/checkpoint.pt", packed, *export.flags),
                (packed, f"{out}/{export.label}.export.json"), f"{out}/repro-export-{export.label}.json",
                f"{out}/export-{export.label}.log", stdout=f"{out}/{export.label}.export.json",
                after=(train.key,), blocked=train.blocked)
    evals = [Step(f"eval:{name}/{export.label}/{split}",
                  ("dqrm-eval", packed, "--data", "data", "--split", split),
                  (eval_json(name, export.label, split),), f"{out}/repro-eval-{export.label}-{split}.json",
                  f"{out}/eval-{export.label}-{split}.log", stdout=eval_json(name, export.label, split),
                  after=(step.key,), blocked=_split_reason(split, profile) or train.blocked)
             for split in export.splits]
    return [step, *evals]


def _diagnose_step(name: str, train: Step, profile: Profile) -> Step:
    out = f"{RUNS_DIR}/{name}"
    splits = ("train", "test") if profile.eval_train_split else ("test",)
    return Step(f"diagnose:{name}", ("dqrm-repro", "diagnose", out, "--data", "data", "--splits", ",".join(splits)),
                (diagnosis_json(name),), f"{out}/repro-diagnose.json", f"{out}/diagnose.log",
                stdout=diagnosis_json(name), after=(train.key,), blocked=train.blocked)


def diagnosis_json(name: str) -> str:
    return f"{RUNS_DIR}/{name}/diagnosis.json"


def eval_json(name: str, label: str, split: str) -> str:
    return f"{RUNS_DIR}/{name}/{label}.eval-{split}.json"


def export_json(name: str, label: str) -> str:
    return f"{RUNS_DIR}/{name}/{label}.export.json"


def step_run(key: str) -> str:
    """The run a step key belongs to ("train:fp32", "eval:fp32/ptq4/test" -> "fp32")."""
    return key.split(":", 1)[1].split("/")[0]


def steps_for(plan: Plan, items: Iterable[Table | Figure]) -> list[str]:
    """Keys of the steps the given tables and figures need (data preparation included), in order."""
    names = {plan.names[r] for r in specs_runs(items)}
    return [k for k in plan.steps if k.startswith("prep:") or step_run(k) in names]
