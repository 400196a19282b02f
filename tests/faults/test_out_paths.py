"""``--out`` where no run directory can be: a file, under a file, in a read-only parent; and a
path with spaces and non-ASCII characters, trained, resumed, exported and evaluated."""
from __future__ import annotations

import json
import os
import stat

import pytest

from dqrm_mpi.train.checkpoint_file import read_checkpoint

from ..conftest import VENV_BIN, run_cmd
from .conftest import run, train_args

EXPORT, EVAL = str(VENV_BIN / "dqrm-export"), str(VENV_BIN / "dqrm-eval")


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only parent"])
def test_out_where_no_run_directory_can_be_is_refused_naming_it(small_dataset, tmp_path, case):
    parent = tmp_path / "parent"
    parent.mkdir()
    if case == "a file":
        out = parent / "taken"
        out.write_text("a file\n")
        expected = f"Invalid value for '--out': Directory '{out}' is a file"
    elif case == "under a file":
        (parent / "taken").write_text("a file\n")
        out = parent / "taken" / "run"
        expected = f"--out {out}: [Errno 20] Not a directory"
    else:
        if os.geteuid() == 0:
            pytest.skip("running as root: a read-only directory does not stop root from writing in it")
        out = parent / "run"
        parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
        expected = f"--out {out}"
    try:
        proc = run(train_args(small_dataset, out, "--max-steps", "2"))
    finally:
        parent.chmod(stat.S_IRWXU)
    assert proc.returncode != 0 and expected in proc.stderr, proc.stderr[-2000:]
    if case == "read-only parent":
        assert "Permission denied" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in parent.iterdir()) == ([] if case == "read-only parent" else ["taken"])


def test_out_with_spaces_and_non_ascii_characters_trains_resumes_and_exports(small_dataset, tmp_path):
    out = tmp_path / "with space" / "ünï côdé run"
    run_cmd(train_args(small_dataset, out, "--max-steps", "2", "--emb-bits", "4", "--mlp-bits", "4"))
    proc = run_cmd(train_args(small_dataset, out, "--max-steps", "3", "--emb-bits", "4", "--mlp-bits", "4",
                              "--resume"))
    assert f"resuming from {out / 'checkpoint.pt'} at step 2" in proc.stdout + proc.stderr
    assert read_checkpoint(out / "checkpoint.pt")["step"] == 3
    assert read_checkpoint(out / "checkpoint-prev.pt")["step"] == 2
    packed = tmp_path / "with space" / "mödel ß.dqrm"
    run_cmd([EXPORT, str(out / "checkpoint.pt"), str(packed)])
    result = json.loads(run_cmd([EVAL, str(packed), "--data", str(small_dataset)]).stdout)
    assert result["model"] == str(packed) and result["rows"] == 2000
