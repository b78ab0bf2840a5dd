"""Env.snapshot / restore on the real games, the outcome classes of lapo.identifiability,
and experiments/action_ceiling.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lapo.envs import Env, EnvError, make_env
from lapo.identifiability import measure, outcome_classes
from tests.test_envs import rollout

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import action_ceiling  # noqa: E402

EMPTY = "minigrid:MiniGrid-Empty-5x5-v0"
LEFT, RIGHT, FORWARD, PICKUP, DROP, TOGGLE, DONE = range(7)


def play(env: Env, seed: int, actions, probe: bool) -> tuple[list, list, list]:
    """`rollout`; with `probe`, every sampled action is tried (and undone) before each step."""

    def try_all(env: Env) -> None:
        classes = outcome_classes(env, env.sample_actions)
        assert sorted(a for g in classes for a in g) == sorted(env.sample_actions)

    return rollout(env, seed, actions, before_step=try_all if probe else None)


def assert_same(a, b) -> None:
    (f1, r1, d1), (f2, r2, d2) = a, b
    assert len(f1) == len(f2) and all((x == y).all() for x, y in zip(f1, f2))
    assert r1 == r2 and d1 == d2


def test_procgen_probing_leaves_the_trajectory_unchanged_through_an_episode_end():
    """bigfish, seed 3: the random actions die within 400 steps. Probing every action before
    every step (the last probes end the episode) changes nothing, nor does the next
    episode that reset() without a seed starts."""
    actions = np.random.default_rng(0).integers(0, 15, 400)
    plain, probed = make_env("procgen:bigfish", seed=50), make_env("procgen:bigfish", seed=50)
    expected = play(plain, 3, actions, probe=False)
    got = play(probed, 3, actions, probe=True)
    assert expected[2][-1] and len(expected[2]) < 400  # the episode did end
    assert_same(got, expected)
    # a probe that ends the episode: the env is brought back, and the step still ends it
    probed.reset(3)
    for a in actions[: len(expected[2]) - 1]:
        probed.step(int(a))
    state = probed.snapshot()
    assert probed.step(int(actions[len(expected[2]) - 1]))[2]
    with pytest.raises(EnvError, match="before reset"):
        probed.step(0)
    probed.restore(state)
    classes = outcome_classes(probed, probed.sample_actions)
    assert probed.step(int(actions[len(expected[2]) - 1]))[2]
    assert len(classes) >= 1
    # the next episodes (auto seeds) are those of an env that never probed
    assert (probed.reset() == plain.reset()).all()


def test_procgen_restore_after_a_divergent_walk_and_larger_frames():
    """A snapshot survives many steps and a reset; the rendered (size > 64) path too."""
    env = make_env("procgen:coinrun", size=96, seed=20)
    env.reset(7)
    for a in (7, 7, 5, 7):
        env.step(a)
    state = env.snapshot()
    actions = [7, 8, 7, 1, 5, 7, 7, 0]
    first = [env.step(a)[0] for a in actions]
    next_level = env.reset()  # seed 20, the first of make_env's auto seeds
    env.restore(state)
    again = [env.step(a)[0] for a in actions]
    assert first[0].shape == (96, 96, 3)
    assert all((x == y).all() for x, y in zip(first, again))
    assert any((first[0] != f).any() for f in first[1:])  # the walk did move
    assert (env.reset() == next_level).all()  # the auto seed is part of the state
    assert (env.reset() != next_level).any()  # ... which walks on: seed 21


def test_minigrid_probing_leaves_the_trajectory_unchanged_to_the_goal():
    """Empty-5x5 from (1, 1) facing right: forward, forward, right, forward, forward
    reaches the goal at (3, 3); the last probes include that ending step."""
    kw = {"actions": tuple(range(7))}
    route = [FORWARD, FORWARD, RIGHT, FORWARD, FORWARD]
    expected = play(make_env(EMPTY, **kw), 0, route, probe=False)
    probed = make_env(EMPTY, **kw)
    got = play(probed, 0, route, probe=True)
    assert expected[2] == [False, False, False, False, True] and expected[1][-1] > 0
    assert_same(got, expected)


def test_babyai_probing_keeps_the_bot_on_its_plan():
    """The expert's next actions (its bot is part of the snapshot) and the frames are those
    of an unprobed run, with random detours the bot replans around."""

    def run(probe: bool) -> tuple[list[int], list[np.ndarray]]:
        env, rng = make_env("babyai:BabyAI-GoToLocal-v0"), np.random.default_rng(1)
        frames, taken = [env.reset(4)], []
        for _ in range(30):
            action = env.expert_action()
            if rng.random() < 0.3:
                action = int(rng.integers(3))
            if probe:
                outcome_classes(env, env.sample_actions)
            frame, _, done, _ = env.step(action)
            frames.append(frame)
            taken.append(action)
            if done:
                break
        return taken, frames

    (a1, f1), (a2, f2) = run(False), run(True)
    assert a1 == a2 and all((x == y).all() for x, y in zip(f1, f2))


def test_minigrid_outcome_classes_follow_the_rules():
    env = make_env(EMPTY, actions=tuple(range(7)))
    env.reset(0)  # at (1, 1) facing right: empty floor ahead
    assert outcome_classes(env, env.sample_actions) == [
        [LEFT], [RIGHT], [FORWARD], [PICKUP, DROP, TOGGLE, DONE]
    ]  # fmt: skip
    env.step(LEFT)  # facing the wall above: forward does nothing either
    assert outcome_classes(env, env.sample_actions) == [
        [LEFT], [RIGHT], [FORWARD, PICKUP, DROP, TOGGLE, DONE]
    ]  # fmt: skip
    # order follows `actions`, and only those are tried
    assert outcome_classes(env, [DONE, FORWARD, RIGHT, PICKUP]) == [
        [DONE, FORWARD, PICKUP],
        [RIGHT],
    ]
    # facing the goal: the step onto it (it ends the episode) is a class of its own
    env.reset(0)
    for a in (FORWARD, FORWARD, RIGHT, FORWARD):
        env.step(a)
    classes = outcome_classes(env, env.sample_actions)
    assert [FORWARD] in classes and len(classes) == 4


class StepCounter(Env):
    """A fake env whose state is a step count; `outcomes[a]` = (frame value, reward, done)."""

    spec = "fake:counter"
    sample_actions = (0, 1, 2, 3)

    def __init__(self, outcomes: dict[int, tuple[int, float, bool]]):
        self.outcomes, self.t = outcomes, 0

    def step(self, action):
        self.t += 1
        value, reward, done = self.outcomes[action]
        return np.full((4, 4, 3), value + self.t, np.uint8), reward, done, {}

    def snapshot(self):
        return self.t

    def restore(self, state):
        self.t = state


def test_outcome_classes_compare_frame_reward_and_done():
    env = StepCounter(
        {0: (0, 0.0, False), 1: (0, 1.0, False), 2: (0, 0.0, True), 3: (0, 0.0, False)}
    )
    assert outcome_classes(env, (0, 1, 2, 3)) == [[0, 3], [1], [2]]
    env.outcomes[3] = (1, 0.0, False)  # another frame
    assert outcome_classes(env, (3, 2, 0, 1)) == [[3], [2], [0], [1]]
    assert env.t == 0  # each step is undone (the frames would differ otherwise)


def test_procgen_outcome_classes_partition_the_actions():
    env = make_env("procgen:miner")
    env.reset(0)
    for a in (4, 7, 7, 1):
        classes = outcome_classes(env, env.sample_actions)
        flat = [a for g in classes for a in g]
        assert sorted(flat) == list(range(15)) and len(flat) == 15
        assert [g[0] for g in classes] == sorted(g[0] for g in classes)
        assert 1 < len(classes) < 15  # miner's special keys do nothing
        env.step(a)


def test_an_env_without_snapshots_says_so():
    class Bare(Env):
        spec = "fake:bare"

    with pytest.raises(EnvError, match="fake:bare.*cannot save and restore"):
        Bare().snapshot()
    with pytest.raises(EnvError, match="fake:bare"):
        outcome_classes(Bare(), [0, 1])


def test_measure_bounds_and_partitions():
    m = measure(EMPTY, states=12, env_kwargs={"actions": tuple(range(7))}, progress=False)
    assert m["states"] == 12 and m["actions"] == 7 and m["spec"] == EMPTY
    assert 1 / 7 <= m["ceiling"] <= 1 and 1 <= m["mean_outcomes"] <= 7
    assert m["ceiling"] == pytest.approx(m["mean_outcomes"] / 7)
    assert m["share_single_outcome"] == 0  # left and right always turn
    assert 3 <= m["mean_outcomes"] <= 4  # forward: blocked (no-op class) or its own
    assert 1 <= len(m["partitions"]) <= 5
    assert sum(p["share"] for p in m["partitions"]) <= 1 + 1e-9
    for p in m["partitions"]:
        assert sorted(n for g in p["groups"] for n in g) == sorted(
            ["left", "right", "forward", "pickup", "drop", "toggle", "done"]
        )
    assert ["left"] in m["partitions"][0]["groups"]
    json.dumps(m)  # JSON-ready
    # the states are those of a recording: the same seed measures the same states
    assert measure(EMPTY, states=12, env_kwargs={"actions": tuple(range(7))}, progress=False) == m
    # a nav-only level samples left, right, forward only: even a blocked forward (no change)
    # differs from both turns, so every action is identifiable
    nav = measure(EMPTY, states=8, policy="random", seed=3, progress=False)
    assert nav["actions"] == 3 and nav["ceiling"] == 1 and nav["mean_outcomes"] == 3


def test_measure_spreads_over_episodes_with_max_episode_steps():
    m = measure("procgen:miner", states=6, max_episode_steps=2, progress=False)
    assert m["states"] == 6 and m["episodes"] == 3
    assert 1 / 15 <= m["ceiling"] <= 1 and 1 <= m["mean_outcomes"] <= 15


def test_action_ceiling_help_runs():
    r = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "action_ceiling.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "--states" in r.stdout and "ceiling" in r.stdout


def test_action_ceiling_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "ceiling.json"
    assert action_ceiling.main(
        ["procgen:miner", EMPTY, "--states", "5", "--out", str(out), "--no-progress"]
    ) == 0  # fmt: skip
    results = json.loads(out.read_text())
    assert [r["spec"] for r in results] == ["procgen:miner", EMPTY]
    assert all(r["states"] == 5 and 1 / r["actions"] <= r["ceiling"] <= 1 for r in results)
    text = capsys.readouterr().out
    assert "| procgen:miner | 5 |" in text and f"| {EMPTY} | 5 |" in text
    assert "{left} {right}" in text  # Empty-5x5 samples left, right, forward


@pytest.mark.parametrize(
    "args, match",
    [
        (["procgen:miner", "procgen:minr"], "procgen:minr.*unknown Procgen game"),
        (["babyai:GoToLocal", "procgen:miner", "--policy", "expert"], "procgen:miner.*babyai"),
    ],
)
def test_action_ceiling_refuses_a_bad_spec_before_measuring(args, match, monkeypatch):
    monkeypatch.setattr(action_ceiling, "measure", lambda *a, **k: pytest.fail("measured"))
    with pytest.raises(SystemExit, match=match):
        action_ceiling.main([*args, "--states", "5"])
