"""Whole `dqrm-train` runs as users launch them: a plain process and `horovodrun -np 2`."""
from __future__ import annotations

import json
import re

import pytest
import torch

from dqrm_mpi.model import DLRM, ModelConfig
from dqrm_mpi.train.checkpoint import load_checkpoint
from dqrm_mpi.train.run_dir import read_metrics

from ..conftest import VENV_BIN, horovodrun, run_cmd

TRAIN = str(VENV_BIN / "dqrm-train")


def _train_args(data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--preset", "tiny", "--batch-size", "400",
            "--seed", "5", *extra]


def test_two_ranks_end_with_the_one_rank_parameters(small_dataset, tmp_path):
    run_cmd([TRAIN, *_train_args(small_dataset, tmp_path / "one", "--max-steps", "20")])
    run_cmd([TRAIN, *_train_args(small_dataset, tmp_path / "disk", "--max-steps", "20", "--data-in-memory", "no")])
    horovodrun(2, [TRAIN, *_train_args(small_dataset, tmp_path / "two", "--max-steps", "20")])
    one = torch.load(tmp_path / "one" / "checkpoint.pt")["model"]
    two = torch.load(tmp_path / "two" / "checkpoint.pt")["model"]
    # the small splits are held in memory by default; read from the shards, the same run
    assert json.loads((tmp_path / "one" / "config.json").read_text())["train"]["data_in_memory"] == "yes"
    disk = torch.load(tmp_path / "disk" / "checkpoint.pt")["model"]
    assert all(torch.equal(disk[n], one[n]) for n in one)
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
    # the logged loss is the global batch's (both ranks' halves), as one rank computes it
    one_steps = [r for r in read_metrics(tmp_path / "one") if r["event"] == "step"]
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in one_steps], rel=1e-4)


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


def test_run_logs_windows_epochs_progress_and_epoch_checkpoints(small_dataset, tmp_path):
    out = tmp_path / "run"
    proc = run_cmd([TRAIN, *_train_args(small_dataset, out, "--epochs", "2", "--log-every", "7", "--emb-bits", "4",
                                        "--scale-period", "5", "--eval-splits", "test", "--keep-epoch-checkpoints",
                                        "--progress", "log", "--progress-seconds", "0",
                                        "--tensorboard", str(tmp_path / "tb"))])
    # a job file's view: plain timestamped lines, no bars, eval lines as they happen
    assert "\r" not in proc.stderr and "eval test" not in proc.stderr
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[dqrm-train\] "
    assert re.search(stamp + r"step 60/60 \(100\.0%\) epoch 1 loss \d\.\d{4} [\d,]+ samples/s comm \S+ ms/step ETA ",
                     proc.stderr), proc.stderr
    assert re.findall(stamp + r"(epoch \d trained|step \d+ epoch \d test)", proc.stdout) == [
        "epoch 0 trained", "step 30 epoch 0 test", "epoch 1 trained", "step 60 epoch 1 test"]

    records = read_metrics(out)
    steps = [r for r in records if r["event"] == "step"]  # 30 steps per epoch: windows cut at 7k and epoch ends
    assert [r["step"] for r in steps] == [7, 14, 21, 28, 30, 35, 42, 49, 56, 60]
    assert [r["steps"] for r in steps] == [7, 7, 7, 7, 2, 5, 7, 7, 7, 4]
    assert [(r["epoch"], r["step"], r["complete"]) for r in records if r["event"] == "epoch"] == [
        (0, 30, True), (1, 60, True)]
    assert all(r["time"] > 0 for r in records)

    summary = json.loads((out / "summary.json").read_text())
    part = summary["step_time"]
    assert part["total"] == pytest.approx(sum(part[p] for p in ("data", "scale_pass", "forward_backward",
                                                                "exchange", "optimizer", "other")))
    assert part["scale_pass"] > 0 and part["data"] > 0
    assert summary["samples_per_second"] == pytest.approx(summary["samples"] / summary["train_seconds"])
    assert summary["steps_per_epoch"] == 30 and summary["log_every"] == 7
    assert [e["epoch"] for e in summary["train_loss"]["per_epoch"]] == [0, 1]
    assert {m["step"] for m in summary["best"]["test"].values()} <= {30, 60}
    assert json.loads((out / "config.json").read_text())["steps_per_epoch"] == 30

    first, last, final = (torch.load(out / name) for name in ("checkpoint-epoch0.pt", "checkpoint-epoch1.pt",
                                                              "checkpoint.pt"))
    assert (first["step"], first["epoch"], last["step"]) == (30, 0, 60)
    for name, value in final["model"].items():
        assert torch.equal(last["model"][name], value), name
    assert not all(torch.equal(first["model"][n], v) for n, v in final["model"].items())
    assert load_checkpoint(out / "checkpoint-epoch0.pt")[1].emb_bits == 4  # what dqrm-export reads
    assert any((tmp_path / "tb").iterdir())
