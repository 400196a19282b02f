"""`dqrm-train` with the optimizers and schedules as users launch it: 2 ranks end with the
1-rank parameters, a run resumed in the warm-up and in the decay ends bit for bit where an
uninterrupted one ends, and schedules that do not fit the run are refused naming the flags."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from dqrm_mpi.train.run_dir import read_metrics

from ..conftest import VENV_BIN, horovodrun, mpi_env, run_cmd

TRAIN = str(VENV_BIN / "dqrm-train")


def _args(data, out, *extra):
    return [TRAIN, "--data", str(data), "--out", str(out), "--preset", "tiny", "--batch-size", "400",
            "--seed", "5", "--eval-splits", "test", "--progress", "none", *extra]


@pytest.mark.parametrize("emb, mlp", [("rowwise-adagrad", "adam"), ("adagrad", "lamb")])
def test_two_ranks_end_with_the_one_rank_parameters_and_state(small_dataset, tmp_path, emb, mlp):
    flags = ["--max-steps", "12", "--emb-optimizer", emb, "--mlp-optimizer", mlp, "--emb-lr", "0.05",
             "--mlp-lr", "0.01", "--lr-warmup-steps", "4"]
    run_cmd(_args(small_dataset, tmp_path / "one", *flags))
    horovodrun(2, _args(small_dataset, tmp_path / "two", *flags))
    one, two = (torch.load(tmp_path / d / "checkpoint.pt") for d in ("one", "two"))
    for name in one["model"]:
        torch.testing.assert_close(two["model"][name], one["model"][name], rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(two["optimizer"]["emb"]["sum"], one["optimizer"]["emb"]["sum"], rtol=1e-4, atol=1e-7)
    for a, b in zip(two["optimizer"]["mlp"]["state"].values(), one["optimizer"]["mlp"]["state"].values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-3, atol=1e-9)
    assert one["optimizer"]["emb"]["sum"].any()  # the tables' state did accumulate
    if emb == "rowwise-adagrad":  # one float per row of the flat table
        rows = sum(v.shape[0] for k, v in one["model"].items() if k.startswith("embeddings.tables."))
        assert one["optimizer"]["emb"]["sum"].shape == (rows,)


def test_compressed_exchange_with_error_feedback_trains_with_adagrad(small_dataset, tmp_path):
    out = tmp_path / "run"
    horovodrun(2, _args(small_dataset, out, "--max-steps", "10", "--emb-optimizer", "rowwise-adagrad",
                        "--emb-lr", "0.05", "--mlp-optimizer", "adam", "--mlp-lr", "0.01", "--emb-compress", "int8",
                        "--mlp-compress", "int8", "--error-feedback", "mlp", "--emb-bits", "4"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["comm_bytes_sent_per_step"]["mean"] > 0
    assert 0.0 < summary["final"]["test"]["log_loss"] < 1.0


def test_resume_in_the_warmup_and_in_the_decay_is_bit_exact(small_dataset, tmp_path):
    # 30 steps an epoch, 2 epochs: warm-up steps 0-9, decay 30-59; every leg the same schedule
    flags = ["--epochs", "2", "--emb-optimizer", "rowwise-adagrad", "--emb-lr", "0.05", "--mlp-optimizer", "adam",
             "--mlp-lr", "0.01", "--lr-warmup-steps", "10", "--lr-decay-start", "30", "--lr-decay-steps", "30",
             "--lr-end", "0.01", "--emb-bits", "4", "--scale-period", "7", "--log-every", "1"]
    run_cmd(_args(small_dataset, tmp_path / "whole", *flags, "--max-steps", "45"))
    run_cmd(_args(small_dataset, tmp_path / "split", *flags, "--max-steps", "5"))
    run_cmd(_args(small_dataset, tmp_path / "split", *flags, "--max-steps", "38", "--resume"))
    run_cmd(_args(small_dataset, tmp_path / "split", *flags, "--max-steps", "45", "--resume"))
    whole, split = (torch.load(tmp_path / d / "checkpoint.pt") for d in ("whole", "split"))
    assert whole["step"] == split["step"] == 45
    for name, value in whole["model"].items():
        assert torch.equal(split["model"][name], value), name
    assert torch.equal(split["optimizer"]["emb"]["sum"], whole["optimizer"]["emb"]["sum"])
    rates = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "split") if r["event"] == "step"}
    assert sorted(rates) == list(range(1, 46))
    assert rates[1] == pytest.approx({"emb": 0.005, "mlp": 0.001})  # step 0: 1/10 of the rates
    assert rates[20] == pytest.approx({"emb": 0.05, "mlp": 0.01})
    assert rates[41]["mlp"] == pytest.approx(0.001 + 0.009 * (1 - 10 / 30) ** 2)  # step 40, lr-end 0.01 of 0.1


@pytest.mark.parametrize("flags, message", [
    (["--lr-warmup-steps", "100"], "--lr-warmup-steps (100) is longer than the run (30 steps in --epochs)"),
    (["--lr-decay-start", "20", "--lr-decay-steps", "20"], "--lr-decay-start + --lr-decay-steps (20 + 20) ends past"),
])
def test_schedules_that_do_not_fit_the_run_are_refused(small_dataset, tmp_path, flags, message):
    proc = subprocess.run(_args(small_dataset, tmp_path / "r", *flags), env=mpi_env(), capture_output=True, text=True)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr


def test_resume_with_another_optimizer_is_refused(small_dataset, tmp_path):
    out = tmp_path / "r"
    run_cmd(_args(small_dataset, out, "--max-steps", "3"))
    proc = subprocess.run(_args(small_dataset, out, "--max-steps", "6", "--resume", "--emb-optimizer",
                                "rowwise-adagrad"), env=mpi_env(), capture_output=True, text=True)
    assert proc.returncode == 1 and "optim.emb_optimizer: 'sgd' -> 'rowwise-adagrad'" in proc.stderr, proc.stderr
    run_cmd(_args(small_dataset, out, "--max-steps", "6", "--resume", "--lr", "0.05"))  # a rate may change
