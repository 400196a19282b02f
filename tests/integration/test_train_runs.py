"""Whole `dqrm-train` runs as users launch them: a plain process and `horovodrun -np 2`."""
from __future__ import annotations

import json

import torch

from dqrm_mpi.model import DLRM, ModelConfig
from dqrm_mpi.train.run_dir import read_metrics

from ..conftest import VENV_BIN, horovodrun, run_cmd

TRAIN = str(VENV_BIN / "dqrm-train")


def _train_args(data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--preset", "tiny", "--batch-size", "400",
            "--seed", "5", *extra]


def test_two_ranks_end_with_the_one_rank_parameters(small_dataset, tmp_path):
    run_cmd([TRAIN, *_train_args(small_dataset, tmp_path / "one", "--max-steps", "20")])
    horovodrun(2, [TRAIN, *_train_args(small_dataset, tmp_path / "two", "--max-steps", "20")])
    one = torch.load(tmp_path / "one" / "checkpoint.pt")["model"]
    two = torch.load(tmp_path / "two" / "checkpoint.pt")["model"]
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    # training moved the parameters away from the (seeded) initialisation: not a trivial comparison
    torch.manual_seed(5)
    start = DLRM(ModelConfig(**torch.load(tmp_path / "one" / "checkpoint.pt")["model_config"])).state_dict()
    moved = [n for n in one if not torch.allclose(one[n], start[n], atol=1e-4)]
    assert len(moved) >= len(one) // 2, f"only {moved} changed"
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 20
    assert summary["comm_bytes_sent_per_step"]["mean"] > 0
    steps = [r for r in read_metrics(tmp_path / "two") if r["event"] == "step"]
    assert len(steps) == 20 and all(r["comm_bytes_sent"] > 0 and r["comm_seconds"] > 0 for r in steps)


def test_model_learns_planted_clicks(learnable_dataset, tmp_path):
    out = tmp_path / "run"
    proc = horovodrun(2, [TRAIN, "--data", str(learnable_dataset), "--out", str(out), "--preset", "tiny",
                          "--batch-size", "256", "--lr", "0.2", "--eval-every", "200"])
    summary = json.loads((out / "summary.json").read_text())
    planted = summary["planted"]["test"]["auc"]
    best = summary["best_test"]["auc"]
    assert best > 0.70, f"test AUC {best:.4f} (planted model: {planted:.4f})"
    assert best > planted - 0.08, f"test AUC {best:.4f} too far below the planted model's {planted:.4f}"
    assert best <= planted + 0.01  # nothing can beat the model that made the labels
    evals = [r for r in read_metrics(out) if r["event"] == "eval"]
    assert {r["split"] for r in evals} == {"test", "val"} and len(evals) >= 4
    assert (out / "config.json").exists() and (out / "checkpoint.pt").exists()
    assert "samples/s" in proc.stdout and "ROC AUC" in proc.stdout
