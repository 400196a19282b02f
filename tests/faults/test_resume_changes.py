"""Resuming with what changed since the checkpoint: another number of ranks (1 -> 2, 2 -> 1,
2 -> 3 with a global batch 3 divides) ends with the parameters of an uninterrupted run; a
batch the ranks do not divide, or another --batch-size, is refused; another --lr is allowed
and said."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dqrm_mpi.train.checkpoint_file import read_checkpoint
from dqrm_mpi.train.run_dir import read_metrics

from ..conftest import run_cmd
from .conftest import on_ranks, run, train_args


def _train(np_: int, data: Path, out: Path, *extra: str):
    args = train_args(data, out, "--seed", "3", *extra)
    return run_cmd(on_ranks(np_, args) if np_ > 1 else args)


def _assert_same_parameters(out: Path, whole: Path) -> None:
    resumed, expected = read_checkpoint(out / "checkpoint.pt"), read_checkpoint(whole / "checkpoint.pt")
    assert resumed["step"] == expected["step"]
    for name, value in expected["model"].items():  # float sums in another order: as 1 vs 2 ranks differ
        torch.testing.assert_close(resumed["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def whole(small_dataset, tmp_path_factory) -> Path:
    """8 uninterrupted steps on 2 ranks (global batch 400)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    _train(2, small_dataset, out, "--max-steps", "8")
    return out


@pytest.mark.parametrize("before, after", [(1, 2), (2, 1)], ids=["1to2", "2to1"])
def test_resume_on_another_number_of_ranks_ends_as_an_uninterrupted_run(small_dataset, whole, tmp_path, before,
                                                                         after):
    out = tmp_path / "run"
    _train(before, small_dataset, out, "--max-steps", "4")
    _train(after, small_dataset, out, "--max-steps", "8", "--resume")
    _assert_same_parameters(out, whole)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == after and summary["resumed_from_step"] == 4 and summary["steps"] == 8
    assert [r["step"] for r in read_metrics(out) if r["event"] == "step"] == list(range(1, 9))


def test_resume_from_two_to_three_ranks_with_a_batch_three_divides(small_dataset, tmp_path):
    _train(2, small_dataset, tmp_path / "whole", "--max-steps", "6", "--batch-size", "600")
    out = tmp_path / "run"
    _train(2, small_dataset, out, "--max-steps", "3", "--batch-size", "600")
    _train(3, small_dataset, out, "--max-steps", "6", "--batch-size", "600", "--resume")
    _assert_same_parameters(out, tmp_path / "whole")
    assert json.loads((out / "summary.json").read_text())["world_size"] == 3


def test_resume_on_ranks_that_do_not_divide_the_batch_is_refused(small_dataset, whole, tmp_path):
    out = tmp_path / "run"
    _train(1, small_dataset, out, "--max-steps", "2")
    proc = run(on_ranks(3, train_args(small_dataset, out, "--seed", "3", "--max-steps", "4", "--resume")))
    assert proc.returncode != 0
    assert "--batch-size 400 is the global batch; it must be divisible by the number of ranks (3)" in \
        proc.stdout + proc.stderr
    assert read_checkpoint(out / "checkpoint.pt")["step"] == 2  # the refused run left the run as it was


def test_resume_refuses_another_batch_size_and_allows_another_lr(small_dataset, tmp_path):
    out = tmp_path / "run"
    _train(1, small_dataset, out, "--max-steps", "4")
    proc = run(train_args(small_dataset, out, "--seed", "3", "--max-steps", "6", "--resume", "--batch-size", "200"))
    assert proc.returncode == 1 and "was trained with other settings (batch_size: 400 -> 200)" in proc.stderr
    assert [r["step"] for r in read_metrics(out) if r["event"] == "step"] == [1, 2, 3, 4]
    proc = _train(1, small_dataset, out, "--max-steps", "6", "--resume", "--lr", "0.05")
    assert "--resume: settings changed since the checkpoint (allowed; config.json holds the new ones): " \
           "lr: 0.1 -> 0.05" in proc.stderr, proc.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 0.05
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 6 and summary["samples"] == 2 * 400
    assert read_checkpoint(out / "checkpoint.pt")["train_config"]["lr"] == 0.05
