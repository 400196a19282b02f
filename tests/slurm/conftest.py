"""A real one-node SLURM cluster (launch/slurm_local.sh) for the tests marked ``slurm``."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_LOCAL = REPO / "launch" / "slurm_local.sh"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: runs jobs on a real one-node SLURM cluster (make test-slurm; root)")


def _free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (slurmctld, slurmd)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


_JOB_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
              "DEADLINE", "PREEMPTED"}


@dataclass(frozen=True)
class JobEnd:
    job: str
    state: str  # JobState: COMPLETED, FAILED, ...
    exit_code: str  # "code:signal"
    text: str  # the job's output file


@dataclass(frozen=True)
class SlurmCluster:
    dir: Path
    env: dict[str, str]  # SLURM_CONF, the venv first on PATH, this checkout importable

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.dir / "log").glob("*.log")))

    def run(self, args: list[str], timeout: int = 300, extra_env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=REPO, env={**self.env, **(extra_env or {})}, capture_output=True,
                              text=True, timeout=timeout)

    def start(self, options: list[str], script: str, args: list[str], output: Path,
              extra_env: dict[str, str] | None = None) -> str:
        """sbatch from the repository root; returns the job id."""
        proc = self.run(["sbatch", "--parsable", f"--output={output}", *options, script, *args],
                        extra_env=extra_env)
        assert proc.returncode == 0, f"sbatch {script}: {proc.stdout}{proc.stderr}"
        return proc.stdout.strip().split(";")[0]

    def job(self, job: str) -> dict[str, str]:
        """``scontrol -o show job``'s fields (JobState, Restarts, ExitCode, ...)."""
        return dict(f.split("=", 1) for f in self.run(["scontrol", "-o", "show", "job", job]).stdout.split()
                    if "=" in f)

    def wait_until(self, job: str, what: str, predicate, timeout: float = 600) -> dict[str, str]:
        """Poll the job's fields (every 0.5 s) until ``predicate(fields)``; returns them.  Fails
        the test (cancelling the job) after ``timeout`` s or when the job ended otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job)
            if predicate(fields):
                return fields
            if fields.get("JobState") in _JOB_ENDED or time.monotonic() > deadline:
                self.run(["scancel", job])
                pytest.fail(f"job {job}: {what} did not happen (JobState {fields.get('JobState')}, "
                            f"ExitCode {fields.get('ExitCode')})\n{self.logs()}")
            time.sleep(0.5)

    def wait(self, job: str, output: Path, timeout: float = 600) -> JobEnd:
        """Wait for the job to end (polling scontrol: sbatch --wait sleeps ever longer between
        its polls)."""
        fields = self.wait_until(job, "ending", lambda f: f.get("JobState") in _JOB_ENDED, timeout)
        text = output.read_text(errors="replace") if output.exists() else "<no output file>"
        return JobEnd(job, fields["JobState"], fields.get("ExitCode", "?"), text)

    def submit(self, options: list[str], script: str, args: list[str], output: Path,
               extra_env: dict[str, str] | None = None, timeout: float = 600) -> JobEnd:
        """start(), then wait() for the job to end."""
        return self.wait(self.start(options, script, args, output, extra_env), output, timeout)

    def sbatch(self, options: list[str], script: str, args: list[str], output: Path,
               extra_env: dict[str, str] | None = None) -> str:
        """submit(); fails the test (with the job file and the daemons' logs) unless the job
        completed with exit code 0.  Returns the job file's text."""
        end = self.submit(options, script, args, output, extra_env)
        if (end.state, end.exit_code) != ("COMPLETED", "0:0"):
            pytest.fail(f"job {end.job} ({script}): {end.state}, exit code {end.exit_code}\n"
                        f"job output:\n{end.text[-6000:]}\n{self.logs()}")
        return end.text


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    """slurmctld + slurmd + munged under a temporary directory, stopped at the end of the session."""
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root (slurmd starts job steps as their user)")
    cluster_dir = tmp_path_factory.mktemp("slurm")
    # nothing of an allocation these tests may run inside leaks into the jobs they submit
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env.update(DQRM_SLURM_DIR=str(cluster_dir), DQRM_SLURM_PORT=str(_free_port_pair()),
               SLURM_CONF=str(cluster_dir / "etc" / "slurm.conf"),
               # the jobs run this checkout with the venv running the tests
               DQRM_VENV=sys.prefix, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p))
    start = subprocess.run(["bash", str(SLURM_LOCAL), "start"], env=env, capture_output=True, text=True,
                           timeout=900)
    cluster = SlurmCluster(cluster_dir, env)
    try:
        if start.returncode != 0:
            pytest.fail(f"slurm_local.sh start exited {start.returncode}\n{start.stdout}{start.stderr}\n"
                        f"{cluster.logs() if (cluster_dir / 'log').is_dir() else ''}")
        yield cluster
    finally:
        subprocess.run(["bash", str(SLURM_LOCAL), "stop"], env=env, capture_output=True, timeout=120)
