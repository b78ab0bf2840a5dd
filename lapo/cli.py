"""The ``lapo`` command: one subcommand per stage, each living in its own module.

A subcommand module exposes two functions::

    def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser
        # sub.add_parser(NAME, help=..., description=...) and its flags, each with help
    def run(args: argparse.Namespace) -> int | None
        # do the work; the return value is the exit status (None: 0)

Only the module of the subcommand being run is imported, so ``lapo --help`` is quick
and a subcommand whose module is missing or broken does not take the others down:
running it prints what is missing instead. Every subcommand's ``--help`` shows the
defaults of its flags (`lapo.cli_args.HelpFormatter`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from lapo.cli_args import HelpFormatter

# name -> (module, one-line help shown by `lapo --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "record": (
        "lapo.record_command",
        "record environment episodes as a dataset (the same as python -m data_prep.record)",
    ),
    "pretrain": (
        "lapo.lam",
        "stage 1: train the latent action model (IDM + world model) on unlabelled video",
    ),
    "train-policy": ("lapo.policy", "stage 2: clone a latent policy from the IDM's latent actions"),
    "finetune": (
        "lapo.finetune.command",
        "stage 3: fit the latent->action decoder (and policy) on labelled demos",
    ),
    "label": ("lapo.label", "pseudo-label a dataset with real actions using a fine-tuned run"),
    "evaluate": (
        "lapo.evaluate",
        "probe accuracy, decoder accuracy, world-model PSNR, env returns",
    ),
    "rl": (
        "lapo.rl",
        "stage 3 online: PPO fine-tuning of the latent policy from reward (no labels)",
    ),
    "demo": ("lapo.demo", "the whole pipeline on a small local dataset, with a report"),
    "export": ("lapo.export", "write a run's weights as safetensors + json from a checkpoint"),
}

# stop at a step boundary on SIGTERM / SIGUSR1, saving a checkpoint (lapo.preempt)
TRAINING_COMMANDS = ("pretrain", "train-policy", "finetune", "rl")

EPILOG = (
    "Settings come from typed defaults, then --config YAML, then --set key=value, then the\n"
    "flags that name a setting (--label-budget, --episodes, ...).\n"
    "Run `lapo SUBCOMMAND --help` for a subcommand's flags."
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lapo")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: `HelpFormatter` unless it asks for another."""

    def __init__(self, *args, formatter_class: type = HelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


class SubcommandUnavailable(RuntimeError):
    """The module behind a subcommand is missing, broken, or lacks add_parser/run."""


def load_subcommand(name: str) -> ModuleType:
    module_name, _ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and module_name.startswith(e.name):
            raise SubcommandUnavailable(
                f"lapo {name}: not available in this install ({module_name} does not exist yet)"
            ) from None
        raise SubcommandUnavailable(
            f"lapo {name}: {module_name} needs the module {e.name!r}, which cannot be imported"
        ) from e
    missing = [f for f in ("add_parser", "run") if not callable(getattr(module, f, None))]
    if missing:
        raise SubcommandUnavailable(
            f"lapo {name}: {module_name} does not define {' and '.join(missing)}() yet, so the "
            "command cannot run"
        )
    return module


def build_parser(selected: str | None = None) -> tuple[argparse.ArgumentParser, ModuleType | None]:
    """The top-level parser; only `selected`'s module is imported and adds its real flags."""
    parser = argparse.ArgumentParser(
        prog="lapo",
        description="lapo: learn to act from unlabelled video (latent action pretraining).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lapo {_version()}")
    sub = parser.add_subparsers(
        dest="command", metavar="SUBCOMMAND", title="subcommands", parser_class=_SubcommandParser
    )
    module = None
    for name, (_, line) in SUBCOMMANDS.items():
        if name == selected:
            module = load_subcommand(name)
            p = module.add_parser(sub)
            if p is None or p.prog.split()[-1] != name:
                raise SubcommandUnavailable(
                    f"lapo {name}: {SUBCOMMANDS[name][0]}.add_parser must add and return the {name!r} parser"
                )
        else:
            sub.add_parser(name, help=line, add_help=False)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    if selected is not None and selected not in SUBCOMMANDS:
        selected = None  # let argparse report the unknown choice with the list of valid ones
    if selected in TRAINING_COMMANDS:
        from lapo.preempt import held_signals

        # from the first line, before torch loads: a preemption never kills a training run
        with held_signals():
            return _run(argv, selected)
    return _run(argv, selected)


def _run(argv: list[str], selected: str | None) -> int:
    try:
        parser, module = build_parser(selected)
    except SubcommandUnavailable as e:
        print(e, file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command is None or module is None:
        parser.print_help()
        return 0 if args.command is None else 2
    # imported after parsing: keeps `lapo --help` free of torch
    from lapo.agent import AgentError
    from lapo.checkpoint import CheckpointError
    from lapo.config import ConfigError
    from lapo.labelled import LabelledDataError
    from lapo.shards import ManifestError
    from lapo.windows import DatasetError

    user_errors = (
        ConfigError, CheckpointError, AgentError, DatasetError, LabelledDataError, ManifestError
    )  # fmt: skip
    try:
        status = module.run(args)
    except (*user_errors, OSError) as e:
        # a user mistake (bad key or value, nothing to resume, a missing or unusable dataset,
        # an unwritable or full --out): one line naming it, no traceback
        print(f"lapo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a NaN/inf loss under nan_policy=stop: where it happened
        print(f"lapo {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lapo {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
