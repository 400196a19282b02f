"""One vocabulary across the commands' options, errors in option names, --version everywhere."""
from __future__ import annotations

import json
from importlib.metadata import version

import pytest
from click.testing import CliRunner

from data_prep.cli import cli as prep_cli
from dqrm_mpi.cli.evaluate import main as eval_main
from dqrm_mpi.cli.export import main as export_main
from dqrm_mpi.cli.train import main as train_main

try:  # dqrm-repro, where this checkout has it
    from dqrm_mpi.cli.repro import main as repro_main
except ImportError:
    repro_main = None


def invoke(command, *args):
    return CliRunner().invoke(command, list(args), prog_name="dqrm-x")


@pytest.mark.parametrize("command", [c for c in (train_main, export_main, eval_main, prep_cli, repro_main) if c])
def test_every_command_has_version(command):
    result = invoke(command, "--version")
    assert result.exit_code == 0 and result.output.endswith(f", version {version('dqrm_mpi')}\n"), result.output


@pytest.mark.parametrize("args, message", [
    (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (["--resume", "auto", "--overwrite"], "--resume and --overwrite exclude each other"),
    (["--emb-bits", "4", "--pretrain-epochs", "1"], "--pretrain-epochs (1) must be below --epochs (1)"),
    (["--pretrain-epochs", "1", "--epochs", "2"], "set --emb-bits, --mlp-bits or --act-bits"),
    (["--mlp-scale", "tensor"], "--mlp-scale tensor needs --mlp-bits"),
    (["--mlp-bits", "4", "--mlp-quant", "none"], "--mlp-bits 4 and --mlp-quant none disagree"),
    (["--mlp-bits", "4", "--mlp-scale", "channel", "--mlp-quant", "matrix"], "disagree: give --mlp-scale alone"),
    (["--top-mlp", "32-2"], "--top-mlp must end in 1"),
    (["--emb-scale", "rows"], "'rows' is not one of 'table', 'row'"),
    (["--resume", "maybe"], "'maybe' is not one of 'no', 'yes', 'auto'"),
])
def test_train_errors_name_the_options(small_dataset, tmp_path, args, message):
    result = invoke(train_main, "--data", str(small_dataset), "--out", str(tmp_path / "r"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "_" not in result.output.split("Error:", 1)[1], result.output  # no Python field names


def _config(out):
    return json.loads((out / "config.json").read_text())


def test_old_spellings_warn_and_mean_the_same(small_dataset, tmp_path):
    common = ["--data", str(small_dataset), "--preset", "tiny", "--max-steps", "1", "--eval-splits", "test",
              "--emb-bits", "4", "--mlp-bits", "4", "--checkpoint-minutes", "0"]
    old = invoke(train_main, *common, "--out", str(tmp_path / "old"), "--emb-scale", "rowwise", "--mlp-quant", "matrix")
    assert old.exit_code == 0, old.output
    assert "--emb-scale rowwise is deprecated: use --emb-scale row" in old.output
    assert "--mlp-quant is deprecated: use --mlp-scale channel|tensor" in old.output
    new = invoke(train_main, *common, "--out", str(tmp_path / "new"), "--emb-scale", "row", "--mlp-scale", "tensor")
    assert new.exit_code == 0 and "deprecated" not in new.output, new.output
    assert _config(tmp_path / "old")["train"]["quant"] == _config(tmp_path / "new")["train"]["quant"]
    assert _config(tmp_path / "new")["train"]["quant"]["emb_scale"] == "row"
    assert _config(tmp_path / "new")["train"]["quant"]["mlp_scale"] == "tensor"


def test_bottom_mlp_in_the_reference_form_is_the_same_model(small_dataset, tmp_path):
    common = ["--data", str(small_dataset), "--max-steps", "1", "--eval-splits", "test", "--batch-size", "512",
              "--checkpoint-minutes", "0"]
    ref = invoke(train_main, *common, "--out", str(tmp_path / "ref"), "--bottom-mlp", "13-64-16")
    assert ref.exit_code == 0, ref.output
    assert "--bottom-mlp 13-64-16: read as the reference DLRM's form, which starts with the 13 inputs: " \
           "layers 64-16" in ref.output
    ours = invoke(train_main, *common, "--out", str(tmp_path / "ours"), "--bottom-mlp", "64-16")
    assert ours.exit_code == 0 and "reference" not in ours.output, ours.output
    assert _config(tmp_path / "ref")["model"] == _config(tmp_path / "ours")["model"]
    assert _config(tmp_path / "ref")["model"]["bottom_mlp"] == [64, 16]
