"""How identifiable each env's actions are from video: the best accuracy any IDM can reach.

Some actions produce exactly the same next frame as others (in Procgen miner,
LEFT+DOWN, LEFT and LEFT+UP all move left; NOOP and the six special keys do nothing), so
no inverse dynamics model that sees (o[t], o[t+1]) can tell them apart. At each state a
recording visits (the same seeds and policy as `lapo record`), every sampled action is
tried from a snapshot of the emulator and the actions are grouped by identical outcome
(next frame, done, reward). A state with m groups among |A| actions caps the accuracy of
the best IDM at m / |A| when actions are drawn uniformly (as the random and sticky
policies draw them); the ceiling is its mean over the states (`lapo.identifiability`).

    python experiments/action_ceiling.py procgen:miner procgen:coinrun --states 400 \\
        --seed 0 --out runs/exp/action_ceiling.json

Prints a markdown table (env, states, distinct outcomes per state, ceiling, share of
states with a single outcome, the most frequent partition of the actions) and writes the
full results, a list with one entry per env, to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lapo.cli_args import RawHelpFormatter
from lapo.envs import POLICIES, EnvError, make_env, make_policy
from lapo.identifiability import measure


def partition_text(groups: list[list[str]]) -> str:
    """[["LEFT", "LEFT+UP"], ["NOOP"]] -> "{LEFT, LEFT+UP} {NOOP}" (a markdown cell)."""
    return " ".join("{" + ", ".join(g) + "}" for g in groups)


def table(results: list[dict]) -> list[str]:
    """The markdown table of `measure` results, one row per env."""
    lines = [
        "| env | states | distinct outcomes per state | ceiling | single outcome | "
        "most frequent partition (share) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        top = r["partitions"][0]
        lines.append(
            f"| {r['spec']} | {r['states']} | {r['mean_outcomes']:.2f} / {r['actions']} | "
            f"{r['ceiling']:.3f} | {r['share_single_outcome']:.3f} | "
            f"{partition_text(top['groups'])} ({top['share']:.2f}) |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=RawHelpFormatter)
    p.add_argument(
        "specs", nargs="+", metavar="SPEC", help="procgen:GAME, babyai:ID or minigrid:ID"
    )
    p.add_argument("--states", type=int, default=400, help="states measured per env")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="recording seed, as in lapo record (same levels and actions)",
    )
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default="sticky",
        help="policy that walks the episodes (expert: babyai:* only)",
    )
    p.add_argument("--epsilon", type=float, default=0.0, help="random-action share, as in record")
    p.add_argument(
        "--max-episode-steps",
        type=int,
        default=None,
        help="end each episode after this many actions (default: when the game ends it); "
        "spreads the states over more levels",
    )
    p.add_argument("--size", type=int, default=64, help="frame size (pixels)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the JSON list here")
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (default: one per env)",
    )
    a = p.parse_args(argv)
    if a.states < 1:
        p.error(f"--states must be >= 1, got {a.states}")
    if a.max_episode_steps is not None and a.max_episode_steps < 1:
        p.error(f"--max-episode-steps must be >= 1, got {a.max_episode_steps}")
    try:
        for spec in a.specs:  # every spec (and the policy on it) before the first measurement
            env = make_env(spec, size=a.size)
            make_policy(a.policy, env, np.random.default_rng(0), a.epsilon)
            env.close()
        results = [
            measure(spec, states=a.states, policy=a.policy, seed=a.seed, size=a.size,
                    epsilon=a.epsilon, max_episode_steps=a.max_episode_steps,
                    progress=a.progress)
            for spec in a.specs
        ]  # fmt: skip
    except EnvError as e:
        raise SystemExit(f"action_ceiling: {e}") from None
    lines = [
        f"Actions identifiable from (o[t], o[t+1]): {a.policy} policy, seed {a.seed}, "
        f"{a.states} states per env",
        "",
        *table(results),
    ]
    print("\n" + "\n".join(lines))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
