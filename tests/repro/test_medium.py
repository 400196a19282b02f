"""The medium profile end to end on a tiny stand-in (its scope, flags and evaluation schedule on
4,200 planted rows): real dqrm-prep / dqrm-train / dqrm-export / dqrm-eval / diagnose runs through
the runner (two steps at once), the report with the model selection and the curve findings, a
resumed suite."""
from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import replace

import pytest

from dqrm_mpi.repro.plan import make_plan, steps_for
from dqrm_mpi.repro.profiles import PROFILES, _synth, quarter_epoch_steps
from dqrm_mpi.repro.report import render
from dqrm_mpi.repro.runner import execute
from dqrm_mpi.repro.specs import FIGURES, TABLES
from dqrm_mpi.train.run_dir import read_metrics

from ..conftest import mpi_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROWS, BATCH = 4_200, 100  # 3,600 training rows: 36 steps an epoch, evaluated every 9
STAND_IN = replace(PROFILES["medium"], data=_synth(ROWS, ("--preset", "tiny"), seed=3), preset="tiny",
                   batch_size=BATCH, epochs=2, eval_every=quarter_epoch_steps(ROWS, BATCH))
ITEMS = [t for t in TABLES if t.key in ("T2", "T8")]  # FP32 (epochs kept, diagnosed), DQRM INT4, fine-tuned


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    out = tmp_path_factory.mktemp("medium")
    plan = make_plan(STAND_IN, TABLES + FIGURES)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in mpi_env().items():  # the runner's subprocesses inherit this environment
            mp.setenv(key, value)
        lines: list[str] = []
        failed = execute(plan, out, steps_for(plan, ITEMS), echo=lines.append, jobs=2)  # two runs side by side
        render(plan, out, TABLES, FIGURES)
        again: list[str] = []
        execute(plan, out, steps_for(plan, ITEMS), echo=again.append)
    return plan, out, failed, lines, again


def test_runs_evaluate_test_and_val_every_quarter_epoch_once_and_keep_the_best_val_model(medium):
    plan, out, failed, lines, _ = medium
    assert failed == [], "\n".join(lines)
    assert STAND_IN.eval_every == 9
    for name in ("fp32", "dqrm4", "dqrm4-finetune"):
        evals = Counter((r["split"], r["step"]) for r in read_metrics(out / "runs" / name) if r["event"] == "eval")
        assert evals == Counter({(s, 9 * q): 1 for s in ("test", "val") for q in range(1, 9)}), name
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        chosen = summary["selected_by_val"]
        assert chosen["val"]["auc"] == summary["best"]["val"]["auc"]["value"]
        assert (out / "runs" / name / "checkpoint-best.pt").exists()
    assert all((out / "runs" / "fp32" / f"checkpoint-epoch{e}.pt").exists() for e in (0, 1))
    assert [e["epoch"] for e in json.loads((out / "runs" / "fp32" / "diagnosis.json").read_text())["epochs"]] == [0, 1]


def test_the_report_gives_the_selection_the_curve_findings_and_why_the_rest_is_not_run(medium):
    plan, out, *_ = medium
    report = (out / "report.md").read_text()
    selection = report[report.index("## Model selection on the validation split"):report.index("## The paper's")]
    assert all(f"| `{name}` |" in selection for name in ("fp32", "dqrm4", "dqrm4-finetune"))
    findings = report[report.index("## The paper's findings"):]
    for n in ("1", "1b", "2", "2b"):
        line = next(ln for ln in findings.splitlines() if ln.startswith(f"- {n}. "))
        assert "appear" in line and "not measured" not in line, line
    assert "FP32 peaks at" in findings and "Selected on the val split" in findings
    comm = next(ln for ln in findings.splitlines() if ln.startswith("- 3. "))
    assert "not measured. Outside the medium profile: it runs the tables and figures whose findings" in comm
    with open(out / "tables" / "cells.csv") as f:
        t4 = [c for c in csv.DictReader(f) if c["table"] == "T4"]
    assert t4 and all(c["status"] == "n/a" and "run with the small profile" in c["value"] for c in t4)
    for key in ("F2a", "F2b", "F8"):
        assert (out / "figures" / f"{key}.png").read_bytes()[:4] == b"\x89PNG"


def test_steps_ran_side_by_side_each_after_the_steps_it_needs(medium):
    plan, _, _, lines, _ = medium
    started, ended = {}, {}  # step -> index of its line: "[i/n] KEY: COMMAND", "[i/n] KEY: done in S s"
    for i, line in enumerate(lines):
        key, rest = line.split("] ", 1)[1].split(": ", 1)
        (ended if rest.startswith("done in ") else started)[key] = i
    assert set(started) == set(ended) == set(steps_for(plan, ITEMS))
    for key in started:
        assert all(ended[k] < started[key] for k in plan.steps[key].after), key
    trains = sorted((k for k in started if k.startswith("train:")), key=started.get)
    assert any(started[b] < ended[a] for a, b in zip(trains, trains[1:])), lines  # two trainings at once


def test_a_resumed_suite_skips_every_finished_run(medium):
    *_, again = medium
    assert again and all(ln.endswith("finished before, skipped") for ln in again), again
