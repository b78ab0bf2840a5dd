"""slurm/pretrain.sbatch on a real single-node Slurm (slurmctld + slurmd + munge on localhost).

Opt-in: runs only with ``LAPO_SLURM_TEST=1``, as root (it installs Debian's slurm-wlm and
munge where they are missing, and starts the daemons it needs). A test suite must not depend
on the state of a system daemon it does not own, so plain ``make test`` skips it. The
cluster it configures is local: one node (this host), one partition, no accounting. Two CPU tasks (gloo) train the debug config; a second
test preempts a job with SIGUSR1 and checks that it requeues and finishes from its
checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.datagen import make_dataset

ROOT = Path(__file__).resolve().parents[1]
CONF = Path("/etc/slurm/slurm.conf")
MARK = "# written by lapo tests/test_slurm.py"

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def sh(cmd: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(
            f"`{cmd}` failed ({res.returncode}): {res.stdout[-2000:]} {res.stderr[-2000:]}"
        )
    return res


def _install() -> None:
    env = "DEBIAN_FRONTEND=noninteractive"
    sh(f"{env} apt-get update -qq && {env} apt-get install -y -qq slurm-wlm munge", timeout=900)


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


def _running(name: str) -> bool:
    return sh(f"pgrep -x {name}", check=False).returncode == 0


PIDFILES = {
    "munged": Path("/run/munge/munged.pid"),
    "slurmctld": Path("/run/slurmctld.pid"),
    "slurmd": Path("/run/slurmd.pid"),
}


def stop_daemons(names: list[str]) -> None:
    """Stop the daemons this module started (by the pid each wrote), newest first."""
    for name in reversed(names):
        pidfile = PIDFILES[name]
        if pidfile.is_file():
            sh(f"kill {int(pidfile.read_text().split()[0])}", check=False)


def ensure_cluster(started: list[str]) -> str | None:
    """Start a localhost Slurm (appending what it started to `started`); return a reason to skip, or None."""
    if os.environ.get("LAPO_SLURM_TEST") != "1":
        return "opt-in: set LAPO_SLURM_TEST=1 (as root) to run against a local Slurm"
    if os.geteuid() != 0:
        return "needs root to run slurmctld/slurmd"
    if not all(shutil.which(b) for b in ("sbatch", "slurmctld", "slurmd", "munged")):
        _install()
    if CONF.is_file() and MARK not in CONF.read_text():
        # a real cluster's configuration: submit to it, never start daemons of our own
        return None if sh("sinfo -h", check=False).returncode == 0 else "sinfo cannot reach Slurm"
    _write_conf()
    if not Path("/etc/munge/munge.key").is_file():
        sh("/usr/sbin/mungekey --create --force || create-munge-key -f")
    if not _running("munged"):
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        sh("chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge", check=False)
        sh("runuser -u munge -- /usr/sbin/munged")
        started.append("munged")
    for daemon in ("slurmctld", "slurmd"):
        if not _running(daemon):
            sh(daemon)
            started.append(daemon)
    deadline = time.time() + 60
    while time.time() < deadline:
        state = sh("sinfo -h -o %t", check=False).stdout.split()
        if state and all(s.rstrip("*") in ("idle", "mix", "alloc") for s in state):
            return None
        if any(s.rstrip("*") in ("down", "drain", "drng") for s in state):
            sh("scontrol update nodename=ALL state=resume", check=False)
        time.sleep(1)
    return f"Slurm did not come up: sinfo says {state}"


@pytest.fixture(scope="module")
def cluster():
    started: list[str] = []
    reason = ensure_cluster(started)
    try:
        if reason:
            pytest.skip(reason)
        yield
    finally:
        stop_daemons(started)  # leave the machine as it was: no daemons left behind


def submit(tmp_path: Path, data: Path, out: Path, *extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(GPUS="0", LAPO=str(ROOT / ".venv" / "bin" / "lapo"), OMP_NUM_THREADS="1")
    cmd = [
        "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
        f"--chdir={ROOT}", f"--output={tmp_path}/slurm-%j.out", "--export=ALL",
        str(ROOT / "slurm" / "pretrain.sbatch"), str(ROOT / "configs/lam/debug.yaml"), str(data), str(out),
        "--set", "data.val_shards=1", *extra,
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def wait(job: str, timeout: float) -> str:
    """Wait until the job leaves the queue; return its final state from scontrol."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = sh(f"scontrol show job {job}", check=False).stdout
        state = re.search(r"JobState=(\S+)", info)
        if state and state.group(1) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return state.group(1)
        time.sleep(2)
    sh(f"scancel {job}", check=False)
    raise AssertionError(f"job {job} still running after {timeout} s")


def test_two_task_cpu_job_trains(cluster, tmp_path):
    ds = make_dataset(tmp_path / "data", shards=5, clips_per_shard=2, clip_frames=16, size=32)
    out = tmp_path / "run"
    job = submit(tmp_path, ds.path, out, "trainer.max_steps=4")
    state = wait(job, timeout=600)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "2 task(s), cpu" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["finished"] is True
    assert (out / "model.safetensors").is_file() and (out / "checkpoints" / "last.ckpt").is_file()


def test_sigusr1_requeues_and_the_job_resumes(cluster, tmp_path):
    ds = make_dataset(tmp_path / "data", shards=5, clips_per_shard=2, clip_frames=16, size=32)
    out = tmp_path / "run"
    steps = 30
    job = submit(
        tmp_path, ds.path, out, f"trainer.max_steps={steps}", "trainer.val_every_n_steps=1000"
    )
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-0000002.ckpt").exists():
        assert time.time() < deadline, "the job never reached step 2"
        time.sleep(1)
    sh(f"scancel --signal=USR1 {job}")  # what --signal=SIGUSR1@90 sends before the time limit
    state = wait(job, timeout=900)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "(restart 1)" in log, "the job was not requeued"
    assert list(out.glob("hpc_ckpt_*.ckpt")), "Lightning saved no requeue checkpoint"
    assert "--resume" in log.split("(restart 1)")[1].splitlines()[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == steps and metrics["finished"] is True


def test_shard_array_and_merge(cluster, tmp_path):
    import numpy as np

    from lapo.shards import read_manifest
    from lapo.video import encode_video

    src = tmp_path / "videos"
    src.mkdir()
    lines = []
    rng = np.random.default_rng(0)
    for i in range(5):  # five short videos with a moving bar, each with its actions
        t = 12 + 4 * i
        frames = np.zeros((t, 32, 48, 3), np.uint8)
        for j in range(t):
            frames[j, :, (3 * j) % 48] = 255
        (src / f"v{i}.mp4").write_bytes(encode_video(frames, 15))
        np.save(src / f"v{i}.actions.npy", rng.integers(0, 3, t).astype(np.int64))
        lines.append(str(src / f"v{i}.mp4"))
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "dataset"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SBATCH_EXTRA"] = f"--cpus-per-task=1 --output={tmp_path}/slurm-%x-%A_%a.out"
    res = subprocess.run(
        ["bash", str(ROOT / "slurm/shard.sbatch"), str(tmp_path / "list.txt"), str(out), "2",
         "--", "--size", "32", "--clip-frames", "8"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    merge_job = re.search(r"merge (\d+)", res.stdout).group(1)
    state = wait(merge_job, timeout=600)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert state == "COMPLETED", logs[-4000:]
    assert "shard slice 0/2: 3 videos" in logs and "shard slice 1/2: 2 videos" in logs
    m = read_manifest(out)
    parts = [read_manifest(p) for p in sorted((out / ".parts").glob("part-*[0-9]"))]
    assert m["num_samples"] == sum(p["num_samples"] for p in parts) > 0
    assert [s["name"] for s in m["shards"]] == [
        f"shard-{i:06d}.tar" for i in range(len(m["shards"]))
    ]
    assert all((out / s["name"]).is_file() for s in m["shards"])
    assert m["action_space"] == {"type": "discrete", "n": 3} and m["height"] == 32
