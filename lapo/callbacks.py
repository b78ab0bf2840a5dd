"""Lightning callbacks and checkpoint IO shared by the pretraining stages (1 and 2).

- `AtomicCheckpointIO`: every ``.ckpt`` Lightning writes goes through `lapo.io.atomic_write`,
  and every one it reads through ``torch.load(weights_only=True)``.
- `StepProgressBar`: one bar over the whole run (0..max_steps), not one per epoch:
  epochs are an artefact of the resampled loader and mean nothing to the user.
- `GracefulStop`: SIGTERM / SIGUSR1 -> every rank stops at the same step boundary and
  ``last.ckpt`` is written once; under Slurm, SIGUSR1 also requeues the job (`lapo.train`).
- `RNGState`: the random number generators travel in every checkpoint, so a resumed run
  draws the same numbers (VQ dead-code restarts, bottleneck noise) as one never stopped.
- `TimeBudget`: ``trainer.max_minutes``: Lightning's `Timer` with rank zero's clock
  shared every step, so all ranks stop together and the schedule can follow the clock.
- `KeyLog`: debug record of the sample keys each rank trained on (audits the
  loader's shard splitting across ranks).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, Timer, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lapo.checkpoint import CheckpointError, atomic_torch_save, prune_checkpoints, refusal
from lapo.preempt import StopRequested, StopSignal
from lapo.resume import rng_state, set_rng_state


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
    """Save ``last.ckpt`` at the next step boundary after SIGTERM / SIGUSR1, then stop.

    The handlers (`lapo.preempt.StopSignal`) only set a flag. At the end of every training
    step the ranks combine their flags with one all-reduce, so all of them stop at the
    same step even when the signal reached only some; they save one checkpoint together
    and raise `StopRequested`, which `lapo.train.fit` catches (no validation pass on the
    way out). Lightning's own signal handling is switched off (`disable_lightning_signals`):
    it broadcasts and saves inside the handler, which deadlocks when the signal lands
    during a collective.
    """

    def __init__(self, last_path: Path) -> None:
        self.last_path = Path(last_path)
        self.signal = StopSignal()
        self.saved_step: int | None = None
        self.requeue = False
        """Set when the stop was agreed: a requeue signal reached some rank under Slurm."""
        self._launcher: Any = None

    def install(self) -> None:
        self.signal.install()

    def uninstall(self) -> None:
        self.signal.uninstall()

    @property
    def requested(self) -> bool:
        return self.signal.requested

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning spawns the other ranks itself when no launcher (srun, torchrun) did:
        # they must hear of the signal too, as Lightning's own handler would have told them.
        self._launcher = trainer.strategy.launcher
        self.signal.on_signal = self._forward

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.signal.on_signal = None
        self._launcher = None

    def _forward(self, signum: int) -> None:
        launcher = self._launcher
        if launcher is not None and hasattr(launcher, "kill") and len(self.signal.received) == 1:
            launcher.kill(signum)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()  # again, in case anything replaced the handlers during set-up

    def save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.last_path, weights_only=False)
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        flags = torch.tensor(
            [float(self.signal.requested), float(self.signal.wants_requeue)],
            device=trainer.strategy.root_device,
        )
        if trainer.world_size > 1:  # one all-reduce per step: every rank decides alike
            flags = trainer.strategy.reduce(flags, reduce_op="max")
        stop, requeue = (bool(v > 0) for v in flags.tolist())
        if not stop:
            return
        self.requeue = requeue
        name = self.signal.name if self.signal.requested else "a signal on another rank"
        rank_zero_info(
            f"lapo: received {name}; saving {self.last_path} at step {trainer.global_step} "
            f"and {'requeueing' if requeue else 'stopping'}"
        )
        if self.saved_step != trainer.global_step:
            self.save(trainer)
        raise StopRequested(f"{name} at step {trainer.global_step}")


class PeriodicCheckpoint(ModelCheckpoint):
    """``step-XXXXXXX.ckpt`` every `every_n_steps`, the newest `keep` of them (-1: all), and ``last.ckpt``.

    Rank zero deletes the older step files after each save (`prune_checkpoints`, the same
    rule a start-up applies to what a killed job left). Lightning's own top-k would need a
    monitored value, and with one it moves saves to the next validation pass.
    """

    def __init__(self, dirpath: Path, every_n_steps: int, keep: int) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="step-{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every_n_steps,
            save_top_k=0 if keep == 0 else -1,
            save_last=True,
            enable_version_counter=False,  # a resumed run overwrites a name, never adds -v1 files
        )
        self.keep = keep

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, *args, **kwargs)
        if self.keep > 0 and trainer.is_global_zero:
            prune_checkpoints(Path(self.dirpath).parent, self.keep)


class BestCheckpoint(ModelCheckpoint):
    """``best.ckpt``: the state at the validation pass with the lowest `metric` so far."""

    def __init__(self, dirpath: Path, metric: str) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="best",
            monitor=metric,
            mode="min",
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
            save_on_train_epoch_end=False,
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a validation pass without a batch logs nothing; Lightning would raise on that
        if self.monitor in trainer.callback_metrics:
            super().on_validation_end(trainer, pl_module)


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
        return rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        state, self._pending = self._pending, None
        if state is not None:
            set_rng_state(state)


class TimeBudget(Timer):
    """Stop training once `minutes` of training time are spent (``trainer.max_minutes``).

    Lightning's `Timer` keeps the clock: training time from the start of fit, validation
    passes included, carried in checkpoints so a resumed run goes on with the time left.
    Here rank zero's reading is broadcast after every step, one collective a step (the
    Timer broadcasts its stop decision as often): every rank stops at the same step and
    reads the same `fraction`, which the learning-rate schedule follows (`lapo.optim.
    lr_lambda`), so the ranks' weights stay identical. Setting ``trainer.should_stop``
    makes Lightning run one last validation pass before it leaves the loop.
    """

    def __init__(self, minutes: float) -> None:
        super().__init__(duration={"seconds": minutes * 60.0}, interval="step", verbose=False)
        self.minutes = minutes
        self.fraction = 0.0
        """The share of the budget spent at the end of the last step, the same on every rank."""

    def on_fit_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        # after a resume the clock holds the time already spent
        self.fraction = self.time_elapsed() / self._duration
        super().on_fit_start(trainer, *args, **kwargs)  # a spent budget stops at once

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        elapsed = self.time_elapsed()
        if trainer.world_size > 1:
            elapsed = trainer.strategy.broadcast(elapsed, src=0)
        self.fraction = elapsed / self._duration
        if self.fraction >= 1.0 and not trainer.should_stop:
            trainer.should_stop = True
            if trainer.global_step < trainer.max_steps:  # the clock, not max_steps, ended it
                rank_zero_info(
                    f"lapo: the trainer.max_minutes={self.minutes:g} budget is spent at step "
                    f"{trainer.global_step} of {trainer.max_steps}; a last validation, then the "
                    "run ends as finished"
                )


def time_budget(trainer: L.Trainer) -> TimeBudget | None:
    """The trainer's `TimeBudget` callback, or None when it has no trainer.max_minutes."""
    return next((c for c in trainer.callbacks if isinstance(c, TimeBudget)), None)


def training_progress(trainer: L.Trainer) -> float:
    """How far training is, 1.0 at its end: the larger of the steps' and the time budget's share."""
    budget = time_budget(trainer)
    steps = trainer.global_step / max(1, trainer.max_steps)
    return max(steps, budget.fraction) if budget is not None else steps


def training_complete(trainer: L.Trainer) -> bool:
    """True when training reached its real end: max_steps, or the time budget spent."""
    return training_progress(trainer) >= 1.0


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
