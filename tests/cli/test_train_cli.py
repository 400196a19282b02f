"""`dqrm-train` options: clear errors before any rank starts (help text: tests/cli/test_help.py)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from dqrm_mpi.cli.train import main


def invoke(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["--lr", "-1"], "Invalid value for '--lr'"),
    (["--lr", "1e300"], "Invalid value for '--lr'"),  # beyond float32: the first update would overflow
    (["--preset", "huge"], "'huge' is not one of"),
    (["--bottom-mlp", "512-x"], "not a dash-separated list of integers"),
    (["--device", "tpu"], "Invalid value for '--device'"),
    (["--eval-splits", "train"], "Invalid value for '--eval-splits'"),
    (["--prefetch", "-1"], "Invalid value for '--prefetch'"),
    (["--bottom-mlp", "64-8"], "bottom MLP output width 8 must equal the embedding dim 16"),
    (["--emb-optimizer", "adam"], "Invalid value for '--emb-optimizer'"),
    (["--mlp-optimizer", "rowwise-adagrad"], "Invalid value for '--mlp-optimizer'"),
    (["--lr-end", "0.5"], "--lr-end (0.5) must not exceed --lr (0.1)"),
    (["--lr-end", "-0.1"], "Invalid value for '--lr-end'"),
    (["--lr-decay-start", "5"], "--lr-decay-start needs --lr-decay-steps"),
    (["--lr-decay-start-step", "5"], "--lr-decay-start needs --lr-decay-steps"),  # the reference DLRM's spelling
    (["--lr-decay-power", "0"], "Invalid value for '--lr-decay-power'"),
    (["--lr-scaling", "cubic"], "Invalid value for '--lr-scaling'"),
])
def test_bad_options_are_clear_errors(small_dataset, tmp_path, args, message):
    result = invoke("--data", str(small_dataset), "--out", str(tmp_path / "r"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_missing_data_directory_is_named(tmp_path):
    result = invoke("--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "nope" in result.output and "does not exist" in result.output
