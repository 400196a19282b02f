"""A checkpoint is as trusted as a shard: digests checked on every load (--resume, --resume auto,
dqrm-export, dqrm-eval, dqrm-repro diagnose), finite weights of the recorded architecture, the
previous checkpoint kept, and messages that say what is wrong with a file."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from dqrm_mpi.train.checkpoint_file import digest, read_checkpoint, sealed
from dqrm_mpi.train.run_dir import read_metrics

from ..conftest import VENV_BIN, run_cmd
from .conftest import run, start, train_args

EXPORT, EVAL, REPRO = str(VENV_BIN / "dqrm-export"), str(VENV_BIN / "dqrm-eval"), str(VENV_BIN / "dqrm-repro")
INT4 = ("--emb-bits", "4", "--mlp-bits", "4")
TABLE = "embeddings.tables.2.weight"


@pytest.fixture(scope="module")
def int4_run(small_dataset, tmp_path_factory) -> Path:
    """An INT4 run of 4 steps checkpointed every 2: checkpoint.pt at step 4, checkpoint-prev.pt at 2."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    run_cmd(train_args(small_dataset, out, "--max-steps", "4", "--checkpoint-every", "2", *INT4))
    return out


def _copy_run(run_dir: Path, to: Path) -> Path:
    return Path(shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns(".lock", ".ranks")))


def _tensor_offset(path: Path, name: str) -> int:
    """Where the bytes of model tensor ``name`` lie in checkpoint file ``path``."""
    values = torch.load(path, weights_only=True)["model"][name].contiguous().numpy().tobytes()
    data = path.read_bytes()
    assert data.count(values) == 1, name
    return data.index(values)


def _xor(path: Path, offset: int, mask: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def _resume(small_dataset, out: Path, *extra: str):
    return run(train_args(small_dataset, out, "--max-steps", "6", *INT4, *extra))


def test_flipped_bytes_are_refused_naming_the_file_and_tensor(int4_run, small_dataset, tmp_path):
    """XOR 0xFF at three offsets in three tensors (the issue's first case)."""
    out = _copy_run(int4_run, tmp_path / "run")
    ckpt = out / "checkpoint.pt"
    for name, at in ((TABLE, 17), ("bottom.layers.0.weight", 5), ("top.layers.0.weight", 40)):
        _xor(ckpt, _tensor_offset(ckpt, name) + at, 0xFF)
    for args in ([EXPORT, str(ckpt), str(tmp_path / "m.dqrm")], [EVAL, str(ckpt), "--data", str(small_dataset)],
                 train_args(small_dataset, out, "--max-steps", "6", "--resume", *INT4)):
        proc = run(args)
        assert proc.returncode == 1, (args[0], proc.stdout[-2000:])
        assert f"{ckpt}: damaged: tensor model/bottom.layers.0.weight does not match its CRC-32" in proc.stderr, \
            proc.stderr[-2000:]
    assert not (tmp_path / "m.dqrm").exists()


def test_changed_exponent_byte_is_refused_by_resume_export_and_diagnose(small_dataset, tmp_path):
    """One exponent byte: a finite -4.4e29 that no finite check notices (the issue's second and
    third cases), on an FP32 run so that dqrm-repro diagnose reads it too."""
    out = tmp_path / "fp32"
    run_cmd(train_args(small_dataset, out, "--max-steps", "2"))
    ckpt = out / "checkpoint.pt"
    at = _tensor_offset(ckpt, TABLE) + 4 * 10 + 3  # the sign-and-exponent byte of value 10
    data = bytearray(ckpt.read_bytes())
    data[at] = 0xF0
    ckpt.write_bytes(bytes(data))
    assert abs(torch.load(ckpt, weights_only=True)["model"][TABLE].flatten()[10]) > 1e29
    for args in ([EXPORT, str(ckpt), str(tmp_path / "m.dqrm")],
                 [REPRO, "diagnose", str(out), "--data", str(small_dataset), "--splits", "test"],
                 train_args(small_dataset, out, "--max-steps", "4", "--resume")):
        proc = run(args)
        assert proc.returncode == 1, (args[:2], proc.stdout[-2000:])
        assert f"{ckpt}: damaged: tensor model/{TABLE} does not match its CRC-32" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a checkpoint", "plain state dict"])
def test_unreadable_checkpoint_says_what_it_is(int4_run, small_dataset, tmp_path, damage):
    out = _copy_run(int4_run, tmp_path / "run")
    ckpt = out / "checkpoint.pt"
    size = ckpt.stat().st_size
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:size // 2])
        expected = f"{ckpt}: truncated ({size // 2} of {size} bytes)"
    elif damage == "empty":
        ckpt.write_bytes(b"")
        expected = f"{ckpt}: empty (0 bytes)"
    elif damage == "not a checkpoint":
        ckpt.write_text("not a model at all\n")
        expected = f"{ckpt}: not a checkpoint (no dqrm-train header)"
    else:
        torch.save(torch.load(ckpt, weights_only=True)["model"], ckpt)
        expected = f"{ckpt}: not a checkpoint (no dqrm-train header)"
    for args in ([EXPORT, str(ckpt), str(tmp_path / "m.dqrm")],
                 train_args(small_dataset, out, "--max-steps", "6", "--resume", *INT4)):
        proc = run(args)
        assert proc.returncode == 1 and expected in proc.stderr, proc.stderr[-2000:]


def test_export_into_a_missing_directory_names_it_as_typed(int4_run, tmp_path):
    proc = run([EXPORT, str(int4_run / "checkpoint.pt"), "missing/sub/m.dqrm"], cwd=tmp_path)
    assert proc.returncode == 1
    assert "missing/sub/m.dqrm: the directory missing/sub does not exist" in proc.stderr, proc.stderr
    assert ".tmp" not in proc.stderr


def test_checkpoint_without_digests_loads_with_a_note(int4_run, small_dataset, tmp_path):
    old = tmp_path / "old.pt"
    state = torch.load(int4_run / "checkpoint.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k not in ("header", "digest")}, old)
    new = json.loads(run_cmd([EVAL, str(int4_run / "checkpoint.pt"), "--data", str(small_dataset)]).stdout)
    proc = run_cmd([EVAL, str(old), "--data", str(small_dataset)])
    assert json.loads(proc.stdout)["auc"] == new["auc"]
    notes = [line for line in proc.stderr.splitlines() if "before checkpoints carried digests" in line]
    assert notes == [f"note: {old} was written before checkpoints carried digests: loaded without verifying "
                     "its bytes"]


def _resealed(state: dict, path: Path) -> Path:
    """``state`` written with digests that match it (as a writer other than dqrm-train could)."""
    torch.save(sealed(state, 0), path)
    assert digest(torch.load(path, weights_only=True)) == torch.load(path, weights_only=True)["digest"]
    return path


@pytest.mark.parametrize("fault", ["inf", "shape"])
def test_what_a_digest_cannot_catch_is_refused(int4_run, tmp_path, fault):
    state = torch.load(int4_run / "checkpoint.pt", weights_only=True)
    if fault == "inf":
        state["model"]["top.layers.0.weight"][0, 0] = float("-inf")
        expected = "tensor model/top.layers.0.weight holds NaN/inf values"
    else:
        state["model"][TABLE] = torch.zeros(301, 8)
        expected = f"tensor model/{TABLE} has shape [301, 8], the architecture recorded in the file gives [300, 8]"
    ckpt = _resealed(state, tmp_path / "checkpoint.pt")
    proc = run([EXPORT, str(ckpt), str(tmp_path / "m.dqrm")])
    assert proc.returncode == 1 and f"{ckpt}: {expected}" in proc.stderr, proc.stderr[-2000:]


def test_previous_checkpoint_is_kept_and_resume_auto_falls_back_to_it(int4_run, small_dataset, tmp_path):
    assert read_checkpoint(int4_run / "checkpoint.pt")["step"] == 4
    assert read_checkpoint(int4_run / "checkpoint-prev.pt")["step"] == 2
    out = _copy_run(int4_run, tmp_path / "run")
    ckpt = out / "checkpoint.pt"
    _xor(ckpt, _tensor_offset(ckpt, TABLE) + 3, 0x01)
    proc = _resume(small_dataset, out, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"--resume auto: {ckpt}: damaged: tensor model/{TABLE} does not match its CRC-32" in proc.stderr
            and f"resuming from {out / 'checkpoint-prev.pt'} at step 2 instead (the checkpoint of step 4 is lost: "
                "steps 3..4 are trained again" in proc.stderr), proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 2
    assert [r["step"] for r in read_metrics(out) if r["event"] == "step"] == list(range(1, 7))
    assert read_checkpoint(out / "checkpoint.pt")["step"] == 6
    assert (out / "checkpoint-damaged.pt").exists()


def test_resume_auto_without_checkpoint_pt_resumes_from_the_previous_one(int4_run, small_dataset, tmp_path):
    """As a run killed between the two renames of a checkpoint's rotation leaves it."""
    out = _copy_run(int4_run, tmp_path / "run")
    (out / "checkpoint.pt").unlink()
    proc = _resume(small_dataset, out, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "checkpoint-prev.pt at step 2" in proc.stderr, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 2


def test_sigkill_while_checkpointing_every_step_always_leaves_a_checkpoint_to_resume(small_dataset, tmp_path):
    """20 SIGKILLs at random moments of a run writing a checkpoint after every step, each try
    resuming (--resume auto) what the last one left: checkpoint.pt or checkpoint-prev.pt
    always verifies, and the resumed run goes on from it."""
    rng = random.Random(25)
    out, log = tmp_path / "run", tmp_path / "train.log"
    args = train_args(small_dataset, out, "--epochs", "1000", "--checkpoint-every", "1", "--resume", "auto")
    steps = []
    for attempt in range(20):
        job = start(args, log)
        try:
            deadline = time.monotonic() + 120
            while not _has_checkpoint(out, after=steps[-1] if steps else 0) and job.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            assert job.poll() is None, log.read_text()[-3000:]
            time.sleep(rng.uniform(0.0, 0.5))  # into the following steps and their checkpoint writes
        finally:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        usable = []
        for name in ("checkpoint.pt", "checkpoint-prev.pt"):
            try:
                usable.append(read_checkpoint(out / name, note=_no_note)["step"])
            except (OSError, ValueError) as e:
                print(f"try {attempt}: {e}")
        assert usable, f"try {attempt}: neither checkpoint verifies"
        steps.append(max(usable))
        if attempt:  # a resumed run removes what the write the last kill cut off left
            assert len(list(out.glob(".checkpoint.pt.*.tmp"))) <= 1
    assert steps == sorted(set(steps)), steps  # every try went on from the last


def _has_checkpoint(out: Path, after: int) -> bool:
    """Whether ``out`` has a checkpoint of a step past ``after`` (its metrics say so)."""
    try:
        return any(r.get("event") == "checkpoint" and r["step"] > after for r in read_metrics(out))
    except (OSError, ValueError):
        return False


def _no_note(text: str) -> None:
    raise AssertionError(f"a checkpoint without digests: {text}")


def test_damaged_optimizer_state_is_refused_naming_its_tensor(small_dataset, tmp_path):
    """The digests cover every tensor of the checkpoint, the optimizers' state as much as the model."""
    out = tmp_path / "run"
    optimizers = ("--emb-optimizer", "rowwise-adagrad", "--mlp-optimizer", "adam")
    run_cmd(train_args(small_dataset, out, "--max-steps", "2", *optimizers))
    ckpt = out / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    assert "optimizer/emb/sum" in state["digest"]["tensors"]
    data = bytearray(ckpt.read_bytes())
    at = data.index(state["optimizer"]["emb"]["sum"].contiguous().numpy().tobytes())
    data[at + 1] ^= 0x01
    ckpt.write_bytes(bytes(data))
    for args in ([EXPORT, str(ckpt), str(tmp_path / "m.dqrm")],
                 train_args(small_dataset, out, "--max-steps", "4", "--resume", *optimizers)):
        proc = run(args)
        assert proc.returncode == 1, proc.stdout[-2000:]
        assert f"{ckpt}: damaged: tensor optimizer/emb/sum does not match its CRC-32" in proc.stderr, \
            proc.stderr[-2000:]
