"""Lightning's training checkpoints (``.ckpt``), read and written with plain torch.

``checkpoints/last.ckpt``, ``step-XXXXXXX.ckpt``, ``best.ckpt`` and Slurm's requeue files
``hpc_ckpt_N.ckpt`` hold the whole training state for ``--resume``. They are written with
`lapo.io.atomic_write`, so a job killed mid-save never leaves a torn ``last.ckpt``, and
read with ``torch.load(weights_only=True)``, so a file holding code is refused. Lightning's
side of the writing (`lapo.callbacks.AtomicCheckpointIO`) and the exported models
(`lapo.runs`) live elsewhere: this module imports no Lightning.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from lapo.io import atomic_write


class CheckpointError(RuntimeError):
    """A checkpoint or exported model is missing or does not match what reads it."""


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def refusal(path: str | Path, err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # torch's message starts with advice on loading the file unsafely; keep only the reason
    reason = [ln for ln in lines if "unpickler error" in ln.lower() or "unsupported" in ln.lower()]
    first = (reason or lines or [type(err).__name__])[0]
    return (
        f"{path}: refused to load: it is not a checkpoint of tensors and plain data (loaded with "
        f"torch.load(weights_only=True), which runs no code from the file): {first}"
    )


def safe_torch_load(path: str | Path, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a file holding code is a `CheckpointError`.

    `mmap` maps the tensors instead of reading them: a cheap check of a large checkpoint.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(refusal(path, e)) from None
    except (RuntimeError, EOFError, ValueError) as e:  # torn or not a torch file at all
        raise CheckpointError(f"{path}: not a readable checkpoint ({e})") from None


# --------------------------------------------------------------------------- run directories


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every training-state file of a run: ``checkpoints/{last,step-*,best}.ckpt`` and
    Lightning's Slurm requeue files ``hpc_ckpt_*.ckpt`` (written by older versions)."""
    run_dir = Path(run_dir)
    ckpts = run_dir / "checkpoints"
    found = [ckpts / "last.ckpt", *sorted(ckpts.glob("step-*.ckpt")), ckpts / "best.ckpt"]
    found += sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    return [p for p in found if p.is_file()]


# On equal steps: a file saved at a step's end before one saved during validation.
_TIE_ORDER = ("last", "step", "hpc", "best")


def _tie_rank(path: Path) -> int:
    return next((i for i, kind in enumerate(_TIE_ORDER) if path.name.startswith(kind)), 0)


def resume_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint of `run_dir` holding the highest global step.

    Every kind counts (`run_checkpoints`), ranked by the step stored inside, not by
    file name or time: after a preemption any of them can be the newest. A file that
    cannot be read is skipped with a warning; one that holds code is refused.
    """
    run_dir = Path(run_dir)
    found = run_checkpoints(run_dir)
    if not found:
        raise CheckpointError(
            f"--resume: no checkpoint in {run_dir} (looked for checkpoints/last.ckpt, "
            "step-*.ckpt, best.ckpt and hpc_ckpt_*.ckpt); start without --resume"
        )
    steps: dict[Path, int] = {}
    skipped: list[str] = []
    for path in found:
        try:
            steps[path] = checkpoint_step(path)
        except CheckpointError as e:
            if "refused" in str(e):
                raise
            skipped.append(str(e))
            warnings.warn(f"lapo: --resume skips {e}", stacklevel=2)
    if not steps:
        raise CheckpointError(
            f"--resume: no readable checkpoint in {run_dir}: " + "; ".join(skipped)
        )
    return max(steps, key=lambda p: (steps[p], -_tie_rank(p)))


def checkpoint_step(path: str | Path) -> int:
    """The global step a Lightning checkpoint holds, read with its tensors mapped, not loaded.

    Reading it also vets the file: one that holds code, or is torn, fails here, before
    any data is read, and never reaches a loader that might unpickle freely (FSDP's
    full-checkpoint loader does).
    """
    ckpt = safe_torch_load(path, mmap=True)
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    if not isinstance(step, int):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no global_step)")
    return step


def prune_checkpoints(
    run_dir: str | Path, keep_last: int, *, keep: str | Path | None = None
) -> list[Path]:
    """Apply the retention policy to what is on disk; return the files deleted.

    Keeps ``last.ckpt``, ``best.ckpt``, the newest `keep_last` ``step-*.ckpt`` (by the
    step in the name; -1 keeps all) and `keep` (the checkpoint being resumed from).
    Lightning's ``hpc_ckpt_*.ckpt`` requeue files are superseded by ``last.ckpt`` and go,
    unless one of them is `keep`. Call from one process only (rank zero).
    """
    run_dir = Path(run_dir)
    keep = Path(keep).resolve() if keep is not None else None
    periodic = sorted(
        (int(m.group(1)), p)
        for p in (run_dir / "checkpoints").glob("step-*.ckpt")
        if (m := re.fullmatch(r"step-(\d+)\.ckpt", p.name))
    )
    doomed = [p for _, p in periodic[: max(0, len(periodic) - keep_last)]] if keep_last >= 0 else []
    doomed += sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    removed = []
    for p in doomed:
        if p.resolve() != keep:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def state_dict_from_checkpoint(path: str | Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The weights under `prefix` of a Lightning checkpoint, with the prefix stripped."""
    ckpt = safe_torch_load(path)
    state = ckpt["state_dict"]
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise CheckpointError(f"{path}: no weights under the prefix {prefix!r}")
    return out
