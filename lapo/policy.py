"""Stage 2: clone a latent policy pi(z | o[t-k+1..t]) from the frozen IDM's latent actions.

Every training window o[t-k+1..t+1] of the unlabelled video is labelled on the fly by the
stage-1 IDM (frozen, eval mode, no gradient): it sees all k+1 frames and gives the latent
action z[t] of the transition o[t] -> o[t+1]. The policy sees only the k context frames
(never o[t+1]) and learns to predict that label:

- ``policy.target=continuous`` (LAPO): regress the IDM's pre-quantisation latent (MSE);
- ``policy.target=codes`` (vq / fsq LAMs only): classify its code indices, one
  cross-entropy per head.

Validation logs ``val/loss``, ``val/latent_mse`` (the policy's latent after the LAM's own
bottleneck against the IDM's ``z[t]``), ``val/latent_mse_baseline`` (the best constant
guess on the batch, so a policy stuck at the mean shows), ``val/pre_mse`` (continuous)
and ``val/code_acc`` (when the LAM has codes). Real-action metrics belong to stage 3. At
the end a health check (`lapo.health.assess_policy`) asks whether the policy's latent
explains any of z[t]'s variance; a failure is printed with its likely causes and goes to
``RUN_P/metrics.json`` as ``health``, where `lapo rl` reads it.

The window (context k, frame gap) and the frame size are the LAM's: they are read from
the LAM run, ``data.context`` / ``data.frame_gap`` default to them and a different value
is an error. Checkpoints hold the policy only (the LAM is re-read from its run and its
hash checked on resume). At the end, ``RUN_P/policy.safetensors`` + ``RUN_P/policy.json``
hold everything `lapo.runs.load_policy` needs, plus the LAM run's path and hash.
Command: ``lapo train-policy --lam RUN --data DATASET --out RUN_P``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor

from lapo.checkpoint import CheckpointError
from lapo.cli_args import add_run_arguments, config_from_args
from lapo.config import ConfigError, PolicyConfig, load_config, to_dict
from lapo.health import assess_policy, warning_text
from lapo.models import LatentActionModel, LatentPolicy
from lapo.runs import (
    POLICY_KIND,
    POLICY_NAME,
    LamRun,
    export_model,
    lam_info,
    policy_extra,
    read_lam,
)
from lapo.train import StageModule, final_metrics, fit, prepare_run, write_metrics

LAM_PREFIX = "lam."  # the frozen LAM's keys in the LightningModule's state dict


# --------------------------------------------------------------------------- the LAM it clones


def check_config(cfg: PolicyConfig, lam: LamRun) -> None:
    """Fail at start-up when the settings cannot clone this LAM (the message names the key)."""
    for key in ("context", "frame_gap"):
        mine, theirs = getattr(cfg.data, key), getattr(lam, key)
        if mine != theirs:
            raise ConfigError(
                f"data.{key}: {mine} differs from the LAM's {theirs} ({cfg.lam}/model.json); the "
                "policy learns the IDM's labels of the LAM's own windows, so leave data."
                f"{key} unset to inherit it"
            )
    if cfg.policy.target == "codes" and lam.bottleneck == "continuous":
        raise ConfigError(
            f"policy.target: codes needs a vq or fsq LAM, but {cfg.lam} has a continuous "
            "bottleneck (no codes); use policy.target=continuous"
        )


def lam_window(tree: dict) -> dict:
    """Defaults from the LAM run that `tree` names: its ``data.context`` and ``data.frame_gap``
    (the policy learns the IDM's labels of the LAM's own windows)."""
    lam = tree.get("lam")
    if not lam:
        return {}
    run = read_lam(lam)
    return {"data": {"context": run.context, "frame_gap": run.frame_gap}}


def load_policy_config(
    path: str | Path | None = None, overrides: list[str] | dict | None = None
) -> PolicyConfig:
    """Typed defaults < YAML at `path` < `overrides`, with the window inherited from the LAM.

    ``data.context`` and ``data.frame_gap`` take the LAM run's values unless the YAML or
    the overrides set them (then `check_config` insists they agree).
    """
    return load_config(PolicyConfig, path, overrides, inherit=lam_window)


# --------------------------------------------------------------------------- the LightningModule


class PolicyModule(StageModule):
    """Stage 2 LightningModule: a trainable `LatentPolicy` and the frozen LAM that labels for it."""

    compile_targets = ("policy", "lam.idm")

    def __init__(self, cfg: PolicyConfig, lam: LatentActionModel, lam_info: dict) -> None:
        super().__init__(cfg.optim, cfg.trainer)
        self.cfg = cfg
        self.lam = lam.requires_grad_(False).eval()
        self.policy = LatentPolicy.for_lam(cfg.policy, lam)
        self.lam_info = lam_info
        self._val_sums: Tensor | None = None  # per val pass: metric sums and window count
        # Frozen and read from the same file on every rank: DDP must neither track the LAM's
        # parameters nor broadcast its buffers (VQ codebooks) before every forward.
        names = [n for n, _ in lam.named_parameters()] + [n for n, _ in lam.named_buffers()]
        self._ddp_params_and_buffers_to_ignore = [LAM_PREFIX + n for n in names]
        # plain dicts only: checkpoints stay loadable with torch.load(weights_only=True)
        self.save_hyperparameters({"config": to_dict(cfg), "lam": lam_info})

    @property
    def context(self) -> int:
        return self.policy.context

    def train(self, mode: bool = True) -> PolicyModule:
        super().train(mode)
        # The IDM is a fixed labeller: no bottleneck noise, no codebook or norm updates.
        self.lam.eval()
        return self

    @torch.no_grad()
    def label(self, frames: Tensor) -> dict[str, Tensor | None]:
        """The IDM's view of whole windows (B, k+1, C, H, W): latent, pre, codes."""
        return self.lam.encode(frames)

    def target(self, enc: dict) -> Tensor:
        """What the policy learns: pre-quantisation latent (B, D) or codes (B, heads)."""
        return enc["pre"].float() if self.policy.target == "continuous" else enc["codes"]

    def forward(self, frames: Tensor) -> Tensor:
        """Windows (B, k+1, C, H, W) or contexts (B, k, ...) -> the policy's output; o[t+1] unused."""
        return self.policy(frames[:, : self.context])  # (B, D) or (B, heads, num_codes)

    def objective(self, frames: Tensor) -> tuple[Tensor, dict[str, Tensor], dict]:
        """Loss of the policy on windows (B, k+1, C, H, W): IDM labels from all frames,
        policy prediction from the first k only."""
        enc = self.label(frames)
        loss, logs = self.policy.loss(frames[:, : self.context], self.target(enc))
        return loss, logs, enc

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        frames = batch["frames"]  # (B, k+1, C, H, W) uint8
        loss, logs, enc = self.objective(frames)
        if not self.check_loss(loss, batch, batch_idx):
            return None  # skipped: no backward, no update (nan_policy=skip)
        b = frames.shape[0]
        # a collapsed IDM (every window the same latent) makes the loss look good: show it
        logs["target_std"] = enc["latent"].float().std(dim=0).mean()
        self.log_dict(
            {f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False, batch_size=b
        )
        self.log("loss", logs["loss"], prog_bar=True, logger=False, batch_size=b)
        return loss

    # ------------------------------------------------------------------ validation

    def val_keys(self) -> list[str]:
        """The validation metrics, the same on every rank (see `latent_metrics`)."""
        keys = ["loss", "latent_mse", "latent_mse_baseline"]
        keys += ["pre_mse"] if self.policy.target == "continuous" else []
        return keys + (["code_acc"] if self.lam.num_codes > 0 else [])

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(
            len(self.val_keys()) + 1, dtype=torch.float64, device=self.device
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        frames = batch["frames"]  # (B, k+1, C, H, W) uint8
        loss, _, enc = self.objective(frames)
        logs = latent_metrics(self(frames), enc, self.lam, self.policy.target)
        logs["loss"] = loss
        b = frames.shape[0]
        row = [logs[k].double() * b for k in self.val_keys()] + [loss.new_tensor(b).double()]
        self._val_sums += torch.stack(row)  # (metrics + 1,) sums over windows, then the count

    def on_validation_epoch_end(self) -> None:
        # One all-reduce that every rank joins, whatever its number of val batches: a val
        # split with fewer shards than ranks can leave a rank with none, and per-metric
        # sync_dist would then wait for it forever.
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        if sums[-1] > 0:
            means = (sums[:-1] / sums[-1]).float()  # (metrics,) window-weighted means
            for key, value in zip(self.val_keys(), means):
                self.log(f"val/{key}", value, sync_dist=False)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The LAM is an input, not training state: keep it out of every checkpoint and
        # remember which one it was, so a resume against another LAM fails loudly.
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith(LAM_PREFIX)}
        checkpoint["lapo_lam"] = dict(self.lam_info)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("lapo_lam", {}).get("sha256")
        if saved != self.lam_info["sha256"]:
            raise CheckpointError(
                f"--resume: the checkpoint was trained on the LAM with sha256 {saved} "
                f"({checkpoint.get('lapo_lam', {}).get('run')}), but --lam {self.lam_info['run']} "
                f"has {self.lam_info['sha256']}; resume with the same LAM or start a new run"
            )
        # Lightning loads strictly: hand it the frozen LAM's current weights back.
        lam_state = self.lam.state_dict()
        checkpoint["state_dict"].update({LAM_PREFIX + k: v for k, v in lam_state.items()})

    def on_train_end(self) -> None:
        weights = self.finished_weights("policy")
        if weights is not None:
            export_model(
                self.trainer.default_root_dir,
                self.policy,
                kind=POLICY_KIND,
                config=to_dict(self.cfg),
                extra=policy_extra(self.policy, self.lam_info),
                state_dict=weights,
                name=POLICY_NAME,
            )


@torch.no_grad()
def latent_metrics(pred: Tensor, enc: dict, lam: LatentActionModel, target: str) -> dict:
    """How close the policy's choice is to the IDM's, in the latent space the FDM/decoder see.

    pred: policy output (B, D) or (B, heads, num_codes); enc: `LatentActionModel.encode`.
    The predicted latent goes through the LAM's bottleneck (eval mode: no noise, no
    codebook update), or its argmax codes are looked up, as stage 3 does.
    """
    latent = enc["latent"].float()  # (B, D)
    codes = enc["codes"]  # (B, heads) or None
    out = {"latent_mse_baseline": (latent - latent.mean(dim=0)).pow(2).mean()}
    if target == "continuous":
        out["pre_mse"] = F.mse_loss(pred.float(), enc["pre"].float())
        q = lam.bottleneck(pred)
        pred_latent, pred_codes = q.latent, q.codes  # (B, D), (B, heads) or None
    else:
        pred_codes = pred.argmax(dim=-1)  # (B, heads)
        pred_latent = lam.codes_to_latent(pred_codes)  # (B, D)
    out["latent_mse"] = F.mse_loss(pred_latent.float(), latent)
    if codes is not None and pred_codes is not None:
        out["code_acc"] = (pred_codes == codes).float().mean()
    return out


# --------------------------------------------------------------------------- the run


def _warn_frame_size(dm: Any, lam: LamRun) -> None:
    """Frames are resized to the LAM's image size either way; a different source size is legal
    but means the IDM labels frames unlike those it was trained on."""
    from lapo.data import DatasetError, dataset_info

    lam_data = lam.dataset
    try:
        theirs = dataset_info(lam_data).frame_size if lam_data else None
    except (DatasetError, OSError, ValueError):
        return  # the LAM's dataset is not reachable from here: nothing to compare
    mine = dm.frame_size
    if theirs and mine and tuple(theirs) != tuple(mine):
        warnings.warn(
            f"lapo train-policy: frames of {dm.cfg.path} are {mine[0]}x{mine[1]} but the LAM was "
            f"trained on {theirs[0]}x{theirs[1]} ({lam_data}); both are resized to "
            f"{lam.image_size}, check the IDM's labels are still sound",
            stacklevel=2,
        )


def train_policy(cfg: PolicyConfig, run_dir: str | Path, *, resume: bool = False) -> dict:
    """Train stage 2 into `run_dir`; returns the final metrics (also in RUN_P/metrics.json)."""
    from lapo.data import VideoDataModule  # the loader pulls in webdataset and decoders

    if not cfg.lam:
        raise ConfigError("lam: no stage-1 run to clone; pass --lam RUN (or set lam in the config)")
    lam = read_lam(cfg.lam)
    check_config(cfg, lam)
    run_dir = Path(run_dir)
    dm = VideoDataModule(cfg.data)
    # seeds before the policy's weights exist; a bad dataset fails before RUN_P is written
    ckpt = prepare_run(cfg, run_dir, resume=resume, check_data=dm.setup)
    _warn_frame_size(dm, lam)
    module = PolicyModule(cfg, lam.load(), lam_info(lam))
    with warnings.catch_warnings():
        # intended: the frozen LAM stays in eval mode for the whole run (see PolicyModule.train)
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        result = fit(module, dm, cfg.trainer, run_dir, ckpt_path=ckpt)
    step = result.trainer.global_step
    health = {**assess_policy(final_metrics(result.trainer)), "step": step}
    if health["verdict"] == "fail":
        rank_zero_warn(
            warning_text(
                health, step=step, final=True, command="lapo train-policy", stage="stage-2"
            )
        )
    else:
        rank_zero_info(f"lapo train-policy: stage-2 health check: {health['verdict']}")
    return write_metrics(
        result.trainer,
        run_dir,
        {"finished": result.finished, "nonfinite_steps": module.nonfinite_steps, "health": health},
    )


# --------------------------------------------------------------------------- the command


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train-policy",
        help="stage 2: clone a latent policy from the IDM's latent actions",
        description="Stage 2 (Lightning): label unlabelled video with a trained LAM's frozen IDM "
        "and clone a policy that predicts those latent actions from the context frames alone. "
        "Writes RUN_P/config.yaml, checkpoints/, logs/, metrics.json and, at the end, "
        "RUN_P/policy.safetensors + RUN_P/policy.json.",
    )
    p.add_argument(
        "--lam",
        help="stage-1 run directory (lapo pretrain --out) whose IDM labels the windows; sets lam",
    )
    add_run_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    flags = {"data.path": args.data, "lam": args.lam}
    cfg = config_from_args(PolicyConfig, args, flags, inherit=lam_window)
    if not cfg.lam:
        raise SystemExit("lapo train-policy: no LAM; pass --lam RUN (a lapo pretrain run)")
    if not cfg.data.path:
        raise SystemExit("lapo train-policy: no dataset; pass --data DATASET (or set data.path)")
    metrics = train_policy(cfg, args.out, resume=args.resume)
    if rank_zero_only.rank == 0:
        state = "finished" if metrics.get("finished") else "stopped early (resume with --resume)"
        print(f"lapo train-policy: {state} at step {metrics['global_step']}; run in {args.out}")
    return 0
