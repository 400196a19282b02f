"""The declared experiments cover the paper, and every profile turns them into sound commands."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dqrm_mpi.repro.experiment import Drop, Export, Metric, NotMeasured, Row, Run, Table
from dqrm_mpi.repro.plan import make_plan, specs_runs
from dqrm_mpi.repro.profiles import PROFILES, quarter_epoch_steps
from dqrm_mpi.repro.results import METRICS
from dqrm_mpi.repro.specs import DQRM4, FIGURES, FP32, PERIOD, TABLES

from ..conftest import mpi_env

# ../shared/docs/dqrm-reference.md, "The seed paper's tables this project must be able to fill":
# item -> (spec key, words its title must hold, quantities its columns must measure)
REFERENCE = {
    1: ("T1", ("Embedding-only QAT", "INT16", "INT8", "INT4", "FP32"), ("accuracy", "AUC", "epoch")),
    2: ("T2", ("FP32", "PTQ INT4", "DQRM INT4"), ("train loss", "accuracy", "AUC")),
    3: ("T3", ("Multi-node", "8-bit gradients"), ("train-loss", "AUC drop")),
    4: ("T4", ("Communication compression",), ("MB", "ms/iter", "accuracy", "AUC")),
    5: ("T5", ("Periodic scale update",), ("ms/iter", "accuracy", "AUC")),
    6: ("T6", ("Embedding-gradient bit width",), ("MB", "accuracy", "AUC")),
    7: ("T7", ("Quantizing each part",), ("accuracy", "AUC")),
    8: ("T8", ("QAT as fine-tuning",), ("accuracy", "AUC")),
}
# item 9: accuracy and loss per epoch with boundaries; naive gradient quantization; MLP vs embedding gradients
FIGURE_PANELS = {"F1a": {"accuracy", "auc"}, "F1cd": {"loss"}, "F2a": {"accuracy", "auc"}, "F2b": {"loss"},
                 "F2c": {"auc", "loss"}, "F2d": {"auc", "loss"}, "F8": {"auc", "loss"}}


def _metrics(cell):
    return (cell.value, cell.reference) if isinstance(cell, Drop) else (cell,) if isinstance(cell, Metric) else ()


@pytest.mark.parametrize("item", sorted(REFERENCE))
def test_every_reference_table_is_declared(item):
    key, words, quantities = REFERENCE[item]
    table = {t.key: t for t in TABLES}[key]
    for word in words:
        assert word in table.title or any(word in r.label for r in table.rows), (key, word)
    columns = " ".join(table.columns)
    for quantity in quantities:
        assert quantity in columns, (key, quantity)


def test_every_reference_figure_is_declared():
    assert {f.key: set(f.panels) for f in FIGURES} == FIGURE_PANELS
    labels = {f.key: [label for label, _ in f.series] for f in FIGURES}
    assert {"INT16", "INT8", "INT4"} <= set(labels["F2c"])
    assert {"embedding grads INT8", "MLP grads INT8"} <= set(labels["F2d"])


def test_cells_name_known_metrics_and_paper_numbers_align():
    for table in TABLES:
        for row in table.rows:
            assert len(row.cells) == len(table.columns), (table.key, row.label)
            for numbers in row.paper.values():
                assert len(numbers) == len(table.columns), (table.key, row.label)
            for cell in row.cells:
                assert isinstance(cell, (Metric, Drop, NotMeasured))
                for m in _metrics(cell):
                    assert m.key in METRICS, (table.key, m.key)
                    if m.key in ("size_mb", "packed_auc", "packed_acc", "packed_log_loss"):
                        assert m.export in {e.label for e in m.run.exports}, (table.key, m.run.name, m.export)
                        assert m.split in {e.splits for e in m.run.exports if e.label == m.export}.pop()


def test_a_run_name_means_one_command():
    seen = {}
    for run in specs_runs(TABLES + FIGURES):
        key = (run.name, run.ranks)
        assert seen.setdefault(key, run) == run, f"two different runs named {run.name}"


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_run_of_every_profile_has_a_command(name):
    plan = make_plan(PROFILES[name], TABLES + FIGURES, raw="/data/raw", train_options=frozenset())
    for run in specs_runs(TABLES + FIGURES):
        step = plan.steps[f"train:{plan.names[run]}"]
        assert "dqrm-train" in step.argv and step.argv[-3:] == ("--out", f"runs/{plan.names[run]}", "--overwrite")
    assert plan.names[PERIOD[PROFILES[name].scale_period]] == plan.names[DQRM4]  # shared, trained once
    if PROFILES[name].cluster:
        assert all(r.startswith("needs `dqrm-train") or r.startswith("not run here") for r in plan.blocked.values())
    else:
        assert not any(s.blocked for s in plan.steps.values() if s.key.startswith("prep:"))


def test_smoke_blocks_only_what_two_cores_and_this_dqrm_train_cannot_do():
    plan = make_plan(PROFILES["smoke"], TABLES + FIGURES, train_options=frozenset())
    assert set(plan.blocked) == {"dense-np2", "int8-np4", "int8-np8"}
    assert "--emb-exchange" in plan.blocked["dense-np2"]
    with_dense = make_plan(PROFILES["smoke"], TABLES + FIGURES, train_options=frozenset({"--emb-exchange"}))
    assert "dense-np2" not in with_dense.blocked  # measured as soon as dqrm-train has the option


def _repro(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dqrm_mpi.cli.repro", *args], capture_output=True, text=True,
                          env=env or mpi_env(), timeout=300)


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path):
    out = tmp_path / "rep"
    proc = _repro("run", "smoke", "--out", str(out), "--dry-run", "--only", "T4,F2a")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].startswith("dqrm-prep synth raw.txt")
    assert any(ln.startswith("horovodrun -np 2 -H localhost:2 dqrm-train") and "runs/int8-np2" in ln for ln in lines)
    assert any(ln.startswith("dqrm-train ") and "runs/fp32 " in ln for ln in lines)  # F2a
    assert not any("runs/emb16" in ln for ln in lines)  # T1 only
    # Table 4's uncompressed row: dense embedding gradients, measured now that dqrm-train has the option
    assert any(ln.startswith("horovodrun -np 2") and "--emb-exchange dense" in ln and "runs/dense-np2" in ln
               for ln in lines)
    assert not out.exists()


def test_terabyte_writes_a_batch_script_and_says_why_cells_are_empty(tmp_path):
    out, raw = tmp_path / "tb", tmp_path / "days"
    raw.mkdir()
    proc = _repro("run", "terabyte", "--out", str(out), "--raw", str(raw))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    script = (out / "scripts" / "run_all.sh").read_text()
    assert f"dqrm-prep criteo {raw} data --max-ind-range 10000000 --sub-sample-rate 0.875" in script
    assert "mpirun -np 8 dqrm-train" in script and "--preset terabyte --batch-size 2048" in script
    assert not (out / "runs").exists()
    report = (out / "report.md").read_text()
    assert "not run here: the terabyte profile runs on a cluster" in report
    assert "(paper 0.8015)" in report  # Terabyte's published numbers beside the cells


def test_real_data_profiles_need_raw(tmp_path):
    proc = _repro("run", "kaggle", "--out", str(tmp_path / "k"))
    assert proc.returncode != 0 and "needs --raw" in proc.stderr


def test_unknown_only_key_is_refused(tmp_path):
    proc = _repro("run", "smoke", "--out", str(tmp_path / "s"), "--dry-run", "--only", "T9")
    assert proc.returncode != 0 and "T9" in proc.stderr


def test_runs_with_the_same_command_are_one_run_with_all_exports():
    twin = Run("twin", FP32.flags, exports=(Export("int8", ("--bits", "8")),))
    table = Table("TX", "twins", ("a", "b"), (Row("r", (Metric(FP32, "best_auc"), Metric(twin, "size_mb", "int8"))),))
    plan = make_plan(PROFILES["smoke"], (table,))
    assert plan.names[twin] == "fp32" and "train:twin" not in plan.steps
    assert {"export:fp32/packed", "export:fp32/ptq4", "export:fp32/int8"} <= set(plan.steps)


@pytest.mark.parametrize("profile, splits", [("small", "train,test"), ("terabyte", "test")])
def test_the_fp32_run_keeps_its_epochs_and_is_diagnosed(profile, splits):
    plan = make_plan(PROFILES[profile], TABLES + FIGURES)
    assert "--keep-epoch-checkpoints" in plan.steps["train:fp32"].argv
    step = plan.steps["diagnose:fp32"]
    assert step.argv == ("dqrm-repro", "diagnose", "runs/fp32", "--data", "data", "--splits", splits)
    assert step.after == ("train:fp32",) and step.stdout == "runs/fp32/diagnosis.json"
    assert [k for k in plan.steps if k.startswith("diagnose:")] == ["diagnose:fp32"]


def test_a_run_stopped_part_way_fills_no_cell(tmp_path):
    """metrics.jsonl of a run that was stopped (no finished record) holds numbers; no cell may show them."""
    from dqrm_mpi.repro.cells import Cells
    from dqrm_mpi.repro.runner import write_json

    plan = make_plan(PROFILES["smoke"], TABLES + FIGURES)
    run = tmp_path / "runs" / "fp32"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"event": "eval", "split": "test", "step": 5, "epoch": 0, '
                                       '"accuracy": 0.7, "auc": 0.6}\n')
    cell = Cells(plan, tmp_path).metric(Metric(FP32, "best_auc"))
    assert (cell.status, cell.number) == ("not run", None)
    for name in ("summary.json", "checkpoint.pt"):  # now it finished: the same file fills the cell
        (run / name).write_text("{}")
    step = plan.steps["train:fp32"]
    write_json(tmp_path / step.record, {"argv": list(step.argv), "after": {k: None for k in step.after}})
    cell = Cells(plan, tmp_path).metric(Metric(FP32, "best_auc"))
    assert (cell.status, cell.number) == ("ok", 0.6)


def test_medium_runs_the_scale_findings_on_one_rank_and_leaves_communication_to_small():
    plan = make_plan(PROFILES["medium"], TABLES + FIGURES, train_options=frozenset({"--emb-exchange"}))
    run_here = set(plan.names.values()) - set(plan.blocked)
    assert run_here == {"fp32", "emb16", "emb8", "emb4", "dqrm4", "emb4-mlp4-matrix", "dqrm4-period1",
                        "dqrm4-finetune"}
    assert all("communication experiments run with the small profile" in why for why in plan.blocked.values())
    assert plan.steps["prep:0"].argv[:7] == ("dqrm-prep", "synth", "raw.txt", "--rows", "10000000", "--profile",
                                             "criteo-like")
    fp32 = " ".join(plan.steps["train:fp32"].argv)
    assert ("--preset kaggle --batch-size 128 --lr 0.1 --epochs 4 --eval-every 16741 --eval-splits test "
            "--eval-splits val" in fp32 and "--keep-best val" in fp32 and "--keep-epoch-checkpoints" in fp32)
    assert "diagnose:fp32" in plan.steps and not plan.steps["diagnose:fp32"].blocked
    # a quarter of an epoch: 8,571,429 training rows (the Kaggle split of 10 M) / 128 = 66,964 steps = 4 x 16,741
    assert quarter_epoch_steps(10_000_000, 128) == 16_741
    with pytest.raises(ValueError, match="do not divide by 4"):
        quarter_epoch_steps(10_000_000, 100)
