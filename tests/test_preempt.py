"""Preemption plumbing that needs no cluster: which checkpoint a resume takes, what
retention keeps, signals as flags, and the sbatch scripts' shell helpers (slurm/common.sh)
run by bash with the environment Slurm would give them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lapo.checkpoint import CheckpointError, prune_checkpoints, resume_checkpoint
from lapo.preempt import StopSignal, held_signals, slurm_job_id

ROOT = Path(__file__).resolve().parents[1]
COMMON = ROOT / "slurm" / "common.sh"


def fake_checkpoint(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "w": torch.zeros(2)}, path)
    return path


def test_resume_takes_the_highest_stored_step_of_any_kind(tmp_path):
    ck = tmp_path / "checkpoints"
    fake_checkpoint(ck / "step-0000004.ckpt", 4)
    fake_checkpoint(ck / "best.ckpt", 4)
    fake_checkpoint(tmp_path / "hpc_ckpt_7.ckpt", 3)  # a larger number in the name
    time.sleep(0.01)
    fake_checkpoint(ck / "last.ckpt", 2)  # the most recently written
    assert resume_checkpoint(tmp_path) == ck / "step-0000004.ckpt"  # step 4; ties: not best
    fake_checkpoint(ck / "last.ckpt", 4)
    assert resume_checkpoint(tmp_path) == ck / "last.ckpt"
    fake_checkpoint(ck / "best.ckpt", 5)
    assert resume_checkpoint(tmp_path) == ck / "best.ckpt"
    # a file that cannot be read is passed over, with a warning naming it
    (ck / "step-0000009.ckpt").write_bytes(b"half a checkpoint")
    with pytest.warns(UserWarning, match="step-0000009.ckpt"):
        assert resume_checkpoint(tmp_path) == ck / "best.ckpt"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resume_checkpoint(tmp_path / "elsewhere")


def test_retention_keeps_the_newest_steps_last_best_and_the_resume_source(tmp_path):
    ck = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8, 10):
        fake_checkpoint(ck / f"step-{step:07d}.ckpt", step)
    for name in ("last.ckpt", "best.ckpt"):
        fake_checkpoint(ck / name, 10)
    for n in (1, 2):
        fake_checkpoint(tmp_path / f"hpc_ckpt_{n}.ckpt", n)
    removed = prune_checkpoints(tmp_path, 2, keep=tmp_path / "hpc_ckpt_2.ckpt")
    left = sorted(p.name for p in ck.iterdir()) + sorted(p.name for p in tmp_path.glob("hpc*"))
    assert left == [
        "best.ckpt", "last.ckpt", "step-0000008.ckpt", "step-0000010.ckpt", "hpc_ckpt_2.ckpt"
    ]  # fmt: skip
    assert len(removed) == 4
    assert prune_checkpoints(tmp_path, -1) == [tmp_path / "hpc_ckpt_2.ckpt"]  # -1: all steps
    prune_checkpoints(tmp_path, 0)
    assert sorted(p.name for p in ck.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_signals_only_set_a_flag_and_one_held_at_start_up_is_taken_over(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    before = signal.getsignal(signal.SIGUSR1)
    with held_signals():
        os.kill(os.getpid(), signal.SIGUSR1)  # during start-up: recorded, not fatal
        stop = StopSignal()
        with stop:
            assert stop.requested and stop.name == "SIGUSR1"
            assert not stop.wants_requeue  # not a Slurm job
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.received == [signal.SIGUSR1, signal.SIGTERM]
            monkeypatch.setenv("SLURM_JOB_ID", "123")
            monkeypatch.setenv("SLURM_JOB_NAME", "lapo-pretrain")
            assert stop.wants_requeue
    assert signal.getsignal(signal.SIGUSR1) == before


def test_slurm_job_id(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME"):
        monkeypatch.delenv(var, raising=False)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    assert slurm_job_id() == "41"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "40_3"
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc: nothing to requeue
    assert slurm_job_id() is None


# --------------------------------------------------------------------------- slurm/common.sh


def resources(**env: str) -> subprocess.CompletedProcess:
    """`lapo_resources` in bash under the given Slurm variables (no Slurm needed)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_", "GPUS"))}
    base.pop("OMP_NUM_THREADS", None)
    script = (
        f"set -euo pipefail; source {COMMON}; lapo_resources; "
        'echo "$TASKS_PER_NODE $CPUS_PER_TASK $GPUS_PER_NODE $ACCELERATOR $OMP_NUM_THREADS '
        '[${CUDA_VISIBLE_DEVICES-unset}]"'
    )
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env={**base, **env}, timeout=30
    )


def test_cpus_come_from_the_allocation_and_gpus_from_what_the_job_sees():
    two = {"SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "2"}
    assert resources(**two, GPUS="0").stdout.split() == ["2", "1", "0", "cpu", "1", "[]"]
    wide = {"SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "16", "GPUS": "0"}
    assert resources(**wide).stdout.split()[1] == "8"
    assert resources(**wide, SLURM_CPUS_PER_TASK="3").stdout.split()[1] == "3"
    # --gpus-per-task: SLURM_GPUS_ON_NODE may be unset; CUDA_VISIBLE_DEVICES says it all
    gpus = resources(**two, CUDA_VISIBLE_DEVICES="0,1").stdout.split()
    assert gpus[2:4] == ["2", "gpu"]
    assert resources(**two, CUDA_VISIBLE_DEVICES="").stdout.split()[3] == "cpu"


def test_more_tasks_than_gpus_is_a_clear_error():
    res = resources(SLURM_NTASKS_PER_NODE="4", CUDA_VISIBLE_DEVICES="0,1")
    assert res.returncode == 2
    assert "4 tasks per node but 2 GPU(s) visible" in res.stderr
    assert "--ntasks-per-node=2" in res.stderr and "GPUS=0" in res.stderr


def test_a_sigusr1_to_the_batch_shell_reaches_the_tasks(tmp_path):
    """`lapo_launch` under ``--signal=B:USR1`` / ``scancel --batch``: the shell passes the
    signal on (through srun, here a stand-in that runs the task itself) and waits."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    srun.chmod(0o755)
    got = tmp_path / "got"
    task = (
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGUSR1, lambda *a: pathlib.Path(sys.argv[1]).write_text('USR1'))\n"
        "print('ready', flush=True)\n"
        "while not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.05)\n"
    )
    script = (
        f"set -euo pipefail; source {COMMON}; CPUS_PER_TASK=1 ACCELERATOR=cpu; "
        f'lapo_launch {sys.executable} -c "$TASK" {got}; echo "launch ended $?"'
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TASK": task}
    proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "launch ended 0" in out
    assert got.read_text() == "USR1"
