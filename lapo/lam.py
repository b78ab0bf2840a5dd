"""Stage 1: the latent action model (IDM + world model) as a thin LightningModule.

``training_step`` calls ``LatentActionModel.loss`` and logs what it returns. Validation
adds what one batch cannot show: codebook perplexity and usage over the whole val pass,
and, when the val windows carry true actions, an online probe from latent actions to
true actions (``val/probe_acc`` against ``val/probe_majority``), and the health checks
of `lapo.health`: the world model's error with shuffled and zeroed latent actions
(``val/latent_gain_db``), the latent's spread across windows (``val/latent_spread``)
and, past a warm-up, a warning naming each failed check (`lapo.lam_validation` sums all
of these over the pass and across ranks). The final verdict goes to RUN/metrics.json as
``health``. Every ``image_every_n_steps`` an image strip o[t] | predicted o[t+1] |
true o[t+1] goes to the loggers and to ``RUN/images/``, and at the end of training one more,
``RUN/images/final-{val|train}-stepN.png``, shows the trained model (on held-out windows
when a validation batch was seen, else on the last training batch).

At the end of training the model is exported to ``RUN/model.safetensors`` +
``RUN/model.json``; `lapo.runs.load_lam` rebuilds it from those two files alone (no pickle).
Command: ``lapo pretrain --config configs/lam/procgen.yaml --data DATASET --out RUN``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from PIL import Image
from torch import Tensor

from lapo.callbacks import training_complete, training_progress
from lapo.cli_args import add_run_arguments, config_from_args
from lapo.config import ConfigError, FinetuneConfig, PretrainConfig, to_dict
from lapo.health import THRESHOLDS, assess, codebook_churn, warning_text
from lapo.labelled import LabelledWindows, load_windows, scan_labelled, select_budget
from lapo.lam_validation import ValidationSums, probe_scores
from lapo.models import LatentActionModel
from lapo.runs import LAM_KIND, export_model
from lapo.sharding import full_params
from lapo.train import StageModule, final_metrics, fit, prepare_run, write_metrics

STRIP_ROWS = 4  # samples shown in an image strip


class LAMModule(StageModule):
    """Stage 1 LightningModule: a `LatentActionModel` plus logging, probing and images."""

    compile_targets = ("model.idm", "model.fdm")

    def __init__(
        self,
        cfg: PretrainConfig,
        *,
        in_channels: int = 3,
        num_actions: int = 0,
        action_dim: int = 0,
    ) -> None:
        super().__init__(cfg.optim, cfg.trainer)
        self.cfg = cfg
        # everything LatentActionModel needs besides ModelConfig; goes to model.json
        self.model_kwargs = {
            "in_channels": in_channels,
            "num_actions": num_actions,
            "action_dim": action_dim,
            "context": cfg.data.context,
        }
        self.model = LatentActionModel(cfg.model, **self.model_kwargs)
        # plain dicts only: checkpoints stay loadable with torch.load(weights_only=True)
        self.save_hyperparameters({"config": to_dict(cfg), "model_kwargs": self.model_kwargs})
        self.on_validation_epoch_start()  # the val accumulators exist from the start
        self.health_step: int | None = None  # step of the last validation pass checked
        self.health_warned_step: int | None = None  # step of the last health warning
        self._strip_frames: dict[str, Tensor] = {}  # split -> windows for the final strip
        # data.labeled: the label budget's windows in memory (`load_label_budget`), or None
        self.labelled: LabelledWindows | None = None

    # ------------------------------------------------------------------ training

    def on_fit_start(self) -> None:
        super().on_fit_start()
        churn = codebook_churn(self.cfg.model, self.cfg.data.batch_size * self.trainer.world_size)
        if churn:
            rank_zero_warn(f"lapo pretrain: {churn}")

    def labelled_batch(self, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """`data.label_batch_size` windows of the label budget, drawn by (seed, step, rank)."""
        if self.labelled is None:
            return None
        rank = self.trainer.global_rank if self._trainer is not None else 0
        rng = np.random.default_rng([self.cfg.data.seed, self.global_step, rank])
        idx = torch.from_numpy(rng.integers(0, len(self.labelled), self.cfg.data.label_batch_size))
        frames = self.labelled.frames[self.labelled.index[idx]]  # (L, k+1, C, H, W) uint8
        return frames.to(device), self.labelled.actions[idx].to(device)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        frames = batch["frames"]  # (B, k+1, C, H, W) uint8
        loss, logs, pred_next = self.model.loss(
            frames,
            batch.get("actions"),
            batch.get("has_action"),
            labelled=self.labelled_batch(frames.device),
        )
        if not self.check_loss(loss, batch, batch_idx):
            return None  # skipped: no backward, no update (nan_policy=skip)
        b = frames.shape[0]
        if self.should_log():
            self.log_dict(
                {f"train/{k}": v for k, v in logs.items()},
                on_step=True,
                on_epoch=False,
                batch_size=b,
            )
        if self.trainer_cfg.progress:
            self.log("loss", logs["loss"], prog_bar=True, logger=False, batch_size=b)
            if "psnr" in logs:
                self.log("psnr", logs["psnr"], prog_bar=True, logger=False, batch_size=b)
        if pred_next is not None and self.global_step % self.trainer_cfg.image_every_n_steps == 0:
            self.log_strip(frames, pred_next, "train")
        return loss

    # ------------------------------------------------------------------ validation

    def on_validation_epoch_start(self) -> None:
        self._val = ValidationSums(self.cfg.data.still_threshold)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        frames = batch["frames"]  # (B, k+1, C, H, W) uint8
        _, logs, pred_next = self.model.loss(frames, batch.get("actions"), batch.get("has_action"))
        if batch_idx == 0 and pred_next is not None:
            self.log_strip(frames, pred_next, "val")
        self._val.add(self.model, batch, logs, self.model.encode(frames), batch_idx)

    def on_validation_epoch_end(self) -> None:
        val, collected = self._val.finish()  # the same on every rank: no sync_dist needed
        for k, v in val.items():
            self.log(f"val/{k}", v)
        if collected is not None:  # rank zero
            scores = probe_scores(collected, num_actions=self.model_kwargs["num_actions"],
                                  seed=self.cfg.trainer.seed, device=self.device)  # fmt: skip
            for k, v in scores.items():
                self.log(f"val/{k}", v, rank_zero_only=True)
            self._check_health({**val, **scores})

    def _check_health(self, val: dict[str, float]) -> None:
        """Rank zero: log how many checks fail and, past the warm-up, warn naming them."""
        health = assess(val, prefix="")
        self.log("val/health_failed", float(len(health["failed"])), rank_zero_only=True)
        if self.trainer.sanity_checking:
            return
        self.health_step = self.global_step
        warm = training_progress(self.trainer) >= THRESHOLDS.warmup_fraction
        if health["failed"] and warm:
            rank_zero_warn(warning_text(health, step=self.global_step))
            self.health_warned_step = self.global_step

    # ------------------------------------------------------------------ images

    @torch.no_grad()
    def log_strip(self, frames: Tensor, pred_next: Tensor, split: str) -> None:
        """Rows of o[t] | predicted o[t+1] | true o[t+1] to the loggers and RUN/images/."""
        if not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        n = min(STRIP_ROWS, frames.shape[0])
        x = self.model.prepare(frames[:n])  # (n, k+1, C, S, S) float in [0, 1]
        cols = torch.stack(
            [x[:, -2], pred_next[:n].float().clamp(0, 1), x[:, -1]], dim=1
        )  # (n, 3, C, S, S)
        grid = rearrange(cols, "n col c h w -> (n h) (col w) c")  # (n*S, 3*S, C)
        img = (grid * 255).round().to(torch.uint8).cpu().numpy()
        if img.shape[-1] == 1:
            img = np.repeat(img, 3, axis=-1)
        step = self.global_step
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"{split}/strip", img, step, dataformats="HWC")
            elif type(logger).__name__ == "WandbLogger":
                logger.log_image(key=f"{split}/strip", images=[img], step=step)
        out = Path(self.trainer.default_root_dir) / "images" / f"{split}-step{step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(out)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._strip_frames["train"] = batch["frames"][:STRIP_ROWS]

    def on_validation_batch_start(
        self, batch: dict, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0:
            self._strip_frames["val"] = batch["frames"][:STRIP_ROWS]

    @torch.no_grad()
    def log_final_strip(self) -> None:
        """The trained model's strip: held-out windows if validation ran, else the last batch.

        Every rank runs the forward pass (FSDP needs them all); rank zero writes the image.
        """
        split = "val" if "val" in self._strip_frames else "train"
        frames = self._strip_frames.get(split)  # (n, k+1, C, H, W) uint8
        if frames is None:  # resumed at max_steps: no batch was seen
            return
        was_training = self.model.training
        self.model.eval()
        frames = frames.to(self.device)
        with full_params(self.trainer.strategy.model):  # outside a step FSDP holds shards
            _, _, pred_next = self.model.loss(frames)  # (n, C, S, S) in [0, 1], or None
        self.model.train(was_training)
        if pred_next is not None:
            self.log_strip(frames, pred_next, f"final-{split}")

    # ------------------------------------------------------------------ export

    def on_train_end(self) -> None:
        if not training_complete(self.trainer):
            return  # stopped early by a signal: no export, no final strip
        weights = self.finished_weights("model")
        if weights is not None:
            export_model(
                Path(self.trainer.default_root_dir),
                self.model,
                kind=LAM_KIND,
                config=to_dict(self.cfg),
                extra=self.model_kwargs,
                state_dict=weights,
            )
        self.log_final_strip()


# --------------------------------------------------------------------------- the command


def action_info(space: dict | None) -> tuple[int, int]:
    """Manifest action space -> (num_actions, action_dim) for the model and the probe."""
    if not space:
        return 0, 0
    if space.get("type") == "discrete":
        return int(space["n"]), 0
    return 0, int(space["dim"])


def check_actions(cfg: PretrainConfig, space: dict | None) -> None:
    """Fail at start-up when the action settings cannot work with the dataset's actions."""
    where = f"{cfg.data.path} (manifest.json)"
    if cfg.model.sup_weight > 0 and not space and not cfg.data.labeled:
        raise ConfigError(
            f"model.sup_weight: {cfg.model.sup_weight} asks for weak supervision, but {where} has "
            "no action labels (action_space null); set model.sup_weight=0"
        )
    n = cfg.model.num_actions
    if n and space and space.get("type") != "discrete":
        raise ConfigError(
            f"model.num_actions: {n} applies to discrete actions, but {where} has continuous "
            f"actions of dim {space.get('dim')}; leave it 0"
        )
    if n and space and n < int(space["n"]):
        raise ConfigError(
            f"model.num_actions: {n} is fewer than the {space['n']} actions of {where} (the "
            "weak-supervision head and the probe would meet actions out of range); leave it 0 "
            "to read the count from the manifest"
        )


def load_label_budget(cfg: PretrainConfig) -> tuple[LabelledWindows, dict]:
    """The `data.label_budget` transitions of `data.labeled` that stage 1 may use.

    Chosen by `lapo.labelled.select_budget` with finetune's default held-out share, so
    `lapo finetune --label-budget N --set seed=S` on the same dataset uses the same ones.
    """
    d = cfg.data
    index = scan_labelled(d.labeled, context=d.context, frame_gap=d.frame_gap)
    sel = select_budget(index, d.label_budget, d.label_seed, FinetuneConfig.val_fraction)
    windows = load_windows(index, sel.train, desc="stage-1 labels", progress=True)
    rank_zero_info(
        f"lapo pretrain: weak supervision on {len(windows)} labelled transitions of "
        f"{d.labeled} ({len(sel.train)} episodes; {d.label_batch_size} a step)"
    )
    return windows, index.action_space


def pretrain(cfg: PretrainConfig, run_dir: str | Path, *, resume: bool = False) -> dict:
    """Train stage 1 into `run_dir`; returns the final metrics (also in RUN/metrics.json)."""
    from lapo.data import VideoDataModule  # the loader pulls in webdataset and decoders

    run_dir = Path(run_dir)
    dm = VideoDataModule(cfg.data)
    ckpt = prepare_run(
        cfg, run_dir, resume=resume, check_data=lambda: check_actions(cfg, dm.action_space)
    )
    labelled, space = load_label_budget(cfg) if cfg.data.labeled else (None, dm.action_space)
    num_actions, action_dim = action_info(space)
    if cfg.model.num_actions:
        num_actions = cfg.model.num_actions
    module = LAMModule(cfg, num_actions=num_actions, action_dim=action_dim)
    module.labelled = labelled
    result = fit(module, dm, cfg.trainer, run_dir, ckpt_path=ckpt)
    health = {**assess(final_metrics(result.trainer)), "step": module.health_step}
    if health["verdict"] != "fail":
        rank_zero_info(f"lapo pretrain: stage-1 health check: {health['verdict']}")
    elif module.health_warned_step == module.health_step:  # the block is on screen already
        failed = ", ".join(health["failed"])
        rank_zero_warn(
            f"lapo pretrain: stage-1 health check of the final model: fail ({failed}; see the "
            f"warning of step {module.health_step} and {run_dir / 'metrics.json'})"
        )
    else:
        rank_zero_warn(warning_text(health, step=module.health_step, final=True))
    return write_metrics(
        result.trainer,
        run_dir,
        {"finished": result.finished, "nonfinite_steps": module.nonfinite_steps, "health": health},
    )


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pretrain",
        help="stage 1: train the latent action model (IDM + world model) on unlabelled video",
        description="Stage 1 (Lightning): train the IDM and world model on video alone. Writes "
        "RUN/config.yaml, RUN/checkpoints/, RUN/logs/, RUN/images/, RUN/metrics.json and, at the "
        "end, RUN/model.safetensors + RUN/model.json.",
    )
    add_run_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(PretrainConfig, args, {"data.path": args.data})
    if not cfg.data.path:
        raise SystemExit(
            "lapo pretrain: no dataset; pass --data DATASET (or set data.path in the config)"
        )
    metrics = pretrain(cfg, args.out, resume=args.resume)
    if rank_zero_only.rank == 0:
        state = "finished" if metrics.get("finished") else "stopped early (resume with --resume)"
        verdict = metrics["health"]["verdict"]
        print(
            f"lapo pretrain: {state} at step {metrics['global_step']}; stage-1 health check: "
            f"{verdict}; run in {args.out}"
        )
    return 0
