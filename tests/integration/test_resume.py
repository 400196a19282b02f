"""A run stopped at a checkpoint and resumed ends where an uninterrupted run ends."""
from __future__ import annotations

import json
import subprocess

import torch

from dqrm_mpi.train.run_dir import read_metrics

from ..conftest import VENV_BIN, horovodrun, mpi_env, run_cmd

TRAIN = str(VENV_BIN / "dqrm-train")


def _args(data, out, *extra):
    return [TRAIN, "--data", str(data), "--out", str(out), "--preset", "tiny", "--batch-size", "400",
            "--seed", "3", "--epochs", "2", "--eval-splits", "test",
            "--emb-bits", "4", "--mlp-bits", "8", "--scale-period", "7", *extra]


def test_resume_matches_an_uninterrupted_run(small_dataset, tmp_path):
    # 30 steps per epoch: stop inside the first epoch, resume across the epoch boundary
    horovodrun(2, _args(small_dataset, tmp_path / "whole", "--max-steps", "40"))
    horovodrun(2, _args(small_dataset, tmp_path / "split", "--max-steps", "17"))
    horovodrun(2, _args(small_dataset, tmp_path / "split", "--max-steps", "40", "--resume"))
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt")
    split = torch.load(tmp_path / "split" / "checkpoint.pt")
    assert whole["step"] == split["step"] == 40
    for name, value in whole["model"].items():
        torch.testing.assert_close(split["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    steps = [r["step"] for r in read_metrics(tmp_path / "split") if r["event"] == "step"]
    assert steps == list(range(1, 41)), "the resumed run appends steps 18..40 to metrics.jsonl"
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 17 and summary["steps"] == 40


def test_out_with_a_run_is_refused_without_resume_or_overwrite(small_dataset, tmp_path):
    out = tmp_path / "r"
    run_cmd(_args(small_dataset, out, "--max-steps", "3", "--checkpoint-every", "2"))
    proc = subprocess.run(_args(small_dataset, out, "--max-steps", "3"), env=mpi_env(), capture_output=True, text=True)
    assert proc.returncode == 1 and "already holds a run" in proc.stderr and "--resume" in proc.stderr
    proc = subprocess.run(_args(small_dataset, out, "--max-steps", "3", "--resume", "--batch-size", "200"),
                          env=mpi_env(), capture_output=True, text=True)
    assert proc.returncode == 1 and "batch_size: 400 -> 200" in proc.stderr
    proc = subprocess.run(_args(small_dataset, out, "--max-steps", "3", "--resume"), env=mpi_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "at step 3" in proc.stderr and "raise --epochs or --max-steps" in proc.stderr
    run_cmd(_args(small_dataset, out, "--max-steps", "2", "--overwrite"))
    assert [r["step"] for r in read_metrics(out) if r["event"] == "step"] == [1, 2]
