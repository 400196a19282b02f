"""`dqrm-train` options: help that teaches, clear errors before any rank starts."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from dqrm_mpi.cli.train import main


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_help_lists_every_option_with_defaults():
    result = invoke("--help")
    assert result.exit_code == 0
    for option in ("--data", "--out", "--preset", "--epochs", "--batch-size", "--lr", "--eval-every",
                   "--seed", "--max-steps", "--device", "--bottom-mlp", "--top-mlp", "--embedding-dim"):
        assert option in result.output, option
    assert "GLOBAL batch" in result.output and "horovodrun -np 2" in result.output
    assert "default: 0.1" in result.output and "default: kaggle" in result.output


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["--lr", "-1"], "Invalid value for '--lr'"),
    (["--preset", "huge"], "'huge' is not one of"),
    (["--bottom-mlp", "512-x"], "not a dash-separated list of integers"),
    (["--device", "tpu"], "Invalid value for '--device'"),
    (["--eval-splits", "train"], "Invalid value for '--eval-splits'"),
    (["--bottom-mlp", "64-8"], "bottom MLP output width 8 must equal the embedding dim 16"),
])
def test_bad_options_are_clear_errors(small_dataset, tmp_path, args, message):
    result = invoke("--data", str(small_dataset), "--out", str(tmp_path / "r"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_missing_data_directory_is_named(tmp_path):
    result = invoke("--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "nope" in result.output and "does not exist" in result.output
