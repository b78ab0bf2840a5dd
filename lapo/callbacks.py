"""Lightning callbacks shared by the pretraining stages (1 and 2).

- `StepProgressBar`: one bar over the whole run (0..max_steps), not one per epoch:
  epochs are an artefact of the resampled loader and mean nothing to the user.
- `GracefulStop`: SIGTERM / SIGUSR1 outside Slurm -> write ``last.ckpt`` and stop at
  the end of the current step. Under Slurm, Lightning's own requeue handler owns
  SIGUSR1 and we only add the ``last.ckpt`` save on SIGTERM.
- `RNGState`: the random number generators travel in every checkpoint, so a resumed run
  draws the same numbers (VQ dead-code restarts, bottleneck noise) as one never stopped.
- `KeyLog`: debug record of the sample keys each rank trained on (audits the
  loader's shard splitting across ranks).
"""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class StepProgressBar(TQDMProgressBar):
    """A training bar whose total is ``max_steps`` and whose position is ``global_step``."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.initial = trainer.global_step  # resumed runs start part-way
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("train")

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # keep one bar across epochs

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if not bar.disable and self._should_update(step, trainer.max_steps):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # the bar is closed once, in on_train_end


class GracefulStop(Callback):
    """Save ``last.ckpt`` and stop cleanly when the job is told to go away.

    Handlers only set a flag; the save happens at the next step boundary, where the
    training state is consistent. Under DDP the flag is OR-reduced so every rank stops
    at the same step (a rank that stops alone would hang the others' all-reduce).
    """

    def __init__(self, last_path: Path) -> None:
        self.last_path = Path(last_path)
        self.signum: int | None = None
        self.saved_step: int | None = None
        self._previous: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = None

    # Installed before trainer.fit so that Lightning's SIGTERM handler, registered
    # inside fit, calls ours too (it composes with handlers already present).
    def install(self) -> None:
        signums = [signal.SIGTERM]
        if not SLURMEnvironment.detect():
            signums.append(signal.SIGUSR1)  # under Slurm this is Lightning's requeue signal
        for s in signums:
            try:
                self._previous[s] = signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handlers
                pass

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        trainer = self._trainer
        if signum == signal.SIGTERM and trainer is not None and trainer.world_size == 1:
            # Lightning's own SIGTERM handler ran just before this one (it composes with
            # handlers present at fit) and would raise at the end of this step, after the
            # step's counters moved on: a save from there, on an epoch's last batch, resumes
            # one batch off. With one process, stop at on_train_batch_end instead, where
            # Lightning restores exactly. (Several processes keep Lightning's way: it has
            # already broadcast the stop to the other ranks.)
            connector = getattr(trainer, "_signal_connector", None)
            if connector is not None:
                connector.received_sigterm = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.last_path, weights_only=False)
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        stop = self.requested
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and self.saved_step != trainer.global_step:
            name = signal.Signals(self.signum).name if self.signum else "a signal on another rank"
            rank_zero_info(
                f"lapo: received {name}; saving {self.last_path} at step {trainer.global_step} and stopping"
            )
            self.save(trainer)
            trainer.should_stop = True

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # SIGTERM during validation stops Lightning before any step boundary. With one
        # process it is safe to save here; with several, ranks may be at different points.
        if (
            isinstance(exception, SIGTERMException)
            and trainer.world_size == 1
            and self.saved_step != trainer.global_step
        ):
            self.save(trainer)


class RNGState(Callback):
    """Save the torch (CPU and CUDA), numpy and Python generators with each checkpoint.

    Lightning restores weights, optimiser, scheduler, loop counters and (through the
    loader's own ``state_dict``) the data position, but not the generators. They are
    stored as tensors and plain numbers, so checkpoints still load with
    ``weights_only=True``, and put back just before the first training step after a
    resume (after the loader has started, which may draw a seed of its own).

    Rank zero's generators are saved and every rank gets them back: all ranks start
    from the same ``trainer.seed`` and draw alike, so they hold the same state anyway.
    """

    def __init__(self) -> None:
        self._pending: dict | None = None

    def state_dict(self) -> dict[str, Any]:
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
        py = state["python"]
        random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
        cuda = state.get("cuda")
        if (
            cuda is not None
            and torch.cuda.is_available()
            and len(cuda) == torch.cuda.device_count()
        ):
            torch.cuda.set_rng_state_all(cuda)


class KeyLog(Callback):
    """Append ``step<TAB>key`` for every training sample to ``RUN/debug/keys-rank<R>.txt``."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        keys = batch.get("key") if isinstance(batch, dict) else None
        if keys is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"keys-rank{trainer.global_rank}.txt"
        with open(path, "a") as f:
            f.writelines(f"{trainer.global_step}\t{k}\n" for k in keys)
