"""Turn a folder of videos (plus optional per-frame actions) into a sharded dataset.

The work has three steps:

1. **Probe** every video's header (frame rate, estimated frame count). A file
   that cannot be opened is skipped here.
2. **Plan**: assign whole videos, in sorted order, to shards so that each shard's
   estimated encoded size stays near the target. The plan is a pure function of
   the sorted file list, the files' headers and the options, and it is saved in
   ``OUT/_ingest/plan.json``.
3. **Build**: worker processes decode, resample, resize, cut and encode one video
   each; the parent writes shards in plan order (tmp + rename) and a small
   sidecar ``OUT/_ingest/shard-NNNNNN.json`` after each. A rerun of the same
   command skips every shard with a sidecar, so a killed run resumes where it
   stopped and ends with the same bytes as an uninterrupted run.

How one video becomes clips (frame-rate change, which action rows are kept) is
in :mod:`lapo.source_video`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lapo import __version__
from lapo.io import atomic_write_json, remove_stale_temporaries
from lapo.shards import (
    MIN_CLIP_FRAMES,
    merge_action_spaces,
    sanitize_stem,
    shard_name,
    write_manifest,
    write_shard,
)
from lapo.source_video import actions_path, build_video
from lapo.video import probe_video_file

VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv")
WORK_DIR = "_ingest"
PAUSE_ENV = "LAPO_INGEST_PAUSE_S"  # testing aid: sleep this long after each shard is written


class IngestError(RuntimeError):
    """The ingest cannot go on (bad options, a foreign OUT directory, inconsistent actions)."""


@dataclass(frozen=True)
class IngestOptions:
    clip_frames: int = 64
    """Frames per clip (the last, shorter clip of a video is kept if it has >= min_clip_frames)."""
    size: int = 64
    """Output frames are size x size pixels (must be even for yuv420p)."""
    fps: float = 15.0
    """Output frame rate; sources are resampled to it."""
    resize: str = "crop"
    """crop: centre crop to a square; pad: letterbox with black."""
    shard_bytes: int = 256_000_000
    """Target encoded bytes per shard (estimated; whole videos are never split)."""
    min_clip_frames: int = MIN_CLIP_FRAMES
    """Shortest tail clip kept."""
    crf: int = 20
    """x264 constant rate factor (lower: better quality, bigger files)."""
    gop: int = 16
    """Keyframe interval of the encoded clips."""
    num_actions: int = 0
    """Discrete action count for the manifest (0: largest action seen plus one)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "fps", float(self.fps))  # 15 and 15.0 must plan alike
        if self.clip_frames < 2:
            raise IngestError(f"--clip-frames must be >= 2, got {self.clip_frames}")
        if self.size < 8 or self.size % 2:
            raise IngestError(f"--size must be an even number >= 8, got {self.size}")
        if not self.fps > 0:
            raise IngestError(f"--fps must be > 0, got {self.fps}")
        if self.resize not in ("crop", "pad"):
            raise IngestError(f"--resize must be crop or pad, got {self.resize!r}")
        if self.shard_bytes < 1:
            raise IngestError(f"--shard-bytes must be positive, got {self.shard_bytes}")
        if not 1 <= self.min_clip_frames <= self.clip_frames:
            raise IngestError("--min-clip-frames must be in [1, clip-frames]")
        if self.num_actions < 0:
            raise IngestError("--num-actions must be >= 0")

    def est_bytes_per_frame(self) -> int:
        # H.264 at crf ~20 stores small game-like frames in roughly 1/16 of their raw size.
        return max(1, self.size * self.size * 3 // 16)


# --------------------------------------------------------------------------- finding and probing


def find_videos(src: str | Path) -> list[str]:
    """Video files under ``src`` (recursive), as sorted POSIX paths relative to it."""
    src = Path(src)
    if not src.is_dir():
        raise IngestError(f"{src}: not a directory of videos")
    found = [
        p.relative_to(src).as_posix()
        for p in src.rglob("*")
        if p.suffix.lower() in VIDEO_EXTS and p.is_file() and WORK_DIR not in p.parts
    ]
    return sorted(found)


def unique_stems(rels: list[str]) -> dict[str, str]:
    """Key stem per video: its relative path without extension, sanitised; clashes get a hash."""
    stems = {rel: sanitize_stem(rel.rsplit(".", 1)[0].replace("/", "_")) for rel in rels}
    counts: dict[str, int] = {}
    for s in stems.values():
        counts[s] = counts.get(s, 0) + 1
    for rel, s in stems.items():
        if counts[s] > 1:
            stems[rel] = f"{s}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"
    return stems


def _probe(job: tuple[str, str]) -> dict:
    src, rel = job
    try:
        info = probe_video_file(Path(src) / rel)
    except Exception as e:  # any failure to read the header skips the file
        return {"rel": rel, "error": str(e)}
    return {"rel": rel, **info}


def check_action_files(src: Path, rels: list[str]) -> None:
    """Fail before any work when the actions files mix discrete and continuous, or widths.

    Only headers are read. A file that does not load is not judged here: its video is
    skipped later, with the reason.
    """
    space, first = None, None
    for rel in rels:
        path = actions_path(src, rel)
        if not path.is_file():
            continue
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception:
            continue
        if arr.ndim not in (1, 2):
            continue
        if arr.dtype.kind in "biu":
            kind = {"type": "discrete", "n": 1}
        elif arr.dtype.kind == "f":
            kind = {"type": "continuous", "dim": int(arr.shape[1]) if arr.ndim == 2 else 1}
        else:
            continue
        try:
            space = merge_action_spaces(space, kind)
        except ValueError as e:
            raise IngestError(
                f"{path.name} and {first}: the actions files of this folder disagree ({e}); "
                "one folder must hold one kind of action"
            ) from None
        first = first or path.name


# --------------------------------------------------------------------------- plan


def plan_shards(probes: list[dict], opts: IngestOptions) -> list[list[str]]:
    """Group probed videos (in the given, sorted order) into shards near ``opts.shard_bytes``."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for p in probes:
        out_frames = int(p["frames"] * opts.fps / p["fps"]) + 1
        clips = -(-out_frames // opts.clip_frames)
        est = out_frames * opts.est_bytes_per_frame() + clips * 2048  # + tar headers and json
        if current and current_bytes + est > opts.shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(p["rel"])
        current_bytes += est
    if current:
        shards.append(current)
    return shards


def _file_id(src: Path, rel: str) -> list:
    act = actions_path(src, rel)
    return [rel, (src / rel).stat().st_size, act.stat().st_size if act.is_file() else None]


def plan_id(src: Path, plan: list[list[str]], opts: IngestOptions) -> str:
    """Fingerprint of what the shards will hold: options, grouping, file names and sizes."""
    blob = {
        "options": dataclasses.asdict(opts),
        "shards": [[_file_id(src, rel) for rel in shard] for shard in plan],
    }
    return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- driver


def _worker_init() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


class _Mapper:
    """Ordered map over jobs: in-process for one worker, a spawn pool otherwise."""

    def __init__(self, workers: int):
        self.pool = None
        if workers > 1:
            # spawn: the parent has opened files with FFmpeg, whose state must not be forked
            self.pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init)

    def imap(self, fn: Callable, jobs: list) -> Iterator:
        return self.pool.imap(fn, jobs, chunksize=1) if self.pool else map(fn, jobs)

    def close(self, failed: bool = False) -> None:
        if self.pool:
            if failed:
                self.pool.terminate()  # do not wait for videos nobody will collect
            else:
                self.pool.close()
            self.pool.join()


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_json(path, obj, indent=1, sort_keys=True)


def _lock(work: Path):
    fd = os.open(work / "lock", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise IngestError(f"{work.parent}: another shard_videos run is writing here") from None
    return fd


def _clear(out: Path, work: Path) -> None:
    for p in list(out.glob("shard-*.tar")) + list(out.glob("*.tmp")) + [out / "manifest.json"]:
        p.unlink(missing_ok=True)
    for p in work.glob("*.json"):
        p.unlink()


def ingest(
    src: str | Path,
    out: str | Path,
    opts: IngestOptions,
    *,
    workers: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    command: str = "",
    log: Callable[[str], None] = print,
) -> dict:
    """Shard the videos under ``src`` into ``out``; resume an interrupted run. Returns a summary."""
    from tqdm import tqdm

    t0 = time.time()
    src, out = Path(src).resolve(), Path(out)
    rels = find_videos(src)
    if not rels:
        raise IngestError(f"{src}: no videos ({', '.join(VIDEO_EXTS)}) found")
    check_action_files(src, rels)  # at start-up, not after every video has been encoded
    work = out / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    lock = _lock(work)
    mapper = _Mapper(min(workers, len(rels)))
    try:
        probes = list(mapper.imap(_probe, [(str(src), r) for r in rels]))
        skipped = [{"video": p["rel"], "reason": p["error"]} for p in probes if "error" in p]
        good = [p for p in probes if "error" not in p]
        plan = plan_shards(good, opts)
        pid = plan_id(src, plan, opts)
        old = work / "plan.json"
        if overwrite:
            _clear(out, work)
        elif old.is_file() and json.loads(old.read_text()).get("plan_id") != pid:
            raise IngestError(
                f"{out} holds shards of a different plan (other files or options); "
                "use a new OUT directory or pass --overwrite"
            )
        elif not old.is_file() and any(out.glob("shard-*.tar")):
            raise IngestError(f"{out} already holds shards not made by this tool; pass --overwrite")
        for d in (out, work):  # an interrupted write; the lock says no one else is writing
            remove_stale_temporaries(d)
        _write_json(old, {"plan_id": pid, "options": dataclasses.asdict(opts), "shards": plan})

        stems = unique_stems(rels)
        done: dict[int, dict] = {}
        for i in range(len(plan)):
            side = work / f"shard-{i:06d}.json"
            if side.is_file():
                info = json.loads(side.read_text())
                tar_ok = info["samples"] == 0 or (out / info["name"]).is_file()
                if info.get("plan_id") == pid and tar_ok:
                    done[i] = info
        todo = [i for i in range(len(plan)) if i not in done]
        jobs = [(str(src), rel, stems[rel], opts) for i in todo for rel in plan[i]]
        n_videos = sum(len(plan[i]) for i in done)
        log(
            f"{len(rels)} videos, {len(skipped)} unreadable, {len(plan)} shards planned, "
            f"{len(done)} already written; {len(jobs)} videos to process with {workers} workers"
        )
        results = mapper.imap(build_video, jobs)
        bar = tqdm(total=len(jobs), unit="video", disable=not progress, dynamic_ncols=True)
        pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
        clips_now = 0
        for i in todo:
            got = [next(results) for _ in plan[i]]
            bar.update(len(got))
            samples = [s for g in got for s in g.get("samples", [])]
            clips_now += len(samples)
            bar.set_postfix(clips=clips_now)
            info = {"name": shard_name(i), "samples": 0, "frames": 0, "bytes": 0}
            if samples:
                info = write_shard(out / shard_name(i), samples)
            info["plan_id"] = pid
            info["skipped"] = [
                {"video": g["rel"], "reason": g["error"]} for g in got if "error" in g
            ]
            info["videos"] = {g["rel"]: g["action_space"] for g in got if "error" not in g}
            _write_json(work / f"shard-{i:06d}.json", info)
            done[i] = info
            if pause:
                time.sleep(pause)
        bar.close()
    except BaseException:
        mapper.close(failed=True)
        raise
    else:
        mapper.close()
    finally:
        os.close(lock)

    infos = [done[i] for i in range(len(plan))]
    skipped += [s for info in infos for s in info["skipped"]]
    skipped.sort(key=lambda s: s["video"])
    space = None
    spaces: dict[str, dict | None] = {k: v for info in infos for k, v in info["videos"].items()}
    for rel, sp in sorted(spaces.items()):
        try:
            space = merge_action_spaces(space, sp)
        except ValueError as e:
            raise IngestError(f"{rel}: its actions do not match the other videos': {e}") from e
    if space and space["type"] == "discrete" and opts.num_actions:
        if opts.num_actions < space["n"]:
            raise IngestError(
                f"--num-actions {opts.num_actions} but actions up to {space['n'] - 1} seen"
            )
        space = {"type": "discrete", "n": opts.num_actions}
    written = [info for info in infos if info["samples"] > 0]
    if not written:
        raise IngestError(f"{src}: no clips made; every video was skipped: {skipped}")
    made_by = {
        "tool": "data_prep.shard_videos",
        "lapo_version": __version__,
        "command": command,
        "source": str(src),
        "options": dataclasses.asdict(opts),
        "plan_id": pid,
        "videos": len(spaces),
        "labelled_videos": sum(sp is not None for sp in spaces.values()),
        "skipped": skipped,
    }
    manifest = write_manifest(
        out,
        written,
        height=opts.size,
        width=opts.size,
        fps=opts.fps,
        action_space=space,
        made_by=made_by,
    )
    seconds = time.time() - t0
    return {
        "videos": len(rels),
        "good_videos": len(spaces),
        "skipped_videos": len(skipped),
        "skipped": skipped,
        "clips": manifest["num_samples"],
        "frames": manifest["num_frames"],
        "shards": len(written),
        "shards_written_now": len(todo),
        "videos_processed_now": len(jobs),
        "clips_made_now": clips_now,
        "bytes": sum(s["bytes"] for s in written),
        "seconds": seconds,
        "action_space": space,
        "resumed_shards": len(plan) - len(todo),
        "reused_videos": n_videos,
    }
