"""Errors raised by more than one stage, and the rule for a non-finite step, importing nothing.

Stages 1 and 2 (Lightning) and stage 3 (Accelerate) handle a NaN/inf loss or gradient
alike, through `NonFiniteSteps`; keeping it here spares stage 3 an import of Lightning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient was NaN or inf and ``nan_policy`` is ``stop``."""


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)  # points at the training loop that found the step


class NonFiniteSteps:
    """``nan_policy`` applied to a step whose loss or gradient is NaN or inf.

    ``stop`` raises `NonFiniteLossError` naming the value and the step; ``skip`` warns and
    counts (`count`), and the caller drops the step so the value never reaches the weights.
    Every rank must call it alike (the caller agrees on the fault first).
    """

    def __init__(
        self,
        policy: str,
        *,
        setting: str = "nan_policy",
        who: str = "lapo",
        warn: Callable[[str], object] = _warn,
    ) -> None:
        self.policy, self.setting, self.who, self.warn = policy, setting, who, warn
        self.count = 0
        """Steps skipped so far."""

    def __call__(self, what: str, value: object, where: str) -> None:
        """A non-finite `what` (``loss``, ``gradient norm``) equal to `value` at `where`."""
        if self.policy == "stop":
            raise NonFiniteLossError(f"non-finite {what} ({value}) at {where}; {self.setting}=stop")
        self.count += 1
        self.warn(
            f"{self.who}: skipping a step with a non-finite {what} ({value}) at {where} "
            f"({self.count} so far)"
        )
