"""`lapo rl`: PPO fine-tuning of a stage-2 latent policy from reward alone (LAPO's stage 3).

The actor is the latent policy of RUN_P, its latent action decoded by an action head:
a fresh one (zero labels, as in LAPO) or the decoder of a `lapo finetune` run
(``--init RUN_F``). The critic is a value head on the policy's own features.
``--from-scratch`` trains RUN_P's architecture from random weights, its head emitting
actions directly (a method-bc agent, no LAM), as the baseline. PPO is stable-baselines3's
(rollout buffer, GAE, clipped loss, minibatches, vectorised envs); `lapo.rl.net` and
`lapo.rl.train` hold what lapo adds.

Writes RUN_R/rl_config.yaml, sources.json, metrics.csv (one row per update), tb/,
checkpoints/, and at the end agent.safetensors + agent.json (`lapo evaluate --model
RUN_R --env ...` reads it like a finetune run) and metrics.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io

from lapo.cli_args import add_config_arguments, config_from_args
from lapo.config import RLConfig

with contextlib.redirect_stderr(
    io.StringIO()
):  # SB3 imports gym (procgen's), which prints a notice
    import stable_baselines3  # noqa: F401


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``lapo rl`` parser (lapo.cli's subcommand protocol)."""
    p = sub.add_parser(
        "rl",
        help="stage 3 online: PPO fine-tuning of the latent policy from reward (no labels)",
        description=__doc__.split("\n\n")[0] + " Settings: typed defaults (lapo/config.py "
        "RLConfig) < --config YAML < --set.",
    )
    p.add_argument(
        "--policy", required=True, help="stage-2 run directory RUN_P (lapo train-policy)"
    )
    p.add_argument("--env", required=True, help="procgen:GAME, babyai:ID or minigrid:ID")
    p.add_argument("--out", required=True, help="run directory RUN_R")
    p.add_argument("--init", help="a lapo finetune run RUN_F whose decoder starts the action head")
    p.add_argument("--from-scratch", action="store_true",
                   help="baseline: RUN_P's architecture with fresh random weights, no LAM")  # fmt: skip
    add_config_arguments(p, example_config="configs/rl/cpu.yaml",
                         example_set="total_frames=100000 num_envs=8")  # fmt: skip
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    return p  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from lapo.config import ConfigError
    from lapo.rl.train import train_rl

    if args.init and args.from_scratch:
        raise ConfigError("--init and --from-scratch exclude each other")
    cfg = config_from_args(RLConfig, args)
    m = train_rl(cfg, args.out, args.policy, args.env, init=args.init,
                 from_scratch=args.from_scratch, resume=args.resume)  # fmt: skip
    if m["finished"]:
        ret = "n/a" if m["return_mean"] is None else f"{m['return_mean']:.3f}"
        print(f"lapo rl: done at {m['frames']} frames; mean return {ret} over the last "
              f"{m['episodes_in_mean']} episodes; agent in {args.out}")  # fmt: skip
    return 0
