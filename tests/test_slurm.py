"""The sbatch scripts on a real single-node Slurm (`tests.slurm_harness`; opt-in, root).

Two CPU tasks (gloo) train the debug config. Preemption is what a cluster does before a
time limit: SIGUSR1 to the tasks (``--signal=SIGUSR1@90``) or to the batch shell
(``--signal=B:USR1@90``). Every preempted job must be requeued, resume from the very
step it saved, and train each step exactly once: the sample keys each rank trained on
(``trainer.log_keys``) must equal those of a job never preempted.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.datagen import make_dataset
from tests.slurm_harness import ROOT, sh

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

PRETRAIN = ROOT / "slurm" / "pretrain.sbatch"
DEBUG = ROOT / "configs/lam/debug.yaml"
STEPS = 150  # the stress job: room for ten preemptions, each after some training
KEEP = 2  # trainer.keep_checkpoints in the preempted jobs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm-data")
    return make_dataset(root, shards=5, clips_per_shard=2, clip_frames=16, size=32).path


def settings(steps: int) -> list[str]:
    return [
        "--set", "data.val_shards=1", f"trainer.max_steps={steps}", "trainer.log_keys=true",
        "trainer.ckpt_every_n_steps=3", "trainer.val_every_n_steps=7", "data.val_batches=2",
        f"trainer.keep_checkpoints={KEEP}", "trainer.loggers=[csv]",
    ]  # fmt: skip


def job_log(out_dir: Path, job: str) -> str:
    return (out_dir / f"slurm-{job}.out").read_text()


def trained_keys(run: Path) -> dict[int, list[str]]:
    """Per rank, the `step<TAB>key` lines of every batch trained, in order."""
    return {r: (run / "debug" / f"keys-rank{r}.txt").read_text().splitlines() for r in (0, 1)}


def saved_and_resumed(log: str) -> tuple[list[int], list[int]]:
    saved = [int(s) for s in re.findall(r"saving \S+ at step (\d+) and requeueing", log)]
    resumed = [int(s) for s in re.findall(r"resuming from \S+ \(step (\d+)\)", log)]
    return saved, resumed


def checkpoint_files(run: Path) -> list[Path]:
    return [*(run / "checkpoints").glob("*.ckpt"), *run.glob("hpc_ckpt_*.ckpt")]


@pytest.fixture(scope="module")
def reference(slurm, data, tmp_path_factory) -> dict[int, list[str]]:
    """The stress job's settings, never preempted: what each rank must train on."""
    out_dir = tmp_path_factory.mktemp("slurm-reference")
    job = slurm.submit(PRETRAIN, DEBUG, data, out_dir / "run", *settings(STEPS), out_dir=out_dir)
    state = slurm.wait(job, timeout=900)
    assert state == "COMPLETED", job_log(out_dir, job)[-4000:]
    return trained_keys(out_dir / "run")


def test_readme_cpu_example_starts_on_a_two_core_node(slurm, data, tmp_path):
    # no --cpus-per-task: the script shares out what the node's allocation holds
    job = slurm.submit(PRETRAIN, DEBUG, data, tmp_path / "run", "--set", "data.val_shards=1",
                       out_dir=tmp_path)  # fmt: skip
    state = slurm.wait(job, timeout=600)
    log = job_log(tmp_path, job)
    assert state == "COMPLETED", log[-4000:]
    per_task = max(1, (os.cpu_count() or 1) // 2)
    assert f"2 task(s), cpu, {per_task} CPU(s) per task" in log
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["finished"] is True


def _wait_for(what: str, ready, timeout: float) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("target", ["tasks", "batch shell"])
def test_sigusr1_requeues_and_the_job_resumes_from_the_saved_step(slurm, data, tmp_path, target):
    run, steps = tmp_path / "run", 30
    job = slurm.submit(PRETRAIN, DEBUG, data, run, *settings(steps), out_dir=tmp_path)
    _wait_for("step 3", lambda: (run / "checkpoints" / "step-0000003.ckpt").exists(), 300)
    # --signal=SIGUSR1@90 reaches the tasks; --signal=B:USR1@90 the batch shell only
    sh(f"scancel --signal=USR1 {'--batch ' if target == 'batch shell' else ''}{job}")
    state = slurm.wait(job, timeout=900)
    log = job_log(tmp_path, job)
    assert state == "COMPLETED", log[-4000:]
    assert "(restart 1)" in log, "the job was not requeued"
    assert "--resume" in log.split("(restart 1)")[1].splitlines()[0]
    saved, resumed = saved_and_resumed(log)
    assert len(saved) == 1 and resumed == saved, (saved, resumed)
    assert 3 <= saved[0] < steps
    for rank, lines in trained_keys(run).items():  # every step trained once: none lost or repeated
        trained = [int(line.split("\t")[0]) for line in lines]  # one line per window (4 a batch)
        assert trained == sorted(trained), f"rank {rank} went back"
        assert Counter(trained) == {s: 4 for s in range(steps)}, f"rank {rank}: {Counter(trained)}"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == steps and metrics["finished"] is True
    assert not list(run.glob("hpc_ckpt_*.ckpt")), "a requeue must not add checkpoint files"


def test_ten_preemptions_at_random_moments_lose_and_repeat_no_step(
    slurm, data, reference, tmp_path
):
    """Ten SIGUSR1s, each at a random moment of a 2-rank job's training: half of them the
    moment a checkpoint is being written, half after a random delay (some land in a
    validation pass); to the tasks or to the batch shell. The job must come back after
    each, resume from the step it saved, and train exactly what an unpreempted job does."""
    seed = int(os.environ.get("LAPO_STRESS_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    run = tmp_path / "run"
    job = slurm.submit(PRETRAIN, DEBUG, data, run, *settings(STEPS), out_dir=tmp_path, minutes=40)
    keys0 = run / "debug" / "keys-rank0.txt"

    def trained() -> int:  # batches rank 0 has trained so far, over all restarts
        return len(keys0.read_text().splitlines()) // 4 if keys0.exists() else 0

    moments, disk = [], []
    for i in range(10):
        at = trained()
        # some training in this run first: a preemption at start-up is no moment of training
        _wait_for(f"training after restart {i}", lambda i=i, at=at: slurm.info(job) == ("RUNNING", i)
                  and trained() >= at + 1, 300)  # fmt: skip
        if i % 2 == 0:  # while a checkpoint is written (its temporary file exists)
            try:
                _wait_for("a save", lambda: any((run / "checkpoints").glob(".*.tmp")), 30)
                moments.append("saving")
            except AssertionError:
                moments.append("no save seen")
        else:
            time.sleep(rng.uniform(0.0, 2.0))
            moments.append("random")
        to_shell = rng.random() < 0.5
        sh(f"scancel --signal=USR1 {'--batch ' if to_shell else ''}{job}")
        _wait_for(f"requeue {i + 1}", lambda i=i: slurm.info(job)[1] == i + 1, 180)
        files = checkpoint_files(run)
        disk.append((len(files), sum(p.stat().st_size for p in files if p.exists())))
    state = slurm.wait(job, timeout=1200)
    log = job_log(tmp_path, job)
    summary = f"seed {seed}, moments {moments}, checkpoint files/bytes after each {disk}"
    assert state == "COMPLETED", summary + "\n" + log[-4000:]
    saved, resumed = saved_and_resumed(log)
    assert len(saved) == 10 and resumed == saved, (summary, saved, resumed)
    assert saved == sorted(saved) and saved[-1] < STEPS, (summary, saved)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == STEPS and metrics["finished"] is True, summary
    assert trained_keys(run) == reference, "the preempted job trained other batches: " + summary
    # bounded: newest KEEP step files + last + best, one more while a save is being pruned
    assert max(n for n, _ in disk) <= KEEP + 3, summary
    assert not list(run.glob("hpc_ckpt_*.ckpt")), summary
    print(f"\n{summary}; saved at {saved}")


def test_shard_array_and_merge(slurm, tmp_path):
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
    env["PYTHON"] = sys.executable  # the tests' interpreter, wherever its environment lives
    env["SBATCH_EXTRA"] = (
        f"--job-name={slurm.name} --time=10 --output={tmp_path}/slurm-%x-%A_%a.out"
    )
    res = subprocess.run(
        ["bash", str(ROOT / "slurm/shard.sbatch"), str(tmp_path / "list.txt"), str(out), "2",
         "--", "--size", "32", "--clip-frames", "8"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    merge_job = re.search(r"merge (\d+)", res.stdout).group(1)
    state = slurm.wait(merge_job, timeout=600)
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
