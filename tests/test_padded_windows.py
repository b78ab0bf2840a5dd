"""The context of a window at an episode start repeats the episode's first frame.

`lapo.windows.padded_context` states the rule; `lapo label` (`window_index`), the
labelled set of stage 3 (`Timeline.windows`), rollouts (`lapo.rollouts.play`) and
the RL frame stack (`FrameStackEnv`) must all cut the windows a plain loop cuts here.
"""

from __future__ import annotations

import numpy as np
import pytest

from lapo.envs import Env
from lapo.label_shard import window_index
from lapo.timeline import ClipRef, build_timeline
from lapo.windows import episode_first, padded_context

K, GAP = 3, 2


def reference(t: int, first: int, k: int = K, gap: int = GAP) -> list[int]:
    """o[t-(k-1)g], ..., o[t], a frame before the episode's first frame replaced by it."""
    return [max(t - j * gap, first) for j in range(k - 1, -1, -1)]


def test_a_window_at_an_episode_start_repeats_its_first_frame():
    dones = np.array([0, 0, 0, 1, 0, 0, 0, 0], dtype=bool)  # o[4] starts episode 2
    first = episode_first(dones)
    assert first.tolist() == [0, 0, 0, 0, 4, 4, 4, 4]
    ctx = padded_context(np.arange(8), first, K, GAP)  # (8, k)
    assert ctx[0].tolist() == [0, 0, 0]  # the very first frame, three times
    assert ctx[4].tolist() == [4, 4, 4]  # never o[2] or o[3] of the episode before
    assert ctx[5].tolist() == [4, 4, 5]
    assert ctx[7].tolist() == [4, 5, 7]
    assert [row.tolist() for row in ctx] == [reference(t, first[t]) for t in range(8)]


def test_a_gap_between_clips_starts_a_new_stretch():
    dones = np.zeros(6, dtype=bool)
    present = np.array([1, 1, 0, 1, 1, 1], dtype=bool)  # o[2] is in no clip
    assert episode_first(dones, present).tolist() == [0, 0, 0, 3, 3, 3]
    assert episode_first(np.zeros(0, dtype=bool)).tolist() == []


def test_label_cuts_the_reference_windows():
    dones = np.array([0, 0, 0, 1, 0, 0, 0, 0], dtype=bool)
    first = [0, 0, 0, 0, 4, 4, 4, 4]
    index, valid = window_index(dones, np.arange(8), K, GAP)
    for t in range(8):
        assert index[t, :K].tolist() == reference(t, first[t]), t
    assert valid.tolist() == [True, True, False, False, True, True, False, False]


def test_the_labelled_set_cuts_the_reference_windows():
    """Two clips of one recording, sharing a frame, with an episode end in the second."""
    dones_b = np.zeros(6, dtype=bool)
    dones_b[1] = True  # frame 5 -> 6 ends episode 1
    clips = [
        ClipRef("s__c00000", "x.tar", 0, 5, "e1", {}, True, np.zeros(5, dtype=bool)),
        ClipRef("s__c00001", "x.tar", 4, 6, "e1", {}, True, dones_b),
    ]
    tl = build_timeline("s", clips)
    rows = np.array([0, 1, 3, 5, 6, 7])
    win = tl.windows(rows, K, GAP)  # (n, k+1)
    firsts = [0, 0, 0, 0, 6, 6]
    for row, t, first in zip(win.tolist(), rows.tolist(), firsts):
        assert row == reference(t, first) + [t + GAP], t


def test_rollouts_show_the_reference_context():
    import torch

    from lapo.rollouts import play

    seen = []

    def turn_left(ctx, alive, rngs, envs):
        seen.append(ctx[0])  # (k, 3, H, W) of episode 0
        return [0] * len(alive)

    out = play("babyai:BabyAI-GoToLocal-v0", turn_left, episodes=1, seed=3, size=32, context=K,
               max_steps=6, frame_gap=GAP, record=True, progress=False)  # fmt: skip
    film = torch.from_numpy(out["frames"]).permute(0, 3, 1, 2)  # (T+1, 3, H, W)
    assert not torch.equal(film[0], film[1])  # turning changes the frame: the check can fail
    for t, ctx in enumerate(seen):
        assert torch.equal(ctx, film[reference(t, 0)]), t


class CountingEnv(Env):
    """Frame t of an episode is filled with the value t."""

    spec, size, num_actions = "count", 8, 1
    action_meanings, sample_actions = ["noop"], (0,)

    def reset(self, seed: int | None = None) -> np.ndarray:
        self.t = 0
        return np.zeros((self.size, self.size, 3), np.uint8)

    def step(self, action) -> tuple[np.ndarray, float, bool, dict]:
        self.t += 1
        return np.full((self.size, self.size, 3), self.t, np.uint8), 0.0, self.t >= 6, {}


def test_the_rl_frame_stack_shows_the_reference_context():
    pytest.importorskip("gymnasium")
    from lapo.rl.env import FrameStackEnv

    env = FrameStackEnv(CountingEnv(), K, GAP)
    obs, _ = env.reset(seed=0)
    for t in range(6):
        assert obs[:, 0, 0, 0].tolist() == reference(t, 0), t  # (k,) frame values
        obs, *_ = env.step(0)
