"""Inverse dynamics model: a window o[t-k+1..t+1] -> pre-quantisation latent action.

The IDM sees the k context frames and the next frame, so it can tell what changed.
The bottleneck that turns its output into the latent action z[t] is a sibling module
(`LatentActionModel.bottleneck`), which keeps the IDM a pure encoder and lets stage 2
regress either side of the quantiser.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .encoders import build_encoder


class IDM(nn.Module):
    """Encoder over k+1 frames -> features (B, embed_dim) -> pre-quant latent (B, latent_dim)."""

    def __init__(self, cfg, *, context: int, in_channels: int = 3):
        """cfg: lapo.config.ModelConfig; context: k, the number of frames before o[t+1]."""
        super().__init__()
        self.context = context
        self.encoder = build_encoder(
            cfg,
            num_frames=context + 1,
            image_size=cfg.image_size,
            out_dim=cfg.embed_dim,
            in_channels=in_channels,
            pool=cfg.idm_pool,
        )
        self.head = nn.Linear(cfg.embed_dim, cfg.latent_dim)

    def forward(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """frames (B, k+1, C, S, S) float in [0, 1] -> (features (B, embed_dim), pre (B, latent_dim))."""
        feats = self.encoder(frames)  # (B, embed_dim)
        pre = self.head(F.relu(feats))  # (B, latent_dim)
        return feats, pre
