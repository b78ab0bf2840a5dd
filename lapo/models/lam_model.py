"""The latent action model (stage 1): IDM + bottleneck + world model, trained on video alone.

    frames o[t-k+1..t+1] --IDM--> pre --bottleneck--> z[t]
    o[t-k+1..t], z[t] --FDM--> o[t+1] (pixels) or its target embedding (latent mode)

The world model can only predict o[t+1] well if z[t] tells it what changed, and the
bottleneck stops z[t] from simply copying o[t+1], so z[t] ends up encoding the action.
An optional head z[t] -> true action (weight `sup_weight`) adds weak supervision on the
windows that carry labels (LAOM).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import exists, prepare_frames, psnr_from_mse
from .fdm import LatentFDM, UNetFDM
from .idm import IDM
from .quantizers import build_bottleneck, codebook_stats


class LatentActionModel(nn.Module):
    """IDM + bottleneck + FDM. See `loss` for the training objective."""

    def __init__(
        self,
        cfg,
        in_channels: int = 3,
        num_actions: int = 0,
        *,
        context: int = 2,
        action_dim: int = 0,
        sync_codebook: bool | None = None,
    ):
        """
        cfg: lapo.config.ModelConfig.
        in_channels: channels per frame (3 for RGB).
        num_actions: discrete true actions for the weak-supervision head (0: cfg.num_actions).
        context: k, frames before o[t+1] in a window (data.context); windows hold k+1 frames.
        action_dim: continuous true action size for the weak-supervision head (MSE) instead.
        sync_codebook: VQ codebook all-reduce across DDP ranks; None resolves it automatically.
        """
        super().__init__()
        self.cfg = cfg
        self.context = context
        self.in_channels = in_channels
        self.image_size = cfg.image_size
        self.idm = IDM(cfg, context=context, in_channels=in_channels)
        self.bottleneck = build_bottleneck(cfg, sync_codebook=sync_codebook)
        if cfg.fdm == "pixel":
            self.fdm = UNetFDM(
                context=context,
                latent_dim=cfg.latent_dim,
                image_size=cfg.image_size,
                channels=cfg.fdm_channels,
                mults=cfg.fdm_mults,
                in_channels=in_channels,
                residual=cfg.fdm_residual,
            )
        else:
            self.fdm = LatentFDM(cfg, context=context, in_channels=in_channels)

        self.num_actions = num_actions or cfg.num_actions
        self.action_dim = action_dim
        sup_out = self.num_actions or action_dim
        self.sup_head = None
        if cfg.sup_weight > 0 and sup_out > 0:
            self.sup_head = nn.Sequential(
                nn.Linear(cfg.latent_dim, cfg.embed_dim),
                nn.ReLU(),
                nn.Linear(cfg.embed_dim, sup_out),
            )
        elif cfg.sup_weight > 0:
            warnings.warn(
                "lapo/models/lam_model.py: model.sup_weight > 0 but the action count is unknown "
                "(num_actions=0, action_dim=0); weak supervision is off",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ pieces

    @property
    def num_codes(self) -> int:
        """Codes per head (0 for the continuous bottleneck)."""
        return self.bottleneck.num_codes

    @property
    def code_heads(self) -> int:
        """Code indices per latent action (0 for the continuous bottleneck)."""
        return self.bottleneck.code_heads

    def prepare(self, frames: Tensor) -> Tensor:
        """uint8 or float (B, T, C, H, W) -> float in [0, 1] at (image_size, image_size)."""
        return prepare_frames(frames, self.image_size, where="lapo/models/lam_model.py")

    def encode(self, frames: Tensor) -> dict[str, Tensor | None]:
        """Windows (B, k+1, C, H, W) (uint8, or float in [0, 1]) -> latent action and friends.

        Returns latent (B, latent_dim), pre (B, latent_dim) pre-quantisation, codes
        (B, heads) long or None, quant_loss (scalar) and feats (B, embed_dim): the IDM
        encoder's features of the whole window (they include o[t+1]).
        """
        x = self.prepare(frames)  # (B, k+1, C, S, S)
        feats, pre = self.idm(x)  # (B, E), (B, D)
        out = self.bottleneck(pre)
        return {
            "latent": out.latent,
            "pre": pre,
            "codes": out.codes,
            "quant_loss": out.loss,
            "feats": feats,
        }

    def codes_to_latent(self, codes: Tensor) -> Tensor:
        """(B, heads) long -> (B, latent_dim), as the bottleneck would output for those codes."""
        return self.bottleneck.codes_to_latent(codes)

    def predict_next(self, context: Tensor, latent: Tensor) -> Tensor | None:
        """context (B, k, C, H, W), latent (B, D) -> predicted o[t+1] (B, C, S, S); None in latent mode."""
        if not isinstance(self.fdm, UNetFDM):
            return None
        return self.fdm(self.prepare(context), latent).clamp(0.0, 1.0)

    @torch.no_grad()
    def latent_dependence(
        self, frames: Tensor, latent: Tensor, *, seed: int = 0
    ) -> dict[str, Tensor]:
        """How much the world model relies on z[t]: its error on the same windows with each
        window's own latent, another window's (a random cyclic shuffle of the batch, so no
        window keeps its own) and zeros.

        frames: (B, k+1, C, H, W) windows; latent: (B, D) their latent actions (`encode`).
        Returns mse, mse_shuffled, mse_zeroed (the pixel world model's mean squared error)
        or fdm_loss, fdm_loss_shuffled, fdm_loss_zeroed (latent world model); {} for a
        batch of one.
        """
        b = latent.shape[0]
        if b < 2:
            return {}
        x = self.prepare(frames)  # (B, k+1, C, S, S)
        order = torch.randperm(b, generator=torch.Generator().manual_seed(seed))  # (B,)
        source = torch.empty_like(order)
        source[order] = order.roll(-1)  # window order[i] gets the latent of order[i+1]
        variants = {
            "": latent,
            "_shuffled": latent[source.to(latent.device)],  # (B, D)
            "_zeroed": torch.zeros_like(latent),  # (B, D)
        }
        out = {}
        for suffix, z in variants.items():
            if isinstance(self.fdm, UNetFDM):
                pred = self.fdm(x[:, :-1], z).clamp(0.0, 1.0)  # (B, C, S, S)
                out[f"mse{suffix}"] = F.mse_loss(pred, x[:, -1])
            else:
                out[f"fdm_loss{suffix}"] = self.fdm.error(x, z)
        return {k: v.float() for k, v in out.items()}

    # ------------------------------------------------------------------ objective

    def loss(
        self,
        frames: Tensor,
        actions: Tensor | None = None,
        has_action: Tensor | None = None,
        labelled: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """One training objective on a batch of windows.

        frames: (B, k+1, C, H, W) uint8 (or float in [0, 1]); resized to image_size here.
        actions: (B,) int64 or (B, A) float true actions of o[t] -> o[t+1], or None.
        has_action: (B,) bool, which windows carry a real label (None: all, if actions given).
        labelled: (frames (L, k+1, C, H, W), actions (L,) or (L, A)): windows from a separate
        labelled budget, seen by the IDM and the weak-supervision head only (one IDM pass
        with `frames`); `actions` of `frames` then go unused by the head.
        Returns (loss, logs, pred_next): logs are detached scalars; pred_next (B, C, S, S)
        in [0, 1], or None for the latent world model.
        """
        x = self.prepare(frames)  # (B, k+1, C, S, S)
        b = x.shape[0]
        if exists(labelled):
            xl = self.prepare(labelled[0])  # (L, k+1, C, S, S)
            _, pre = self.idm(torch.cat([x, xl.to(x.dtype)]))  # (B + L, D)
            q = self.bottleneck(pre)
            latent, latent_l = q.latent[:b], q.latent[b:]  # (B, D), (L, D)
            actions, has_action = labelled[1], None
        else:
            _, pre = self.idm(x)  # (B, D)
            q = self.bottleneck(pre)
            latent = latent_l = q.latent  # (B, D)
        nxt = x[:, -1]  # (B, C, S, S)
        logs: dict[str, Tensor] = {}

        pred_next = None
        if isinstance(self.fdm, UNetFDM):
            pred_next = self.fdm(x[:, :-1], latent)  # (B, C, S, S)
            fdm_mse = F.mse_loss(pred_next, nxt)
            logs["fdm_mse"] = fdm_mse
            copy_mse = F.mse_loss(x[:, -2], nxt).detach()
            fdm_loss, copy_err = fdm_mse, copy_mse
            if self.cfg.fdm_loss == "huber":
                delta = self.cfg.fdm_huber_delta
                fdm_loss = F.smooth_l1_loss(pred_next, nxt, beta=delta)
                copy_err = F.smooth_l1_loss(x[:, -2], nxt, beta=delta).detach()
            if self.cfg.fdm_loss_scale == "copy":  # 1.0 == as good as copying o[t]
                fdm_loss = fdm_loss / copy_err.clamp_min(1e-5)  # a still batch: bounded
            pred_next = pred_next.clamp(0.0, 1.0) if self.fdm.residual else pred_next
            # the squared errors behind the PSNRs, so a validation pass can pool them
            logs["pred_mse"] = F.mse_loss(pred_next.detach(), nxt)
            logs["copy_mse"] = copy_mse
            logs["psnr"] = psnr_from_mse(logs["pred_mse"])
            logs["psnr_copy"] = psnr_from_mse(copy_mse)
        else:
            fdm_loss = self.fdm.loss(x, latent)
        logs["fdm_loss"] = fdm_loss
        logs["quant_loss"] = q.loss
        loss = fdm_loss + q.loss

        if exists(self.sup_head):
            sup_loss, sup_logs = self._sup_loss(latent_l, actions, has_action)
            loss = loss + self.cfg.sup_weight * sup_loss
            logs.update(sup_logs)

        logs.update(codebook_stats(q.codes, self.num_codes))
        logs["latent_std"] = latent.std(dim=0, correction=0).mean()
        logs["loss"] = loss
        logs = {k: v.detach().float() for k, v in logs.items()}
        return loss, logs, (pred_next.detach() if exists(pred_next) else None)

    forward = loss  # DDP and FSDP wrappers call forward: it is the whole objective

    def _sup_loss(
        self, latent: Tensor, actions: Tensor | None, has_action: Tensor | None
    ) -> tuple[Tensor, dict]:
        """Weak supervision on labelled windows only.

        The head always runs, and a batch without labels contributes 0 * output, so every
        parameter takes part in the graph and DDP needs no find_unused_parameters.
        """
        out = self.sup_head(latent)  # (B, A)
        if not exists(actions):
            return out.sum() * 0.0, {}
        b = latent.shape[0]
        mask = (
            has_action.bool()
            if exists(has_action)
            else torch.ones(b, dtype=torch.bool, device=latent.device)
        )
        w = mask.float()  # (B,)
        n = w.sum().clamp_min(1.0)
        if self.num_actions:
            if actions.is_floating_point():
                raise ValueError("lapo/models/lam_model.py: discrete sup head got float actions")
            target = actions.long().clamp(
                0, self.num_actions - 1
            )  # (B,) unlabelled rows may hold -1
            per = F.cross_entropy(out, target, reduction="none")  # (B,)
            acc = ((out.argmax(-1) == target).float() * w).sum() / n
            loss = (per * w).sum() / n
            return loss, {"sup_loss": loss, "sup_acc": acc, "sup_frac": w.mean()}
        per = (out - actions.float()).pow(2).mean(dim=-1)  # (B,)
        loss = (per * w).sum() / n
        return loss, {"sup_loss": loss, "sup_frac": w.mean()}
