"""A real single-node Slurm on localhost for the opt-in Slurm tests.

Opt-in: ``LAPO_SLURM_TEST=1``, as root (it installs Debian's slurm-wlm and munge where
missing and starts the daemons that are not running). A test suite must not depend on a
system daemon it does not own, so a plain ``make test`` skips these tests. The cluster it
configures is local: one node (this host), one partition, no accounting.

The session fixture `slurm` brings the cluster up once for every test that asks for it
and leaves the machine as it found it. Each job it submits carries the session's job
name and a ``--time`` bound. Clean-up runs in a watchdog process that outlives pytest:
when its pipe from the session closes (the session ended, failed, or was killed, even
with ``kill -9``), it cancels the session's jobs, waits for them to leave, and stops
the daemons this session started (by the process ids it recorded).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = Path("/etc/slurm/slurm.conf")
MARK = "# written by lapo tests/slurm_harness.py"
PIDFILES = {
    "munged": Path("/run/munge/munged.pid"),
    "slurmctld": Path("/run/slurmctld.pid"),
    "slurmd": Path("/run/slurmd.pid"),
}
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def sh(cmd: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(
            f"`{cmd}` failed ({res.returncode}): {res.stdout[-2000:]} {res.stderr[-2000:]}"
        )
    return res


def _write_conf() -> None:
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
    CONF.parent.mkdir(parents=True, exist_ok=True)
    for d in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm"):
        Path(d).mkdir(parents=True, exist_ok=True)
    CONF.write_text(
        f"""{MARK}
ClusterName=lapo-test
SlurmctldHost={host}
AuthType=auth/munge
# a requeued job waits this long before it may start again (default 120 s)
AuthInfo=cred_expire=15
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
MpiDefault=none
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    )


def _pid_of(name: str) -> int | None:
    """The pid in `name`'s pid file, if that process is alive and is `name`."""
    try:
        pid = int(PIDFILES[name].read_text().split()[0])
        return pid if Path(f"/proc/{pid}/comm").read_text().strip() == name else None
    except (OSError, ValueError, IndexError):
        return None


def _running(name: str) -> bool:
    return sh(f"pgrep -x {name}", check=False).returncode == 0


# The watchdog: blocks on stdin; at EOF cancels the session's jobs and stops its daemons.
WATCHDOG = r"""
import subprocess, sys, time
name, daemons = sys.argv[1], [d.split(":") for d in sys.argv[2:]]
sys.stdin.read()
subprocess.run(["scancel", "--name", name], capture_output=True)
deadline = time.time() + 90
while time.time() < deadline:
    left = subprocess.run(["squeue", "-h", "-n", name], capture_output=True, text=True)
    if left.returncode != 0 or not left.stdout.strip():
        break
    time.sleep(1)
for pid, comm in reversed(daemons):  # newest first: slurmd, slurmctld, munged
    try:
        if open(f"/proc/{pid}/comm").read().strip() == comm:
            subprocess.run(["kill", pid])
    except OSError:
        pass
"""


class LocalSlurm:
    """The session's cluster: brings it up, submits bounded jobs, and takes it down."""

    def __init__(self) -> None:
        self.name = f"lapo-test-{os.getpid()}"
        self.started: list[tuple[int, str]] = []
        self._watchdog: subprocess.Popen | None = None

    def up(self) -> str | None:
        """Start what is missing; return a reason to skip, or None once sinfo shows the node."""
        if os.environ.get("LAPO_SLURM_TEST") != "1":
            return "opt-in: set LAPO_SLURM_TEST=1 (as root) to run against a local Slurm"
        if os.geteuid() != 0:
            return "needs root to run slurmctld/slurmd"
        if not all(shutil.which(b) for b in ("sbatch", "slurmctld", "slurmd", "munged")):
            env = "DEBIAN_FRONTEND=noninteractive"
            sh(f"{env} apt-get update -qq && {env} apt-get install -y -qq slurm-wlm munge", 900)
        self._watch()
        if CONF.is_file() and "# written by lapo tests/" not in CONF.read_text():
            # a real cluster's configuration: submit to it, never start daemons of our own
            return (
                None if sh("sinfo -h", check=False).returncode == 0 else "sinfo cannot reach Slurm"
            )
        _write_conf()
        if not Path("/etc/munge/munge.key").is_file():
            sh("/usr/sbin/mungekey --create --force || create-munge-key -f")
        if not _running("munged"):
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            sh(
                "chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge",
                check=False,
            )
            self._start("munged", "runuser -u munge -- /usr/sbin/munged")
        for daemon in ("slurmctld", "slurmd"):
            if not _running(daemon):
                self._start(daemon, daemon)
        deadline, state = time.time() + 60, []
        while time.time() < deadline:
            state = sh("sinfo -h -o %t", check=False).stdout.split()
            if state and all(s.rstrip("*") in ("idle", "mix", "alloc") for s in state):
                return None
            if any(s.rstrip("*") in ("down", "drain", "drng") for s in state):
                sh("scontrol update nodename=ALL state=resume", check=False)
            time.sleep(1)
        return f"Slurm did not come up: sinfo says {state}"

    def _start(self, name: str, cmd: str) -> None:
        sh(cmd)
        deadline = time.time() + 10
        while (pid := _pid_of(name)) is None and time.time() < deadline:
            time.sleep(0.1)
        if pid is not None:
            self.started.append((pid, name))
            self._watch()  # the watchdog must know every daemon it may have to stop

    def _watch(self) -> None:
        """(Re)start the watchdog with the current list of daemons to stop."""
        old, self._watchdog = self._watchdog, None
        daemons = [f"{pid}:{name}" for pid, name in self.started]
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG, self.name, *daemons],
            stdin=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C to pytest's process group must not reach it
        )
        if old is not None:  # its replacement holds the pipe now; let it go without cleaning
            old.kill()
            old.wait()

    def down(self) -> None:
        """Cancel this session's jobs and stop the daemons it started (the watchdog does it)."""
        if self._watchdog is not None:
            self._watchdog.stdin.close()
            self._watchdog.wait(timeout=180)
            self._watchdog = None

    # ------------------------------------------------------------------ jobs

    def submit(
        self, script: Path, *args: object, out_dir: Path, sbatch: tuple[str, ...] = (),
        minutes: int = 15, env: dict[str, str] | None = None,
    ) -> str:  # fmt: skip
        """sbatch `script` ARGS as a 2-task CPU job of this session, bounded by `minutes`."""
        job_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        # the same interpreter as the tests, wherever its environment lives
        job_env.update(GPUS="0", LAPO=f"{sys.executable} -m lapo.cli", PYTHONPATH=str(ROOT))
        job_env.update(OMP_NUM_THREADS="1", **(env or {}))
        cmd = [
            "sbatch", "--parsable", f"--job-name={self.name}", f"--time={minutes}",
            "--nodes=1", "--ntasks-per-node=2", f"--chdir={ROOT}",
            f"--output={out_dir}/slurm-%j.out", "--export=ALL", *sbatch,
            str(script), *(str(a) for a in args),
        ]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, env=job_env, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().split(";")[0]

    def info(self, job: str) -> tuple[str, int]:
        """(JobState, Restarts) of `job`."""
        text = sh(f"scontrol show job {job}", check=False).stdout
        state = re.search(r"JobState=(\S+)", text)
        restarts = re.search(r"Restarts=(\d+)", text)
        return (state.group(1) if state else "UNKNOWN", int(restarts.group(1)) if restarts else 0)

    def wait(self, job: str, timeout: float) -> str:
        """Wait until `job` leaves the queue; return its final state (cancel it on timeout)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            state, _ = self.info(job)
            if state in FINAL_STATES:
                return state
            if (
                "Reason=DependencyNeverSatisfied"
                in sh(f"scontrol show job {job}", check=False).stdout
            ):
                sh(f"scancel {job}", check=False)
                return "DEPENDENCY_NEVER_SATISFIED"
            time.sleep(1)
        sh(f"scancel {job}", check=False)
        raise AssertionError(f"job {job} still running after {timeout} s")


@pytest.fixture(scope="session")
def slurm():
    cluster = LocalSlurm()
    try:
        reason = cluster.up()
        if reason:
            pytest.skip(reason)
        yield cluster
    finally:
        cluster.down()
