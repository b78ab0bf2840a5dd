"""lapo's envs as a stable-baselines3 VecEnv whose observations are the last k frames.

`FrameStackEnv` puts the gymnasium API on a `lapo.envs.Env` (reset -> frame, step ->
frame, reward, done, info). An observation is uint8 (k, 3, S, S): o[t-(k-1)g], ..., o[t]
(g = frame_gap), the first frame repeated at an episode start
(`lapo.windows.padded_context`), which is what `lapo evaluate --env` feeds an agent
(`lapo.rollouts.play`). Frames are rendered at S by `lapo.envs.make_env`; the
policy resizes them to its own image size as it does everywhere else.

Discrete envs get ``Discrete(env.num_actions)``; an env object that carries a gymnasium
``action_space`` of its own (a Box, in tests) keeps it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from lapo.envs import Env, episode_seeds, make_env
from lapo.windows import padded_context


class FrameStackEnv(gym.Env):
    """A lapo Env seen through its k latest frames (see the module docstring)."""

    metadata = {"render_modes": []}

    def __init__(self, env: Env, context: int, frame_gap: int = 1) -> None:
        self.env, self.context, self.frame_gap = env, int(context), int(frame_gap)
        s = int(env.size)
        self.observation_space = spaces.Box(0, 255, (self.context, 3, s, s), np.uint8)
        own = getattr(env, "action_space", None)
        self.action_space = (
            own if isinstance(own, spaces.Space) else spaces.Discrete(int(env.num_actions))
        )
        self._frames: deque[np.ndarray] = deque(maxlen=(self.context - 1) * self.frame_gap + 1)
        self._t = 0  # frame number of the latest frame in its episode

    def _obs(self) -> np.ndarray:
        t = np.array([self._t])
        index = padded_context(t, np.zeros_like(t), self.context, self.frame_gap)[0]  # (k,)
        index -= self._t + 1 - len(self._frames)  # frame number -> place in the deque
        return np.stack([self._frames[j].transpose(2, 0, 1) for j in index])  # (k, 3, S, S)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        frame = self.env.reset(seed=seed)  # no seed: the env's own walk from make_env's seed
        self._frames.clear()
        self._frames.append(frame)
        self._t = 0
        return self._obs(), {}

    def step(self, action):
        if isinstance(self.action_space, spaces.Discrete):
            action = int(action)
        else:
            action = np.asarray(action, dtype=np.float32)
        frame, reward, done, info = self.env.step(action)
        self._frames.append(frame)
        self._t += 1
        truncated = bool(done and info.get("truncated", False))
        out = {"success": bool(info.get("success", False))} if done else {}
        return self._obs(), float(reward), bool(done and not truncated), truncated, out

    def close(self) -> None:
        self.env.close()


def _make(
    spec, size: int, seed: int, context: int, frame_gap: int, env_kwargs: dict
) -> FrameStackEnv:
    env = spec(seed) if callable(spec) else make_env(spec, size=size, seed=seed, **env_kwargs)
    return FrameStackEnv(env, context, frame_gap)


def make_vec_env(spec: str | Callable[[int], Env], *, num_envs: int, context: int, size: int,
                 seed: int, first: int = 0, kind: str = "dummy", env_kwargs: dict | None = None,
                 frame_gap: int = 1):  # fmt: skip
    """`num_envs` envs behind SB3's VecMonitor (episode returns and lengths in infos).

    `spec` is an env spec for `make_env`, or a callable seed -> Env (tests). Env i walks
    the levels from `episode_seeds(seed, first + i)`: a resumed run passes the frames it
    has done as `first`, so it meets new levels rather than replaying the first ones.
    """
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecMonitor

    seeds = [episode_seeds(seed, first + i)[0] for i in range(num_envs)]
    fns = [partial(_make, spec, size, s, context, frame_gap, env_kwargs or {}) for s in seeds]
    venv = SubprocVecEnv(fns) if kind == "subproc" else DummyVecEnv(fns)
    return VecMonitor(venv)
