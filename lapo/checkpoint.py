"""Checkpoint files: atomic writes, Lightning's checkpoint IO, safetensors export.

Two kinds of file live in a run directory:

- Lightning checkpoints (``checkpoints/last.ckpt``, ``step-XXXXXXX.ckpt``): the whole
  training state for ``--resume``. They are written to a temporary file in the same
  directory and renamed over the target, so a job killed mid-save never leaves a torn
  ``last.ckpt`` behind.
- The exported model (``model.safetensors`` + ``model.json``): weights as safetensors
  and the settings needed to rebuild the module as JSON. Loading them runs no pickle,
  so a run directory can be shared and opened safely.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file

EXPORT_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


class CheckpointError(RuntimeError):
    """A checkpoint or exported model is missing or does not match what reads it."""


# --------------------------------------------------------------------------- atomic writes


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside `path`, fsync it, then rename it over `path`.

    The rename is atomic on POSIX file systems, so readers see the old file or the new
    one, never half of the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes local files with tmp + rename.

    Every checkpoint Lightning writes (ModelCheckpoint, ``last.ckpt``, the Slurm
    requeue ``hpc_ckpt_N.ckpt``, ``trainer.save_checkpoint``) goes through here.
    Remote URLs (s3://, gs://) fall back to Lightning's fsspec transaction.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Always tensors and plain data only, whatever the caller or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
        # asks: a checkpoint from elsewhere must never run code (every lapo checkpoint qualifies).
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(refusal(path, e)) from None


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


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete ``.NAME.*.tmp`` files that `atomic_write` left behind when its process was killed.

    Call only where no other process writes into `directory` (rank zero, at start-up).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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


# --------------------------------------------------------------------------- safetensors export


def export_model(
    run_dir: str | Path,
    model: torch.nn.Module,
    *,
    kind: str,
    config: dict,
    extra: dict | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    name: str = "model",
) -> Path:
    """Write ``RUN/model.safetensors`` and ``RUN/model.json`` (``RUN/<name>.*`` with `name`).

    `kind` names the class that reads it back (``"lam"``, ``"policy"``, ...); `config`
    is the plain dict of settings that rebuilds the module; `extra` holds anything else
    its constructor needs (e.g. ``num_actions``). `state_dict`, when given, replaces
    ``model.state_dict()`` (FSDP gathers the full one outside the module).
    """
    run_dir = Path(run_dir)
    state = model.state_dict() if state_dict is None else state_dict
    # safetensors refuses tensors that share memory (tied weights); a private copy of
    # each breaks the sharing, and loading both names into the tied module is harmless.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    weights, meta_file = f"{name}.safetensors", f"{name}.json"
    atomic_write(run_dir / weights, lambda tmp: save_file(tensors, str(tmp), {"kind": kind}))
    meta = {
        "format_version": EXPORT_FORMAT_VERSION,
        "kind": kind,
        "config": config,
        "extra": extra or {},
        "weights": weights,
    }
    atomic_write_text(run_dir / meta_file, json.dumps(meta, indent=2) + "\n")
    return run_dir / weights


def read_model_meta(run_dir: str | Path, kind: str | None = None, *, name: str = "model") -> dict:
    """Read ``RUN/model.json`` (``RUN/<name>.json``); with `kind`, check the kind of model."""
    path = Path(run_dir) / f"{name}.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist: {run_dir} holds no exported model (did training finish?)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format_version") != EXPORT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {meta.get('format_version')} is not supported"
        )
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{path}: holds a {meta.get('kind')!r} model, expected {kind!r}")
    return meta


def load_weights(
    model: torch.nn.Module, run_dir: str | Path, *, strict: bool = True, name: str = "model"
) -> None:
    """Fill `model` from ``RUN/model.safetensors`` (``RUN/<name>.safetensors``; no pickle)."""
    path = Path(run_dir) / f"{name}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except SafetensorError as e:  # not safetensors (e.g. a pickle renamed): never unpickled
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path} does not match {type(model).__name__}: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
