"""The clips of one recording on one frame axis, cut into episodes at ``dones``.

Each clip's json ``start`` is its first frame's number in the recording, so the
clips of one source lie on one axis; neighbours may share frames (`lapo.record`
shares one), and where two clips hold a frame the later start owns it. A row with
``dones`` ends its episode; a gap between clips also begins a new stretch, as no
window can reach across it.

A transition is row t, the action after o[t] leading to o[t+g] (g = frame_gap):
every step t .. t+g-1 stays inside the episode and every frame up to o[t+g] is
there. Its window may reach into the previous clip for context; before the
episode's first frame (or a gap) the context repeats that frame
(`lapo.windows.padded_context`). So every labelled transition is usable, and each
belongs to exactly one clip: the one with the latest start at or before t.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lapo.tars import Span
from lapo.windows import episode_first, padded_context


@dataclass
class ClipRef:
    """Where one clip lives and what its rows say (no frames: those are decoded on demand)."""

    key: str
    shard: str
    start: int
    num_frames: int
    episode: str  # the json's episode (of the clip's first frame)
    members: dict[str, Span]  # extension -> (byte offset, size) inside the tar
    has_actions: bool
    dones: np.ndarray | None  # (T,) bool


@dataclass
class Timeline:
    """All clips of one source on one frame axis (clip ``start`` is the frame number)."""

    source: str
    clips: list[ClipRef]  # sorted by start
    frame_owner: np.ndarray  # (L,) clip holding each frame, -1: none; the latest start wins
    action_owner: np.ndarray  # (L,) clip holding each action row, -1: none
    done: np.ndarray  # (L,) the step after frame f ends its episode
    first: np.ndarray  # (L,) earliest frame a window ending at f may use (episode start, gap)

    def windows(self, rows: np.ndarray, context: int, gap: int) -> np.ndarray:
        """Frame numbers of the window of each transition row t: the padded context, then
        o[t+g]. rows (n,) -> (n, k+1) int64."""
        rows = np.asarray(rows, dtype=np.int64)
        ctx = padded_context(rows, self.first[rows], context, gap)  # (n, k)
        return np.concatenate([ctx, (rows + gap)[:, None]], axis=1)  # (n, k+1)


@dataclass
class EpisodeRef:
    id: str
    source: str
    rows: np.ndarray  # labelled transition rows t (frame numbers of the source)
    owner: np.ndarray  # clip index (in the timeline) owning each row


def build_timeline(source: str, clips: list[ClipRef]) -> Timeline:
    """Lay the clips of `source` on its frame axis."""
    clips = sorted(clips, key=lambda c: (c.start, c.key))
    length = max(c.start + c.num_frames for c in clips)
    frame_owner = np.full(length, -1, np.int64)
    action_owner = np.full(length, -1, np.int64)
    done = np.zeros(length, bool)
    for i, c in enumerate(clips):
        span = slice(c.start, c.start + c.num_frames)
        frame_owner[span] = i
        if c.has_actions:
            action_owner[span] = i
        if c.dones is not None:
            done[span] |= c.dones
    first = episode_first(done, present=frame_owner >= 0)
    return Timeline(source, clips, frame_owner, action_owner, done, first)


def split_episodes(tl: Timeline, gap: int) -> list[EpisodeRef]:
    """Split a timeline at dones into episodes holding their labelled transition rows."""
    length = len(tl.frame_owner)
    have = np.concatenate([tl.frame_owner >= 0, np.zeros(gap, bool)])  # (L + gap,)
    done = np.concatenate([tl.done, np.zeros(gap, bool)])
    t = np.arange(length)
    ok = (tl.action_owner >= 0) & have[t + gap]
    for j in range(gap):  # every step t+j -> t+j+1 up to the target frame stays in the episode
        ok &= have[t + j] & ~done[t + j]
    number = np.concatenate([[0], np.cumsum(tl.done[:-1])])  # (L,) episode number of each frame
    out = []
    for e in np.unique(number[ok]).tolist():
        rows = t[ok & (number == e)]
        begin = int(np.flatnonzero(number == e)[0])
        clip = tl.clips[tl.frame_owner[begin]] if tl.frame_owner[begin] >= 0 else None
        # the json names the episode of a clip's first frame; elsewhere the id is positional
        eid = clip.episode if clip is not None and clip.start == begin else f"{tl.source}@{begin}"
        out.append(EpisodeRef(eid, tl.source, rows, tl.frame_owner[rows]))
    return out
