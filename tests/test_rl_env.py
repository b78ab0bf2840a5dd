"""The VecEnvs of `lapo rl` (`lapo.rl.env`): Procgen's batched env against the per-env path.

Procgen seeds each episode's generator with its level, so a game's frames depend only on
its level and actions: with one level (num_levels=1) the batched env and the per-env
DummyVecEnv path must give the same observations, rewards, dones and episode infos for the
same actions. The stacking rule itself is checked exactly on a fake gym3 env whose frames
carry their own frame number.
"""

from __future__ import annotations

import numpy as np
import pytest
from stable_baselines3.common.vec_env import DummyVecEnv

from lapo.config import ConfigError
from lapo.envs import ProcgenEnv, make_env
from lapo.rl.env import FrameStacks, ProcgenVecEnv, make_vec_env, vec_env_kind
from lapo.windows import padded_context

ONE_LEVEL = {"num_levels": 1, "start_level": 7}


def both(num_envs: int, **kw):
    """The batched and the per-env (DummyVecEnv) path on bigfish level 7."""
    common = dict(num_envs=num_envs, context=3, frame_gap=2, size=32, seed=0, env_kwargs=ONE_LEVEL)
    return (
        make_vec_env("procgen:bigfish", kind="batched", **common, **kw),
        make_vec_env("procgen:bigfish", kind="dummy", **common),
    )


def test_batched_procgen_gives_the_per_env_observations_and_episodes():
    batched, dummy = both(3)
    assert isinstance(batched.venv, ProcgenVecEnv) and isinstance(dummy.venv, DummyVecEnv)
    assert batched.observation_space == dummy.observation_space
    assert batched.action_space == dummy.action_space
    ob = batched.reset()
    assert ob.shape == (3, 3, 3, 32, 32) and ob.dtype == np.uint8
    assert (ob == ob[:, :1]).all()  # an episode start repeats its first frame
    assert (ob == dummy.reset()).all()
    rng, ends, lengths = np.random.default_rng(0), 0, np.zeros(3, int)
    for t in range(200):  # a random bigfish on this level dies in about 60 steps
        a = rng.integers(0, 15, 3)
        xb, rb, db, ib = batched.step(a)
        xd, rd, dd, idd = dummy.step(a)
        assert xb.dtype == np.uint8 and rb.dtype == rd.dtype and db.dtype == dd.dtype
        assert (xb == xd).all() and (rb == rd).all() and (db == dd).all(), t
        lengths += 1
        for i in range(3):
            assert ib[i].keys() == idd[i].keys()  # TimeLimit.truncated; at an end: episode, ...
            if not db[i]:
                continue
            ends += 1
            ep, ref = ib[i]["episode"], idd[i]["episode"]  # VecMonitor's
            assert (ep["r"], ep["l"]) == (ref["r"], ref["l"]) and ep["l"] == lengths[i]
            assert ib[i]["success"] == idd[i]["success"]
            assert ib[i]["TimeLimit.truncated"] is False
            end = ib[i]["terminal_observation"]
            assert (end == idd[i]["terminal_observation"]).all()
            assert (xb[i] == xb[i, :1]).all() and (end[-1] != xb[i, 0]).any()  # a new start
            lengths[i] = 0
    assert ends >= 3
    batched.close()
    dummy.close()


def test_batched_procgen_threads_and_large_frames_render_as_procgen_env():
    """Larger than 64 px: the 512 px render resized, as `ProcgenEnv` does; C++ threads
    step the same games."""
    for size, threads in ((96, 0), (64, 2)):
        common = dict(num_envs=2, context=2, size=size, seed=0, env_kwargs=ONE_LEVEL)
        b = make_vec_env("procgen:bigfish", kind="batched", num_threads=threads, **common)
        d = make_vec_env("procgen:bigfish", kind="dummy", **common)
        assert (b.reset() == d.reset()).all()
        for a in np.random.default_rng(1).integers(0, 15, (8, 2)):
            assert (b.step(a)[0] == d.step(a)[0]).all()
        b.close()
        d.close()


def test_levels_differ_across_games_and_resets_without_a_fixed_level():
    venv = make_vec_env("procgen:bigfish", num_envs=4, context=2, size=32, seed=0)
    assert isinstance(venv.venv, ProcgenVecEnv)  # auto: batched for procgen
    first = venv.reset()[:, -1]
    assert len({f.tobytes() for f in first}) > 1  # the games play different levels
    assert (venv.reset()[:, -1] != first).any()  # a later reset draws new ones
    venv.close()
    again = make_vec_env("procgen:bigfish", num_envs=4, context=2, size=32, seed=0)
    assert (again.reset()[:, -1] == first).all()  # same seed, same levels
    resumed = make_vec_env("procgen:bigfish", num_envs=4, context=2, size=32, seed=0, first=512)
    assert (resumed.reset()[:, -1] != first).any()
    again.close()
    resumed.close()


def test_auto_picks_batched_for_procgen_only_and_bad_kinds_are_named():
    assert vec_env_kind("auto", "procgen:bigfish") == "batched"
    assert vec_env_kind("auto", "babyai:BabyAI-GoToObj-v0") == "dummy"
    assert vec_env_kind("auto", lambda seed: None) == "dummy"
    assert vec_env_kind("subproc", "procgen:bigfish") == "subproc"
    venv = make_vec_env("minigrid:MiniGrid-Empty-5x5-v0", num_envs=2, context=2, size=32, seed=0)
    assert isinstance(venv.venv, DummyVecEnv)
    venv.close()
    with pytest.raises(ConfigError, match="vec_env: batched .*minigrid:MiniGrid-Empty"):
        make_vec_env("minigrid:MiniGrid-Empty-5x5-v0", num_envs=2, context=2, size=32, seed=0,
                     kind="batched")  # fmt: skip
    with pytest.raises(ConfigError, match="vec_env: 'gym3'"):
        vec_env_kind("gym3", "procgen:bigfish")


# --------------------------------------------------------------------------- the stacking rule


class FakeGame:
    """gym3's side of a batched Procgen env: game i's episodes last lengths[i] steps; each
    frame is filled with its frame number in the episode (a new episode starts at 0)."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths, self.t = np.array(lengths), np.zeros(len(lengths), int)
        self.first = np.ones(len(lengths), bool)

    def act(self, actions: np.ndarray) -> None:
        assert actions.dtype == np.int32
        self.t += 1
        self.first = self.t >= self.lengths
        self.t[self.first] = 0

    def observe(self):
        frames = np.broadcast_to(self.t[:, None, None, None], (len(self.t), 8, 8, 3))
        return np.ones(len(self.t), np.float32), {"rgb": frames.astype(np.uint8)}, self.first

    def get_info(self) -> list[dict]:
        return [{"prev_level_complete": np.uint8(i % 2)} for i in range(len(self.t))]

    def close(self) -> None:
        pass


class FakeProcgen(ProcgenEnv):
    spec, size, num_actions, num_levels, start_level = "procgen:fake", 8, 15, 0, 0

    def __init__(self, lengths: list[int]) -> None:  # no real Procgen game
        self.lengths = lengths

    def gym3_env(self, num, **kw):
        return FakeGame(self.lengths)

    def frames(self, env, ob):
        return ob["rgb"]


def test_the_batched_stack_follows_padded_context_across_episode_ends():
    k, g, lengths = 3, 2, [3, 5]
    venv = ProcgenVecEnv(FakeProcgen(lengths), num_envs=2, context=k, frame_gap=g)
    shown = venv.reset()[:, :, 0, 0, 0]  # (envs, k): the frame number each context frame shows
    assert (shown == 0).all()
    for step in range(1, 13):
        obs, reward, done, infos = venv.step(np.zeros(2, np.int64))
        for i, n in enumerate(lengths):
            t = step % n  # frame number in the current episode
            assert done[i] == (t == 0)
            if done[i]:  # the ended episode's frames up to n, frame n showing frame n-1
                end = infos[i]["terminal_observation"][:, 0, 0, 0]
                want = np.minimum(padded_context(np.array([n]), np.zeros(1), k, g)[0], n - 1)
                assert (end == want).all() and infos[i]["success"] == bool(i % 2)
            want = padded_context(np.array([t]), np.zeros(1), k, g)[0]
            assert (obs[i, :, 0, 0, 0] == want).all(), (step, i)


def test_frame_stacks_of_one_env_match_the_stacking_rule():
    stack = FrameStacks(1, context=4, frame_gap=3, size=2)
    frame = lambda j: np.full((1, 2, 2, 3), j, np.uint8)  # noqa: E731
    stack.start(frame(0))
    for t in range(1, 20):
        stack.push(frame(t))
        want = padded_context(np.array([t]), np.zeros(1), 4, 3)[0]
        assert (stack.obs()[0, :, 0, 0, 0] == want).all()


def test_a_procgen_spec_with_bad_levels_is_named():
    with pytest.raises(ValueError, match="num_levels and start_level must be >= 0"):
        make_env("procgen:bigfish", num_levels=2, start_level=-1)
