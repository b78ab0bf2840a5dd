"""Stage 3's checkpoints on disk: epoch folders that are whole or absent, and the best weights.

A phase's checkpoints live in ``RUN_F/checkpoints/<phase>/``: ``epoch-XXXX`` after each
epoch, ``epoch-XXXX-batch-YYYYYY`` when a signal stopped it mid-epoch (Accelerate's
``save_state``: safetensors weights, optimiser and generators), and ``best.safetensors``
+ ``best.json`` for the best held-out epoch so far.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

from accelerate import Accelerator
from torch import nn

from lapo.checkpoint import CheckpointError, refusal
from lapo.io import atomic_write, atomic_write_json


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under `root` whose save finished, oldest first."""
    return sorted(p.parent for p in root.glob("epoch-*/progress.json"))


def save_checkpoint(acc: Accelerator, path: Path, progress: dict, keep: int) -> None:
    """Accelerate's state into folder `path`, marked complete by ``progress.json``; keep the newest `keep`.

    ``progress.json`` is removed before anything in the folder is (over)written or deleted,
    so a kill -9 at any point leaves no complete-looking torn checkpoint.
    """
    if acc.is_main_process:
        (path / "progress.json").unlink(missing_ok=True)
    acc.wait_for_everyone()
    acc.save_state(str(path))
    acc.wait_for_everyone()
    if acc.is_main_process:
        atomic_write_json(path / "progress.json", progress, indent=None)  # marks it complete
        for old in complete_checkpoints(path.parent)[:-keep]:
            (old / "progress.json").unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def load_checkpoint(acc: Accelerator, path: Path) -> dict:
    """Restore the state saved in folder `path`; returns its ``progress.json``.

    Accelerate's load_state reads safetensors weights and ``torch.load(weights_only=True)``
    for the rest: a state file that needs unpickling is refused naming the folder.
    """
    try:
        acc.load_state(str(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(refusal(path, e)) from None
    return json.loads((path / "progress.json").read_text())


class BestWeights:
    """The best held-out weights of a phase so far, on disk too (``best.safetensors`` and
    ``best.json`` next to the epoch checkpoints), so a resumed run still knows them."""

    def __init__(self, acc: Accelerator, root: Path, discrete: bool):
        self.acc, self.root, self.discrete = acc, root, discrete
        self.epoch, self.val, self.state = None, {}, None
        meta = root / "best.json"
        if meta.is_file() and (root / "best.safetensors").is_file():
            from safetensors.torch import load_file

            info = json.loads(meta.read_text())
            self.epoch, self.val = info["epoch"], info["val"]
            self.state = load_file(str(root / "best.safetensors"))

    def score(self, val: dict) -> float:
        """Higher is better: accuracy, or minus the MSE of continuous actions."""
        return val["accuracy"] if self.discrete else -val["mse"]

    def offer(self, module: nn.Module, val: dict, epoch: int) -> None:
        """Keep `module`'s weights if `val` beats the best so far (epoch -1: the starting point)."""
        if self.epoch is not None and self.score(val) <= self.score(self.val):
            return  # ties keep the earlier weights
        self.epoch, self.val = epoch, dict(val)
        self.state = {
            k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()
        }
        if self.acc.is_main_process:
            from safetensors.torch import save_file

            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "best.json").unlink(missing_ok=True)  # the pair is whole or absent
            atomic_write(
                self.root / "best.safetensors", lambda tmp: save_file(self.state, str(tmp))
            )
            atomic_write_json(self.root / "best.json", {"epoch": epoch, "val": val}, indent=None)

    def restore(self, module: nn.Module) -> None:
        module.load_state_dict(self.state)
