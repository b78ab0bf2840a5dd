"""Lightning plumbing shared by the pretraining stages (1: latent action model, 2: policy).

A stage supplies a `StageModule` subclass (its loss and metrics) and a DataModule;
`prepare_run` checks and creates the run directory and `fit` trains on the Trainer
`lapo.trainer` builds for the `TrainerConfig`:

- preemption: SIGTERM / SIGUSR1 only set a flag; all ranks stop at the same step
  boundary, save ``last.ckpt`` once, and under Slurm SIGUSR1 also requeues the job
  (``#SBATCH --signal=SIGUSR1@90``).
- checkpoints: ``RUN/checkpoints/step-XXXXXXX.ckpt`` every ``ckpt_every_n_steps`` (the
  newest ``keep_checkpoints`` kept), ``last.ckpt`` and ``best.ckpt``, all written
  atomically; ``--resume`` restores the one holding the highest step.
- safety: NaN/inf losses (and NaN/inf gradients) are skipped (and counted) or stop the run
  naming the step, so a non-finite value never reaches the weights or a checkpoint;
  resumed runs restore the RNG too (`lapo.callbacks.RNGState`), and checkpoints load with
  ``weights_only=True`` only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from lapo.callbacks import GracefulStop, time_budget, training_complete
from lapo.checkpoint import checkpoint_step, prune_checkpoints, resume_checkpoint
from lapo.config import OptimConfig, TrainerConfig, save_config
from lapo.errors import NonFiniteSteps
from lapo.io import atomic_write_json, remove_stale_temporaries
from lapo.optim import adamw, decayed_names, lr_lambda
from lapo.preempt import StopRequested, requeue_slurm_job
from lapo.trainer import build_trainer, check_hardware, resolve_hardware

# --------------------------------------------------------------------------- the module side


class StageModule(L.LightningModule):
    """Base LightningModule: AdamW + schedule, NaN guard, FSDP-aware clipping, compile.

    Subclasses build their models in ``__init__`` and call `check_loss` in
    ``training_step``; ``compile_targets`` names the submodules worth compiling.
    """

    compile_targets: tuple[str, ...] = ()

    def __init__(self, optim: OptimConfig, trainer_cfg: TrainerConfig) -> None:
        super().__init__()
        self.optim_cfg = optim
        self.trainer_cfg = trainer_cfg
        self.compile_enabled = False  # set by `fit` once the hardware is known
        self.nonfinite = NonFiniteSteps(
            trainer_cfg.nan_policy, setting="trainer.nan_policy", warn=rank_zero_warn
        )
        self._where: str | None = None  # step, batch and keys of the batch being trained on

    def configure_model(self) -> None:
        # Lightning calls this before the strategy wraps the module: the last moment the
        # parameters have their own names and shapes (see lapo.sharding)
        self._decayed = decayed_names(self)
        if self.trainer_cfg.channels_last and self.trainer_cfg.strategy != "fsdp":
            self.to(memory_format=torch.channels_last)  # 4-D weights only; values unchanged
        if not self.compile_enabled:
            return
        for name in self.compile_targets:
            # Module.compile() compiles in place: parameter names (and so checkpoints
            # and the safetensors export) stay the same as without compile.
            self.get_submodule(name).compile()

    def configure_optimizers(self) -> dict:
        # No weight decay on biases and norm gains (1-D tensors): decaying them only hurts.
        # Decided from the unwrapped module: under FSDP every parameter here is a 1-D shard.
        decayed = getattr(self, "_decayed", None) or decayed_names(self)
        cfg = self.optim_cfg
        opt = adamw(self.named_parameters(), decayed, lr=cfg.lr, weight_decay=cfg.weight_decay,
                    betas=cfg.betas)  # fmt: skip
        # trainer.max_minutes: the cosine follows the clock too (no trainer, as in a plain loop: steps)
        budget = time_budget(self._trainer) if self._trainer is not None else None
        clock = (lambda: budget.fraction) if budget is not None else None
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(self.optim_cfg, self.trainer_cfg.max_steps, clock)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        clip = self.optim_cfg.grad_clip
        wrapped = self.trainer.model
        if hasattr(wrapped, "clip_grad_norm_"):  # FSDP: the norm must be computed over all shards
            norm = wrapped.clip_grad_norm_(clip if clip > 0 else float("inf"))
        else:
            norm = torch.nn.utils.clip_grad_norm_(
                self.parameters(), clip if clip > 0 else float("inf")
            )
        if not torch.isfinite(norm) and self.trainer.precision != "16-mixed":
            # A finite loss can still give inf/NaN gradients; AdamW would spread them into every
            # weight. (16-mixed is exempt: its grad scaler skips such steps by design.) The
            # norm is of the all-reduced gradients, so every rank takes the same decision.
            self.nonfinite_event("gradient norm", float(norm))
            for p in self.parameters():
                p.grad = None  # the optimiser skips parameters without a gradient
            return
        if self.should_log():
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
            # both parameter groups share one schedule: the first group's lr says it all
            self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)

    def should_log(self) -> bool:
        """True on the steps whose logged values reach the loggers.

        Mirrors Lightning's own rule (its batch counter + 1, during the step): values
        logged on other steps are dropped, so skipping them saves the logging work.
        """
        return (self.global_step + 1) % self.trainer_cfg.log_every_n_steps == 0

    def check_loss(self, loss: torch.Tensor, batch: dict, batch_idx: int) -> bool:
        """True when `loss` is finite on every rank; otherwise skip (count) or raise per nan_policy."""
        keys = batch.get("key") if isinstance(batch, dict) else None
        keys = list(dict.fromkeys(keys))[:4] if keys else None  # windows of one clip share a key
        self._where = f"step {self.global_step}, batch {batch_idx}" + (
            f", keys {keys}" if keys else ""
        )
        finite = bool(torch.isfinite(loss).all())
        if self.trainer.world_size > 1:  # all ranks must skip together or DDP's all-reduce hangs
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return True
        self.nonfinite_event("loss", loss.item())
        return False

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped so far for a non-finite loss or gradient."""
        return self.nonfinite.count

    def nonfinite_event(self, what: str, value: float) -> None:
        """A non-finite `what` at the current step: raise (nan_policy=stop) or warn and count."""
        where = getattr(self, "_where", None) or f"step {self.global_step}"
        self.nonfinite(what, value, where)
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False)

    def finished_weights(self, prefix: str) -> dict[str, torch.Tensor] | None:
        """At the real end of training, the weights under ``prefix.`` (prefix removed) on
        rank 0 for its export; None on other ranks and after a stop by a signal (the export
        belongs to the real end). Every rank must call it: FSDP gathers the full state here."""
        if not training_complete(self.trainer):
            return None
        state = self.trainer.strategy.lightning_module_state_dict()
        if not self.trainer.is_global_zero:
            return None
        return {
            k.removeprefix(prefix + "."): v for k, v in state.items() if k.startswith(prefix + ".")
        }


# --------------------------------------------------------------------------- running a stage


def prepare_run(
    cfg: Any, run_dir: str | Path, *, resume: bool, check_data: Callable[[], Any] | None = None
) -> Path | None:
    """Seed, create RUN, write RUN/config.yaml; return the checkpoint to resume from (or None).

    Call before building models (the seed must precede weight init). Whatever can
    fail does so before anything is written, cheapest first: a missing or unsafe
    checkpoint, settings the hardware cannot run, then `check_data` (reading the
    dataset's manifest), so a failed command leaves no RUN behind.
    """
    run_dir = Path(run_dir)
    ckpt = resume_checkpoint(run_dir) if resume else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fit() resolves the hardware again and warns then
        check_hardware(cfg.trainer)
    if check_data is not None:
        check_data()
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        for d in (run_dir, run_dir / "checkpoints"):  # left by a process killed mid-write
            remove_stale_temporaries(d)
        # retention holds across requeues too: each start trims what earlier jobs left
        prune_checkpoints(run_dir, cfg.trainer.keep_checkpoints, keep=ckpt)
        save_config(cfg, run_dir / "config.yaml")
    return ckpt


# Lightning advice that does not apply to these runs:
EXPECTED_WARNINGS = (
    # resumed runs reuse their checkpoint directory
    r"Checkpoint directory .* exists and is not empty",
    # the resampled loader has a length and splits work across workers itself
    r"Your `IterableDataset` has `__len__` defined",
    # val metrics are reduced by hand (ranks may hold unequal val batches) and agree on every rank
    r"It is recommended to use `self.log\('val/",
)


def own_loader_generators(datamodule: L.LightningDataModule, seed: int) -> None:
    """Make the datamodule's loaders draw their worker seed from a generator of their own.

    Every DataLoader iterator draws one number from the global torch RNG unless the loader
    has a ``generator``. The global RNG also drives training (VQ dead-code restarts,
    bottleneck noise), and a resumed run starts its iterators at other moments than an
    uninterrupted one (mid-epoch, or before a validation pass it repeats), so those draws
    would shift every later random number. The loaders' data order does not depend on this
    seed (lapo.stream seeds its pipeline from data.seed, the epoch, rank and worker).
    """
    from lightning.pytorch.utilities.model_helpers import is_overridden
    from torch.utils.data import DataLoader

    def with_generator(make: Any) -> Any:
        def wrapped() -> Any:
            loaders = make()
            for dl in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
                if isinstance(dl, DataLoader) and dl.generator is None:
                    dl.generator = torch.Generator().manual_seed(seed)
            return loaders

        return wrapped

    for name in ("train_dataloader", "val_dataloader"):
        if is_overridden(name, datamodule, L.LightningDataModule):
            setattr(datamodule, name, with_generator(getattr(datamodule, name)))


@dataclass
class FitResult:
    trainer: L.Trainer
    finished: bool
    """True when max_steps was reached or trainer.max_minutes spent; False when a signal
    stopped the run early."""


def fit(
    module: StageModule,
    datamodule: L.LightningDataModule,
    cfg: TrainerConfig,
    run_dir: str | Path,
    *,
    ckpt_path: Path | None = None,
) -> FitResult:
    """Train `module` to ``cfg.max_steps`` or ``cfg.max_minutes`` (from `ckpt_path` when resuming); always leaves last.ckpt."""
    run_dir = Path(run_dir)
    hw = resolve_hardware(cfg)
    module.compile_enabled = hw.compile
    stop = GracefulStop(run_dir / "checkpoints" / "last.ckpt")
    trainer = build_trainer(cfg, run_dir, hw, stop)
    own_loader_generators(datamodule, cfg.seed)
    if ckpt_path is not None:
        rank_zero_info(f"lapo: resuming from {ckpt_path} (step {checkpoint_step(ckpt_path)})")
    stop.install()
    try:
        with warnings.catch_warnings():
            for message in EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            ckpt = str(ckpt_path) if ckpt_path else None
            # weights_only=True: resuming never unpickles code (AtomicCheckpointIO insists too)
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    except StopRequested:
        stopped = True
    else:
        stopped = False
    finally:
        stop.uninstall()
    if stopped:
        # every rank has left the training loop and the checkpoint is on disk: only now
        # may Slurm stop the tasks (it sends them SIGTERM as it requeues)
        requeued = stop.requeue and trainer.is_global_zero and requeue_slurm_job()
        then = "the requeued job resumes from it" if requeued else "resume with --resume"
        rank_zero_info(f"lapo: stopped at step {trainer.global_step}; {then}")
        return FitResult(trainer, finished=False)
    if stop.saved_step != trainer.global_step:
        stop.save(trainer)  # the final state, so --resume with a larger max_steps goes on
    # a signal after the last step boundary changes nothing: the run is complete
    return FitResult(trainer, finished=training_complete(trainer))


def final_metrics(trainer: L.Trainer) -> dict[str, float]:
    """Last logged value of every scalar metric, as plain floats."""
    out = {}
    for k, v in trainer.callback_metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            out[k] = float(v)
    return dict(sorted(out.items()))


def write_metrics(trainer: L.Trainer, run_dir: Path, extra: dict | None = None) -> dict:
    metrics = {"global_step": trainer.global_step, **final_metrics(trainer), **(extra or {})}
    if trainer.is_global_zero:
        atomic_write_json(Path(run_dir) / "metrics.json", metrics)
    return metrics
