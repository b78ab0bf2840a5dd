"""AdamW and its learning-rate schedule, the same for every training loop.

Stages 1 and 2 (Lightning, `lapo.train`) and stage 3 (Accelerate, `lapo.finetune`) build
their optimiser and schedule here, so the two sides cannot drift apart. Plain torch: no
Lightning, no Accelerate.

- Weight decay applies to matrices and conv kernels (2-D and more), not to biases and
  norm gains (1-D), which decay only hurts. An embedding table would be 2-D and decayed;
  lapo's models hold none (VQ codebooks are EMA buffers, not parameters). Which
  parameter is which is decided from the module as built, before any wrapper renames or
  flattens it: FSDP with ``use_orig_params=True`` shows each parameter as a 1-D shard
  of its flat parameter, so a ``p.ndim >= 2`` test after wrapping would decay nothing.
- The schedule: a linear warm-up, then constant or a cosine from the peak down to
  ``min_lr_ratio`` of it, as a multiplier of the peak learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lapo.config import OptimConfig

# Names wrappers insert into parameter names: FSDP, activation checkpointing,
# torch.compile (as a wrapper module), DDP.
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str) -> str:
    """A parameter's name as the unwrapped module spells it."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def decayed_names(module: nn.Module) -> set[str]:
    """Names of the parameters that take weight decay: those of 2 or more dimensions.

    Call on the module before any wrapper touches it (``configure_model`` time).
    """
    return {plain_name(n) for n, p in module.named_parameters() if p.ndim >= 2}


def weight_decay_groups(
    named_params: Iterable[tuple[str, torch.Tensor]], decayed: set[str], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups: the parameters named in `decayed` with `weight_decay`, the rest without.

    `named_params` may come from a wrapped module; names are compared without the
    wrappers' parts. Parameters that need no gradient are left out.
    """
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            (decay if plain_name(name) in decayed else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw(
    named_params: Iterable[tuple[str, torch.Tensor]],
    decayed: set[str],
    *,
    lr: float,
    weight_decay: float,
    betas: Iterable[float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW over `weight_decay_groups`: decay on the `decayed` parameters only."""
    groups = weight_decay_groups(named_params, decayed, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def warmup_cosine(
    step: int,
    progress: float,
    *,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier of the peak learning rate at optimiser step `step`.

    Linear warm-up over the first `warmup_steps`; after it 1 (``constant``) or a cosine
    from 1 to `min_lr_ratio` as `progress` (the fraction of the schedule after warm-up
    that is done, clipped to [0, 1]) goes from 0 to 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def lr_lambda(
    optim: OptimConfig, max_steps: int, clock: Callable[[], float] | None = None
) -> Callable[[int], float]:
    """`warmup_cosine` of ``optim`` over `max_steps` steps, for ``torch.optim.lr_scheduler.LambdaLR``.

    clock: the fraction of a time budget spent (`lapo.callbacks.TimeBudget`); the cosine
    then follows whichever of the steps and the clock is further along.
    """
    span = max(1, max_steps - optim.warmup_steps)

    def factor(step: int) -> float:
        progress = (step - optim.warmup_steps) / span
        if clock is not None:
            progress = max(progress, clock())
        return warmup_cosine(
            step,
            progress,
            warmup_steps=optim.warmup_steps,
            schedule=optim.schedule,
            min_lr_ratio=optim.min_lr_ratio,
        )

    return factor


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate of every group of `optimizer` (a schedule computed by hand)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
