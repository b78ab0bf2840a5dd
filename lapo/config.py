"""Typed settings for every lapo command.

One source of truth: the dataclasses below hold every default. A YAML file only
overrides fields, and command-line ``key.sub=value`` pairs override the YAML. A
wrong key or a bad value fails at start-up with a message naming it, before any
data is read.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lapo.io import atomic_write_text

CONFIGS = Path(__file__).resolve().parent / "configs"
"""The YAML recipes: the top-level configs/ in a checkout (lapo/configs links to it), package
data in an install: ``CONFIGS / "lam" / "debug.yaml"``."""


class ConfigError(ValueError):
    """A setting is unknown, mistyped or impossible. The message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    path: str = ""
    """Training dataset: a directory of shards + manifest.json, or any URL/brace pattern webdataset accepts."""
    val_path: str | None = None
    """Validation dataset. None: hold out the last `val_shards` shards of `path`, or whole source videos when it has too few shards."""
    val_shards: int = 1
    """Shards of `path` held out for validation when `val_path` is not given (0: no validation); more of the last shards (up to half) when these hold fewer windows than one validation pass reads (`val_batches` x `batch_size`), so that validation does not repeat windows. With `val_shards` or fewer shards in `path`, `val_fraction` of its source videos (episodes, for recorded data) are held out instead."""
    val_fraction: float = 0.1
    """Share of the source videos held out (chosen by a hash of their names) when `path` has too few shards to hold out `val_shards` whole shards; at least one video is held out and at least one trains."""
    context: int = 2
    """k: frames of context o[t-k+1..t]; each window holds k+1 frames (context plus o[t+1])."""
    frame_gap: int = 1
    """Steps between consecutive frames of a window (1: consecutive frames)."""
    batch_size: int = 32
    """Windows per batch, per rank."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 2048
    """Windows held in the shuffle buffer of each worker (bounds memory)."""
    windows_per_clip: int = 0
    """At most this many windows are cut from each decoded clip (0: all of them)."""
    still_keep: float = 1.0
    """Share of the still windows that training keeps (1: all). A window is still when o[t+1] is within `still_threshold` of o[t]: it tells the latent only that nothing moved. On video that stands still much of the time (72% of the transitions of a sticky-random Procgen miner recording, 19% of coinrun's) a value such as 0.1 spends the steps on windows where something moves. Training streams only: validation, the probe and every held-out score see every window. Meant for stage 1: stage 2 clones behaviour and should see what the agent saw."""
    still_threshold: float = 0.5
    """The mean absolute difference between o[t+1] and o[t], in grey levels (0-255) over all pixels and channels, under which a window counts as still (`still_keep`); above 0 because video compression leaves a little noise on frames that did not change."""
    batches_per_epoch: int = 500
    """Training batches per rank per epoch (the stream is resampled, so every rank gets exactly this)."""
    val_batches: int = 20
    """Validation batches per rank, at most (a deterministic, finite pass; 0: the whole split)."""
    seed: int = 0
    """Seed for shard resampling and window shuffling."""
    labeled: str | None = None
    """Stage 1's labelled set for the weak-supervision head (model.sup_weight > 0): a labelled dataset (usually `path` itself) of which only `label_budget` transitions are used, chosen by the rule and seed `lapo finetune` uses (`lapo.labelled.select_budget`, finetune.val_fraction 0.2), so a finetune with the same budget and seed sees the same labels. Each step adds `label_batch_size` of them to the batch for the IDM and the head only. None: the head reads the training windows' own actions, every one of them."""
    label_budget: int = 1000
    """Labelled transitions of `labeled` that stage 1 may use."""
    label_batch_size: int = 32
    """Labelled windows per step and rank, drawn at random from the budget."""
    label_seed: int = 0
    """Seed of the budget's selection (finetune's `seed` picks the same transitions)."""

    def __post_init__(self) -> None:
        _check(self.context >= 1, "data.context", f"must be >= 1, got {self.context}")
        _check(self.label_budget >= 1, "data.label_budget", "must be >= 1")
        _check(self.label_batch_size >= 1, "data.label_batch_size", "must be >= 1")
        _check(self.frame_gap >= 1, "data.frame_gap", f"must be >= 1, got {self.frame_gap}")
        _check(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
        _check(self.windows_per_clip >= 0, "data.windows_per_clip", "must be >= 0")
        _check(0.0 <= self.still_keep <= 1.0, "data.still_keep", "must be in [0, 1]")
        _check(self.still_threshold >= 0.0, "data.still_threshold", "must be >= 0")
        _check(self.batches_per_epoch >= 1, "data.batches_per_epoch", "must be >= 1")
        _check(self.val_shards >= 0, "data.val_shards", "must be >= 0")
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
        _check(self.val_batches >= 0, "data.val_batches", "must be >= 0 (0: the whole split)")


@dataclass
class EncoderConfig:
    """The frame encoder's settings, shared by the IDM / world model (`model`) and the latent
    policy (`policy`); `lapo.models.encoders.build_encoder` reads them."""

    encoder: Literal["impala", "transformer"] = "impala"
    """IMPALA CNN for small frames; a spatio-temporal patch transformer for large ones."""
    impala_scale: int = 4
    """Width multiplier of the IMPALA CNN (channels 16, 32, 32 times this)."""
    patch_size: int = 8
    """Transformer encoder: pixels per patch side."""
    tf_dim: int = 256
    """Transformer encoder: embedding width."""
    tf_depth: int = 4
    """Transformer encoder: number of blocks."""
    tf_heads: int = 4
    """Transformer encoder: attention heads."""

    def check_encoder(self, section: str) -> None:
        _check(self.impala_scale >= 1, f"{section}.impala_scale", "must be >= 1")
        _check(self.patch_size >= 1, f"{section}.patch_size", "must be >= 1")
        _check(self.tf_depth >= 1, f"{section}.tf_depth", "must be >= 1")
        if self.encoder == "transformer":
            _check(self.tf_dim % self.tf_heads == 0, f"{section}.tf_heads", "must divide tf_dim")


@dataclass
class ModelConfig(EncoderConfig):
    image_size: int = 64
    """Frames are resized (square) to this many pixels on a side before the model."""
    latent_dim: int = 128
    """Size of the latent action vector z[t] fed to the world model."""
    embed_dim: int = 256
    """Width of encoder outputs: the IDM's features before its latent head, and the latent world model's embedding."""
    bottleneck: Literal["vq", "fsq", "continuous"] = "vq"
    """How z[t] is constrained: vector quantisation, finite scalar quantisation, or a small continuous vector."""
    vq_codebook_size: int = 64
    """VQ: codes per codebook."""
    vq_heads: int = 2
    """VQ: heads (z is split in this many parts, each quantised separately)."""
    vq_decay: float = 0.8
    """VQ: EMA decay of the codebook."""
    vq_commitment: float = 0.25
    """VQ: commitment loss weight."""
    vq_cosine: bool = False
    """VQ: match by cosine similarity with unit-norm codes and inputs (the library's use_cosine_sim). Keeps the latent from shrinking towards zero, which the commitment loss otherwise allows when the world-model loss is small (mostly static frames)."""
    vq_kmeans_init: bool = False
    """VQ: initialise codebooks with k-means on the first batch."""
    vq_dead_code_threshold: float = 1.0
    """VQ: replace codes whose EMA usage per batch (summed over ranks) falls below this with batch vectors (0: off; off, the codebook collapses to one code on small games)."""
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    """FSQ: levels per dimension (codebook size is their product)."""
    continuous_dim: int = 8
    """Continuous: size of the bottleneck vector before projection to latent_dim."""
    continuous_norm: Literal["none", "l2", "tanh"] = "tanh"
    """Continuous: how the vector is bounded."""
    continuous_noise: float = 0.1
    """Continuous: std of Gaussian noise added while training (an information limit)."""
    idm_pool: Literal["flatten", "max"] = "flatten"
    """How the IDM's IMPALA encoder turns its last feature map into features. "flatten" (LAPO): every cell has its own weights, so z[t] can say where in the frame something changed, and a narrow world model that cannot find a small sprite itself then learns to read its place from z[t] instead of the action. "max": one 1x1 map applied at every cell, then the maximum over the frame, so z[t] carries what changed, not where."""
    fdm: Literal["pixel", "latent"] = "pixel"
    """World model target: pixels (U-Net, LAPO) or a learned embedding with an EMA target encoder (LAOM)."""
    fdm_channels: int = 32
    """Base width of the U-Net world model (each level's width is this times its `fdm_mults` entry)."""
    fdm_mults: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Pixel world model: width multipliers of the U-Net's levels, one halving of the frame per entry, so image_size must be a multiple of 2 ** len(fdm_mults)."""
    fdm_residual: bool = False
    """Pixel world model predicts o[t+1] - o[t] on top of o[t] (starts near a copy of o[t]); false: the frame itself through a sigmoid, as LAPO does."""
    fdm_loss_scale: Literal["none", "copy"] = "none"
    """Pixel world model: "copy" divides the MSE by the batch's MSE of copying o[t] (no gradient), so 1.0 means no better than a copy whatever the share of pixels that move. Small moving sprites give MSEs near 1e-4, which the VQ commitment term (order 1) otherwise drowns: the IDM then serves the codebook and the latent collapses."""
    fdm_loss: Literal["mse", "huber"] = "mse"
    """Pixel world model: the per-pixel error it is trained on. Under "mse" a world model unsure where a sprite goes draws a faint copy at each place it might be, and gets half the credit for the move without the latent. "huber" is quadratic for errors under `fdm_huber_delta` (the near-static background, as under MSE) and linear above it, where a sprite's pixels land: a blend earns nothing there, so which way something moved is worth as much as that it moved. `fdm_loss_scale: copy` then divides by copying o[t]'s error of the same kind. PSNR and every score stay MSE-based. On miner it did not make the latent tell moves apart better (README); what did was `idm_pool` max. (Plain L1, tried: the U-Net's small output on every static pixel then costs as much as the sprite, and it fell behind copying.)"""
    fdm_huber_delta: float = 0.05
    """Pixel world model, fdm_loss huber: the error (on [0, 1] pixels; 0.05 is about 13 grey levels) where the loss turns from quadratic to linear."""
    ema_decay: float = 0.995
    """Latent world model: EMA decay of the target encoder."""
    fdm_latent_loss: Literal["cosine", "mse"] = "cosine"
    """Latent world model: distance between predicted and target embeddings (cosine is scale-free, so cannot shrink to zero)."""
    sup_weight: float = 0.0
    """Weak supervision: weight of a head z -> true action on labelled windows (0: off)."""
    num_actions: int = 0
    """True action count for the weak-supervision head (0: read from the dataset manifest)."""

    def __post_init__(self) -> None:
        self.check_encoder("model")
        _check(self.image_size >= 8, "model.image_size", "must be >= 8")
        _check(self.latent_dim >= 1, "model.latent_dim", "must be >= 1")
        _check(self.vq_codebook_size >= 2, "model.vq_codebook_size", "must be >= 2")
        _check(self.vq_heads >= 1, "model.vq_heads", "must be >= 1")
        _check(
            self.latent_dim % self.vq_heads == 0 or self.bottleneck != "vq",
            "model.vq_heads",
            f"latent_dim {self.latent_dim} must be divisible by vq_heads {self.vq_heads}",
        )
        _check(0.0 < self.vq_decay < 1.0, "model.vq_decay", "must be in (0, 1)")
        _check(
            len(self.fsq_levels) >= 1 and all(lv >= 2 for lv in self.fsq_levels),
            "model.fsq_levels",
            f"must be a non-empty list of integers >= 2, got {self.fsq_levels}",
        )
        _check(self.continuous_dim >= 1, "model.continuous_dim", "must be >= 1")
        _check(self.continuous_noise >= 0, "model.continuous_noise", "must be >= 0")
        _check(self.sup_weight >= 0, "model.sup_weight", "must be >= 0")
        _check(self.num_actions >= 0, "model.num_actions", "must be >= 0")
        _check(self.embed_dim >= 1, "model.embed_dim", "must be >= 1")
        _check(self.fdm_channels >= 1, "model.fdm_channels", "must be >= 1")
        _check(self.fdm_huber_delta > 0, "model.fdm_huber_delta", "must be > 0")
        _check(
            self.idm_pool == "flatten" or self.encoder == "impala",
            "model.idm_pool",
            f"{self.idm_pool!r} needs model.encoder impala, got {self.encoder!r}",
        )
        _check(self.vq_commitment >= 0, "model.vq_commitment", "must be >= 0")
        _check(self.vq_dead_code_threshold >= 0, "model.vq_dead_code_threshold", "must be >= 0")
        _check(0.0 <= self.ema_decay < 1.0, "model.ema_decay", "must be in [0, 1)")
        _check(
            len(self.fdm_mults) >= 1 and all(m >= 1 for m in self.fdm_mults),
            "model.fdm_mults",
            f"must be a non-empty list of integers >= 1, got {self.fdm_mults}",
        )
        if self.fdm == "pixel":
            halvings = len(self.fdm_mults)
            _check(
                self.image_size % 2**halvings == 0,
                "model.image_size",
                f"the pixel world model (U-Net, {halvings} halvings: len(model.fdm_mults)) needs "
                f"a multiple of {2**halvings}, got {self.image_size}",
            )
        if self.encoder == "transformer":
            _check(
                self.image_size % self.patch_size == 0,
                "model.patch_size",
                f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}",
            )


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """Learning-rate schedule after warm-up."""
    min_lr_ratio: float = 0.0
    """Cosine schedule: the learning rate at max_steps, as a fraction of lr."""
    grad_clip: float = 1.0
    """Gradient norm clip (0: off)."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(len(self.betas) == 2, "optim.betas", "must hold two numbers")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    """Optimiser steps (Lightning's key)."""
    max_minutes: float = 0.0
    """A wall-clock budget for training, validation passes included (0: none): the run ends at max_steps or when this many minutes are spent, whichever comes first, with a final validation and the export either way. The cosine schedule follows whichever is further along, so a run cut short by the clock still anneals. The clock travels in checkpoints: --resume goes on with the time left."""
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu."""
    devices: Union[int, str] = "auto"
    """Devices per node (Lightning's meaning)."""
    num_nodes: int = 1
    """Nodes (under Slurm, match --nodes)."""
    strategy: Literal["auto", "ddp", "fsdp", "ddp_find_unused_parameters_true"] = "auto"
    """Distribution strategy."""
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    """Numeric precision; bf16-mixed falls back to 32-true with a warning on CPU."""
    compile: bool = False
    """torch.compile the models (GPU only; ignored with a warning on CPU)."""
    channels_last: bool = True
    """Keep convolution weights (and so activations) in channels-last layout: faster convolutions on CPU (oneDNN) and GPU; 21% off a configs/lam/procgen_cpu.yaml step of batch 32 on 2 CPU cores (benchmarks/train_step.py --runs plain,plain-nchw). Not applied under FSDP, which flattens parameters."""
    log_every_n_steps: int = 10
    """Scalar logging interval."""
    val_every_n_steps: int = 200
    """Validation interval in optimiser steps."""
    ckpt_every_n_steps: int = 500
    """Checkpoint interval in optimiser steps (last.ckpt is kept too)."""
    keep_checkpoints: int = 3
    """Periodic ``step-*.ckpt`` files kept: the newest by step; older ones are deleted after each save and at start-up (so requeued jobs stay bounded too). -1 keeps all, 0 keeps only ``last.ckpt``."""
    best_checkpoint_metric: str = "val/loss"
    """Also keep ``best.ckpt``, the state at the validation pass with the lowest value of this metric; empty keeps none."""
    image_every_n_steps: int = 500
    """Interval of the o[t] / predicted / true image strip."""
    loggers: list[str] = field(default_factory=lambda: ["tensorboard", "csv"])
    """Any of tensorboard, csv, wandb."""
    seed: int = 0
    """Global seed (models, data order)."""
    deterministic: bool = False
    """Ask torch for deterministic kernels."""
    nan_policy: Literal["skip", "stop"] = "skip"
    """On a NaN/inf loss: skip the step, or stop naming the step and batch."""
    progress: bool = True
    """Show a progress bar."""
    sanity_val_steps: int = 0
    """Validation batches run before training starts, to fail early on a broken val pass."""
    wandb_project: str = "lapo"
    """Weights & Biases project (used when loggers include wandb)."""
    log_keys: bool = False
    """Debug: append every training batch's sample keys to RUN/debug/keys-rank<R>.txt."""

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, "trainer.max_steps", f"must be >= 1, got {self.max_steps}")
        _check(self.max_minutes >= 0, "trainer.max_minutes", "must be >= 0 (0: no limit)")
        _check(self.num_nodes >= 1, "trainer.num_nodes", "must be >= 1")
        for name in (
            "log_every_n_steps",
            "val_every_n_steps",
            "ckpt_every_n_steps",
            "image_every_n_steps",
        ):
            _check(getattr(self, name) >= 1, f"trainer.{name}", "must be >= 1")
        _check(self.sanity_val_steps >= 0, "trainer.sanity_val_steps", "must be >= 0")
        _check(
            self.keep_checkpoints >= -1,
            "trainer.keep_checkpoints",
            f"must be -1 (all), 0 or more, got {self.keep_checkpoints}",
        )
        _check(
            isinstance(self.devices, str)
            and self.devices == "auto"
            or isinstance(self.devices, int)
            and (self.devices >= 1 or self.devices == -1),
            "trainer.devices",
            f"must be 'auto', -1 (all) or an integer >= 1, got {self.devices!r}",
        )
        accelerators = ("auto", "cpu", "gpu", "cuda", "mps")
        _check(
            self.accelerator in accelerators,
            "trainer.accelerator",
            f"{self.accelerator!r} is not allowed; choose one of {list(accelerators)}",
        )
        bad = [lg for lg in self.loggers if lg not in ("tensorboard", "csv", "wandb")]
        _check(
            not bad, "trainer.loggers", f"unknown logger(s) {bad}; allowed: tensorboard, csv, wandb"
        )


@dataclass
class PretrainConfig:
    """Stage 1: the latent action model (IDM + world model)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        _check(
            self.data.labeled is None or self.model.sup_weight > 0,
            "data.labeled",
            "a labelled set for stage 1 needs model.sup_weight > 0 (the head it trains)",
        )


@dataclass
class PolicyModelConfig(EncoderConfig):
    """The latent policy's network: its observation encoder (frames at the latent action
    model's image_size) and head."""

    hidden: int = 256
    """Width of the policy head (and of the observation features it exposes)."""
    target: Literal["continuous", "codes"] = "continuous"
    """Regress the IDM's pre-quantisation latent, or classify its codes (vq/fsq only)."""

    def __post_init__(self) -> None:
        self.check_encoder("policy")
        _check(self.hidden >= 1, "policy.hidden", "must be >= 1")


@dataclass
class PolicyConfig:
    """Stage 2: the latent policy cloned from the IDM's latent actions."""

    lam: str = ""
    """Stage-1 run directory (RUN/model.safetensors + model.json) whose frozen IDM labels every window; `--lam` sets it."""
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyModelConfig = field(default_factory=PolicyModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class FinetuneConfig:
    """Stage 3: decoder from latent to true actions and policy fine-tune (Accelerate)."""

    label_budget: int = 1000
    """Labelled transitions used (whole episodes first, then clips; seeded). 0: all of them (every episode outside the held-out split)."""
    method: Literal["lapo", "idm-supervised", "bc"] = "lapo"
    """lapo: decoder on latents; idm-supervised: VPT-style IDM on the labels; bc: clone true actions."""
    finetune_policy: bool = False
    """Also fine-tune the latent policy end to end through the decoder (lapo with a policy run)."""
    use_obs_features: bool = False
    """lapo: the decoder also sees observation features (the IDM's features of o[t-k+1..t] with o[t] repeated as the next frame, so act() can compute them too)."""
    decoder_hidden: int = 128
    """Decoder MLP width."""
    epochs: int = 20
    """Passes over the labelled budget (decoder fit; idm-supervised and bc training)."""
    policy_epochs: int = 0
    """Passes of the end-to-end policy fine-tune (0: same as epochs)."""
    max_minutes: float = 0.0
    """Wall-time budget of each training phase in minutes (0: none). With one, the cosine schedule follows whichever of steps and time runs out first, and a phase whose time is spent ends its epoch there (evaluated and saved). For baselines given the same time as another run."""
    batch_size: int = 64
    """Per-process batch size."""
    eval_batch_size: int = 256
    """Per-process batch size for held-out evaluation and latent extraction."""
    lr: float = 1e-3
    """AdamW learning rate (decoder fit, idm-supervised, bc)."""
    policy_lr: float = 3e-4
    """AdamW learning rate of the end-to-end policy fine-tune (the pretrained policy moves slowly)."""
    keep_best: bool = True
    """End each phase with the weights of its best held-out epoch; the policy fine-tune also counts its starting point, so a few noisy labels cannot make the stage-2 policy worse. The held-out split then chose the epoch too (the rollouts of lapo evaluate stay independent)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient norm clip (0: off)."""
    val_fraction: float = 0.2
    """Fraction of labelled episodes held out for evaluation (never used for training)."""
    val_max: int = 5000
    """At most this many held-out transitions are loaded (seeded subset; 0: all)."""
    context: int = 0
    """k frames of context. 0: the LAM's (lapo) or 2 (baselines); for lapo any other value must equal the LAM's."""
    frame_gap: int = 0
    """Steps between frames of a window. 0: the LAM's (lapo) or 1 (baselines)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Accelerate mixed precision (fp16 needs a GPU; on CPU it falls back to no with a warning)."""
    num_workers: int = 0
    """DataLoader workers (the labelled set is in memory: 0 is usually fastest)."""
    keep_checkpoints: int = 2
    """Epoch checkpoints kept per phase under RUN_F/checkpoints (older ones are deleted)."""
    nan_policy: Literal["skip", "stop"] = "skip"
    """On a NaN/inf loss or gradient: skip the step, or stop naming the phase, epoch, step and batch."""
    progress: bool = True
    """Show a progress bar (main process only)."""
    seed: int = 0
    """Seed for budget selection and training."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """idm-supervised: the IDM's architecture (the LAM's IDM encoder; the bottleneck and world model are unused)."""
    policy: PolicyModelConfig = field(default_factory=PolicyModelConfig)
    """bc: the policy network's architecture (its head outputs true actions)."""

    def __post_init__(self) -> None:
        _check(self.label_budget >= 0, "finetune.label_budget", "must be >= 0 (0: all)")
        _check(self.epochs >= 1, "finetune.epochs", "must be >= 1")
        _check(self.policy_epochs >= 0, "finetune.policy_epochs", "must be >= 0")
        _check(self.max_minutes >= 0, "finetune.max_minutes", "must be >= 0 (0: no limit)")
        _check(self.batch_size >= 1, "finetune.batch_size", "must be >= 1")
        _check(self.eval_batch_size >= 1, "finetune.eval_batch_size", "must be >= 1")
        _check(self.decoder_hidden >= 1, "finetune.decoder_hidden", "must be >= 1")
        _check(0.0 < self.val_fraction < 1.0, "finetune.val_fraction", "must be in (0, 1)")
        _check(self.val_max >= 0, "finetune.val_max", "must be >= 0")
        _check(self.lr > 0, "finetune.lr", "must be > 0")
        _check(self.policy_lr > 0, "finetune.policy_lr", "must be > 0")
        _check(self.weight_decay >= 0, "finetune.weight_decay", "must be >= 0")
        _check(self.grad_clip >= 0, "finetune.grad_clip", "must be >= 0")
        _check(self.context >= 0, "finetune.context", "must be >= 0 (0: the LAM's, or 2)")
        _check(self.frame_gap >= 0, "finetune.frame_gap", "must be >= 0 (0: the LAM's, or 1)")
        _check(self.num_workers >= 0, "finetune.num_workers", "must be >= 0")
        _check(self.keep_checkpoints >= 1, "finetune.keep_checkpoints", "must be >= 1")
        _check(
            not self.finetune_policy or self.method == "lapo",
            "finetune.finetune_policy",
            f"only applies to method lapo (method is {self.method}; bc trains its policy anyway)",
        )
        _check(
            not self.use_obs_features or self.method == "lapo",
            "finetune.use_obs_features",
            f"only applies to method lapo (method is {self.method})",
        )


@dataclass
class RLConfig:
    """Online RL (`lapo rl`): PPO fine-tuning of a stage-2 latent policy through an action head."""

    total_frames: int = 4_000_000
    """Env steps to train for, summed over the parallel envs (the run stops at the first whole rollout at or past it)."""
    num_envs: int = 64
    """Parallel environments."""
    rollout_steps: int = 64
    """Steps per env between two PPO updates (a rollout holds num_envs * rollout_steps frames)."""
    minibatches: int = 8
    """Minibatches each rollout is split into per epoch; must divide num_envs * rollout_steps."""
    epochs: int = 3
    """Passes over each rollout per update."""
    lr: float = 2.5e-3
    """Adam learning rate of the new parts (action head, value head, log-std) at its peak."""
    policy_lr_scale: float = 0.4
    """The pretrained latent policy learns at lr times this (1: the same as the heads). --from-scratch trains every part at lr."""
    policy_start_frames: int = 0
    """The pretrained policy's learning rate stays 0 until this many frames, then warms up like the heads'. While the fresh head is near zero the policy's gradients are tiny, and Adam would turn them into full-size random steps that scramble the latents the head is learning to read (LAPO starts its policy layer late for the same reason). Ignored with --from-scratch."""
    freeze_encoder: bool = False
    """Keep the pretrained policy's observation encoder fixed (only its head moves). Ignored with --from-scratch."""
    warmup_frames: int = 0
    """Each part's learning rate rises linearly from 0 over this many frames from its start (0: none)."""
    anneal_lr: bool = True
    """The learning rate falls linearly to 0 at total_frames."""
    gamma: float = 0.999
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """PPO ratio clip."""
    clip_value: float = 0.0
    """Clip of the value update around the rollout's values (0: no clipping)."""
    ent_coef: float = 0.0025
    """Entropy bonus weight."""
    vf_coef: float = 0.5
    """Value loss weight."""
    max_grad_norm: float = 0.5
    """Gradient norm clip."""
    target_kl: float = 0.0
    """Stop an update's epochs early when the approximate KL passes this (0: never)."""
    normalize_advantage: bool = True
    """Normalise advantages per minibatch."""
    self_label_epochs: int = 0
    """Passes over each rollout fitting the action head to the agent's own transitions (the frozen LAM's latent of (o[t], o[t+g]) -> the action taken), before the PPO update: labels that cost nothing, since the agent knows what it did. 0: the head learns from reward alone, as in LAPO. Ignored with --from-scratch."""
    head_lr_scale: float = 1.0
    """The action head learns from reward at lr times this. 0 with self_label_epochs: the head learns only from the agent's own transitions, PPO never moves it (LAPO's released code keeps its decoder out of PPO likewise). Ignored with --from-scratch."""
    self_label_frames: int = 0
    """Fit the head to the agent's own transitions only in the first this many frames (0: all run). Ignored without self_label_epochs."""
    head_hidden: int = 128
    """Width of a fresh action head (an ActionDecoder MLP); --init takes the finetune run's decoder as it is."""
    log_std_init: float = 0.0
    """Continuous action spaces: initial log standard deviation of the Gaussian."""
    env_size: int = 0
    """Frame size the env renders (0: the policy's image size)."""
    env_view: Literal["", "full", "agent"] = ""
    """babyai/minigrid: top-down grid or the agent's view ("": as the policy's training data was recorded, else the env's default)."""
    vec_env: Literal["auto", "dummy", "subproc", "batched"] = "auto"
    """How the envs are stepped: dummy (in this process, one after another), subproc (one process each), batched (procgen only: all games in one Procgen gym3 env, one C++ call a step), auto (batched for procgen, dummy otherwise)."""
    env_threads: int = 0
    """vec_env batched: Procgen's C++ threads stepping the games (0: in the calling thread)."""
    ckpt_every_frames: int = 100_000
    """Save a checkpoint after the first update at or past each multiple of this (0: only on a stop signal)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept under RUN_R/checkpoints."""
    tensorboard: bool = True
    """Also write TensorBoard scalars under RUN_R/tb (SB3's logger)."""
    progress: bool = True
    """Show a progress bar."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:1, ..."""
    seed: int = 0
    """Seed of the weights of new parts, the envs' levels and the action sampling."""

    def __post_init__(self) -> None:
        _check(self.total_frames >= 1, "total_frames", "must be >= 1")
        _check(self.num_envs >= 1, "num_envs", "must be >= 1")
        _check(self.rollout_steps >= 1, "rollout_steps", "must be >= 1")
        _check(self.minibatches >= 1, "minibatches", "must be >= 1")
        batch = self.num_envs * self.rollout_steps
        _check(
            batch % self.minibatches == 0 and batch // self.minibatches >= 2,
            "minibatches",
            f"must divide num_envs * rollout_steps = {batch} into minibatches of at least 2",
        )
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.env_threads >= 0, "env_threads", "must be >= 0")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.policy_lr_scale >= 0, "policy_lr_scale", "must be >= 0")
        _check(self.warmup_frames >= 0, "warmup_frames", "must be >= 0")
        _check(self.policy_start_frames >= 0, "policy_start_frames", "must be >= 0")
        _check(0.0 < self.gamma <= 1.0, "gamma", "must be in (0, 1]")
        _check(0.0 <= self.gae_lambda <= 1.0, "gae_lambda", "must be in [0, 1]")
        _check(self.clip_range > 0, "clip_range", "must be > 0")
        for key in ("clip_value", "ent_coef", "vf_coef", "target_kl"):
            _check(getattr(self, key) >= 0, key, "must be >= 0")
        _check(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        _check(self.self_label_epochs >= 0, "self_label_epochs", "must be >= 0")
        _check(self.self_label_frames >= 0, "self_label_frames", "must be >= 0")
        _check(self.head_lr_scale >= 0, "head_lr_scale", "must be >= 0")
        _check(self.head_hidden >= 1, "head_hidden", "must be >= 1")
        _check(
            self.env_size == 0 or (self.env_size >= 8 and self.env_size % 2 == 0),
            "env_size",
            f"must be 0 or an even number >= 8, got {self.env_size}",
        )
        _check(self.ckpt_every_frames >= 0, "ckpt_every_frames", "must be >= 0")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")


@dataclass
class EvaluateConfig:
    """`lapo evaluate`: a stage-3 run scored on held-out labelled windows and in closed-loop rollouts."""

    split: Literal["heldout", "all"] = "heldout"
    """Labelled windows scored: the episodes `lapo finetune` held out (the run's seed and val_fraction), or every episode but one, for a dataset the run never trained on."""
    max_windows: int | None = None
    """At most this many held-out windows, a seeded subset (None: the run's val_max; 0: all)."""
    batch_size: int = 256
    """Windows per forward pass."""
    still_threshold: float = 0.5
    """Grey levels (0-255, mean absolute difference of o[t+1] from o[t]) under which a held-out window counts as still: the decoder is also scored apart on the still windows and the others (data.still_threshold's measure)."""
    episodes: int = 20
    """Rollout episodes, seeded 0..N-1; the random policy plays the same seeds."""
    max_steps: int = 500
    """Step cap per rollout episode; an episode cut by it counts as no success."""
    env_size: int = 0
    """Frame size the env renders (0: that of the labelled data the run was fine-tuned on, else the model's)."""
    env_view: Literal["", "full", "agent"] = ""
    """babyai/minigrid: top-down grid or the agent's view ("": as the run's labelled data was recorded)."""
    greedy: bool = True
    """Rollouts take the policy's most likely action; false samples from it."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:1, ..."""
    seed: int = 0
    """Seed of the rollouts and of the probe's split of the held-out windows."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        _check(
            self.max_windows is None or self.max_windows >= 0,
            "max_windows",
            "must be >= 0 (0: all)",
        )
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.still_threshold >= 0.0, "still_threshold", "must be >= 0")
        _check(self.episodes >= 1, "episodes", "must be >= 1")
        _check(self.max_steps >= 1, "max_steps", "must be >= 1")
        _check(
            self.env_size == 0 or (self.env_size >= 8 and self.env_size % 2 == 0),
            "env_size",
            f"must be 0 or an even number >= 8, got {self.env_size}",
        )


@dataclass
class LabelConfig:
    """`lapo label`: pseudo-label a dataset with a stage-3 run's IDM and decoder."""

    workers: int = 1
    """Worker processes, each labelling whole shards (1: in this process)."""
    batch_size: int = 256
    """Windows per forward pass."""
    device: str = "auto"
    """auto (cuda:LOCAL_RANK where a GPU is there), cpu, cuda:0, ..."""
    rank: int | None = None
    """This process's rank among those sharing the shards (None: RANK or SLURM_PROCID, else 0)."""
    world_size: int | None = None
    """Processes sharing the shards, each taking every world_size-th one (None: WORLD_SIZE or SLURM_NTASKS, else 1)."""
    merge_timeout: float = 3600.0
    """Seconds rank 0 waits for the other ranks' shards before it writes manifest.json."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        _check(self.workers >= 0, "workers", "must be >= 0 (0 or 1: in this process)")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.rank is None or self.rank >= 0, "rank", "must be >= 0")
        _check(self.world_size is None or self.world_size >= 1, "world_size", "must be >= 1")
        _check(self.merge_timeout >= 0, "merge_timeout", "must be >= 0")


# --------------------------------------------------------------------------- machinery


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}"
        )
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(args)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `3e-4` as a string: accept any numeric spelling.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a (possibly partial) dict; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key; allowed keys here: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            key = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(data[name], hints[name], key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the key check above
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``set_dotted(tree, "data.path", v)``: ``tree["data"]["path"] = v``, making sections as needed."""
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(pairs: list[str] | None) -> dict:
    """``["model.bottleneck=fsq", "trainer.max_steps=10"]`` -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r}: expected key=value, e.g. trainer.max_steps=100")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key.strip()}: {_yaml_fault(e)}") from None
        set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _yaml_fault(e: yaml.YAMLError) -> str:
    """One line for a YAML error; a tag that would build an object is refused by name."""
    if isinstance(e, yaml.constructor.ConstructorError) and "tag" in str(e.problem or ""):
        where = f" at line {e.problem_mark.line + 1}" if e.problem_mark else ""
        return (
            f"refused: {e.problem}{where}; configs are read with YAML's safe loader, which builds "
            "no Python objects: use plain mappings, lists, strings, numbers and true/false"
        )
    return f"not valid YAML: {e}"


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with the safe loader (never executes tags)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: {_yaml_fault(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | dict | None = None,
    *,
    inherit: Callable[[dict], dict] | None = None,
) -> T:
    """Defaults of `cls`, overridden by the YAML at `path`, overridden by `overrides`.

    `inherit` maps those merged settings to defaults taken from elsewhere (stage 2's window
    from its LAM run), which apply wherever neither the YAML nor `overrides` set a key.
    """
    tree: dict = read_yaml(path) if path else {}
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    tree = _merge(tree, extra)
    if inherit is not None:
        tree = _merge(inherit(tree), tree)
    where = f" (in {path})" if path else ""
    try:
        return from_dict(cls, tree)
    except ConfigError as e:
        raise ConfigError(f"{e}{where}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: readers never see half a file)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
