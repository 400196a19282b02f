"""A real one-node SLURM cluster (launch/slurm_local.sh) for the tests marked ``slurm``."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
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

    def sbatch(self, options: list[str], script: str, args: list[str], output: Path,
               extra_env: dict[str, str] | None = None) -> str:
        """Submit from the repository root, wait for the job to end; return its output file's
        text.  Fails the test (with the output file and the daemons' logs) unless it exited 0."""
        proc = self.run(["sbatch", "--wait", f"--output={output}", *options, script, *args],
                        timeout=600, extra_env=extra_env)
        text = output.read_text(errors="replace") if output.exists() else "<no output file>"
        if proc.returncode != 0:
            pytest.fail(f"sbatch {script} exited {proc.returncode}\n{proc.stdout}{proc.stderr}\n"
                        f"job output:\n{text[-6000:]}\n{self.logs()}")
        return text


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    """slurmctld + slurmd + munged under a temporary directory, stopped at the end of the session."""
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root (slurmd starts job steps as their user)")
    cluster_dir = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ)
    env.update(DQRM_SLURM_DIR=str(cluster_dir), DQRM_SLURM_PORT=str(_free_port_pair()),
               SLURM_CONF=str(cluster_dir / "etc" / "slurm.conf"),
               # the jobs run this checkout with the venv running the tests
               DQRM_VENV=sys.prefix, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p))
    for var in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_JOB_NODELIST", "SLURM_TASKS_PER_NODE"):
        env.pop(var, None)  # tests run inside a SLURM job must not leak its allocation into ours
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
