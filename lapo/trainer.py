"""The Lightning Trainer a `TrainerConfig` asks for, on the hardware at hand (stages 1 and 2).

- hardware: bf16 and torch.compile on GPU; on CPU both fall back with a warning, and
  settings this machine or launch cannot honour fail at start-up (`check_hardware`).
- distribution: DDP (gloo on CPU, NCCL on GPU) or FSDP (`lapo.sharding`); under Slurm
  the SLURMEnvironment wires the ranks.
- callbacks: the generators' state (`RNGState`), periodic, last and best checkpoints
  written atomically, the stop signal (`GracefulStop`), the time budget (`TimeBudget`,
  ``trainer.max_minutes``) and one progress bar over the run.
- logs: TensorBoard + CSV under ``RUN/logs`` (W&B when installed and asked for).
- signals: Lightning's own handlers are off; they ran collectives inside the handler.

`lapo.train.fit` builds one of these and runs a stage's module on it.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from lapo.callbacks import (
    AtomicCheckpointIO,
    BestCheckpoint,
    GracefulStop,
    KeyLog,
    PeriodicCheckpoint,
    RNGState,
    StepProgressBar,
    TimeBudget,
)
from lapo.config import ConfigError, TrainerConfig
from lapo.sharding import LapoFSDP


@dataclass
class Hardware:
    """What this machine runs a `TrainerConfig` with: the settings it can honour."""

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
    if cfg.max_minutes:
        callbacks.append(TimeBudget(cfg.max_minutes))
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
