"""``lapo finetune``: its flags, and the run (or the runs of a label-budget curve) they ask for."""

from __future__ import annotations

import argparse
import sys

from lapo.cli_args import add_config_arguments, config_from_args
from lapo.config import FinetuneConfig
from lapo.finetune.budgets import fit_budget_curve
from lapo.finetune.stage import finetune
from lapo.labelled import LabelledDataError


def parse_budgets(text: str) -> list[int]:
    """``100,300,1000`` -> [100, 300, 1000]; each a budget of at least 1."""
    try:
        budgets = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers like 100,300") from None
    if not budgets or any(b < 1 for b in budgets):
        raise argparse.ArgumentTypeError(f"{text!r}: budgets must be integers >= 1")
    return budgets


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "finetune",
        help="stage 3: fit the latent->action decoder (and policy) on labelled demos",
        description="Stage 3 (Accelerate): fit a decoder from latent to true actions on a budget of "
        "labelled transitions (and fine-tune the policy), or train a baseline. Writes RUN_F/config.yaml, "
        "selection.json, metrics.jsonl, checkpoints/, agent.safetensors + agent.json, metrics.json. "
        "With --label-budgets, one such run per budget for the label-budget curve. "
        "Several processes (GPUs, or CPUs with gloo): accelerate launch --multi_gpu --num_processes N "
        "-m lapo.cli finetune ...",
    )
    p.add_argument(
        "--lam",
        help="stage-1 run directory (RUN); required for --method lapo; with --method "
        "idm-supervised the IDM starts from RUN's (architecture and weights) instead of random",
    )
    p.add_argument(
        "--policy", help="stage-2 run directory (RUN_P): the agent can act; see --finetune-policy"
    )
    p.add_argument("--labeled", "--labelled", dest="labeled", required=True,
                   help="labelled dataset directory (shards + manifest.json with an action space)")  # fmt: skip
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--label-budget",
        type=int,
        help="labelled transitions to train on (sets label_budget, default "
        f"{FinetuneConfig.label_budget}; 0: all outside the held-out split)",
    )
    budget.add_argument(
        "--label-budgets",
        type=parse_budgets,
        metavar="N,N,...",
        help="the label-budget curve: one run per budget, OUT/budget-N, listed in OUT/budgets.json "
        "(score them with lapo evaluate --budget-runs OUT); finished runs are reused, begun ones "
        "resumed",
    )
    p.add_argument("--out", required=True,
                   help="run directory RUN_F (with --label-budgets: the directory of its runs)")  # fmt: skip
    p.add_argument(
        "--method",
        choices=["lapo", "idm-supervised", "bc"],
        help=f"sets method (default {FinetuneConfig.method})",
    )
    p.add_argument(
        "--finetune-policy",
        action="store_true",
        help="lapo: also fine-tune policy + decoder end to end",
    )
    add_config_arguments(p, example_config="configs/finetune/lapo.yaml",
                         example_set="epochs=5 decoder_hidden=64 model.image_size=32")  # fmt: skip
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                   help=f"sets mixed_precision (default {FinetuneConfig.mixed_precision})")  # fmt: skip
    return p


def run(args: argparse.Namespace) -> int:
    flags = {"method": args.method, "label_budget": args.label_budget,
             "mixed_precision": args.mixed_precision, "finetune_policy": args.finetune_policy or None}  # fmt: skip
    cfg = config_from_args(FinetuneConfig, args, flags)
    if args.label_budgets:
        fit_budget_curve(cfg, args.out, args.labeled, args.label_budgets, lam=args.lam,
                         policy=args.policy)  # fmt: skip
        return 0
    try:
        finetune(cfg, args.out, args.labeled, lam=args.lam, policy=args.policy, resume=args.resume)
    except LabelledDataError as e:  # e.g. a budget larger than the labels: one line, no traceback
        print(f"lapo finetune: error: {e}", file=sys.stderr)
        return 2
    return 0
