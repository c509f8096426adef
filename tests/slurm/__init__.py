"""A real two-node Slurm cluster on one machine, for testing the sbatch launchers.

Recipe (verified on Debian bookworm, Slurm 22.05): ``slurmctld`` plus two ``slurmd -N nodeX`` that share the
host's address but listen on distinct ports, ``auth/none`` (no munge), CPUs oversubscribed through
``SlurmdParameters=config_overrides``. See /work/shared/notes/slurm-on-one-machine.md and docs/slurm.md.

Usage in a test module::

    from slurm import slurm_cluster  # noqa: F401  (the pytest fixture)

    def test_x(slurm_cluster):
        job = slurm_cluster.sbatch(["--wrap", "hostname"])
        assert slurm_cluster.wait_done(job)["JobState"] == "COMPLETED"
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterable, Optional

import pytest

SLURM_PACKAGES = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client"}
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE"}


def ensure_debian_packages(binaries: dict[str, str]) -> None:
    """Install the Debian packages providing ``binaries`` ({binary: package}) unless all are on PATH.

    Skips the calling test only when apt itself is unusable (no apt-get, or not root); an install that
    apt attempts and fails is an error.
    """
    search_path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = sorted({pkg for exe, pkg in binaries.items() if shutil.which(exe, path=search_path) is None})
    if not missing:
        return
    if shutil.which("apt-get") is None:
        pytest.skip(f"apt-get is unavailable, cannot install {missing}")
    if os.geteuid() != 0:
        pytest.skip(f"installing {missing} with apt-get needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock_wait = ["-o", "DPkg::Lock::Timeout=300"]  # other test sessions may hold the dpkg lock
    for cmd in (["apt-get", *lock_wait, "update", "-qq"],
                ["apt-get", *lock_wait, "install", "-y", "-qq", "--no-install-recommends", *missing]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """slurmctld + one slurmd per node, all state under ``root``; clients need :attr:`env`."""

    def __init__(self, root: Path, nodes: Iterable[str] = ("node1", "node2"), cpus_per_node: int = 4):
        self.root = Path(root)
        self.nodes = list(nodes)
        self.cpus_per_node = cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        # Jobs must not inherit the allocation of a pytest that itself runs inside a Slurm job.
        for key in list(self.env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del self.env[key]
        self.pids: list[int] = []

    # --- configuration -----------------------------------------------------------------------------
    def write_conf(self) -> None:
        for sub in ("state", "log", "run", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        r = self.root
        lines = [
            "ClusterName=grinci",
            f"SlurmctldHost={host}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            f"SlurmctldPort={ctld_port}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r}/log/jobcomp.txt",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",  # more CPUs than the host has: ranks oversubscribe cores
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            "EnforcePartLimits=ALL",
            "MinJobAge=3600",
            "KillWait=10",
            "InactiveLimit=0",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus_per_node} RealMemory=4000 State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        self.write_conf()
        subprocess.run(["/usr/sbin/slurmctld", "-c", "-i"], env=self.env, check=True)
        for node in self.nodes:
            subprocess.run(["/usr/sbin/slurmd", "-N", node], env=self.env, check=True)
        deadline = time.monotonic() + timeout
        pidfiles = [self.root / "run/slurmctld.pid", *(self.root / f"run/slurmd-{n}.pid" for n in self.nodes)]
        while True:
            self.pids = [int(p.read_text()) for p in pidfiles if p.exists() and p.read_text().strip()]
            states = self.client("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            alive = len(self.pids) == len(pidfiles) and all(_alive(pid) for pid in self.pids)
            if alive and len(states) == len(self.nodes) and all(s == "idle" for s in states):
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in (self.root / "log").glob("*.log"))
                self.stop()
                raise RuntimeError(f"Slurm did not come up (sinfo: {states}, pids: {self.pids})\n{logs}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel every job (so no trainer outlives the test), then stop the daemons."""
        if self.pids and _alive(self.pids[0]):
            self.client("scancel", "--full", "--quiet", *self.job_ids(), check=False)
            deadline = time.monotonic() + 30
            while self.job_ids(states="RUNNING,COMPLETING") and time.monotonic() < deadline:
                time.sleep(0.5)
        for pid in self.pids:
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in self.pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self.pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.pids = []

    # --- clients -----------------------------------------------------------------------------------
    def client(self, *cmd: str, check: bool = True, env: Optional[dict] = None) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=env or self.env, check=check, capture_output=True, text=True)

    def job_ids(self, states: str = "all") -> list[str]:
        out = self.client("squeue", "-h", "-o", "%i", "-t", states, check=False).stdout
        return out.split()

    def sbatch(self, args: list[str], env: Optional[dict] = None, cwd: Optional[Path] = None) -> str:
        """Submit with ``sbatch --parsable`` and return the job id."""
        proc = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                              check=True, capture_output=True, text=True)
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, StartTime, EndTime, ...)."""
        out = self.client("scontrol", "show", "-o", "job", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_done(self, job_id: str, timeout: float = 150.0, poll: float = 0.5) -> dict[str, str]:
        """Poll until the job reaches a final state; fail with the job record on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in FINISHED_STATES:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s: {info}")
            time.sleep(poll)

    def wait_for(self, predicate, timeout: float, poll: float = 0.25, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(poll)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie would still answer kill(0); the daemons are not our children, so this suffices.
    return True


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """Install Slurm if needed, start a two-node cluster (node1, node2) for the module, tear it down."""
    ensure_debian_packages(SLURM_PACKAGES)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
