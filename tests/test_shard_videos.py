"""data_prep.shard_videos / lapo.ingest on a folder of real videos made here."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from data_prep.shard_videos import main, parse_bytes
from lapo import shards, tars, validate
from lapo.ingest import ingest
from lapo.ingest_plan import IngestError, IngestOptions, find_videos, unique_stems
from lapo.video import decode_video_bytes
from tests.datagen import assert_same_sample, assert_same_shard

ROOT = Path(__file__).resolve().parents[1]


def write_video(path: Path, t: int, h: int, w: int, fps: float, codec="libx264", pix="yuv420p"):
    """A scrolling gradient around a grey centre square whose level, 20 + (16 i mod 224), tells frame i apart."""
    yy, xx = np.mgrid[0:h, 0:w]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix
        s.bit_rate = 4_000_000  # mpeg4's default bit rate smears the grey levels
        for i in range(t):
            f = np.stack([(xx * 2 + i * 3) % 256, (yy * 3 + i) % 256, (xx + yy) % 256], -1)
            f[h // 4 : h - h // 4, w // 4 : w - w // 4] = 20 + (16 * i) % 224
            c.mux(s.encode(av.VideoFrame.from_ndarray(f.astype(np.uint8), format="rgb24")))
        c.mux(s.encode(None))


def out_frames(n_src: int, src_fps: float, dst_fps: float) -> int:
    """Expected output frames: output j exists while its nearest source frame (ties up) exists."""
    j = 0
    while math.floor(j * src_fps / dst_fps + 0.5) < n_src:
        j += 1
    return j


def expected_clips(n: int, clip: int, min_frames: int = 2) -> int:
    return n // clip + (1 if n % clip >= min_frames else 0)


# name: (frames, height, width, fps, codec, pix, action rows or None)
VIDEOS = {
    "a.mp4": (40, 61, 97, 10, "libx264", "yuv444p", "match"),
    "b.webm": (50, 50, 130, 24, "libvpx-vp9", "yuv420p", None),
    "sub/c.avi": (45, 64, 48, 30, "mpeg4", "yuv420p", "match"),
    "sub/d.mkv": (23, 40, 40, 15, "libx264", "yuv420p", "match"),
    "mismatch.mp4": (20, 32, 32, 15, "libx264", "yuv420p", 12),
}


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("videos")
    for name, (t, h, w, fps, codec, pix, acts) in VIDEOS.items():
        write_video(src / name, t, h, w, fps, codec, pix)
        if acts is not None:
            rows = t if acts == "match" else acts
            stem = (src / name).with_suffix("")
            np.save(f"{stem}.actions.npy", (np.arange(rows) * 7) % 6)  # row i -> (7 i) mod 6
    (src / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    (src / "notes.txt").write_text("not a video")
    return src


def read_dataset(out: Path) -> dict[str, dict]:
    m = shards.read_manifest(out)
    samples = {}
    for s in m["shards"]:
        for sample in tars.iter_tar_samples(out / s["name"]):
            assert sample["__key__"] not in samples, f"duplicate {sample['__key__']}"
            samples[sample["__key__"]] = sample
    return samples


def test_parse_bytes():
    assert parse_bytes("256MB") == 256_000_000
    assert parse_bytes("1GiB") == 2**30
    assert parse_bytes("5000") == 5000
    assert parse_bytes("0.5kb") == 500


def test_find_and_stems(video_dir):
    rels = find_videos(video_dir)
    assert rels == sorted([*VIDEOS, "corrupt.mp4"])
    assert "notes.txt" not in rels
    assert unique_stems(["x/a.mp4", "x_a.mp4", "b.c.mp4"])["b.c.mp4"] == "b_c"
    clash = unique_stems(["x/a.mp4", "x_a.mp4"])
    assert len(set(clash.values())) == 2 and all("__" not in s for s in clash.values())


def test_ingest_folder(video_dir, tmp_path, capsys):
    out = tmp_path / "ds"
    # --crf 12: this test checks which frames are kept, not the codec's quality
    args = (
        "--clip-frames 16 --size 32 --fps 15 --workers 2 --no-progress --shard-bytes 20KB --crf 12"
    )
    code = main([str(video_dir), str(out), *args.split()])
    assert code == 0
    captured = capsys.readouterr()
    assert "skipped corrupt.mp4" in captured.err
    assert (
        "skipped mismatch.mp4: actions file has 12 rows but the video has 20 frames" in captured.err
    )
    assert "4 videos ok, 2 skipped" in captured.out

    m = shards.read_manifest(out)
    assert validate.validate_dataset(out, decode=True) == []
    assert m["height"] == m["width"] == 32 and m["fps"] == 15
    assert m["action_space"] == {"type": "discrete", "n": 6}
    assert {s["video"] for s in m["made_by"]["skipped"]} == {"corrupt.mp4", "mismatch.mp4"}
    assert len(m["shards"]) >= 2  # the small --shard-bytes spreads the videos out

    samples = read_dataset(out)
    total_clips = total_frames = 0
    for name, (t, h, w, fps, *_rest, acts) in VIDEOS.items():
        if name == "mismatch.mp4":
            assert not [k for k in samples if k.startswith("mismatch")]
            continue
        stem = name.rsplit(".", 1)[0].replace("/", "_")
        n_out = out_frames(t, fps, 15)
        n_clips = expected_clips(n_out, 16)
        keys = sorted(k for k in samples if k.startswith(stem + "__c"))
        assert keys == [f"{stem}__c{c:05d}" for c in range(n_clips)], name
        got_frames = 0
        for c, key in enumerate(keys):
            s = samples[key]
            meta = json.loads(s["json"])
            assert meta["source"] == name and meta["episode"] == stem
            assert meta["start"] == 16 * c and meta["src_fps"] == pytest.approx(fps)
            assert meta["src_size"] == [h, w]
            clip = decode_video_bytes(s["mp4"])
            assert clip.shape == (meta["num_frames"], 32, 32, 3)
            got_frames += meta["num_frames"]
            if acts is None:
                assert "actions.npy" not in s
                continue
            a = shards.load_npy(s["actions.npy"])
            assert a.dtype == np.int64 and a.shape == (meta["num_frames"],)
            # the action of output frame j is the row of the source frame it shows
            src_idx = [math.floor((16 * c + j) * fps / 15 + 0.5) for j in range(len(a))]
            np.testing.assert_array_equal(a, (np.asarray(src_idx) * 7) % 6)
            # and that frame really is shown: the grey centre encodes the source frame index.
            # Levels are 16 apart, so an error under 8 means the nearest level is the right frame
            # (x264 lets flat brightness ramps lag a few levels within a GOP, hence --crf 12).
            grey = clip[:, 14:18, 14:18].mean(axis=(1, 2, 3))
            np.testing.assert_array_less(np.abs(grey - (20 + (np.asarray(src_idx) * 16) % 224)), 8)
        tail = n_out - 16 * (n_out // 16)
        assert got_frames == n_out - (tail if tail < 2 else 0)
        total_clips += n_clips
        total_frames += got_frames
    assert m["num_samples"] == total_clips == len(samples)
    assert m["num_frames"] == total_frames

    # a rerun of a finished dataset reuses everything and changes nothing
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    summary = ingest(
        video_dir,
        out,
        IngestOptions(clip_frames=16, size=32, fps=15, shard_bytes=20_000, crf=12),
        workers=1,
        progress=False,
        log=lambda s: None,
    )
    assert summary["videos_processed_now"] == 0
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == before


def test_pad_mode_and_other_options_refuse_old_plan(video_dir, tmp_path):
    out = tmp_path / "ds"
    opts = IngestOptions(clip_frames=8, size=24, fps=10, resize="pad")
    ingest(video_dir, out, opts, workers=1, progress=False, log=lambda s: None)
    clip = decode_video_bytes(read_dataset(out)["b__c00000"]["mp4"])  # 130x50 letterboxed
    assert clip[:, :3].max() < 20 and clip[:, 10:14].mean() > 40
    with pytest.raises(IngestError, match="different plan"):
        ingest(
            video_dir,
            out,
            IngestOptions(clip_frames=4, size=24),
            workers=1,
            progress=False,
            log=lambda s: None,
        )
    ingest(
        video_dir,
        out,
        IngestOptions(clip_frames=4, size=24),
        workers=1,
        progress=False,
        overwrite=True,
        log=lambda s: None,
    )
    assert validate.validate_dataset(out) == []


def test_bad_options_fail_fast(tmp_path, capsys):
    assert main([str(tmp_path), str(tmp_path / "o"), "--size", "33"]) == 2
    assert "--size" in capsys.readouterr().err
    assert main([str(tmp_path), str(tmp_path / "o")]) == 2  # no videos
    assert "no videos" in capsys.readouterr().err


RESUME_ARGS = "--clip-frames 8 --size 16 --shard-bytes 1 --workers 1 --no-progress".split()


def test_resume_after_kill_is_byte_identical(tmp_path, capsys):
    src = tmp_path / "src"
    lengths = [12, 15, 18, 21, 24]
    for i, t in enumerate(lengths):
        write_video(src / f"v{i}.mp4", t, 24, 32, 15)
        np.save(src / f"v{i}.actions.npy", np.arange(t) % 4)
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main([str(src), str(ref), *RESUME_ARGS]) == 0  # the uninterrupted reference

    # One shard per video (--shard-bytes 1). A real process, killed uncleanly with its whole
    # group once the first shard exists; the pause hook keeps the rest of the run unfinished.
    cmd = [sys.executable, "-m", "data_prep.shard_videos", str(src), str(out), *RESUME_ARGS]
    env = {**os.environ, "LAPO_INGEST_PAUSE_S": "0.4"}
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    # a shard is finished once its sidecar is written (after the tar's rename); a kill
    # between the two leaves a tar that the rerun rightly redoes, so wait for a sidecar
    while not list(out.glob("_ingest/shard-*.json")) and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    partial = sorted(p.stem + ".tar" for p in out.glob("_ingest/shard-*.json"))
    assert 1 <= len(partial) < len(lengths) and not (out / "manifest.json").exists()

    capsys.readouterr()
    assert main([str(src), str(out), *RESUME_ARGS]) == 0
    assert f"{len(partial)} shards reused" in capsys.readouterr().out
    assert validate.validate_dataset(out) == []
    a, b = read_dataset(ref), read_dataset(out)
    assert sorted(a) == sorted(b) and len(a) == sum(expected_clips(t, 8) for t in lengths)
    for key in a:
        assert_same_sample(a[key], b[key], key)
    for p in ref.glob("shard-*.tar"):
        assert_same_shard(p, out / p.name)
