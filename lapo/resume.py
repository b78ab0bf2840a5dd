"""What a resumed run restores, and what it must find unchanged.

- `check_run_dir`: a stage-3 or RL run resumes only with the settings and inputs it was
  started with (``config.yaml`` or ``rl_config.yaml``, and ``sources.json``); a run
  started without ``--resume`` never writes over another.
- `rng_state` / `set_rng_state`: the torch (CPU and CUDA), numpy and Python generators as
  tensors and plain numbers, so a checkpoint holding them still loads with
  ``torch.load(weights_only=True)`` and a resumed run draws the numbers an uninterrupted
  one would (`lapo.callbacks.RNGState` for stages 1 and 2, `lapo.rl.train`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lapo.checkpoint import CheckpointError
from lapo.config import ConfigError, load_config, to_dict
from lapo.runs import AGENT_META


def check_run_dir(
    cfg: Any,
    run_dir: str | Path,
    sources: dict,
    *,
    resume: bool,
    config: str = "config.yaml",
    free: tuple[str, ...] = (),
    what: str = "run",
) -> None:
    """Before a stage-3 run writes anything: without `resume`, `run_dir` must hold no run;
    with it, the run there was made with the settings `cfg` (but for the keys in `free`)
    and the inputs `sources` (its ``sources.json``)."""
    run_dir = Path(run_dir)
    saved = run_dir / config
    if not resume:
        if any((run_dir / x).exists() for x in (config, "checkpoints", AGENT_META)):
            raise CheckpointError(
                f"{run_dir} already holds a {what}; pass --resume or choose another --out"
            )
        return
    if not saved.is_file():
        raise CheckpointError(
            f"--resume: {run_dir} holds no {what} (no {config}); start without --resume"
        )
    old, new = to_dict(load_config(type(cfg), saved)), to_dict(cfg)
    for key in new:
        if key not in free and old[key] != new[key]:
            raise ConfigError(f"{key}: {new[key]!r} differs from {old[key]!r} in {saved}; "
                              "--resume needs the same settings")  # fmt: skip
    old_sources = json.loads((run_dir / "sources.json").read_text())
    if old_sources != sources:
        raise ConfigError(
            f"--resume: inputs {sources} differ from {old_sources} ({run_dir}/sources.json)"
        )


def rng_state() -> dict[str, Any]:
    """This process's generators, as tensors and plain numbers (``weights_only`` safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back the generators `rng_state` took (CUDA's only on as many devices as then)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
