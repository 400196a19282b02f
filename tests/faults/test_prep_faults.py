"""Faults around `dqrm-prep criteo` as a person meets them, with real files and real
processes: a full disk, two runs into one OUT, an input edited in place, a killed main
process, file modes."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from data_prep.cli import cli
from dqrm_mpi.data.schema import list_shards, read_meta

ROOT = Path(__file__).resolve().parents[2]
KAGGLE = ROOT / "tests" / "data" / "criteo_kaggle_train_head1999.tsv"


def crit(raw, out, *more, code=0):
    r = CliRunner().invoke(cli, ["criteo", str(raw), str(out), "--no-progress", "--workers", "1",
                                 "--shard-rows", "400", *map(str, more)], catch_exceptions=False)
    assert r.exit_code == code, r.output
    return r


def prep_cmd(raw, out, *more) -> list[str]:
    return [sys.executable, "-m", "data_prep.cli", "criteo", str(raw), str(out), "--no-progress",
            "--shard-rows", "400", *map(str, more)]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


@pytest.fixture
def raw(tmp_path) -> Path:
    p = tmp_path / "train.txt"
    shutil.copy(KAGGLE, p)
    return p


# ------------------------------------------------------------ full disk

def _can_mount_tmpfs(where: Path) -> bool:
    p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                        f"mount -t tmpfs -o size=64k tmpfs {where}"], capture_output=True)
    return p.returncode == 0


@pytest.mark.parametrize("size", ["150k", "900k"])  # full while spilling rows / while writing shards
def test_full_disk_names_the_file_and_the_space_needed(raw, tmp_path, size):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("unshare") is None or not _can_mount_tmpfs(mnt):
        pytest.skip("needs unshare and a tmpfs mount in a user namespace")
    script = f"mount -t tmpfs -o size={size} tmpfs {mnt} && exec {' '.join(prep_cmd(raw, mnt / 'out', '--workers', 1))}"
    p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                       env=env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert f"Error: {mnt / 'out'}: no space left on device writing {mnt / 'out'}/" in p.stderr, p.stderr
    assert "this run needs about" in p.stderr and "free now" in p.stderr and "it resumes" in p.stderr
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr


# ------------------------------------------------------------ two runs, one OUT

def test_second_prep_into_one_output_is_refused_naming_the_first(raw, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dqrm_mpi.locking import DirectoryLock; "
         f"DirectoryLock({str(out)!r}, 'x', '.dqrm-prep.lock').acquire(); print('locked', flush=True); "
         "time.sleep(600)"],
        env=env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = crit(raw, out, code=1)
        assert (f"{out} is in use by another run (pid {holder.pid} on host {socket.gethostname()} since "
                in r.output), r.output
        assert not (out / "meta.json").exists() and not (out / ".prep").exists()
    finally:
        holder.kill()  # SIGKILL: the operating system releases the lock
        holder.wait()
    crit(raw, out)
    assert read_meta(out).rows["train"] == 1714


# ------------------------------------------------------------ input edited in place

def _edit_in_place(raw: Path) -> None:
    """Flip the label of line 10 (same size), as an editor or a re-download would."""
    lines = raw.read_bytes().split(b"\n")
    lines[9] = (b"1" if lines[9][:1] == b"0" else b"0") + lines[9][1:]
    raw.write_bytes(b"\n".join(lines))


def test_input_edited_between_kill_and_rerun_is_refused(raw, tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(prep_cmd(raw, out, "--workers", 1, "--piece-bytes", 50_000),
                       env=dict(env(), DQRM_PREP_KILL_AFTER="pieces:2"), cwd=ROOT, capture_output=True, timeout=120)
    assert p.returncode == -signal.SIGKILL and (out / ".prep").is_dir()
    size = raw.stat().st_size
    _edit_in_place(raw)
    assert raw.stat().st_size == size
    r = crit(raw, out, "--piece-bytes", 50_000, code=1)
    assert f"{out}: holds an unfinished run whose inputs changed since it started" in r.output, r.output
    assert "train.txt changed since" in r.output and "modified " in r.output and "content differs" in r.output
    assert "--overwrite" in r.output
    crit(raw, out, "--piece-bytes", 50_000, "--overwrite")
    fresh = tmp_path / "fresh"
    crit(raw, fresh)
    for a, b in zip(list_shards(out, "train"), list_shards(fresh, "train")):
        assert a.read_bytes() == b.read_bytes()  # the edited input only, byte for byte


def test_finished_dataset_with_a_changed_input_is_stale(raw, tmp_path):
    out = tmp_path / "out"
    crit(raw, out)
    os.utime(raw, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, or rewritten with the same bytes
    r = crit(raw, out, code=1)
    assert f"{out}: stale: the dataset there was made from other inputs (inputs: train.txt changed since " \
           f"(modified " in r.output, r.output
    assert "already complete" not in r.output and "--overwrite" in r.output


# ------------------------------------------------------------ killed main process

def _descendants(pid: int) -> set[int]:
    """Live (not zombie) descendants of ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    state = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            state[int(d.name)] = fields[0]
            children.setdefault(int(fields[1]), []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if state.get(c) != "Z":
                out.add(c)
                todo.append(c)
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            if (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z":
                alive.add(pid)
        except OSError:
            pass
    return alive


def test_workers_die_with_a_killed_main_process(tmp_path):
    raw = tmp_path / "train.txt"
    with open(raw, "wb") as f:
        for _ in range(40):
            f.write(KAGGLE.read_bytes())
    main = subprocess.Popen(prep_cmd(raw, tmp_path / "out", "--workers", 2, "--piece-bytes", 1 << 20),
                            env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(procs) < 3 and main.poll() is None and time.monotonic() < deadline:  # fork server + 2 workers
            procs = _descendants(main.pid)
            time.sleep(0.05)
        assert len(procs) >= 3, f"no pool of workers seen (exit code {main.poll()})"
        main.kill()
        main.wait()
        deadline = time.monotonic() + 30
        while _alive(procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _alive(procs)
        assert not left, f"processes left running after SIGKILL of dqrm-prep: {sorted(left)}"
    finally:  # whatever this test started ends with it
        main.kill()
        for pid in _alive(procs.union(*(_descendants(p) for p in procs))):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------ file modes

def test_every_file_prep_writes_is_readable_like_the_shards(raw, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        crit(raw, out)
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert modes["meta.json"] == modes["train/part-00000.h5"] == 0o644, modes
    assert set(modes.values()) == {0o644}, modes


# ------------------------------------------------------------ lines the CSV reader cannot take

def _with_line_777(tmp_path, edit) -> Path:
    lines = KAGGLE.read_bytes().split(b"\n")
    lines[776] = edit(lines[776])
    p = tmp_path / "bad.txt"
    p.write_bytes(b"\n".join(lines))
    return p


def _field(i: int, value: bytes):
    def edit(line: bytes) -> bytes:
        f = line.split(b"\t")
        f[i] = value
        return b"\t".join(f)
    return edit


@pytest.mark.parametrize("edit,expected", [
    (lambda l: l + b"a" * (10 << 20), "expected a line of at most 1,048,576 bytes, got 10,485,"),
    (_field(5, b"1\xff2"), "field I5 (column 6 of 40): expected UTF-8 text, got non-UTF-8 bytes: '1\\\\xff2'"),
    (_field(0, b"\xe9"), "field label (column 1 of 40): expected UTF-8 text, got non-UTF-8 bytes"),
    (_field(30, b"\xc3\x28abcdef"), "field C17 (column 31 of 40): expected UTF-8 text, got non-UTF-8 bytes"),
    (_field(7, b"1\r2"), "field I7 (column 8 of 40): expected no carriage return inside a line, got a carriage"),
], ids=["10MB-line", "non-utf8-dense", "non-utf8-label", "non-utf8-categorical", "carriage-return"])
def test_unreadable_line_is_named_by_line_and_skipped_on_request(tmp_path, edit, expected):
    raw = _with_line_777(tmp_path, edit)
    r = crit(raw, tmp_path / "out", code=1)
    assert f"Error: {raw}:777: {expected}" in r.output, r.output[:500]
    r = crit(raw, tmp_path / "skip", "--bad-lines", "skip")
    assert "1 bad lines skipped" in r.output
    meta = read_meta(tmp_path / "skip")
    assert meta.extra["counts"]["rows_skipped_bad"] == 1 and sum(meta.rows.values()) == 1998
    assert meta.extra["bad_line_examples"][0]["line"] == 777
    # the rows around the bad line are the same rows as without it
    clean = tmp_path / "clean.txt"
    clean.write_bytes(b"\n".join(l for i, l in enumerate(KAGGLE.read_bytes().split(b"\n")) if i != 776))
    crit(clean, tmp_path / "ref")
    assert read_meta(tmp_path / "ref").cardinalities == meta.cardinalities
