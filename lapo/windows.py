"""Clips to training windows: check a shard sample, decode it once, cut windows.

A window is k+1 frames ``o[s], o[s+g], ..., o[s+k*g]`` of one clip (k context
frames, g = frame_gap) plus the action of the transition leaving the last
context frame t = s+(k-1)*g: row t of ``actions.npy``. With g > 1 the window
skips frames, and that one row stands for the g actions taken between o[t] and
o[t+g].

A window never contains a transition that ends an episode: ``dones[j]`` marks
the step j -> j+1 as terminal, so rows s .. s+k*g-1 must all be False (every
step between the first and the last frame, skipped ones included).

The training stream cuts only windows that fit inside a clip. Readers that need a
window for every transition (`lapo label`, the labelled set of stage 3, rollouts)
also make windows at an episode's first frames: `padded_context` gives their frame
numbers, the episode's first frame standing in for the frames before it.

This module is the per-sample half of the loader (``lapo.data`` streams shards
into it); everything here runs inside a DataLoader worker.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

from lapo.shards import load_npy
from lapo.video import VideoDecodeError, decode_video_bytes

# Why a sample was skipped; each is one counter of LoaderStats.
REASONS = (
    "tar_error",  # unreadable or truncated shard, missing shard file (webdataset's handler)
    "missing_video",  # a sample without mp4 (often the tail of a truncated tar)
    "bad_video",  # mp4 bytes that do not decode
    "bad_json",  # json that does not parse to an object
    "frame_count",  # decoded frames differ from json num_frames
    "frame_size",  # decoded frame size differs from the manifest's
    "bad_actions",  # actions.npy unreadable, wrong rows / dtype / shape / range, NaN
    "bad_dones",  # dones.npy unreadable or wrong rows / dtype
    "bad_other",  # any other error while reading one sample (the warning names it)
)
COUNTERS = ("clips", "windows", "batches", "short_clips", "still_skipped", *REASONS)


class DatasetError(ValueError):
    """The dataset cannot be used as configured. The message names the path and the fault."""


class BadDataWarning(UserWarning):
    """A sample or shard was skipped; training goes on (see ``LoaderStats``)."""


class BadSample(ValueError):
    """One clip cannot be used. ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class LoaderStats:
    """Counters of one loader, readable from the main process while workers run.

    One row per DataLoader worker, in shared memory: each worker adds to its own
    row only (no locks needed) and the main process sums the rows.
    """

    def __init__(self, num_workers: int):
        self.table = torch.zeros(max(num_workers, 1), len(COUNTERS), dtype=torch.int64)
        self.table.share_memory_()
        self._view: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {"table": self.table, "_view": None}  # the numpy view is rebuilt in each process

    def add(self, worker: int, name: str, n: int = 1) -> None:
        if self._view is None:
            self._view = self.table.numpy()  # same memory; numpy adds without torch's dispatch
        self._view[worker, COUNTERS.index(name)] += n

    def as_dict(self) -> dict[str, int]:
        totals = self.table.sum(0).tolist()
        return dict(zip(COUNTERS, totals))

    def per_worker(self) -> list[dict[str, int]]:
        return [dict(zip(COUNTERS, row)) for row in self.table.tolist()]

    @property
    def bad(self) -> int:
        """Samples and shards skipped, all reasons together."""
        d = self.as_dict()
        return sum(d[r] for r in REASONS)

    def summary(self) -> str:
        d = self.as_dict()
        bad = ", ".join(f"{r}={d[r]}" for r in REASONS if d[r])
        still = f", {d['still_skipped']} still windows left out" if d["still_skipped"] else ""
        return (
            f"{d['clips']} clips decoded, {d['windows']} windows, {d['batches']} batches, "
            f"{d['short_clips']} clips too short{still}; skipped: {bad or 'none'}"
        )


def warn_bad(what: str) -> None:
    warnings.warn(f"lapo.data: skipping {what}", BadDataWarning, stacklevel=2)


@dataclass
class Clip:
    key: str
    frames: np.ndarray  # (T, 3, H, W) uint8
    actions: np.ndarray | None  # (T,) int64 or (T, D) float32
    dones: np.ndarray | None  # (T,) bool


def _check_actions(arr: np.ndarray, space: dict, t: int) -> np.ndarray:
    if len(arr) != t:
        raise BadSample(
            "bad_actions", f"actions.npy has {len(arr)} rows but the clip has {t} frames"
        )
    if space["type"] == "discrete":
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise BadSample(
                "bad_actions", f"discrete actions must be integer (T,), got {arr.dtype} {arr.shape}"
            )
        if arr.size and (arr.min() < 0 or arr.max() >= space["n"]):
            raise BadSample("bad_actions", f"discrete actions outside [0, {space['n']})")
        return arr.astype(np.int64)
    if arr.ndim != 2 or arr.shape[1] != space["dim"] or arr.dtype.kind != "f":
        raise BadSample(
            "bad_actions",
            f"continuous actions must be float (T, {space['dim']}), got {arr.dtype} {arr.shape}",
        )
    if not np.isfinite(arr).all():
        raise BadSample("bad_actions", "continuous actions hold NaN or inf")
    return arr.astype(np.float32)


def load_clip(
    sample: dict,
    *,
    action_space: dict | None,
    frame_size: tuple[int, int] | None,
    decode_threads: int = 1,
) -> Clip:
    """Check and decode one shard sample; raise ``BadSample`` naming what is wrong.

    The clip's frames come back channels first, (T, 3, H, W) uint8.

    Actions are read only when the dataset declares an action space (without one
    there is nothing to check them against, and the loader marks every window
    unlabelled).
    """
    key = sample.get("__key__", "?")
    if "mp4" not in sample:
        raise BadSample("missing_video", "no mp4 in the sample")
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as e:
            raise BadSample("bad_json", f"json does not parse: {e}") from e
        if not isinstance(meta, dict):
            raise BadSample("bad_json", f"json is a {type(meta).__name__}, not an object")
    try:
        frames = decode_video_bytes(sample["mp4"], num_threads=decode_threads)  # (T, H, W, 3)
    except VideoDecodeError as e:
        raise BadSample("bad_video", str(e)) from e
    t = len(frames)
    if "num_frames" in meta and meta["num_frames"] != t:  # no int(): json may hold "abc"
        raise BadSample("frame_count", f"json says {meta['num_frames']} frames, mp4 decodes to {t}")
    if frame_size is not None and tuple(frames.shape[1:3]) != tuple(frame_size):  # (T, H, W, 3)
        raise BadSample(
            "frame_size", f"frames are {frames.shape[1:3]}, the dataset's are {tuple(frame_size)}"
        )
    actions = None
    if action_space is not None and "actions.npy" in sample:
        try:
            raw = load_npy(sample["actions.npy"])
        except Exception as e:
            raise BadSample("bad_actions", f"actions.npy does not load: {e}") from e
        actions = _check_actions(raw, action_space, t)
    dones = None
    if "dones.npy" in sample:
        try:
            dones = load_npy(sample["dones.npy"])
        except Exception as e:
            raise BadSample("bad_dones", f"dones.npy does not load: {e}") from e
        if dones.shape != (t,) or dones.dtype.kind not in "biuf":
            raise BadSample(
                "bad_dones", f"dones.npy is {dones.dtype} {dones.shape}, expected bool ({t},)"
            )
        dones = dones.astype(bool)
    # Channels first once per clip: windows are then views, and a batch is one np.stack.
    frames = (
        rearrange(torch.from_numpy(frames), "t h w c -> t c h w").contiguous().numpy()
    )  # (T, 3, H, W)
    return Clip(key=key, frames=frames, actions=actions, dones=dones)


def window_starts(num_frames: int, dones: np.ndarray | None, context: int, gap: int) -> np.ndarray:
    """First-frame indices s of every window that fits the clip and crosses no episode end."""
    span = context * gap  # frames from the first to the last frame of a window
    starts = np.arange(max(num_frames - span, 0))
    if dones is None or not dones.any() or starts.size == 0:
        return starts
    ends = np.concatenate([[0], np.cumsum(dones, dtype=np.int64)])  # ends[j] = dones in rows < j
    return starts[ends[starts + span] == ends[starts]]


def episode_first(dones: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
    """The first frame of each frame's episode, over a run of L frames: int64 (L,).

    ``dones[j]`` ends an episode after frame j, so frame j+1 starts the next one. A frame
    that follows an absent one (``present`` False: a gap between clips) starts one too,
    since nothing before the gap can be shown.
    """
    n = len(dones)
    starts = np.ones(n, dtype=bool)  # (L,) frame f begins an episode
    starts[1:] = np.asarray(dones[:-1], dtype=bool)
    if present is not None:
        starts[1:] |= ~np.asarray(present[:-1], dtype=bool)
    return np.maximum.accumulate(np.where(starts, np.arange(n), 0))


def padded_context(rows: np.ndarray, first: np.ndarray, context: int, gap: int) -> np.ndarray:
    """Frame numbers of the k context frames of each row t, o[t-(k-1)g], ..., o[t]: (T, k).

    ``first`` (T,) is the first frame of each row's episode (`episode_first`); a context
    frame before it is that frame, so a window at an episode start repeats its first
    frame and never shows the previous episode.
    """
    rows = np.asarray(rows, dtype=np.int64)
    ctx = rows[:, None] + np.arange(-(context - 1), 1)[None, :] * gap  # (T, k)
    return np.maximum(ctx, np.asarray(first, dtype=np.int64)[:, None])


def still_transitions(prev: np.ndarray, nxt: np.ndarray, threshold: float) -> np.ndarray:
    """bool (N,): True where frame nxt[i] differs from prev[i] by less than ``threshold``
    grey levels, as the mean absolute difference over pixels and channels (uint8 (N, ...))."""
    diff = np.abs(nxt.astype(np.int16) - prev.astype(np.int16))  # (N, C, H, W)
    return diff.reshape(len(diff), -1).mean(axis=1) < threshold


def still_windows(
    frames: np.ndarray, starts: np.ndarray, context: int, gap: int, threshold: float
) -> np.ndarray:
    """Which windows are still (`still_transitions` of o[t] and o[t+1]): bool (N,).

    frames: a clip's uint8 frames (T, C, H, W); starts: (N,) first frames of its windows.
    """
    last = np.asarray(starts, dtype=np.int64) + context * gap  # (N,) index of o[t+1]
    return still_transitions(frames[last - gap], frames[last], threshold)


def pick_starts(starts: np.ndarray, limit: int, rng: np.random.Generator | None) -> np.ndarray:
    """At most ``limit`` starts (0: all): a random subset with ``rng``, else evenly spaced."""
    if limit == 0 or len(starts) <= limit:
        return starts
    if rng is not None:
        return rng.choice(starts, size=limit, replace=False)
    return starts[np.linspace(0, len(starts) - 1, limit).round().astype(np.int64)]


def empty_action(action_space: dict | None) -> np.ndarray:
    """The fill value of ``actions`` where a clip has none (``has_action`` False)."""
    if action_space is not None and action_space["type"] == "continuous":
        return np.zeros(action_space["dim"], dtype=np.float32)
    return np.zeros((), dtype=np.int64)


def cut_windows(
    clip: Clip, starts: np.ndarray, context: int, gap: int, fill: np.ndarray
) -> Iterator[dict]:
    """Windows as dicts of numpy views: frames (k+1, 3, H, W), actions, has_action, key, start."""
    span = context * gap
    # Views keep the whole decoded clip alive while any window of it waits in the
    # shuffle buffer. When few windows are cut, copy them so the clip can be freed:
    # either way the buffer holds at most (k+1) frames per window.
    copy = len(starts) * (context + 1) < len(clip.frames)
    has_action = clip.actions is not None
    for s in starts.tolist():
        frames = clip.frames[s : s + span + 1 : gap]  # (k+1, 3, H, W)
        t = s + (context - 1) * gap  # last context frame: its action leads to the target frame
        yield {
            "frames": frames.copy() if copy else frames,
            "actions": clip.actions[t] if has_action else fill,
            "has_action": has_action,
            "key": clip.key,
            "start": s,
        }


def single_window(window: dict) -> dict:
    """One window for delivery: frames uint8 tensor (k+1, 3, H, W), other fields numpy."""
    return {**window, "frames": torch.from_numpy(np.ascontiguousarray(window["frames"]))}


def collate_fields(windows: list[dict]) -> dict:
    """A batch's fields other than frames, as numpy (pickles inline between processes)."""
    return {
        "actions": np.stack([w["actions"] for w in windows]),  # (B,) int64 or (B, D) float32
        "has_action": np.array([w["has_action"] for w in windows], dtype=bool),  # (B,)
        "key": [w["key"] for w in windows],
        "start": np.array([w["start"] for w in windows], dtype=np.int64),  # (B,)
    }


def collate_windows(windows: list[dict], *, shared: bool = False) -> dict:
    """Stack windows into a batch: frames uint8 (B, k+1, 3, H, W), actions (B,) / (B, D).

    Frames become a tensor, written straight into shared memory when ``shared``
    (a DataLoader worker then hands it over without another copy). The small
    fields stay numpy: a tensor each would cost a shared-memory segment per
    batch. ``as_tensors`` converts them.
    """
    first = windows[0]["frames"]
    frames = torch.empty((len(windows), *first.shape), dtype=torch.uint8)  # (B, k+1, 3, H, W)
    if shared:
        frames.share_memory_()
    np.stack([w["frames"] for w in windows], out=frames.numpy())
    return {"frames": frames, **collate_fields(windows)}


def as_tensors(item: dict) -> dict:
    """Numpy fields of a window or batch as tensors (no copy)."""
    return {
        k: torch.as_tensor(v) if isinstance(v, (np.ndarray, np.generic, bool, int)) else v
        for k, v in item.items()
    }
