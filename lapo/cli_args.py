"""What every subcommand's command line shares: help that shows defaults, ``--config`` and
``--set``, and the typed config they resolve to.

Precedence, lowest first: the dataclass defaults (`lapo.config`), the ``--config`` YAML,
the ``--set key=value`` pairs, then a command's own flags where it has one for a setting
(``--label-budget``, ``--episodes``, ...). Such a flag defaults to None, meaning "not
given", so that the YAML and ``--set`` show through; its help names the typed default.
Imports no torch, so ``lapo --help`` and a mistyped key fail fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, TypeVar

from lapo.config import load_config, parse_overrides, set_dotted

T = TypeVar("T")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag's default, where there is one to show and its help does not
    already say it (no "(default: None)", "(default: False)" on switches or empty ones)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        empty = default is None or default is False or default in ("", [], ())
        if empty or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """`HelpFormatter` for a description laid out by hand (kept as written)."""


def add_config_arguments(
    p: argparse.ArgumentParser, *, example_config: str | None = None, example_set: str
) -> None:
    """``--config FILE`` and ``--set KEY=VALUE ...``, read by `config_from_args`."""
    p.add_argument(
        "--config",
        help="YAML file overriding the typed defaults"
        + (f" (e.g. {example_config})" if example_config else ""),
    )
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help=f"override any setting, e.g. --set {example_set}",
    )


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags every Lightning stage shares: --config, --data, --out, --resume, --set."""
    p.add_argument(
        "--data",
        help="dataset directory (shards + manifest.json) or shard URL pattern; sets data.path",
    )
    p.add_argument(
        "--out", required=True, help="run directory: checkpoints, logs, config.yaml, metrics.json"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --out holding the highest step (checkpoints/last.ckpt, "
        "step-*.ckpt, best.ckpt, or an older Slurm hpc_ckpt_*.ckpt)",
    )
    add_config_arguments(p, example_set="trainer.max_steps=100 model.bottleneck=fsq")


def config_from_args(
    cls: type[T],
    args: argparse.Namespace,
    flags: dict[str, Any] | None = None,
    *,
    inherit: Callable[[dict], dict] | None = None,
) -> T:
    """The typed config of a command: defaults < ``--config`` < ``--set`` < `flags`.

    `flags` maps dotted keys to the values of the command's own flags; None means the flag
    was not given. Their values are set as they are, not parsed as YAML, so a path such as
    ``2024`` or ``yes`` stays a string. `inherit` is `lapo.config.load_config`'s. A wrong
    key or value raises `lapo.config.ConfigError` naming it, before any data is read.
    """
    tree = parse_overrides(getattr(args, "overrides", None))
    for key, value in (flags or {}).items():
        if value is not None:
            set_dotted(tree, key, value)
    return load_config(cls, getattr(args, "config", None), tree, inherit=inherit)
