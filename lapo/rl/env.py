"""lapo's envs as a stable-baselines3 VecEnv whose observations are the last k frames.

An observation is uint8 (k, 3, S, S): o[t-(k-1)g], ..., o[t] (g = frame_gap), the first
frame repeated at an episode start (`lapo.windows.padded_context`), which is what `lapo
evaluate --env` feeds an agent (`lapo.rollouts.play`). Frames are rendered at S by
`lapo.envs.make_env`; the policy resizes them to its own image size as it does
everywhere else. `FrameStacks` holds the frames of n envs and is the one place that
stacks them; two VecEnvs read it:

- `FrameStackEnv` puts the gymnasium API on one `lapo.envs.Env` (reset -> frame, step ->
  frame, reward, done, info); SB3's DummyVecEnv or SubprocVecEnv runs n of them. Env i
  walks the levels from its own seed (`make_vec_env`).
- `ProcgenVecEnv` runs n Procgen games in ONE `procgen.ProcgenGym3Env`, stepped by one
  C++ call, its frames rendered and resized by `lapo.envs.ProcgenEnv.frames`. Its episodes
  end, repeat their last frame as the terminal one (Procgen has none) and report success
  as `ProcgenEnv.step` does, so each env's observations, rewards and dones are those of
  the per-env path on the same levels. What differs is which levels: gym3 takes one
  start_level / num_levels for all its games and draws each game's next level itself, from
  a generator seeded by one rand_seed, where the per-env path picks the level of every
  episode from its env's seed walk (`ProcgenEnv.level_of`). The level distribution is the
  same (uniform over [start_level, start_level + num_levels), or any level when
  num_levels = 0), the sequence is not. A game's play depends only on its level and the
  actions (Procgen seeds each episode's generator with the level), which the tests use.

`make_vec_env(kind="auto")` picks ProcgenVecEnv for procgen:* specs, DummyVecEnv
otherwise (BabyAI / MiniGrid). Discrete envs get ``Discrete(env.num_actions)``; an env
object that carries a gymnasium ``action_space`` of its own (a Box, in tests) keeps it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv

from lapo.config import ConfigError
from lapo.envs import Env, ProcgenEnv, episode_seeds, make_env
from lapo.windows import padded_context

VEC_ENVS = ("auto", "dummy", "subproc", "batched")
_SHARED = "its games are one gym3 env, with no per-game object for"


class FrameStacks:
    """The latest frames of n envs, enough for each env's k-frame context.

    Frame number j of an env's episode sits in slot j % span (span = (k-1)g + 1);
    `obs` reads the slots of `padded_context`'s frame numbers.
    """

    def __init__(self, n: int, context: int, frame_gap: int, size: int) -> None:
        self.context, self.frame_gap = int(context), int(frame_gap)
        self.span = (self.context - 1) * self.frame_gap + 1
        self.frames = np.zeros((n, self.span, 3, size, size), np.uint8)
        self.t = np.zeros(n, np.int64)  # frame number of each env's latest frame
        self._all = np.arange(n)

    def start(self, frames: np.ndarray, envs=None) -> None:
        """New episodes in `envs` (indices; None: all) begin with `frames` (m, S, S, 3)."""
        envs = self._all if envs is None else np.asarray(envs)
        self.t[envs] = 0
        self.frames[envs, 0] = frames.transpose(0, 3, 1, 2)

    def push(self, frames: np.ndarray, repeat: np.ndarray | None = None) -> None:
        """Every env's next frame (n, S, S, 3); envs where `repeat` (n,) is True show their
        latest frame again instead (Procgen's terminal step)."""
        last = self.t % self.span
        self.t += 1
        slot = self.t % self.span
        self.frames[self._all, slot] = frames.transpose(0, 3, 1, 2)
        if repeat is not None and repeat.any():
            self.frames[repeat, slot[repeat]] = self.frames[repeat, last[repeat]]

    def obs(self, envs=None) -> np.ndarray:
        """(m, k, 3, S, S) uint8: the context of `envs` (indices; None: all)."""
        envs = self._all if envs is None else np.asarray(envs)
        t = self.t[envs]
        index = padded_context(t, np.zeros_like(t), self.context, self.frame_gap)  # (m, k)
        return self.frames[envs[:, None], index % self.span]


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
        self._stack = FrameStacks(1, self.context, self.frame_gap, s)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        frame = self.env.reset(seed=seed)  # no seed: the env's own walk from make_env's seed
        self._stack.start(frame[None])
        return self._stack.obs()[0], {}

    def step(self, action):
        if isinstance(self.action_space, spaces.Discrete):
            action = int(action)
        else:
            action = np.asarray(action, dtype=np.float32)
        frame, reward, done, info = self.env.step(action)
        self._stack.push(frame[None])
        truncated = bool(done and info.get("truncated", False))
        out = {"success": bool(info.get("success", False))} if done else {}
        return self._stack.obs()[0], float(reward), bool(done and not truncated), truncated, out

    def close(self) -> None:
        self.env.close()


class ProcgenVecEnv(VecEnv):
    """`num_envs` games of one Procgen env in one `ProcgenGym3Env` (see the module docstring).

    `env` gives the game, its options, frame size and level set (num_levels, start_level);
    `rand_seed` seeds gym3's level draws, (rand_seed + r) mod 2**31 at the r-th reset()
    (SB3's `seed()` sets it for the next one). `num_threads` > 0 steps the games in that
    many C++ threads, 0 in this one. Infos are DummyVecEnv's: ``TimeLimit.truncated``
    (always False: Procgen does not tell its time limit from a real end), and at an
    episode end ``success`` (the level was completed) and ``terminal_observation``.
    """

    def __init__(self, env: ProcgenEnv, *, num_envs: int, context: int, frame_gap: int = 1,
                 rand_seed: int = 0, num_threads: int = 0) -> None:  # fmt: skip
        if not isinstance(env, ProcgenEnv):
            raise ConfigError(f"vec_env: batched needs a procgen:<game> env, got {env.spec}")
        self.env, self.context, self.frame_gap = env, int(context), int(frame_gap)
        self.rand_seed, self.num_threads, self.render_mode = int(rand_seed), int(num_threads), None
        s = int(env.size)
        self._stack = FrameStacks(num_envs, self.context, self.frame_gap, s)
        self._game, self._resets, self._actions = None, 0, None
        super().__init__(
            num_envs,
            spaces.Box(0, 255, (self.context, 3, s, s), np.uint8),
            spaces.Discrete(int(env.num_actions)),
        )

    def reset(self) -> np.ndarray:
        if self._seeds[0] is not None:
            self.rand_seed, self._resets = int(self._seeds[0]), 0
        self._reset_seeds()
        self._reset_options()
        if self._game is not None:
            self._game.close()
        e = self.env
        start = e.start_level if e.num_levels else 0  # num_levels 0: any level, as level_of
        self._game = e.gym3_env(
            self.num_envs, num_levels=e.num_levels, start_level=start,
            rand_seed=(self.rand_seed + self._resets) % 2**31, num_threads=self.num_threads,
        )  # fmt: skip
        self._resets += 1
        _, ob, _ = self._game.observe()
        self._stack.start(e.frames(self._game, ob))
        return self._stack.obs()

    def step_async(self, actions: np.ndarray) -> None:
        if self._game is None:
            raise RuntimeError(f"{self.env.spec}: step before reset (or after close)")
        self._actions = np.asarray(actions).reshape(self.num_envs).astype(np.int32)

    def step_wait(self):
        game = self._game
        game.act(self._actions)
        reward, ob, first = game.observe()
        frames = self.env.frames(game, ob)
        done = first.astype(bool)  # the game already reset: `frames` opens the next episode
        self._stack.push(frames, repeat=done)
        obs = self._stack.obs()
        infos = [{"TimeLimit.truncated": False} for _ in range(self.num_envs)]
        ended = np.flatnonzero(done)
        if ended.size:
            levels, terminal = game.get_info(), obs[ended]  # a copy: obs[ended] changes next
            for i, last in zip(ended, terminal):
                infos[i]["success"] = bool(levels[i]["prev_level_complete"])
                infos[i]["terminal_observation"] = last
            self._stack.start(frames[ended], ended)
            obs[ended] = self._stack.obs(ended)
        return obs, np.asarray(reward, dtype=np.float32), done, infos

    def close(self) -> None:
        if self._game is not None:
            self._game.close()
            self._game = None

    def get_attr(self, attr_name: str, indices=None) -> list:
        source = self if attr_name == "render_mode" else self.env  # one env's settings for all
        return [getattr(source, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value, indices=None) -> None:
        raise NotImplementedError(f"ProcgenVecEnv: {_SHARED} set_attr({attr_name!r})")

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list:
        raise NotImplementedError(f"ProcgenVecEnv: {_SHARED} env_method({method_name!r})")

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]


def vec_env_kind(kind: str, spec) -> str:
    """`kind` with "auto" resolved: batched for procgen:* specs, dummy otherwise."""
    procgen = isinstance(spec, str) and spec.startswith("procgen:")
    if kind not in VEC_ENVS:
        raise ConfigError(f"vec_env: {kind!r} is not one of {', '.join(VEC_ENVS)}")
    if kind == "auto":
        return "batched" if procgen else "dummy"
    if kind == "batched" and not procgen:
        raise ConfigError(
            f"vec_env: batched is Procgen's own batched env; {spec!r} is not procgen:<game> "
            "(use auto, dummy or subproc)"
        )
    return kind


def _make(
    spec, size: int, seed: int, context: int, frame_gap: int, env_kwargs: dict
) -> FrameStackEnv:
    env = spec(seed) if callable(spec) else make_env(spec, size=size, seed=seed, **env_kwargs)
    return FrameStackEnv(env, context, frame_gap)


def make_vec_env(spec: str | Callable[[int], Env], *, num_envs: int, context: int, size: int,
                 seed: int, first: int = 0, kind: str = "auto", env_kwargs: dict | None = None,
                 frame_gap: int = 1, num_threads: int = 0):  # fmt: skip
    """`num_envs` envs behind SB3's VecMonitor (episode returns and lengths in infos).

    `spec` is an env spec for `make_env`, or a callable seed -> Env (tests). `kind`: auto,
    dummy, subproc or batched (`vec_env_kind`). Dummy / subproc: env i walks the levels
    from `episode_seeds(seed, first + i)`; batched: gym3 draws them from the rand_seed
    `episode_seeds(seed, first)` (`num_threads`: its C++ stepping threads). A resumed run
    passes the frames it has done as `first`, so it meets new levels rather than replaying
    the first ones.
    """
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecMonitor

    kind = vec_env_kind(kind, spec)
    if kind == "batched":
        env = make_env(spec, size=size, seed=seed, **(env_kwargs or {}))  # checks the spec
        return VecMonitor(ProcgenVecEnv(env, num_envs=num_envs, context=context,
                                        frame_gap=frame_gap, num_threads=num_threads,
                                        rand_seed=episode_seeds(seed, first)[0]))  # fmt: skip
    seeds = [episode_seeds(seed, first + i)[0] for i in range(num_envs)]
    fns = [partial(_make, spec, size, s, context, frame_gap, env_kwargs or {}) for s in seeds]
    venv = SubprocVecEnv(fns) if kind == "subproc" else DummyVecEnv(fns)
    return VecMonitor(venv)
