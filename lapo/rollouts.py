"""Closed-loop rollouts of a fine-tuned agent, and of a uniform random policy on the same seeds.

`lapo evaluate --env SPEC` runs `--episodes` episodes of each policy, in lockstep
so the agent sees one batch per step. Episode i of either policy starts from
`lapo.envs.episode_seeds(seed, i)`: both policies meet the same levels, and a
rerun the same ones. The policy acts from the context it was trained on, o[t-(k-1)g],
..., o[t] (g = the run's frame gap), the first frame repeated at an episode start
(`lapo.windows.padded_context`, as in `lapo label` and `lapo.labelled`). Each
episode is cut at `max_steps`.

Success is the env adapter's `info["success"]` at the episode end: BabyAI /
MiniGrid, terminated with reward > 0; Procgen, the game's
`prev_level_complete`. An episode cut by the step cap is no success.
`positive_return_rate` (episodes with return > 0) is reported beside it: in
Procgen games with partial rewards (Bigfish's fish) it moves long before levels
are completed.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

from lapo.envs import episode_seeds, make_env, make_policy
from lapo.windows import padded_context


def play(spec: str, choose, *, episodes: int, seed: int, size: int, context: int,
         max_steps: int, frame_gap: int = 1, record: bool = False, progress: bool = True,
         desc: str = "rollouts", env_kwargs: dict | None = None) -> dict:  # fmt: skip
    """Run `episodes` seeded episodes in lockstep; `choose(contexts, alive, rngs, envs)` acts.

    contexts: uint8 (B, k, 3, H, W) of the live episodes (o[t-(k-1)g], ..., o[t] at step
    t, the first frame repeated at the start); alive: their episode numbers; rngs, envs: the
    per-episode policy generators and environments. It returns B action ids. Episode i
    starts from `episode_seeds(seed, i)`, whatever the policy, so two policies
    meet the same levels. Returns per-episode returns, successes and lengths, plus
    the frames and actions of episode 0 when `record`. `env_kwargs` go to `make_env`
    (e.g. ``{"view": "agent"}``: render as the training data was).
    """
    envs = [make_env(spec, size=size, seed=seed, **(env_kwargs or {})) for _ in range(episodes)]
    reach = (context - 1) * frame_gap + 1  # frames a context spans
    history, rngs = [], []  # the latest `reach` frames of each episode
    for i, env in enumerate(envs):
        env_seed, rng = episode_seeds(seed, i)
        history.append(deque([env.reset(seed=env_seed)], maxlen=reach))
        rngs.append(rng)
    returns = np.zeros(episodes)
    success = np.zeros(episodes, dtype=bool)
    length = np.zeros(episodes, dtype=np.int64)
    done = np.zeros(episodes, dtype=bool)
    film, film_actions = ([history[0][-1]], []) if record else (None, None)
    bar = tqdm(total=episodes, desc=desc, unit="ep", disable=not progress)
    for _ in range(max_steps):
        alive = np.flatnonzero(~done)
        if len(alive) == 0:
            break
        steps = length[alive]  # (B,) frame number of each live episode's latest frame
        index = padded_context(steps, np.zeros_like(steps), context, frame_gap)  # (B, k)
        held = np.array([len(history[i]) for i in alive])  # (B,) frames in each history
        index -= (steps + 1 - held)[:, None]  # frame number -> place in the history
        ctx = torch.from_numpy(np.stack([np.stack([history[i][j] for j in row])
                                         for i, row in zip(alive, index.tolist())]))  # fmt: skip
        actions = choose(rearrange(ctx, "b k h w c -> b k c h w"), alive, rngs, envs)  # (B,)
        for i, a in zip(alive.tolist(), actions):
            frame, reward, ended, info = envs[i].step(int(a))
            returns[i] += reward
            length[i] += 1
            history[i].append(frame)
            if record and i == 0:
                film_actions.append(int(a))
                if not ended or info.get("terminal_frame", True):
                    film.append(frame)
            if ended:
                done[i] = True
                success[i] = bool(info.get("success", False))
                bar.update(1)
    bar.update(int((~done).sum()))
    bar.close()
    for env in envs:
        env.close()
    out = {"returns": returns, "success": success, "length": length, "capped": ~done}
    if record:
        out["frames"], out["actions"] = np.stack(film), np.asarray(film_actions)
    return out


def _summary(r: dict, prefix: str = "") -> dict:
    return {
        f"{prefix}return_mean": float(r["returns"].mean()),
        f"{prefix}return_std": float(r["returns"].std()),
        f"{prefix}success_rate": float(r["success"].mean()),
        f"{prefix}positive_return_rate": float((r["returns"] > 0).mean()),
        f"{prefix}episode_length_mean": float(r["length"].mean()),
        f"{prefix}capped_episodes": int(r["capped"].sum()),
    }


def rollout_metrics(agent, spec: str, *, episodes: int, seed: int, size: int, max_steps: int,
                    greedy: bool, device: str, progress: bool = True,
                    env_kwargs: dict | None = None) -> tuple[dict, dict]:  # fmt: skip
    """Closed-loop returns of the agent's policy and of a uniform random policy."""
    if agent.action_space["type"] != "discrete":
        raise ValueError("lapo evaluate: --env needs a discrete action space (Procgen, BabyAI)")

    def agent_choose(ctx, alive, rngs, envs):
        return agent.act(ctx.to(device), greedy=greedy).cpu().tolist()

    # uniform over the env's sampling set: the `--policy random` of lapo.record
    randoms: dict[int, object] = {}

    def random_choose(ctx, alive, rngs, envs):
        for i in alive.tolist():
            if i not in randoms:
                randoms[i] = make_policy("random", envs[i], rngs[i])
        return [randoms[i](None) for i in alive.tolist()]

    common = dict(episodes=episodes, seed=seed, size=size, context=agent.context,
                  frame_gap=agent.frame_gap, max_steps=max_steps, progress=progress,
                  env_kwargs=env_kwargs)  # fmt: skip
    mine = play(spec, agent_choose, record=True, desc="rollouts (agent)", **common)
    rand = play(spec, random_choose, desc="rollouts (random)", **common)
    metrics = {
        "env": spec,
        "episodes": episodes,
        "max_steps": max_steps,
        "greedy": greedy,
        "env_kwargs": dict(env_kwargs or {}),
        **_summary(mine),
        **_summary(rand, "random_"),
    }
    return metrics, mine
