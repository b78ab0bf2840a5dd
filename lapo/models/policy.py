"""Latent policy (stage 2) and action decoder (stage 3).

- `LatentPolicy`: pi(z | o[t-k+1..t]). It sees only the k context frames (never o[t+1])
  and is cloned from the IDM's labels on the same unlabelled video: either regressing the
  IDM's pre-quantisation latent (`target="continuous"`, MSE) or classifying its code
  indices (`target="codes"`, cross-entropy per head).
- `ActionDecoder`: an MLP from a latent action (optionally concatenated with observation
  features) to true action logits (discrete) or an action vector (continuous), fitted on
  the small labelled set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .common import exists, prepare_frames
from .encoders import build_encoder


class LatentPolicy(nn.Module):
    """Observation window (B, k, C, H, W) -> latent action prediction."""

    def __init__(
        self,
        cfg,
        *,
        context: int,
        image_size: int,
        latent_dim: int,
        num_codes: int = 0,
        code_heads: int = 0,
        in_channels: int = 3,
    ):
        """cfg: lapo.config.PolicyModelConfig; the rest describe the latent action model it clones."""
        super().__init__()
        if cfg.target == "codes" and (num_codes <= 0 or code_heads <= 0):
            raise ValueError(
                "lapo/models/policy.py: policy.target=codes needs a vq or fsq latent action model "
                "(the continuous bottleneck has no codes); use policy.target=continuous"
            )
        self.target = cfg.target
        self.context = context
        self.image_size = image_size
        self.latent_dim = latent_dim
        self.num_codes = num_codes
        self.code_heads = code_heads
        self.encoder = build_encoder(
            cfg,
            num_frames=context,
            image_size=image_size,
            out_dim=cfg.hidden,
            in_channels=in_channels,
        )
        out = latent_dim if cfg.target == "continuous" else code_heads * num_codes
        self.head = nn.Sequential(
            nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, out)
        )

    @classmethod
    def for_lam(cls, cfg, lam: nn.Module) -> LatentPolicy:
        """A policy shaped to clone `lam` (a LatentActionModel): same context, frame size, latent."""
        return cls(
            cfg,
            context=lam.context,
            image_size=lam.image_size,
            latent_dim=lam.cfg.latent_dim,
            num_codes=lam.num_codes,
            code_heads=lam.code_heads,
            in_channels=lam.in_channels,
        )

    def features(self, obs: Tensor) -> Tensor:
        """obs (B, k, C, H, W) uint8 or float -> observation features (B, hidden)."""
        x = prepare_frames(obs, self.image_size, where="lapo/models/policy.py")  # (B, k, C, S, S)
        return F.relu(self.encoder(x))  # (B, hidden)

    def forward_with_features(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """(B, k, C, H, W) -> (what `forward` returns, the features (B, hidden) it came from).

        One encoder pass for a caller that puts another head (e.g. a value head) on the trunk.
        """
        feats = self.features(obs)  # (B, hidden)
        y = self.head(feats)  # (B, out)
        if self.target == "codes":
            y = rearrange(y, "b (h n) -> b h n", h=self.code_heads)  # (B, heads, num_codes)
        return y, feats

    def forward(self, obs: Tensor) -> Tensor:
        """(B, k, C, H, W) -> (B, latent_dim) regression, or (B, heads, num_codes) code logits."""
        return self.forward_with_features(obs)[0]

    def loss(self, obs: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """target: (B, latent_dim) float (continuous) or (B, heads) long codes. Logs are detached."""
        pred = self(obs)
        if self.target == "continuous":
            loss = F.mse_loss(pred, target.float())
            return loss, {"loss": loss.detach(), "mse": loss.detach()}
        logits = rearrange(pred, "b h n -> (b h) n")  # (B*heads, num_codes)
        labels = rearrange(target.long(), "b h -> (b h)")  # (B*heads,)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, {"loss": loss.detach(), "code_acc": acc.detach()}

    def predict_latent(self, obs: Tensor, bottleneck: nn.Module | None = None) -> Tensor:
        """Latent action (B, latent_dim) for `obs`.

        codes: argmax codes looked up in `bottleneck` (required). continuous: the predicted
        pre-quantisation latent, passed through `bottleneck` when one is given (put it in
        eval mode so no noise is added and no codebook is updated).
        """
        pred = self(obs)
        if self.target == "codes":
            if not exists(bottleneck):
                raise ValueError(
                    "lapo/models/policy.py: predict_latent with codes needs the LAM's bottleneck"
                )
            return bottleneck.codes_to_latent(pred.argmax(-1))  # (B, latent_dim)
        return bottleneck(pred).latent if exists(bottleneck) else pred  # (B, latent_dim)


class ActionDecoder(nn.Module):
    """MLP: latent action (B, D) [+ observation features (B, F)] -> true action logits or vector."""

    def __init__(
        self,
        latent_dim: int,
        *,
        num_actions: int = 0,
        action_dim: int = 0,
        hidden: int = 128,
        obs_dim: int = 0,
    ):
        super().__init__()
        if (num_actions > 0) == (action_dim > 0):
            raise ValueError(
                "lapo/models/policy.py: ActionDecoder needs exactly one of num_actions (discrete) "
                f"or action_dim (continuous), got num_actions={num_actions}, action_dim={action_dim}"
            )
        self.num_actions = num_actions
        self.action_dim = action_dim
        self.obs_dim = obs_dim
        self.net = nn.Sequential(
            nn.Linear(latent_dim + obs_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_actions or action_dim),
        )

    @property
    def discrete(self) -> bool:
        return self.num_actions > 0

    def forward(self, latent: Tensor, obs_feats: Tensor | None = None) -> Tensor:
        """(B, D) [, (B, F)] -> (B, num_actions) logits or (B, action_dim) actions."""
        if self.obs_dim:
            if not exists(obs_feats) or obs_feats.shape[-1] != self.obs_dim:
                got = None if obs_feats is None else tuple(obs_feats.shape)
                raise ValueError(
                    f"lapo/models/policy.py: ActionDecoder expects obs_feats (B, {self.obs_dim}), got {got}"
                )
            latent = torch.cat([latent, obs_feats], dim=-1)  # (B, D+F)
        return self.net(latent)  # (B, A)

    def loss(
        self, latent: Tensor, actions: Tensor, obs_feats: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy + accuracy (discrete) or MSE (continuous). Logs are detached."""
        out = self(latent, obs_feats)  # (B, A)
        if self.discrete:
            loss = F.cross_entropy(out, actions.long())
            acc = (out.argmax(-1) == actions.long()).float().mean()
            return loss, {"loss": loss.detach(), "acc": acc.detach()}
        loss = F.mse_loss(out, actions.float())
        return loss, {"loss": loss.detach(), "mse": loss.detach()}

    @torch.no_grad()
    def predict(self, latent: Tensor, obs_feats: Tensor | None = None) -> Tensor:
        """(B,) int64 actions (discrete) or (B, action_dim) float."""
        out = self(latent, obs_feats)  # (B, A)
        return out.argmax(-1) if self.discrete else out
