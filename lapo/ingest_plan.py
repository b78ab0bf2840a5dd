"""What an ingest will do, decided before any video is decoded: options, videos, shards.

`find_videos` lists a folder's videos in sorted order, `probe_job` reads each one's
header, and `plan_shards` groups whole videos into shards near a target size. The
plan is a pure function of the sorted file list, the headers and the options;
`plan_id` fingerprints it, so a rerun of the same command finds the shards it
already wrote (`lapo.ingest`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lapo.shards import MIN_CLIP_FRAMES, merge_action_spaces, sanitize_stem
from lapo.source_video import actions_path
from lapo.video import probe_video_file

VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv")
WORK_DIR = "_ingest"  # OUT/_ingest: the plan, a sidecar per written shard, the lock


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


def probe_job(job: tuple[str, str]) -> dict:
    """(source folder, relative path) -> the video's header, or ``{"rel", "error"}``."""
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
