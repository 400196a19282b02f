"""--keep-best val: the model of the best val AUC kept as checkpoint-best.pt, its metrics in
summary.json (``selected_by_val``), continued across --resume."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from dqrm_mpi.cli import train as train_cli
from dqrm_mpi.comm.inprocess import run_ranks
from dqrm_mpi.train.checkpoint import load_checkpoint
from dqrm_mpi.train.config import TrainConfig
from dqrm_mpi.train.evaluation import predict
from dqrm_mpi.train.loop import train
from dqrm_mpi.train.metrics import binary_metrics
from dqrm_mpi.train.run_dir import read_metrics


def _train(data, out, **options) -> dict:
    config = TrainConfig(data=data, out=out, preset="tiny", batch_size=400, seed=5, threads=1, lr=2.0,
                         eval_every=10, epochs=4, keep_best="val", **options)
    return run_ranks(1, lambda backend: train(config, backend))[0]


def test_the_best_val_model_is_kept_and_reported_across_a_resume(small_dataset, tmp_path):
    out = tmp_path / "run"
    _train(small_dataset, out, max_steps=80)
    summary = _train(small_dataset, out, resume="yes")
    evals = [r for r in read_metrics(out) if r["event"] == "eval"]
    val = [r for r in evals if r["split"] == "val"]
    assert [r["step"] for r in val] == list(range(10, 121, 10))  # both invocations' evaluations
    best = max(val, key=lambda r: r["auc"])  # the first of equal values
    # the settings put the best val AUC in the first invocation (above all of the resumed one's):
    # the resumed run must continue that selection, and its model is not the final one
    assert best["step"] <= 80, [(r["step"], r["auc"]) for r in val]
    selected = summary["selected_by_val"]
    test = next(r for r in evals if r["split"] == "test" and r["step"] == best["step"])
    assert (selected["step"], selected["epoch"]) == (best["step"], best["epoch"])
    assert selected["val"]["auc"] == best["auc"] and selected["test"]["auc"] == test["auc"]
    assert json.loads((out / "summary.json").read_text())["selected_by_val"] == selected

    kept = torch.load(out / "checkpoint-best.pt")
    assert kept["step"] == best["step"] and kept["selected"] == selected
    model = load_checkpoint(out / "checkpoint-best.pt")[0]  # what dqrm-export reads
    labels, scores = predict(model, small_dataset, "test")
    assert binary_metrics(scores, labels)["auc"] == pytest.approx(test["auc"], abs=1e-6)
    final = torch.load(out / "checkpoint.pt")["model"]
    assert not all(torch.equal(final[n], v) for n, v in kept["model"].items())


def test_keep_best_names_the_split_it_needs():
    with pytest.raises(ValueError, match="add val to eval_splits"):
        TrainConfig(data=".", out="o", keep_best="val", eval_splits=("test",))
    result = CliRunner().invoke(train_cli.main, ["--data", ".", "--out", "o", "--keep-best", "val",
                                                 "--eval-splits", "test"])
    assert result.exit_code == 2 and "--keep-best val" in result.output and "--eval-splits" in result.output
