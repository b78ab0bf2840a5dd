"""Data preparation under interruption and hostile disks: record, shard_videos and label.

- Killed (SIGKILL to the whole process group) at seeded random points, then rerun: the
  result equals an uninterrupted run clip for clip (arrays and metadata byte for byte,
  videos by decoded frames), with no duplicate and
  no missing clip, no leftover ``.tmp``, and after every kill any shard under its final
  name is already complete (identical to the uninterrupted run's).
- An output directory that cannot be created (below a regular file) or written (a
  read-only mount), and a full disk (a tiny tmpfs): a clear error naming the path, and
  no half-written shard left under a final name or listed in a manifest.

The mount tests need root (they are skipped elsewhere); the kill tests start real
processes, so they are marked slow.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from data_prep.record import main as record_main
from data_prep.shard_videos import main as shard_main
from lapo.cli import main as lapo_main
from lapo.record import record_dataset
from lapo.shards import read_manifest
from lapo.tars import iter_tar_samples
from lapo.validate import validate_dataset
from tests.datagen import (
    NUM_ACTIONS,
    assert_same_manifest,
    assert_same_sample,
    assert_same_shard,
    make_dataset,
)
from tests.test_label import write_agent
from tests.test_shard_videos import write_video

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
RECORD = ["procgen:bigfish", "--episodes", "6", "--episodes-per-shard", "1", "--max-steps", "40",
          "--clip-frames", "16", "--size", "64", "--seed", "5"]  # fmt: skip
RECORD_KW = dict(episodes=6, episodes_per_shard=1, max_episode_steps=40, clip_frames=16, size=64,
                 seed=5)  # fmt: skip
SHARD = ["--clip-frames", "8", "--size", "16", "--shard-bytes", "1", "--workers", "1"]


# --------------------------------------------------------------------------- comparing datasets


def clips_of(out: Path) -> dict[str, dict[str, bytes]]:
    """Every clip the manifest lists, key -> members; no key may appear twice."""
    got: dict[str, dict[str, bytes]] = {}
    for entry in read_manifest(out)["shards"]:
        assert re.fullmatch(r"shard-\d{6}\.tar", entry["name"]), f"manifest lists {entry['name']}"
        for sample in iter_tar_samples(out / entry["name"]):
            key = sample.pop("__key__")
            assert key not in got, f"clip {key} appears twice"
            got[key] = sample
    return got


def assert_same_dataset(out: Path, ref: Path) -> None:
    assert validate_dataset(out) == []
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"
    a, b = clips_of(ref), clips_of(out)
    assert sorted(b) == sorted(a), "clips missing or extra"
    for key in a:
        assert_same_sample(b[key], a[key], f"clip {key} vs the uninterrupted run")


def assert_only_whole_shards(out: Path, ref: Path) -> None:
    """After a kill: whatever sits under a final shard name is complete, and a manifest (if
    one was written already) lists only such shards."""
    for p in out.glob("shard-*.tar"):
        assert_same_shard(p, ref / p.name)  # complete: every clip of the reference's shard
    if (out / "manifest.json").is_file():
        for entry in read_manifest(out)["shards"]:
            assert (out / entry["name"]).is_file(), f"manifest lists unwritten {entry['name']}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it finished first: a kill after the end is a valid point too
    proc.wait(timeout=60)


def _shard_files(out: Path) -> set[str]:
    """Shards and the temporaries being written as shards (``.shard-000001.tar.<random>.tmp``)."""
    return {p.name for p in out.glob("*shard-*.tar*")} if out.is_dir() else set()


def reference_run(cmd: list[str], out: Path, env: dict | None = None) -> float:
    """Run ``cmd`` uninterrupted; return how long it wrote: first shard file to the manifest."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    first = last = None
    while proc.poll() is None:
        now = time.monotonic()
        if first is None and _shard_files(out):
            first = now
        if last is None and (out / "manifest.json").exists():
            last = now
        time.sleep(0.001)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    return (last or time.monotonic()) - (first or time.monotonic())


def kill_then_finish(
    cmd: list[str],
    out: Path,
    ref: Path,
    *,
    seed: int,
    work_s: float,
    kills: int = 2,
    env: dict | None = None,
) -> list[str]:
    """Run ``cmd``, SIGKILL it at a random point, ``kills`` times; then run it to the end.

    A kill lands either during start-up (a quarter of them) or at a uniform time within
    ``work_s`` after the run has begun a shard file of its own (a new ``.tmp`` or
    shard), so most land while shards are being written. Returns what each kill left.
    """
    rng = np.random.default_rng(seed)
    seen = []
    for _ in range(kills):
        before = _shard_files(out)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or ENV, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0.0, 2.0))
        else:
            deadline = time.monotonic() + 180
            while not _shard_files(out) - before and proc.poll() is None:
                assert time.monotonic() < deadline, "the command wrote nothing for 3 minutes"
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 1.2 * work_s))
        _kill_group(proc)
        seen.append(sorted(_shard_files(out)))
        assert_only_whole_shards(out, ref)
    done = subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return seen


# --------------------------------------------------------------------------- kill and rerun


@pytest.mark.slow  # four runs of the real command, each importing torch: ~20-60 s
def test_record_killed_at_random_points_then_rerun_equals_uninterrupted(tmp_path):
    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "data_prep.record", *RECORD, "--out", str(out),
                "--no-progress"]  # fmt: skip

    ref, out = tmp_path / "ref", tmp_path / "out"
    work_s = reference_run(cmd(ref), ref)
    kill_then_finish(cmd(out), out, ref, seed=11, work_s=work_s)
    assert_same_dataset(out, ref)
    assert_same_manifest(out, ref)


@pytest.mark.slow  # four runs of the real command: ~15-40 s
def test_shard_videos_killed_at_random_points_then_rerun_equals_uninterrupted(tmp_path):
    src = tmp_path / "src"
    for i, t in enumerate([12, 15, 18, 21, 24, 27]):
        write_video(src / f"v{i}.mp4", t, 24, 32, 15)
        np.save(src / f"v{i}.actions.npy", np.arange(t) % 4)

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "data_prep.shard_videos", str(src), str(out), *SHARD,
                "--no-progress"]  # fmt: skip

    env = {**ENV, "LAPO_INGEST_PAUSE_S": "0.15"}  # spreads the six shards over about a second
    ref, out = tmp_path / "ref", tmp_path / "out"
    work_s = reference_run(cmd(ref), ref, env)
    kill_then_finish(cmd(out), out, ref, seed=12, work_s=work_s, env=env)
    assert_same_dataset(out, ref)


@pytest.fixture(scope="module")
def labelling(tmp_path_factory):
    """A tiny dataset of eight shards and an untrained labelling agent (lapo.agent)."""
    root = tmp_path_factory.mktemp("labelling")
    make_dataset(root / "data", shards=8, clips_per_shard=2, clip_frames=12, size=32)
    run = write_agent(root / "run", {"type": "discrete", "n": NUM_ACTIONS})
    return root / "data", run


@pytest.mark.slow  # four runs of `lapo label`, each importing torch: ~20-60 s
def test_label_killed_at_random_points_then_rerun_equals_uninterrupted(labelling, tmp_path):
    data, run = labelling

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "lapo.cli", "label", "--model", str(run), "--data",
                str(data), "--out", str(out), "--device", "cpu", "--batch-size", "8",
                "--no-progress"]  # fmt: skip

    ref, out = tmp_path / "ref", tmp_path / "out"
    work_s = reference_run(cmd(ref), ref)
    kill_then_finish(cmd(out), out, ref, seed=13, work_s=work_s)
    assert_same_dataset(out, ref)


# --------------------------------------------------------------------------- hostile disks


@contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path`` (root only; otherwise the test is skipped)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                         capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path) -> Iterator[Path]:
    """A directory nothing can be written in: a read-only mount (root ignores chmod)."""
    path = tmp_path / "ro"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    with tmpfs(path, "64k", read_only=True):
        yield path


@pytest.fixture
def video_src(tmp_path) -> Path:
    src = tmp_path / "src"
    for i, t in enumerate([30, 40]):
        write_video(src / f"v{i}.mp4", t, 48, 48, 15)
    return src


def unwritable_outs(tmp_path: Path, read_only_dir: Path) -> list[Path]:
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file, not a directory")
    return [blocker / "out", read_only_dir / "out"]


def test_record_to_an_unwritable_directory_names_it(tmp_path, read_only_dir, capsys):
    for out in unwritable_outs(tmp_path, read_only_dir):
        with pytest.raises(SystemExit) as e:
            record_main(["procgen:bigfish", "--episodes", "1", "--max-steps", "4", "--out",
                         str(out), "--no-progress"])  # fmt: skip
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert str(out) in err and "Traceback" not in err, err


def test_shard_videos_to_an_unwritable_directory_names_it(tmp_path, read_only_dir, video_src, capsys):  # fmt: skip
    for out in unwritable_outs(tmp_path, read_only_dir):
        assert shard_main([str(video_src), str(out), "--workers", "1", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert str(out) in err and "Traceback" not in err, err


def test_label_to_an_unwritable_directory_names_it(tmp_path, read_only_dir, labelling, capsys):
    data, run = labelling
    for out in unwritable_outs(tmp_path, read_only_dir):
        argv = ["label", "--model", str(run), "--data", str(data), "--out", str(out),
                "--device", "cpu", "--no-progress"]  # fmt: skip
        assert lapo_main(argv) == 2
        err = capsys.readouterr().err
        assert str(out) in err and "Traceback" not in err, err


def assert_full_disk_left_no_half_shard(out: Path) -> None:
    assert not (out / "manifest.json").exists(), "a manifest was written for an unfinished dataset"
    assert not list(out.rglob("*.tmp")), "a half-written file was left behind"
    for p in out.glob("shard-*.tar"):  # whatever has a final name reads through
        assert sum(1 for _ in iter_tar_samples(p)) > 0


def half_of(dataset: Path) -> str:
    """A tmpfs size that holds about half the shards of ``dataset``: the disk fills mid-run."""
    total = sum(p.stat().st_size for p in dataset.glob("shard-*.tar"))
    return f"{max(total // 2, 16384) // 1024}k"


def test_record_on_a_full_disk_fails_clearly_keeping_only_whole_shards(tmp_path, capsys):
    ref = tmp_path / "ref"
    record_dataset("procgen:bigfish", ref, progress=False, verbose=False, **RECORD_KW)
    with tmpfs(tmp_path / "disk", half_of(ref)) as disk:
        out = disk / "rec"
        with pytest.raises(SystemExit) as e:
            record_main([*RECORD, "--out", str(out), "--no-progress"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "No space left on device" in err and str(out / "shard-") in err, err
        assert_full_disk_left_no_half_shard(out)
        assert list(out.glob("shard-*.tar")), "half the disk should hold a shard or two"
        assert_only_whole_shards(out, ref)  # what was written is exactly the uninterrupted bytes


def test_shard_videos_on_a_full_disk_fails_clearly(tmp_path, video_src, capsys):
    args = ["--size", "64", "--clip-frames", "8", "--shard-bytes", "1", "--workers", "1",
            "--no-progress"]  # fmt: skip
    assert shard_main([str(video_src), str(tmp_path / "ref"), *args]) == 0
    capsys.readouterr()
    with tmpfs(tmp_path / "disk", half_of(tmp_path / "ref")) as disk:
        out = disk / "ds"
        code = shard_main([str(video_src), str(out), *args])
        err = capsys.readouterr().err
        assert code == 2 and "No space left on device" in err and str(out) in err, err
        assert_full_disk_left_no_half_shard(out)


def test_label_on_a_full_disk_fails_clearly(tmp_path, labelling, capsys):
    data, run = labelling  # labelled shards are larger than these: half of them cannot fit
    with tmpfs(tmp_path / "disk", half_of(data)) as disk:
        out = disk / "labelled"
        argv = ["label", "--model", str(run), "--data", str(data), "--out", str(out),
                "--device", "cpu", "--no-progress"]  # fmt: skip
        assert lapo_main(argv) == 2
        err = capsys.readouterr().err
        assert "No space left on device" in err and str(out / "shard-") in err, err
        assert_full_disk_left_no_half_shard(out)
