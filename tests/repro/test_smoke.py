"""`dqrm-repro run smoke` end to end: real dqrm-prep / dqrm-train (1 and 2 ranks) / dqrm-export /
dqrm-eval runs, every table and figure written, a second run skipping every finished run."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dqrm_mpi.repro.experiment import Metric, Row, Run, Table
from dqrm_mpi.repro.plan import make_plan, steps_for
from dqrm_mpi.repro.profiles import PROFILES
from dqrm_mpi.repro.report import render
from dqrm_mpi.repro.runner import execute
from dqrm_mpi.repro.specs import FIGURES, FP32, TABLES

from ..conftest import mpi_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the first test sets the suite up
OUTPUTS = ["report.md", *(f"tables/{t.key}.csv" for t in TABLES), "tables/cells.csv"]


def repro(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dqrm_mpi.cli.repro", *args], capture_output=True, text=True,
                          env=env or mpi_env(), timeout=1800)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("repro") / "smoke"
    return out, repro("run", "smoke", "--out", str(out))


def _cells(out: Path) -> list[dict]:
    with open(out / "tables" / "cells.csv") as f:
        return list(csv.DictReader(f))


def test_smoke_produces_every_table_and_figure(smoke):
    out, proc = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = (out / "report.md").read_text()
    for t in TABLES:
        assert f"## {t.key}: {t.title}" in report
        rows = list(csv.reader(open(out / "tables" / f"{t.key}.csv")))
        assert rows[0] == ["", *t.columns] and [r[0] for r in rows[1:]] == [r.label for r in t.rows]
    for f in FIGURES:
        assert f"![{f.key}](figures/{f.key}.png)" in report
        assert (out / "figures" / f"{f.key}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cells = _cells(out)
    assert {c["status"] for c in cells} == {"ok", "n/a"}
    unavailable = {c["runs"].split()[0] for c in cells if c["status"] == "n/a" and c["runs"]}
    assert unavailable == {"int8-np4", "int8-np8"}  # more ranks than the smoke profile runs on 2 cores
    dense = [c for c in cells if c["runs"] == "dense-np2"]  # Table 4's uncompressed row, measured
    assert dense and {c["status"] for c in dense} == {"ok"}
    fp32_auc = next(c for c in cells if c["table"] == "T2" and c["row"] == "FP32 DLRM" and c["column"] == "AUC")
    assert fp32_auc["paper"] == "0.8047" and 0 < float(fp32_auc["value"]) < 1
    # the cell's number is the run's own
    packed = json.loads((out / "runs" / "fp32" / "packed.eval-test.json").read_text())
    assert float(fp32_auc["value"]) == pytest.approx(packed["auc"], abs=1e-4)
    t4 = {c["row"]: c for c in cells if c["table"] == "T4" and c["column"].startswith("MB")}
    assert 0 < float(t4["sparsification + INT8 gradients"]["value"]) < float(t4["embedding-gradient sparsification"]["value"])
    assert "horovodrun -np 2 -H localhost:2 dqrm-train" in report


def test_smoke_reports_the_findings_and_the_diagnosis(smoke):
    out, _ = smoke
    report = (out / "report.md").read_text()
    findings = report[report.index("## The paper's findings"):]
    for n in (1, 2, 3):  # each finding measured (appears or not), none left "not measured yet"
        line = next(ln for ln in findings.splitlines() if ln.startswith(f"- {n}. "))
        assert "appear" in line and "not measured" not in line, line
    d = json.loads((out / "runs" / "fp32" / "diagnosis.json").read_text())
    assert [e["epoch"] for e in d["epochs"]] == [0, 1]  # smoke trains 2 epochs, each kept
    packed = json.loads((out / "runs" / "fp32" / "packed.eval-test.json").read_text())
    assert d["epochs"][-1]["test_auc"] == pytest.approx(packed["auc"], abs=1e-6)  # the same final model
    ptq = json.loads((out / "runs" / "fp32" / "ptq4.eval-test.json").read_text())
    assert d["epochs"][-1]["ptq4_test_auc"] == pytest.approx(ptq["auc"], abs=1e-6)  # as dqrm-export --bits 4
    assert len(d["tables"]) == 26 and all(0 <= t["zero_lookup_share"] <= 1 for t in d["tables"])
    assert "| C26 |" in report and "| 2 | " in findings  # the per-table and per-epoch rows


def test_resumed_suite_skips_finished_runs_and_renders_the_same(smoke):
    out, first = smoke
    assert first.returncode == 0
    before = {p: (out / p).read_bytes() for p in OUTPUTS}
    summary = out / "runs" / "dqrm4" / "summary.json"
    mtime = summary.stat().st_mtime_ns
    proc = repro("run", "smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert steps and all(ln.endswith("finished before, skipped") for ln in steps), steps
    assert summary.stat().st_mtime_ns == mtime
    assert {p: (out / p).read_bytes() for p in OUTPUTS} == before
    proc = repro("report", str(out))
    assert proc.returncode == 0, proc.stderr
    assert {p: (out / p).read_bytes() for p in OUTPUTS} == before


def test_a_changed_command_is_run_again(smoke, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(smoke[0], out)
    record = out / "runs" / "emb8" / "repro-train.json"
    saved = json.loads(record.read_text())
    record.write_text(json.dumps({**saved, "argv": saved["argv"][:-1]}))  # as if the spec had changed
    proc = repro("run", "smoke", "--out", str(out), "--dry-run", "--only", "T1")
    lines = proc.stdout.splitlines()
    pending = [ln for i, ln in enumerate(lines) if ln.startswith("dqrm-") and lines[i - 1] != "# finished"]
    assert len(pending) == 1 and "runs/emb8 " in pending[0], lines


def test_a_failed_run_fills_its_cells_with_why_and_the_suite_goes_on(smoke, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(smoke[0], out)
    bad, after = Run("bad", ("--lr", "0")), Run("short", ("--max-steps", "2"))
    table = Table("TX", "failure", ("AUC", "AUC", "AUC"),
                  (Row("r", (Metric(bad, "best_auc"), Metric(after, "best_auc"), Metric(FP32, "best_auc"))),))
    plan = make_plan(PROFILES["smoke"], (table,))
    for key, value in mpi_env().items():  # the runner's subprocesses inherit this environment
        monkeypatch.setenv(key, value)
    failed = execute(plan, out, steps_for(plan, [table]), echo=lambda s: None)
    assert failed == ["train:bad"]
    render(plan, out, (table,), ())
    status = [(c["status"], c["value"]) for c in _cells(out)]
    assert status[0][0] == "failed" and "--lr" in status[0][1]  # dqrm-train's own message
    assert status[1][0] == status[2][0] == "ok"
    assert "FAILED" in (out / "report.md").read_text()


def test_exit_code_is_non_zero_when_runs_fail(tmp_path):
    env = {**mpi_env(), "PATH": "/usr/bin:/bin"}  # no dqrm-* tools
    proc = repro("run", "smoke", "--out", str(tmp_path / "r"), "--only", "T7", env=env)
    assert proc.returncode == 1
    assert "dqrm-prep not found on PATH" in (tmp_path / "r" / "report.md").read_text()
    assert "step(s) failed" in proc.stderr
