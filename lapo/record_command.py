"""``lapo record`` and ``python -m data_prep.record``: record environment episodes into a
dataset (shards + manifest.json).

    lapo record procgen:bigfish --episodes 64 --out data/bigfish --policy sticky
    lapo record babyai:BabyAI-GoToLocal-v0 --episodes 500 --policy expert --out data/goto

The flags of `lapo.record.record_dataset`, which holds the frame / action alignment and
how episodes become clips and shards. Rerunning the same command after an interruption
finishes the missing shards only.
"""

from __future__ import annotations

import argparse
import sys

from lapo.cli_args import HelpFormatter
from lapo.config import ConfigError
from lapo.envs import POLICIES, PROCGEN_GAMES, EnvError
from lapo.record import record_dataset

DESCRIPTION = (
    "Record episodes of a Procgen game or a BabyAI/MiniGrid level as a sharded clip dataset."
)
ENV_OPTIONS = (  # flag, record_dataset's env_kwargs key, the env families it applies to
    ("--distribution-mode", "distribution_mode", ("procgen",)),
    ("--num-levels", "num_levels", ("procgen",)),
    ("--view", "view", ("babyai", "minigrid")),
)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The recording flags, shared by ``lapo record`` and ``python -m data_prep.record``."""
    p.add_argument(
        "spec",
        help=f"environment: procgen:<game> ({', '.join(PROCGEN_GAMES)}), babyai:<env-id> "
        "(e.g. babyai:BabyAI-GoToLocal-v0) or minigrid:<env-id> (e.g. minigrid:MiniGrid-Empty-8x8-v0)",
    )
    p.add_argument("--out", required=True, help="output dataset directory (created; resumable)")
    p.add_argument("--episodes", type=int, default=64, help="number of episodes to record")
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default="random",
        help="random: uniform actions; sticky: a random action held 1-4 steps; "
        "expert: the BabyAI bot (babyai:* only)",
    )
    p.add_argument(
        "--epsilon",
        type=float,
        default=0.0,
        help="probability of replacing each action by a uniform random one (default 0); "
        "with --policy expert this gives the varied moves a latent action model learns from",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="run seed; episode e is seeded from (seed, e)"
    )
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
    p.add_argument(
        "--clip-frames", type=int, default=64, help="frames per clip (one webdataset sample)"
    )
    p.add_argument(
        "--clip-overlap",
        type=int,
        default=1,
        help="frames shared by consecutive clips of an episode (1 keeps every transition)",
    )
    p.add_argument("--episodes-per-shard", type=int, default=16, help="episodes in each shard file")
    p.add_argument("--workers", type=int, default=1, help="processes recording shards in parallel")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="cut episodes after this many actions (default: the environment's own limit)",
    )
    p.add_argument("--fps", type=float, default=15.0, help="frame rate written into the mp4 clips")
    p.add_argument(
        "--distribution-mode",
        default=None,
        choices=("easy", "hard", "extreme", "memory", "exploration"),
        help="procgen only: level distribution (default easy)",
    )
    p.add_argument(
        "--num-levels",
        type=int,
        default=None,
        help="procgen only: play only levels [start, start+N) (default 0: any level)",
    )
    p.add_argument(
        "--view",
        default=None,
        choices=("full", "agent"),
        help="babyai/minigrid only: full top-down grid (default) or the agent's 7x7 view",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def build_parser(prog: str = "python -m data_prep.record") -> argparse.ArgumentParser:
    """The parser of the standalone command."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=HelpFormatter)
    return add_arguments(p)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``lapo record`` parser (lapo.cli's subcommand protocol)."""
    p = sub.add_parser(
        "record",
        help="record environment episodes as a dataset (the same as python -m data_prep.record)",
        description=DESCRIPTION,
    )
    return add_arguments(p)


def record(args: argparse.Namespace) -> dict:
    """Record what `args` asks for; a flag its env family does not have is a ConfigError."""
    family = args.spec.partition(":")[0]
    env_kwargs = {}
    for flag, key, families in ENV_OPTIONS:
        value = getattr(args, key)
        if value is None:
            continue
        if family not in families:
            raise ConfigError(f"{flag} applies to {'/'.join(families)} only, not {args.spec}")
        env_kwargs[key] = value
    return record_dataset(
        args.spec,
        args.out,
        episodes=args.episodes,
        policy=args.policy,
        epsilon=args.epsilon,
        seed=args.seed,
        size=args.size,
        clip_frames=args.clip_frames,
        clip_overlap=args.clip_overlap,
        episodes_per_shard=args.episodes_per_shard,
        workers=args.workers,
        max_episode_steps=args.max_steps,
        fps=args.fps,
        env_kwargs=env_kwargs,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    try:
        record(args)
    except (EnvError, ValueError) as e:  # a bad spec, policy or setting: one line, no traceback
        print(f"lapo record: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m data_prep.record``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        record(args)
    except (EnvError, ValueError, OSError) as e:  # OSError: full disk, unwritable --out
        # one line: the usage block would bury the message (argparse's own errors keep it)
        parser.exit(2, f"record: error: {e}\n")
    return 0
