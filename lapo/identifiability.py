"""How identifiable an environment's actions are from video: the ceiling of any IDM.

Some actions produce exactly the same next frame as others (Procgen miner's DOWN_LEFT,
LEFT and UP_LEFT all move left; NOOP and the special keys do nothing). No inverse
dynamics model that sees (o[t], o[t+1]) can tell them apart. At a state where the
actions of A fall into m classes of identical outcomes, the best IDM under a uniform
policy over A guesses one action per class and is right with probability m / |A|.

`outcome_classes` finds those classes at the env's current state by trying every action
from a snapshot (`Env.snapshot` / `Env.restore`); `measure` averages them over the states
a recording visits (the same seeds and policies as `lapo record`):

    m = measure("procgen:miner", states=400)
    m["ceiling"]         # mean of m / |A|: the best achievable IDM accuracy
    m["mean_outcomes"]   # mean number of distinct outcomes per state
"""

from __future__ import annotations

from collections import Counter

from tqdm import tqdm

from lapo.envs import Env, episode_seeds, make_env, make_policy


def outcome_classes(env: Env, actions) -> list[list[int]]:
    """Groups of `actions` (ids) with identical outcomes from the env's current state.

    Each action is stepped once from the same snapshot; two actions share a group when
    their next frames are equal (exact uint8 equality), and their `done` and reward too.
    Groups are in the order of their first action, each in the order of `actions`. The
    env is restored afterwards: its next steps play as if nothing was tried.
    """
    state = env.snapshot()
    groups: dict[tuple, list[int]] = {}
    for action in actions:
        try:
            frame, reward, done, _ = env.step(int(action))
        finally:
            env.restore(state)
        key = (frame.shape, frame.tobytes(), bool(done), float(reward))
        groups.setdefault(key, []).append(int(action))
    return list(groups.values())


def measure(
    spec: str,
    *,
    states: int,
    policy: str = "sticky",
    seed: int = 0,
    size: int = 64,
    env_kwargs: dict | None = None,
    epsilon: float = 0.0,
    max_episode_steps: int | None = None,
    progress: bool = True,
) -> dict:
    """Outcome classes at the first `states` states that a recording of `spec` visits.

    Episodes are played as `lapo record` plays them (`episode_seeds(seed, e)`, then
    `make_policy(policy, env, rng, epsilon)`; at most `max_episode_steps` actions each);
    every state that an action is taken from is measured over `env.sample_actions`
    before the policy acts. Returns a JSON-ready dict: spec, policy, seed, states,
    episodes (how many were walked), actions (|A|), mean_outcomes (mean number of
    classes), ceiling (mean of classes / |A|: the accuracy of the best IDM when actions
    are drawn uniformly, as the random and sticky policies draw them marginally),
    share_single_outcome (share of states where every action gives the same outcome) and
    partitions (the 5 most frequent, each {"groups": [[action name, ...], ...], "share"}).
    """
    if states < 1:
        raise ValueError(f"measure: states must be >= 1, got {states}")
    env = make_env(spec, size=size, seed=seed, **(env_kwargs or {}))
    actions = env.sample_actions
    counts: list[int] = []
    partitions: Counter = Counter()
    bar = tqdm(total=states, desc=env.spec, unit="state", disable=not progress)
    episode = 0
    try:
        while len(counts) < states:
            env_seed, rng = episode_seeds(seed, episode)
            act = make_policy(policy, env, rng, epsilon)
            frame, steps = env.reset(env_seed), 0
            episode += 1
            while len(counts) < states:
                classes = outcome_classes(env, actions)
                counts.append(len(classes))
                partitions[tuple(map(tuple, classes))] += 1
                bar.update(1)
                frame, _, done, _ = env.step(act(frame))
                steps += 1
                if done or (max_episode_steps is not None and steps >= max_episode_steps):
                    break
    finally:
        bar.close()
        env.close()
    n, names = len(counts), env.action_meanings
    return {
        "spec": env.spec,
        "policy": policy,
        "seed": seed,
        "states": n,
        "episodes": episode,
        "actions": len(actions),
        "mean_outcomes": sum(counts) / n,
        "ceiling": sum(counts) / (n * len(actions)),
        "share_single_outcome": sum(c == 1 for c in counts) / n,
        "partitions": [
            {"groups": [[names[a] for a in group] for group in part], "share": k / n}
            for part, k in partitions.most_common(5)
        ],
    }
