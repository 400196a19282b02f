"""`dqrm-train`'s reporting options: clear errors before any rank starts, and the config they build."""
from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dqrm_mpi.cli.log_options import log_options, pop_log_config
from dqrm_mpi.cli.train import main


@pytest.mark.parametrize("args, message", [
    (["--progress", "fancy"], "Invalid value for '--progress'"),
    (["--log-every", "0"], "Invalid value for '--log-every'"),
    (["--progress-seconds", "-1"], "Invalid value for '--progress-seconds'"),
])
def test_bad_log_options_are_clear_errors(small_dataset, tmp_path, args, message):
    result = CliRunner().invoke(main, ["--data", str(small_dataset), "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_log_options_build_the_log_config(tmp_path):
    seen = {}

    @click.command()
    @log_options
    def cmd(**options):
        seen["log"] = pop_log_config(options)
        seen["rest"] = options

    result = CliRunner().invoke(cmd, ["--progress", "log", "--progress-seconds", "30", "--log-every", "50",
                                      "--tensorboard", str(tmp_path / "tb"), "--keep-epoch-checkpoints",
                                      "--keep-best", "val"])
    assert result.exit_code == 0, result.output
    log = seen["log"]
    assert (log.progress, log.progress_seconds, log.log_every, log.tensorboard) == ("log", 30.0, 50, Path(tmp_path / "tb"))
    assert seen["rest"] == {"keep_epoch_checkpoints": True, "keep_best": "val"}  # TrainConfig fields
