"""One source video (plus its optional per-frame actions) -> the clip samples of a dataset.

Used by :mod:`lapo.ingest` inside worker processes. The video is streamed: each
source frame is decoded, and only the frames that the output frame rate shows
are resized, so memory holds one clip at the output size.

Frame-rate change: output frame j shows the source frame nearest in time
(:func:`lapo.video.resample_index`), and keeps that source frame's action row.
Downsampling therefore drops the actions of skipped source frames; upsampling
repeats frames and their actions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lapo.shards import action_space_of, clip_key, clip_sample, normalize_actions, npy_bytes
from lapo.video import open_video_file, resample_index, square_frame

if TYPE_CHECKING:
    from lapo.ingest_plan import IngestOptions

ACTIONS_SUFFIX = ".actions.npy"


def actions_path(src: Path, rel: str) -> Path:
    """``NAME.actions.npy`` beside ``NAME.<ext>``."""
    video = src / rel
    return video.with_name(video.name[: -len(video.suffix)] + ACTIONS_SUFFIX)


class SkipVideo(Exception):
    """This video is left out; the message says why."""


def _load_actions(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        return normalize_actions(np.load(path, allow_pickle=False))
    except Exception as e:
        raise SkipVideo(f"{path.name}: unusable actions file: {e}") from e


def video_clips(src: Path, rel: str, stem: str, opts: IngestOptions) -> tuple[list[dict], dict]:
    """Decode one video and return (its clip samples, facts about it). Raises SkipVideo."""
    actions = _load_actions(actions_path(src, rel))
    try:
        src_fps, frames = open_video_file(src / rel)
    except Exception as e:
        raise SkipVideo(str(e)) from e
    samples: list[dict] = []
    rows: list[np.ndarray] = []  # per clip: the source frame of each of its frames
    clip: list[np.ndarray] = []
    idx: list[int] = []
    src_hw = None

    def emit() -> None:
        if not clip:
            return
        rows.append(np.asarray(idx))
        c = len(samples)
        samples.append(
            clip_sample(
                clip_key(stem, c),
                np.stack(clip),  # (T, size, size, 3)
                fps=opts.fps,
                source=rel,
                episode=stem,
                start=c * opts.clip_frames,
                extra={"src_fps": src_fps, "src_start": idx[0], "src_size": list(src_hw)},
                gop=opts.gop,
                crf=opts.crf,
            )
        )
        clip.clear()
        idx.clear()

    n_src = 0
    want = resample_index(0, src_fps, opts.fps)  # source frame shown by the next output frame
    j = 0
    try:
        for i, frame in enumerate(frames):
            n_src = i + 1
            src_hw = (frame.height, frame.width)
            small = None  # converted only if shown: downsampling skips the work for the rest
            while want == i:  # one source frame may fill several output frames (upsampling)
                small = square_frame(frame, opts.size, opts.resize) if small is None else small
                clip.append(small)
                idx.append(i)
                j += 1
                want = resample_index(j, src_fps, opts.fps)
                if len(clip) == opts.clip_frames:
                    emit()
    except Exception as e:
        raise SkipVideo(f"decoding failed after {n_src} frames: {e}") from e
    if n_src == 0:
        raise SkipVideo("no frames decoded")
    if len(clip) >= opts.min_clip_frames:
        emit()
    if not samples:  # counted as skipped, not as a video that silently gave nothing
        raise SkipVideo(
            f"too short: {j} output frame(s) at {opts.fps:g} fps, fewer than --min-clip-frames "
            f"{opts.min_clip_frames}"
        )
    if actions is not None and len(actions) != n_src:
        raise SkipVideo(f"actions file has {len(actions)} rows but the video has {n_src} frames")
    if actions is not None:  # only now is the source frame count known to match
        for sample, r in zip(samples, rows):
            sample["actions.npy"] = npy_bytes(actions[r])
    facts = {"src_frames": n_src, "action_space": action_space_of(actions)}
    return samples, facts


def build_video(job: tuple[str, str, str, IngestOptions]) -> dict:
    """Worker entry: ``(src, rel, stem, opts)`` -> samples and facts, or the reason it was skipped."""
    src, rel, stem, opts = job
    try:
        samples, facts = video_clips(Path(src), rel, stem, opts)
    except SkipVideo as e:
        return {"rel": rel, "error": str(e)}
    except Exception as e:  # a broken file must not stop the whole ingest
        return {"rel": rel, "error": f"{type(e).__name__}: {e}"}
    return {"rel": rel, "samples": samples, **facts}
