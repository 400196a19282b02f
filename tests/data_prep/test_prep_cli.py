"""The CLI: bad input, resume after a kill, option mismatch, verify, inspect, synth, mpirun."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from data_prep.cli import cli
from data_prep.synth import CARDINALITY_PROFILES
from dqrm_mpi.data.schema import list_shards, read_meta
from prep_testlib import KAGGLE, assert_same_dataset, read_lines

ROOT = Path(__file__).resolve().parents[2]


def run(*args, code=0):
    """`dqrm-prep ARGS`, asserting its exit code (1: a library error, 2: a usage error)."""
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == code, r.output
    return r


def crit(raw, out, *more, code=0):
    return run("criteo", raw, out, "--no-progress", "--workers", "1", "--shard-rows", "400", *more, code=code)


def with_line(tmp_path, lineno: int, edit) -> Path:
    lines = read_lines(KAGGLE)
    lines[lineno - 1] = edit(lines[lineno - 1])
    p = tmp_path / "bad.txt"
    p.write_text("\n".join(lines) + "\n")
    return p


def set_field(i, value):
    def edit(line):
        f = line.split("\t")
        f[i] = value
        return "\t".join(f)
    return edit


# ------------------------------------------------------------ bad input

@pytest.mark.parametrize("edit,field,expected", [
    (lambda l: l.rsplit("\t", 1)[0], None, "40 tab-separated fields"),        # 39 fields
    (lambda l: l + "\textra", None, "40 tab-separated fields"),              # 41 fields
    (set_field(5, "12x"), "I5", "an integer"),                              # non-integer dense
    (set_field(3, "1.5"), "I3", "an integer"),
    (set_field(20, "zz12ab34"), "C7", "hexadecimal"),                       # non-hex categorical
    (set_field(16, "123456789"), "C3", "hexadecimal"),                      # too many digits
    (set_field(0, "2"), "label", "0 or 1"),
    (set_field(0, ""), "label", "0 or 1"),
])
def test_bad_line_is_reported_with_file_line_field(tmp_path, edit, field, expected):
    raw = with_line(tmp_path, 777, edit)
    r = crit(raw, tmp_path / "out", code=1)
    assert f"{raw}:777:" in r.output and expected in r.output, r.output
    if field:
        assert f"field {field} " in r.output
    assert not (tmp_path / "out" / "meta.json").exists()
    # --bad-lines skip: counted, reported, the rest kept
    r = crit(raw, tmp_path / "skip", "--bad-lines", "skip")
    assert "1 bad lines skipped" in r.output
    meta = read_meta(tmp_path / "skip")
    assert meta.extra["counts"]["rows_skipped_bad"] == 1
    assert sum(meta.rows.values()) == 1998
    ex = meta.extra["bad_line_examples"][0]
    assert ex["line"] == 777 and ex["field"] == field and expected in ex["expected"]


def test_empty_line_is_bad(tmp_path):
    raw = with_line(tmp_path, 5, lambda l: "")
    r = crit(raw, tmp_path / "o", code=1)
    assert f"{raw}:5: field label (column 1 of 40): expected 0 or 1, got ''" in r.output, r.output


def test_truncated_gzip(tmp_path):
    data = gzip.compress(KAGGLE.read_bytes())
    raw = tmp_path / "train.txt.gz"
    raw.write_bytes(data[: len(data) // 2])
    r = crit(raw, tmp_path / "o", code=1)
    assert str(raw) in r.output and "truncated or corrupt gzip" in r.output


def test_empty_and_missing_input(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    r = crit(tmp_path / "empty.txt", tmp_path / "o", code=1)
    assert "empty" in r.output and "empty.txt" in r.output
    r = crit(tmp_path / "nope.txt", tmp_path / "o2", code=1)
    assert "no such file" in r.output
    (tmp_path / "d").mkdir()
    r = crit(tmp_path / "d", tmp_path / "o3", code=1)
    assert "train.txt" in r.output
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "day_0").write_text(read_lines(KAGGLE)[0] + "\n")
    (tmp_path / "tb" / "day_2").write_text(read_lines(KAGGLE)[0] + "\n")
    r = crit(tmp_path / "tb", tmp_path / "o4", code=1)
    assert "without gaps; missing ['day_1']" in r.output, r.output


def test_unusable_output_directory(tmp_path, kaggle_file):
    f = tmp_path / "afile"
    f.write_text("x")
    r = crit(kaggle_file, f, code=2)  # refused by Click's path check: a usage error
    assert "afile" in r.output and "is a file" in r.output, r.output
    r = crit(kaggle_file, f / "sub", code=1)
    assert "cannot create output directory" in r.output
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        r = crit(kaggle_file, ro, code=1)
        assert "not writable" in r.output


# ------------------------------------------------------------ resume, options

def _cmd(raw, out, *more):
    return [sys.executable, "-m", "data_prep.cli", "criteo", str(raw), str(out), "--no-progress",
            "--shard-rows", "200", *map(str, more)]


@pytest.mark.parametrize("stage,workers", [("shards:3", 1), ("pieces:2", 1), ("shards:2", 2)])
def test_resume_after_kill_gives_identical_shards(kaggle_file, tmp_path, stage, workers):
    ref = tmp_path / "ref"
    crit(kaggle_file, ref, "--shard-rows", "200")
    out = tmp_path / "out"
    env = dict(os.environ, DQRM_PREP_KILL_AFTER=stage)
    p = subprocess.run(_cmd(kaggle_file, out, "--workers", workers, "--piece-bytes", 50_000), env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert not (out / "meta.json").exists() and (out / ".prep").is_dir()
    if stage.startswith("shards") and workers == 1:
        done = list_shards(out, "train")
        assert len(done) == 3  # killed right after the 3rd shard was renamed into place
        before = {pth: pth.stat().st_mtime_ns for pth in done}
    env.pop("DQRM_PREP_KILL_AFTER")
    p = subprocess.run(_cmd(kaggle_file, out, "--workers", workers, "--piece-bytes", 50_000), env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert_same_dataset(ref, out)
    meta = read_meta(out)
    assert meta.extra["resumed"] is True
    if stage.startswith("shards") and workers == 1:
        assert all(pth.stat().st_mtime_ns == t for pth, t in before.items())  # finished shards kept
        assert meta.extra["shards_written_this_run"] == sum(meta.extra["shards"].values()) - 3
    assert not list((out / "train").glob(".*tmp"))


def test_mismatched_options_refused_unless_overwrite(kaggle_file, tmp_path):
    out = tmp_path / "o"
    crit(kaggle_file, out)
    r = crit(kaggle_file, out)
    assert "nothing to do" in r.output
    r = crit(kaggle_file, out, "--seed", "5", code=1)
    assert "seed" in r.output and "--overwrite" in r.output
    r = crit(kaggle_file, out, "--seed", "5", "--overwrite")
    assert read_meta(out).options["seed"] == 5
    # an unfinished run with other options is refused too
    (out / "meta.json").unlink()
    (out / ".prep").mkdir()
    (out / ".prep" / "options.json").write_text(json.dumps({"seed": 1}))
    r = crit(kaggle_file, out, code=1)
    assert "unfinished run" in r.output
    # foreign shards without state
    shutil.rmtree(out / ".prep")
    r = crit(kaggle_file, out, code=1)
    assert "not made by this command" in r.output


def test_unfinished_run_of_another_work_file_layout_is_not_resumed(kaggle_file, tmp_path):
    out = tmp_path / "o"
    crit(kaggle_file, out, "--keep-temp")
    (out / "meta.json").unlink()
    options = out / ".prep" / "options.json"
    recorded = json.loads(options.read_text())
    del recorded["state_layout"]  # as an older dqrm-prep wrote it
    options.write_text(json.dumps(recorded))
    r = crit(kaggle_file, out, code=1)
    assert "unfinished run of another dqrm-prep version" in r.output and "--overwrite" in r.output
    crit(kaggle_file, out, "--overwrite")
    assert read_meta(out).rows["train"] > 0


# ------------------------------------------------------------ verify, inspect

def test_verify_and_inspect(kaggle_file, tmp_path):
    out = tmp_path / "o"
    crit(kaggle_file, out)
    r = run("verify", out)
    assert "ok" in r.output
    r = run("inspect", out)
    assert "1,714 rows" in r.output and "train" in r.output and "cardinalities" in r.output
    r = run("inspect", out, "--json")
    assert json.loads(r.output)["rows"]["train"] == 1714
    # an id at the cardinality -> verify fails
    shard = list_shards(out, "train")[1]
    card = read_meta(out).cardinalities[4]
    with h5py.File(shard, "r+") as f:
        f["sparse"][7, 4] = card
    r = run("verify", out, code=1)
    assert f"{shard}: row 7: C5 = {card}, expected 0 <= id < {card}" in r.output, r.output
    with h5py.File(shard, "r+") as f:
        f["sparse"][7, 4] = 0
        f["dense"][3, 0] = np.nan
    r = run("verify", out, code=1)
    assert f"{shard}: row 3: I1 = nan, expected a finite number" in r.output, r.output
    shard.unlink()
    r = run("verify", out, code=1)
    assert "meta.json says 1714" in r.output


# ------------------------------------------------------------ synth

def test_synth_file_and_planted_metrics(tmp_path):
    raw = tmp_path / "s.txt"
    r = run("synth", raw, "--rows", "7000", "--seed", "4", "--no-progress")
    assert "planted test AUC" in r.output
    info = json.loads(Path(str(raw) + ".planted.json").read_text())
    assert info["test"]["rows"] == 500 and info["val"]["rows"] == 500
    assert 0.6 < info["test"]["auc"] < 1.0 and info["test"]["log_loss"] > 0
    lines = raw.read_text().splitlines()
    assert len(lines) == 7000 and all(len(line.split("\t")) == 40 for line in lines[:200])
    fields = [line.split("\t") for line in lines[:2000]]
    assert any(f[3] == "" for f in fields) and any(f[20] == "" for f in fields)  # missing
    assert any(x.startswith("-") for f in fields for x in f[1:14])  # negative integers
    assert all(len(x) in (0, 8) for f in fields for x in f[14:])
    # deterministic, gzip variant has the same content
    run("synth", tmp_path / "s2.txt.gz", "--rows", "7000", "--seed", "4", "--no-progress")
    assert gzip.decompress((tmp_path / "s2.txt.gz").read_bytes()) == raw.read_bytes()
    # prep it: test split rows == planted test rows, ctr close
    crit(raw, tmp_path / "o")
    meta = read_meta(tmp_path / "o")
    assert meta.rows["test"] == 500 and meta.rows["val"] == 500
    assert meta.ctr == pytest.approx(info["train"]["ctr"])
    assert max(meta.cardinalities) <= 5000


def test_planted_metrics_copied_into_meta(tmp_path):
    """A synth file's planted test/val metrics land in meta.json (as write_synthetic_dataset
    records them) when the splits are the rows they were computed on, and only then."""
    raw = tmp_path / "p.txt"
    run("synth", raw, "--rows", "7000", "--seed", "2", "--no-progress")
    info = json.loads(Path(str(raw) + ".planted.json").read_text())
    crit(raw, tmp_path / "o", "--sub-sample-rate", "0.5")  # sub-sampling touches train only
    meta = read_meta(tmp_path / "o")
    planted = meta.extra["planted"]
    assert set(planted) == {"test", "val"}
    for split in ("test", "val"):
        assert planted[split] == info[split]
        assert set(planted[split]) >= {"auc", "log_loss", "rows", "ctr"}
        assert planted[split]["rows"] == meta.rows[split]
    assert json.loads((tmp_path / "o" / "meta.json").read_text())["extra"]["planted"]["test"]["auc"] == info["test"]["auc"]
    # Other rows than the sidecar describes (a line dropped): not copied.
    lines = raw.read_text().splitlines()
    cut = tmp_path / "cut.txt"
    cut.write_text("\n".join(lines[:-1]) + "\n")
    shutil.copy(str(raw) + ".planted.json", str(cut) + ".planted.json")
    crit(cut, tmp_path / "o2")
    assert "planted" not in read_meta(tmp_path / "o2").extra
    # A bad test-split line skipped: the test rows differ, not copied.
    f = lines[6200].split("\t")
    f[3] = "x"
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(lines[:6200] + ["\t".join(f)] + lines[6201:]) + "\n")
    shutil.copy(str(raw) + ".planted.json", str(bad) + ".planted.json")
    crit(bad, tmp_path / "o3", "--bad-lines", "skip")
    assert read_meta(tmp_path / "o3").rows["test"] == 499
    assert "planted" not in read_meta(tmp_path / "o3").extra


def test_synth_cardinalities_option(tmp_path):
    cards = ",".join(["7"] * 26)
    run("synth", tmp_path / "c.txt", "--rows", "3000", "--cardinalities", cards, "--no-progress")
    crit(tmp_path / "c.txt", tmp_path / "o")
    assert max(read_meta(tmp_path / "o").cardinalities) <= 7
    r = run("synth", tmp_path / "d.txt", "--rows", "10", "--cardinalities", "1,2", code=1)
    assert "--cardinalities: expected 26 integers >= 2, got 2 values" in r.output, r.output
    assert not (tmp_path / "d.txt").exists()


@pytest.mark.parametrize("profile", sorted(CARDINALITY_PROFILES))
def test_synth_preset_takes_each_cardinality_profile(tmp_path, profile):
    """`--preset NAME` offers exactly the profiles and writes ids below the profile's cardinalities."""
    choices = next(p for p in cli.commands["synth"].params if p.name == "preset").type.choices
    assert sorted(choices) == sorted(CARDINALITY_PROFILES)
    raw = tmp_path / "p.txt"
    run("synth", raw, "--rows", "700", "--preset", profile, "--no-progress")
    assert json.loads(Path(str(raw) + ".planted.json").read_text())["cardinalities"] == list(CARDINALITY_PROFILES[profile])


# ------------------------------------------------------------ MPI

@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
def test_mpirun_two_ranks_same_output(kaggle_file, tmp_path):
    pytest.importorskip("mpi4py")
    ref = tmp_path / "ref"
    crit(kaggle_file, ref, "--shard-rows", "200")
    out = tmp_path / "mpi"
    cmd = ["mpirun", "-np", "2", "--oversubscribe", "--allow-run-as-root",
           *_cmd(kaggle_file, out, "--workers", 1, "--piece-bytes", 50_000)]
    # env: Python's view of the environment, not the C-level one that an MPI initialised in this
    # process by an earlier in-process test has added to (a nested mpirun then fails silently)
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_same_dataset(ref, out)
    assert read_meta(out).extra["mpi_ranks"] == 2
