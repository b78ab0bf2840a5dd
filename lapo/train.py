"""Lightning plumbing shared by the pretraining stages (1: latent action model, 2: policy).

A stage supplies a `StageModule` subclass (its loss and metrics) and a DataModule;
this file turns a `TrainerConfig` into a Trainer and runs it:

- hardware: bf16 and torch.compile on GPU; on CPU both fall back with a warning.
- distribution: DDP (gloo on CPU, NCCL on GPU) or FSDP (`lapo.sharding`); under Slurm
  the SLURMEnvironment wires the ranks.
- preemption: SIGTERM / SIGUSR1 only set a flag; all ranks stop at the same step
  boundary, save ``last.ckpt`` once, and under Slurm SIGUSR1 also requeues the job
  (``#SBATCH --signal=SIGUSR1@90``). Lightning's own signal handling is off: it ran
  collectives inside the handler.
- checkpoints: ``RUN/checkpoints/step-XXXXXXX.ckpt`` every ``ckpt_every_n_steps`` (the
  newest ``keep_checkpoints`` kept), ``last.ckpt`` and ``best.ckpt``, all written
  atomically; ``--resume`` restores the one holding the highest step.
- logs: TensorBoard + CSV under ``RUN/logs`` (W&B when installed and asked for).
- safety: NaN/inf losses (and NaN/inf gradients) are skipped (and counted) or stop the run
  naming the step, so a non-finite value never reaches the weights or a checkpoint;
  resumed runs restore the RNG too (`RNGState`), and checkpoints load with
  ``weights_only=True`` only.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from lapo.callbacks import (
    AtomicCheckpointIO,
    BestCheckpoint,
    GracefulStop,
    KeyLog,
    PeriodicCheckpoint,
    RNGState,
    StepProgressBar,
)
from lapo.checkpoint import checkpoint_step, prune_checkpoints, resume_checkpoint
from lapo.config import (
    ConfigError,
    OptimConfig,
    TrainerConfig,
    load_config,
    parse_overrides,
    save_config,
)
from lapo.errors import NonFiniteSteps
from lapo.io import atomic_write_json, remove_stale_temporaries
from lapo.optim import adamw, decayed_names, lr_lambda
from lapo.preempt import StopRequested, requeue_slurm_job
from lapo.sharding import LapoFSDP

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
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(self.optim_cfg, self.trainer_cfg.max_steps)
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


# --------------------------------------------------------------------------- the trainer side


@dataclass
class Hardware:
    accelerator: str
    precision: str
    compile: bool


def resolve_hardware(cfg: TrainerConfig) -> Hardware:
    """Pick the accelerator; on CPU drop bf16/fp16 and compile with a warning."""
    accel = cfg.accelerator
    if accel == "auto":
        accel = "gpu" if torch.cuda.is_available() else "cpu"
    if accel in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator: {accel} but torch sees no CUDA device (use cpu or auto)"
        )
    precision, compile_ = cfg.precision, cfg.compile
    if accel == "cpu":
        if precision != "32-true":
            warnings.warn(
                f"lapo: trainer.precision={precision} is ignored on CPU; using 32-true",
                stacklevel=2,
            )
            precision = "32-true"
        if compile_:
            warnings.warn("lapo: trainer.compile=true is ignored on CPU", stacklevel=2)
            compile_ = False
    return Hardware(accel, precision, compile_)


def _num_processes(cfg: TrainerConfig, hw: Hardware) -> int:
    if isinstance(cfg.devices, int) and cfg.devices > 0:
        per_node = cfg.devices
    elif hw.accelerator == "cpu":
        per_node = 1
    else:  # "auto" or -1: every visible GPU
        per_node = torch.cuda.device_count()
    return per_node * cfg.num_nodes


def make_strategy(cfg: TrainerConfig, hw: Hardware) -> str | Strategy:
    if cfg.strategy == "fsdp":
        return LapoFSDP(precision=hw.precision, cpu=hw.accelerator == "cpu")
    if cfg.strategy == "auto" and _num_processes(cfg, hw) <= 1:
        return "auto"
    # No buffer broadcast at each forward: the only buffers (VQ codebooks) are all-reduced
    # by the quantiser itself, and Lightning runs validation through the DDP wrapper, where
    # a broadcast hangs as soon as ranks hold different numbers of val batches.
    no_sync = (
        {"forward_sync_buffers": False}  # torch >= 2.13 (still syncs once at init)
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    return DDPStrategy(
        process_group_backend="gloo" if hw.accelerator == "cpu" else None,
        find_unused_parameters=cfg.strategy == "ddp_find_unused_parameters_true",
        **no_sync,
    )


def make_loggers(cfg: TrainerConfig, run_dir: Path) -> list[Logger]:
    logs = run_dir / "logs"
    out: list[Logger] = []
    for name in cfg.loggers:
        if name == "tensorboard":
            out.append(
                TensorBoardLogger(save_dir=logs, name="tensorboard", default_hp_metric=False)
            )
        elif name == "csv":
            out.append(CSVLogger(save_dir=logs, name="csv"))
        elif name == "wandb":
            try:
                import wandb  # noqa: F401
                from lightning.pytorch.loggers import WandbLogger
            except ImportError:
                rank_zero_warn(
                    "lapo: trainer.loggers includes wandb but wandb is not installed; skipping it"
                )
                continue
            out.append(
                WandbLogger(project=cfg.wandb_project, name=run_dir.name, save_dir=str(logs))
            )
    return out


def _not_an_advert(record: logging.LogRecord) -> bool:
    """Lightning's tips for its paid services ("💡 Tip: ... litlogger / litmodels")."""
    return "Tip: For seamless" not in record.getMessage()


def build_trainer(cfg: TrainerConfig, run_dir: Path, hw: Hardware, stop: GracefulStop) -> L.Trainer:
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_an_advert not in rank_zero_log.filters:
        rank_zero_log.addFilter(_not_an_advert)
    ckpt_dir = run_dir / "checkpoints"
    callbacks: list[Any] = [
        RNGState(),  # first: its state is taken before any other callback draws a number
        PeriodicCheckpoint(ckpt_dir, cfg.ckpt_every_n_steps, cfg.keep_checkpoints),
        stop,
    ]
    if cfg.best_checkpoint_metric:
        callbacks.append(BestCheckpoint(ckpt_dir, cfg.best_checkpoint_metric))
    if cfg.progress:
        callbacks.append(StepProgressBar())
    if cfg.log_keys:
        callbacks.append(KeyLog(run_dir / "debug"))
    loggers = make_loggers(cfg, run_dir)
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # the ranks' wiring only: requeueing is GracefulStop's (Lightning's saves inside
        # the signal handler, which deadlocks when the signal lands in a collective)
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = L.Trainer(
        accelerator=hw.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=make_strategy(cfg, hw),
        precision=hw.precision,
        max_steps=cfg.max_steps,
        max_epochs=-1,
        # the train loader is a resampled stream of fixed length, so validation is
        # scheduled in global steps rather than in epochs
        val_check_interval=cfg.val_every_n_steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=cfg.sanity_val_steps,
        log_every_n_steps=cfg.log_every_n_steps,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=plugins,
        default_root_dir=run_dir,
        enable_progress_bar=cfg.progress,
        # "warn": deterministic kernels where torch has them, a warning where it has not
        deterministic="warn" if cfg.deterministic else None,
        # the loader splits shards by rank itself; a DistributedSampler would not apply
        use_distributed_sampler=False,
        benchmark=hw.accelerator != "cpu" and not cfg.deterministic,
    )
    disable_lightning_signals(trainer)
    return trainer


def disable_lightning_signals(trainer: L.Trainer) -> None:
    """Keep Lightning from installing signal handlers of its own during ``fit``.

    Its SIGTERM handler broadcasts to the other ranks, and its Slurm requeue handler saves a
    checkpoint (a barrier), both from inside the handler: when the signal interrupts a
    rank in the middle of another collective (a checkpoint save, say), the ranks wait on
    each other for ever. `GracefulStop` owns SIGTERM and SIGUSR1 instead.
    """
    connector = getattr(trainer, "_signal_connector", None)
    if connector is None or not hasattr(connector, "register_signal_handlers"):
        raise RuntimeError(
            "lapo.train: this Lightning version has no Trainer._signal_connector; its signal "
            "handlers would run collectives inside a signal handler"
        )
    connector.register_signal_handlers = lambda: None


def check_hardware(cfg: TrainerConfig) -> None:
    """Settings this machine or launch cannot honour, as `ConfigError`s naming the key."""
    hw = resolve_hardware(cfg)
    make_strategy(cfg, hw)
    gpus = torch.cuda.device_count()
    if hw.accelerator in ("gpu", "cuda") and isinstance(cfg.devices, int) and cfg.devices > gpus:
        raise ConfigError(f"trainer.devices: {cfg.devices} GPUs asked for, {gpus} visible")
    cluster = SLURMEnvironment.detect() or "TORCHELASTIC_RUN_ID" in os.environ
    if cfg.num_nodes > 1 and not cluster and "NODE_RANK" not in os.environ:
        # Lightning would wait forever for the other nodes to join
        raise ConfigError(
            f"trainer.num_nodes: {cfg.num_nodes} nodes but this process was not started by Slurm "
            "(srun), torchrun, or with NODE_RANK/MASTER_ADDR set; launch it with one of those, "
            "or use num_nodes=1"
        )


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
    """True when max_steps was reached; False when a signal stopped the run early."""


def fit(
    module: StageModule,
    datamodule: L.LightningDataModule,
    cfg: TrainerConfig,
    run_dir: str | Path,
    *,
    ckpt_path: Path | None = None,
) -> FitResult:
    """Train `module` to ``cfg.max_steps`` (from `ckpt_path` when resuming); always leaves last.ckpt."""
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
    return FitResult(trainer, finished=trainer.global_step >= cfg.max_steps)


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


# --------------------------------------------------------------------------- command-line flags


def add_run_arguments(p: argparse.ArgumentParser, *, default_config: str | None = None) -> None:
    """Flags every Lightning stage shares: --config, --data, --out, --resume, --set."""
    p.add_argument(
        "--config",
        default=default_config,
        help="YAML file overriding the typed defaults"
        + (f" (default: {default_config})" if default_config else ""),
    )
    p.add_argument(
        "--data",
        help="dataset directory (shards + manifest.json) or shard URL pattern; sets data.path",
    )
    p.add_argument(
        "--out", required=True, help="run directory: checkpoints, logs, config.yaml, metrics.json"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --out holding the highest step (checkpoints/last.ckpt, "
        "step-*.ckpt, best.ckpt, or an older Slurm hpc_ckpt_*.ckpt)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override any setting, e.g. --set trainer.max_steps=100 model.bottleneck=fsq",
    )


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Typed config from --config, then --set pairs, then --data (a wrong key fails here, before data)."""
    tree = parse_overrides(args.overrides)
    if getattr(args, "data", None):
        # set directly, not through YAML parsing: a path like `2024` or `yes` must stay a string
        tree.setdefault("data", {})["path"] = str(args.data)
    return load_config(cls, args.config, tree)
