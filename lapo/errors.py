"""Errors raised by more than one stage, in a module that imports nothing.

Stages 1 and 2 (Lightning) and stage 3 (Accelerate) stop on a non-finite loss alike;
raising the one class from here spares stage 3 an import of Lightning.
"""


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient was NaN or inf and ``nan_policy`` is ``stop``."""
