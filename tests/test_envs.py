"""Environment adapters and scripted policies on the real Procgen and MiniGrid/BabyAI games."""

from __future__ import annotations

import numpy as np
import pytest

from lapo.envs import PROCGEN_GAMES, EnvError, episode_seeds, make_env, make_policy


def rollout(
    env, seed: int, actions, before_step=None
) -> tuple[list[np.ndarray], list[float], list[bool]]:
    """Frames, rewards and dones of `actions` from reset(seed), stopping at the episode's
    end; `before_step(env)`, if given, is called before each step."""
    frames, rewards, dones = [env.reset(seed)], [], []
    for a in actions:
        if before_step is not None:
            before_step(env)
        frame, reward, done, _ = env.step(int(a))
        frames.append(frame)
        rewards.append(reward)
        dones.append(done)
        if done:
            break
    return frames, rewards, dones


def test_procgen_frames_actions_and_determinism():
    env = make_env("procgen:bigfish")
    assert env.num_actions == 15 and len(env.action_meanings) == 15
    assert env.sample_actions == tuple(range(15))
    actions = np.random.default_rng(0).integers(0, 15, 40)
    f1, r1, d1 = rollout(env, 11, actions)
    f2, r2, d2 = rollout(make_env("procgen:bigfish"), 11, actions)
    assert f1[0].shape == (64, 64, 3) and f1[0].dtype == np.uint8
    assert len(f1) == len(f2) and all((a == b).all() for a, b in zip(f1, f2))
    assert r1 == r2 and d1 == d2
    # the frames move (a real game, not a constant image) and another level looks different
    assert any((f1[0] != f).any() for f in f1[1:])
    other = make_env("procgen:bigfish").reset(12)
    assert (other != f1[0]).any()


def test_procgen_resize_and_levels():
    small = make_env("procgen:coinrun", size=32).reset(5)
    assert small.shape == (32, 32, 3) and small.dtype == np.uint8
    env = make_env("procgen:coinrun", num_levels=3, start_level=100)
    assert [env.level_of(s) for s in (0, 1, 2, 3, 7)] == [100, 101, 102, 100, 101]
    assert (env.reset(0) == env.reset(3)).all()  # same level, same first frame


def test_procgen_episode_end_has_no_terminal_frame():
    env = make_env("procgen:bigfish")
    last, rng = env.reset(3), np.random.default_rng(0)
    for _ in range(2000):  # a random bigfish dies within a few hundred steps
        frame, _, done, info = env.step(int(rng.integers(15)))
        if done:
            break
        last = frame
    assert done and info["terminal_frame"] is False
    assert (frame == last).all()  # the previous frame repeated, never the next level's first
    with pytest.raises(EnvError, match="before reset"):
        env.step(0)


def test_babyai_expert_solves_and_mission():
    env = make_env("babyai:BabyAI-GoToLocal-v0")
    assert env.num_actions == 7 and env.sample_actions == (0, 1, 2) and env.has_expert
    assert env.action_meanings[:3] == ["left", "right", "forward"]
    for seed in range(3):
        frame = env.reset(seed)
        assert frame.shape == (64, 64, 3) and env.mission.startswith("go to")
        for _ in range(64):
            frame, reward, done, info = env.step(env.expert_action())
            if done:
                break
        assert done and info["success"] and reward > 0 and info["terminal_frame"]


def test_babyai_short_name_views_and_sizes():
    env = make_env("babyai:GoToLocal", size=48, view="agent")
    assert env.spec == "babyai:BabyAI-GoToLocal-v0"
    assert env.reset(0).shape == (48, 48, 3)
    grid = make_env("minigrid:MiniGrid-Empty-5x5-v0", size=40)
    frame = grid.reset(0)
    assert frame.shape == (40, 40, 3) and grid.mission
    assert not grid.has_expert
    with pytest.raises(EnvError, match="expert"):
        grid.expert_action()


@pytest.mark.parametrize(
    "spec, match",
    [
        ("procgen:bigfsh", "bigfish, bossfight"),
        ("babyai:BabyAI-GoToLocl-v0", "did you mean BabyAI-GoToLocal-v0"),
        ("babyai:gotoobj", "did you mean BabyAI-GoToObj-v0"),  # case and prefix aside
        ("minigrid:Empyt-5x5", "did you mean MiniGrid-Empty-5x5-v0"),
        ("minigrid:Nope", r"none of the \d+ ids is close \(e.g. MiniGrid-"),
        ("atari:pong", "procgen:<game>"),
    ],
)
def test_unknown_specs_name_the_closest_valid_ones(spec, match):
    with pytest.raises(EnvError, match=match):
        make_env(spec)


def test_bad_options_and_sizes():
    with pytest.raises(EnvError, match="even"):
        make_env("procgen:bigfish", size=63)
    with pytest.raises(EnvError, match="unknown option"):
        make_env("procgen:bigfish", colour=True)
    with pytest.raises(EnvError, match="view"):
        make_env("babyai:GoToLocal", view="sideways")
    assert len(PROCGEN_GAMES) == 16


def test_episode_seeds_depend_only_on_seed_and_index():
    a = [episode_seeds(0, e) for e in range(5)]
    b = [episode_seeds(0, e) for e in reversed(range(5))][::-1]
    assert [s for s, _ in a] == [s for s, _ in b]
    assert len({s for s, _ in a}) == 5
    assert a[2][1].integers(1 << 30) == b[2][1].integers(1 << 30)
    assert episode_seeds(1, 0)[0] != a[0][0]


def test_policies():
    env = make_env("babyai:GoToLocal")
    env.reset(0)
    rng = np.random.default_rng(0)
    rand = make_policy("random", env, rng)
    assert {rand(None) for _ in range(200)} == {0, 1, 2}
    sticky = make_policy("sticky", env, np.random.default_rng(1))
    acts = [sticky(None) for _ in range(400)]
    again = make_policy("sticky", env, np.random.default_rng(1))
    assert acts == [again(None) for _ in range(400)]
    runs = np.diff(np.flatnonzero(np.diff(acts) != 0))
    # held 1-4 steps (mean 2.5; ~3.7 with repeats of the same action); uniform would give 1.5
    assert runs.mean() > 2.5
    assert set(acts) == {0, 1, 2}
    with pytest.raises(EnvError, match="needs a babyai"):
        make_policy("expert", make_env("procgen:bigfish"), rng)
    with pytest.raises(EnvError, match="unknown policy"):
        make_policy("greedy", env, rng)
