"""A run directory belongs to one run, is resumed without repeated metrics, is readable by
others and survives a full disk without half-written files."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dqrm_mpi.model import DLRM, model_config_from_preset
from dqrm_mpi.train.run_dir import CHECKPOINT, RunDir, read_metrics

from ..conftest import SMALL_CARDINALITIES, VENV_BIN, mpi_env, run_cmd
from .conftest import run, start, train_args


def test_second_run_on_the_same_out_is_refused_naming_the_first(small_dataset, tmp_path):
    out = tmp_path / "run"
    first = start(train_args(small_dataset, out, "--epochs", "1000"), tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        for extra in ((), ("--overwrite",), ("--resume",)):
            proc = run(train_args(small_dataset, out, "--max-steps", "2", *extra))
            assert proc.returncode == 1, proc.stdout
            assert f"is in use by another run (pid {first.pid} on host {os.uname().nodename}" in proc.stderr
        assert first.poll() is None, "the refused runs left the first one alone"
    finally:
        first.kill()
        first.wait()
    run_cmd(train_args(small_dataset, out, "--max-steps", "2", "--overwrite"))  # the lock died with its holder


def test_resume_truncates_metrics_to_the_checkpoint(small_dataset, tmp_path):
    out = tmp_path / "run"
    run_cmd(train_args(small_dataset, out, "--max-steps", "4"))
    at_step_4 = (out / "checkpoint.pt").read_bytes()
    run_cmd(train_args(small_dataset, out, "--max-steps", "7", "--resume"))
    (out / "checkpoint.pt").write_bytes(at_step_4)  # as if killed after step 7, before its checkpoint
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"event": "step", "step": 8, "lo')  # and cut off in the middle of a line
    run_cmd(train_args(small_dataset, out, "--max-steps", "9", "--resume"))
    records = read_metrics(out)
    assert [r["step"] for r in records if r["event"] == "step"] == list(range(1, 10))
    assert [r["step"] for r in records if r["event"] == "eval"] == [4, 9]


def test_run_files_are_readable_by_others(small_dataset, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(train_args(small_dataset, out, "--max-steps", "2"), env=mpi_env(), capture_output=True,
                          text=True, preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr
    for name in ("config.json", "summary.json", "metrics.jsonl", "checkpoint.pt"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


@pytest.fixture()
def tiny_fs(tmp_path):
    """A 160 KiB tmpfs (root only): room for a run's JSON and metrics, not for its checkpoint."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_disk_full_names_the_path_and_leaves_no_partial_file(small_dataset, tmp_path, tiny_fs):
    out = tiny_fs / "run"
    proc = run(train_args(small_dataset, out, "--max-steps", "3"))
    assert proc.returncode == 1, proc.stdout
    assert "no space left on the device (needs about" in proc.stderr and str(out) in proc.stderr
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not (out / "checkpoint.pt").exists()
    json.loads((out / "config.json").read_text())
    assert all(r["event"] for r in read_metrics(out))  # whole lines only

    model = tmp_path / "run"
    run_cmd(train_args(small_dataset, model, "--max-steps", "2"))
    proc = run([str(VENV_BIN / "dqrm-export"), str(model / "checkpoint.pt"), str(tiny_fs / "m.dqrm")])
    assert proc.returncode == 1 and f"{tiny_fs / 'm.dqrm'}: no space left on the device" in proc.stderr
    assert list(tiny_fs.iterdir()) == [out]


def _tiny_state(step: int) -> dict:
    config = model_config_from_preset("tiny", SMALL_CARDINALITIES)
    return {"model": DLRM(config).state_dict(), "model_config": config.to_dict(), "step": step}


def test_checkpoint_with_non_finite_weights_keeps_the_previous_one(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.save_checkpoint(_tiny_state(1))
    bad = _tiny_state(2)
    bad["model"]["top.layers.0.bias"][1] = float("inf")
    with pytest.raises(FloatingPointError, match="step 2: top.layers.0.bias holds NaN/inf values"):
        run_dir.save_checkpoint(bad)
    run_dir.close()
    assert torch.load(tmp_path / CHECKPOINT)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT, "metrics.jsonl"]
