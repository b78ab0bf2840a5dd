"""Preemption: stop signals that only set a flag, and the Slurm requeue.

A signal handler runs between two bytecodes of whatever the process was doing: in the
middle of a checkpoint's barrier, a gradient all-reduce, a file write. A handler that
starts a collective or a save there can deadlock a multi-process job (one rank waits in
the handler's broadcast while another waits at the barrier the first one left). So the
handlers here record the signal and return. The training loops look at the flag at each
step boundary, agree across ranks with one collective, save once, and only then ask
Slurm to requeue the job (`requeue_slurm_job`, rank zero).

- SIGTERM: save and exit (Slurm's own preemption or ``scancel``; Slurm decides whether
  the job comes back).
- SIGUSR1: save and exit; under a Slurm batch job, also requeue it. ``#SBATCH
  --signal=SIGUSR1@90`` sends it to the tasks; the sbatch scripts forward a
  ``--signal=B:USR1`` sent to the batch shell to the tasks as well.

This module imports nothing heavy: `held_signals` runs before torch is imported.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REQUEUE_SIGNAL = signal.SIGUSR1

_held: list[int] = []  # signals recorded by `held_signals` before a StopSignal took over


def _hold(signum: int, _frame: Any) -> None:
    _held.append(signum)


@contextmanager
def held_signals() -> Iterator[None]:
    """Inside, SIGTERM and SIGUSR1 are recorded instead of ending the process.

    The training commands run inside it from their first line: a signal during start-up
    (imports, opening the dataset) is handed to the next `StopSignal`, and the run stops
    at its first step boundary instead of dying (SIGUSR1's default action), which Slurm
    would count as a failed job rather than a requeue. A signal that comes after
    training has ended is recorded and dropped. The handlers before are restored on exit.
    """
    previous = {}
    for s in STOP_SIGNALS:
        try:
            previous[s] = signal.signal(s, _hold)
        except ValueError:  # not the main thread: leave the defaults
            break
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _held.clear()


class StopRequested(Exception):
    """The ranks agreed to stop at a step boundary after a signal and the state is saved;
    ``--resume`` continues the run. Raised by every training loop alike."""


class StopSignal:
    """SIGTERM / SIGUSR1 set a flag and nothing else; the loop acts on it between steps.

    Use as a context manager, or `install` / `uninstall`. Installing takes over any
    signal `held_signals` recorded before.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.on_signal: Callable[[int], None] | None = None
        """Called from the handler after the flag is set; it must not block or use a collective."""
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for s in STOP_SIGNALS:
            try:
                previous = signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread (a notebook worker): no handlers
                continue
            self._previous.setdefault(s, previous)
        self.received.extend(_held)
        _held.clear()

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> StopSignal:
        self.install()
        return self

    def __exit__(self, *_: object) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.received.append(signum)
        if self.on_signal is not None:
            self.on_signal(signum)

    @property
    def signum(self) -> int | None:
        """The first signal received, or None."""
        return self.received[0] if self.received else None

    @property
    def requested(self) -> bool:
        return bool(self.received)

    @property
    def wants_requeue(self) -> bool:
        """A requeue signal arrived and this process runs inside a Slurm batch job."""
        return REQUEUE_SIGNAL in self.received and slurm_job_id() is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal on another process"


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes for this job (``ARRAY_TASK`` form in an array), or None.

    None outside Slurm and in interactive allocations (``salloc`` / ``srun --pty``), whose
    shells are not batch jobs Slurm could run again.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if not job or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        job = f"{array_job}_{task}"
    return job if re.fullmatch(r"[0-9_]+", job) else None


def requeue_slurm_job(job: str | None = None) -> bool:
    """``scontrol requeue`` this job (rank zero only, after the checkpoint is saved); True on success.

    Slurm then stops every task (SIGTERM, then SIGKILL after KillWait) and runs the batch
    script again, which resumes from the newest checkpoint.
    """
    job = job or slurm_job_id()
    if job is None:
        return False
    try:
        res = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"lapo: could not requeue Slurm job {job}: {e}", file=sys.stderr, flush=True)
        return False
    if res.returncode != 0:
        print(
            f"lapo: `scontrol requeue {job}` failed ({res.returncode}): {res.stderr.strip()}",
            file=sys.stderr,
            flush=True,
        )
        return False
    print(f"lapo: requeued Slurm job {job}", file=sys.stderr, flush=True)
    return True
