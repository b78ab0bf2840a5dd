"""Interrupted training: a signal saves and exits cleanly, a resumed run equals one never stopped.

Each stage runs as the real `lapo` command in a subprocess on tiny real shards
(tests.datagen). Once its first checkpoint exists the test sends SIGTERM (stages 1
and 3) or SIGUSR1 (stage 2); the command must save, exit with status 0 and leave no
final export; ``--resume`` must then finish, and its final weights must equal those
of a run that was never interrupted (same settings, run in this process through the
same command-line entry point). The three stages chain: the uninterrupted stage-1
run is the LAM of stage 2, whose uninterrupted run is the policy fine-tuned in stage 3.

``kill -9`` cannot be caught: the checkpoint files are what must survive it. A
process saving checkpoints in a loop is killed at seeded random moments and
``last.ckpt`` must always load (weights_only=True) and be whole; a real `lapo
pretrain` killed mid-run must resume and clean up the temporary files it left.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lapo.checkpoint import checkpoint_step, safe_torch_load
from lapo.cli import main as lapo_main
from tests.datagen import make_dataset

ROOT = Path(__file__).resolve().parents[1]
LAPO = [sys.executable, "-m", "lapo.cli"]
STEPS = 16  # stages 1 and 2: long enough that the signal lands mid-run, with room to spare
ATOL = 1e-5

pytestmark = pytest.mark.slow


def _env() -> dict:
    # outside Slurm: SIGUSR1 is ours, not Lightning's requeue signal
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("int-data"), shards=4, clip_frames=16).path


def pretrain_args(data: Path, out: Path) -> list[str]:
    return [
        "pretrain", "--config", str(ROOT / "configs/lam/debug.yaml"), "--data", str(data),
        "--out", str(out), "--set", f"trainer.max_steps={STEPS}", "trainer.ckpt_every_n_steps=2",
        "trainer.val_every_n_steps=5", "trainer.image_every_n_steps=1000", "trainer.loggers=[csv]",
        "data.val_batches=2",
    ]  # fmt: skip


def policy_args(lam: Path, data: Path, out: Path) -> list[str]:
    return [
        "train-policy", "--config", str(ROOT / "configs/policy/debug.yaml"), "--lam", str(lam),
        "--data", str(data), "--out", str(out), "--set", f"trainer.max_steps={STEPS}",
        "trainer.val_every_n_steps=5", "trainer.loggers=[csv]", "data.val_batches=2",
    ]  # fmt: skip


def finetune_args(lam: Path, policy: Path, data: Path, out: Path) -> list[str]:
    return [
        "finetune", "--config", str(ROOT / "configs/finetune/debug.yaml"), "--lam", str(lam),
        "--policy", str(policy), "--finetune-policy", "--labeled", str(data),
        "--label-budget", "60", "--out", str(out), "--set", "policy_epochs=20",
    ]  # fmt: skip


def run_here(args: list[str]) -> None:
    """The command in this process (the reference run, without a second interpreter's start-up)."""
    assert lapo_main(args) == 0


def interrupt(args: list[str], ready: Path, signum: int, timeout: float = 300) -> str:
    """Start the command, send `signum` once `ready` exists, return its output (status 0 checked)."""
    proc = subprocess.Popen(
        [*LAPO, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env=_env(),
    )  # fmt: skip
    try:
        deadline = time.time() + timeout
        while not ready.exists():
            if proc.poll() is not None:
                pytest.fail(f"finished before {ready.name} appeared:\n{proc.stdout.read()[-3000:]}")
            assert time.time() < deadline, f"{ready} never appeared"
            time.sleep(0.05)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    return out


def resume(args: list[str], timeout: float = 300) -> str:
    res = subprocess.run(
        [*LAPO, *args, "--resume"], capture_output=True, text=True, cwd=ROOT, env=_env(),
        timeout=timeout,
    )  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return res.stdout + res.stderr


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].numel())
    assert worst <= ATOL, f"{a.name}: resumed weights differ from uninterrupted by {worst}"


@pytest.fixture(scope="module")
def lam_ref(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("int-lam") / "ref"
    run_here(pretrain_args(data, run))
    return run


@pytest.fixture(scope="module")
def policy_ref(lam_ref, data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("int-policy") / "ref"
    run_here(policy_args(lam_ref, data, run))
    return run


# --------------------------------------------------------------------------- signals


def test_pretrain_sigterm_saves_exits_and_resumes_to_the_same_weights(data, lam_ref, tmp_path):
    run = tmp_path / "run"
    args = pretrain_args(data, run)
    # step 4 ends the first epoch (debug.yaml: 4 batches per epoch): the signal lands at or
    # just after an epoch boundary, where a save at the wrong moment resumes one batch off
    out = interrupt(args, run / "checkpoints" / "step-0000004.ckpt", signal.SIGTERM)
    assert "stopped early" in out and "--resume" in out
    stopped_at = checkpoint_step(run / "checkpoints" / "last.ckpt")
    assert 4 <= stopped_at < STEPS, "the signal must land mid-run"
    assert not (run / "model.safetensors").exists(), "an unfinished run must not export"

    out = resume(args)
    assert "resuming from" in out and f"finished at step {STEPS}" in out
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == STEPS
    assert_same_weights(run / "model.safetensors", lam_ref / "model.safetensors")
    # the optimiser and scheduler came back too: the last checkpoints agree beyond the weights
    a = safe_torch_load(run / "checkpoints" / "last.ckpt")
    b = safe_torch_load(lam_ref / "checkpoints" / "last.ckpt")
    assert a["lr_schedulers"] == b["lr_schedulers"]
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):  # fmt: skip
        assert torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], atol=ATOL)


def test_train_policy_sigusr1_saves_exits_and_resumes_to_the_same_weights(
    data, lam_ref, policy_ref, tmp_path
):
    run = tmp_path / "run"
    args = policy_args(lam_ref, data, run)
    out = interrupt(args, run / "checkpoints" / "step-0000002.ckpt", signal.SIGUSR1)
    assert "SIGUSR1" in out and "stopped early" in out
    assert 2 <= checkpoint_step(run / "checkpoints" / "last.ckpt") < STEPS
    assert not (run / "policy.safetensors").exists()

    out = resume(args)
    assert f"finished at step {STEPS}" in out
    assert_same_weights(run / "policy.safetensors", policy_ref / "policy.safetensors")


def test_finetune_sigterm_saves_exits_and_resumes_to_the_same_agent(
    data, lam_ref, policy_ref, tmp_path
):
    ref = tmp_path / "ref"
    run_here(finetune_args(lam_ref, policy_ref, data, ref))
    run = tmp_path / "run"
    args = finetune_args(lam_ref, policy_ref, data, run)
    ready = run / "checkpoints" / "policy" / "epoch-0000" / "progress.json"
    out = interrupt(args, ready, signal.SIGTERM)
    assert "stopped early by SIGTERM" in out and "--resume" in out
    assert not (run / "agent.json").exists() and not (run / "metrics.json").exists()
    saved = sorted(p.parent.name for p in (run / "checkpoints" / "policy").glob("*/progress.json"))
    assert saved and saved[-1] != "epoch-0019", f"the signal must land mid-run: {saved}"

    out = resume(args)
    assert "policy: resumed" in out
    assert_same_weights(run / "agent.safetensors", ref / "agent.safetensors")


# --------------------------------------------------------------------------- kill -9

_SAVER = """
import os, sys, torch
from lapo.callbacks import AtomicCheckpointIO
from lapo.checkpoint import safe_torch_load
io, path, n = AtomicCheckpointIO(), sys.argv[1], int(sys.argv[2])
step = safe_torch_load(path)["global_step"] if os.path.exists(path) else 0
while True:
    step += 1
    io.save_checkpoint({"global_step": step, "w": torch.full((n,), float(step))}, path)
    print(step, flush=True)
"""


def test_kill_9_while_saving_never_leaves_a_torn_last_ckpt(tmp_path):
    """Each save writes 16 MB, so nearly every kill lands inside torch.save, fsync or rename.

    Every saver continues from the step in the file its predecessor left, so a torn file
    also stops the next saver."""
    last, n = tmp_path / "last.ckpt", 4_000_000
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(last), str(n)], stdout=subprocess.PIPE, text=True,
            cwd=ROOT,
        )  # fmt: skip
        first = proc.stdout.readline()  # one whole save before the kill, so a file must exist
        assert first.strip(), "the saver died before its first checkpoint"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        finished = [int(first), *(int(x) for x in proc.stdout.read().split())]
        proc.wait()
        ckpt = safe_torch_load(last)  # raises on a torn file
        # whole (every value from one save) and never older than the last save that returned
        assert torch.equal(ckpt["w"], torch.full((n,), float(ckpt["global_step"])))
        assert ckpt["global_step"] >= max(finished)
        names = {p.name for p in tmp_path.iterdir()} - {"last.ckpt"}
        assert all(x.startswith(".last.ckpt.") and x.endswith(".tmp") for x in names), names


def test_kill_9_of_pretrain_then_resume_finishes_and_cleans_up(data, lam_ref, tmp_path):
    run = tmp_path / "run"
    args = pretrain_args(data, run) + ["trainer.ckpt_every_n_steps=1"]
    proc = subprocess.Popen([*LAPO, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=_env())  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (run / "checkpoints" / "step-0000003.ckpt").exists():
            assert proc.poll() is None and time.time() < deadline, "no checkpoint at step 3"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    for p in (run / "checkpoints").glob("*.ckpt"):  # every file under a final name is whole
        safe_torch_load(p)
    # a temporary left by the kill (if it landed mid-save) is swept away by the resumed run
    stray = run / "checkpoints" / ".last.ckpt.killed.tmp"
    stray.write_bytes(b"half a checkpoint")
    out = resume(args)
    assert f"finished at step {STEPS}" in out
    assert not list(run.rglob("*.tmp"))
    assert_same_weights(run / "model.safetensors", lam_ref / "model.safetensors")
