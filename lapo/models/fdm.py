"""Forward dynamics models (world models): o[t-k+1..t] and z[t] -> o[t+1].

- `UNetFDM` (model.fdm = "pixel", LAPO): a U-Net over the k context frames stacked on
  channels, one halving of the frame per entry of `mults`. z[t] enters twice, as in LAPO:
  broadcast as extra channels at the input and again at the lowest resolution, so the
  decoder cannot ignore it. The output goes
  through a sigmoid, so predictions are valid images in [0, 1]; the loss is pixel MSE.
- `LatentFDM` (model.fdm = "latent", LAOM): predicts the *embedding* of the next
  window under a target encoder that is an exponential moving average of the online
  context encoder (BYOL style, stop-gradient target). No pixels are predicted, so a
  distractor-heavy background costs nothing to ignore.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from .encoders import build_encoder

UNET_MULTS = (1, 2, 4, 8)  # default width multipliers per level (model.fdm_mults)


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with a 1x1 skip when the width changes."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C_out, H, W)
        return self.skip(x) + h


class UNetFDM(nn.Module):
    """Pixel world model: (context (B, k, C, S, S), latent (B, D)) -> next frame (B, C, S, S) in [0, 1]."""

    def __init__(
        self,
        *,
        context: int,
        latent_dim: int,
        image_size: int,
        channels: int = 64,
        mults: Sequence[int] = UNET_MULTS,
        in_channels: int = 3,
        residual: bool = True,
    ):
        super().__init__()
        self.residual = residual
        levels = len(mults)
        if image_size % 2**levels:
            raise ValueError(
                f"lapo/models/fdm.py: the U-Net world model halves the frame {levels} times "
                f"(model.fdm_mults), so model.image_size must be divisible by {2**levels}, "
                f"got {image_size}"
            )
        self.context = context
        widths = [channels * m for m in mults]
        bottom, w_last = image_size // 2**levels, widths[-1]
        if bottom * bottom * (w_last // _groups(w_last)) < 2:
            raise ValueError(
                f"lapo/models/fdm.py: the lowest level is {bottom}x{bottom} with {w_last} channels "
                f"in {_groups(w_last)} norm groups: one value per group cannot be normalised; "
                "widen model.fdm_channels or drop a level of model.fdm_mults"
            )
        frame_ch = in_channels * context
        self.z_in = nn.Linear(latent_dim, channels)
        self.stem = nn.Conv2d(frame_ch + channels, channels, 3, padding=1)

        self.down_blocks, self.downsamples = nn.ModuleList(), nn.ModuleList()
        c = channels
        for w in widths:
            self.down_blocks.append(ResBlock(c, w))
            self.downsamples.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
            c = w

        self.z_mid = nn.Linear(latent_dim, c)
        self.mid = nn.Sequential(ResBlock(2 * c, c), ResBlock(c, c))

        self.upsamples, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for w in reversed(widths):
            self.upsamples.append(nn.Conv2d(c, w, 3, padding=1))
            self.up_blocks.append(ResBlock(2 * w, w))
            c = w

        # the raw context frames are concatenated again before the head (LAPO does the
        # same), which makes copying static background cheap
        self.out_norm = nn.GroupNorm(_groups(c), c)
        self.head = nn.Sequential(
            nn.Conv2d(c + frame_ch, c, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c, in_channels, 3, padding=1),
        )
        if residual:
            # start (almost) as a copy of o[t]: the latent only has to explain the change,
            # so it carries information from the first steps instead of after the U-Net
            # has slowly learnt to reproduce the background. Small, not zero, so that
            # gradients reach the IDM from the first step.
            nn.init.normal_(self.head[-1].weight, std=1e-2)
            nn.init.zeros_(self.head[-1].bias)

    def forward(self, context: Tensor, latent: Tensor) -> Tensor:
        k, s = context.shape[1], context.shape[-1]
        if k != self.context:
            raise ValueError(
                f"lapo/models/fdm.py: expected {self.context} context frames, got {k} "
                f"(shape {tuple(context.shape)}); data.context must match the model"
            )
        frames = rearrange(context, "b k c h w -> b (k c) h w")  # (B, k*C, S, S)
        zmap = repeat(self.z_in(latent), "b c -> b c h w", h=s, w=s)  # (B, c0, S, S)
        x = self.stem(torch.cat([frames, zmap], dim=1))  # (B, c0, S, S)

        skips = []
        for block, down in zip(self.down_blocks, self.downsamples):
            x = block(x)  # (B, w_i, S_i, S_i)
            skips.append(x)
            x = down(x)  # (B, w_i, S_i/2, S_i/2)

        h = x.shape[-1]
        zmid = repeat(self.z_mid(latent), "b c -> b c h w", h=h, w=h)  # (B, w_last, Sb, Sb)
        x = self.mid(torch.cat([x, zmid], dim=1))  # (B, w_last, Sb, Sb), Sb = S / 2**levels

        for up, block in zip(self.upsamples, self.up_blocks):
            x = up(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, w_i, S_i, S_i)
            x = block(torch.cat([x, skips.pop()], dim=1))  # (B, w_i, S_i, S_i)

        x = F.silu(self.out_norm(x))  # (B, c0, S, S)
        out = self.head(torch.cat([x, frames], dim=1))  # (B, C, S, S)
        if self.residual:
            # unclamped, so a pixel predicted past 0 or 1 still gets a gradient back;
            # callers clamp for display and PSNR
            return context[:, -1] + out  # (B, C, S, S)
        return torch.sigmoid(out)  # (B, C, S, S) in [0, 1]


class LatentFDM(nn.Module):
    """Latent world model: predicts the EMA target encoder's embedding of o[t-k+2..t+1]."""

    def __init__(self, cfg, *, context: int, in_channels: int = 3):
        """cfg: lapo.config.ModelConfig."""
        super().__init__()
        e = cfg.embed_dim
        self.encoder = build_encoder(
            cfg, num_frames=context, image_size=cfg.image_size, out_dim=e, in_channels=in_channels
        )
        self.target = copy.deepcopy(self.encoder).requires_grad_(False)
        self.predictor = nn.Sequential(
            nn.Linear(e + cfg.latent_dim, 2 * e),
            nn.GELU(),
            nn.Linear(2 * e, 2 * e),
            nn.GELU(),
            nn.Linear(2 * e, e),
        )
        self.decay = cfg.ema_decay
        self.loss_kind = cfg.fdm_latent_loss

    @torch.no_grad()
    def update_target(self) -> None:
        """target <- decay * target + (1 - decay) * online; identical on every DDP rank."""
        for t, o in zip(self.target.parameters(), self.encoder.parameters()):
            t.lerp_(o.detach(), 1.0 - self.decay)

    def forward(self, context: Tensor, latent: Tensor) -> Tensor:
        """context (B, k, C, S, S), latent (B, D) -> predicted next embedding (B, embed_dim)."""
        h = self.encoder(context)  # (B, E)
        return self.predictor(torch.cat([h, latent], dim=-1))  # (B, E)

    def loss(self, frames: Tensor, latent: Tensor) -> Tensor:
        """frames (B, k+1, C, S, S) in [0, 1], latent (B, D) -> scalar loss.

        In training mode the target is first moved one EMA step towards the online
        encoder, so the training loop needs no extra hook (the target lags one step).
        """
        if self.training:
            self.update_target()
        return self.error(frames, latent)

    def error(self, frames: Tensor, latent: Tensor) -> Tensor:
        """The loss of `loss` without the EMA step: the same windows may be scored repeatedly."""
        pred = self(frames[:, :-1], latent)  # (B, E)
        with torch.no_grad():
            target = self.target(frames[:, 1:])  # (B, E), stop-gradient
        if self.loss_kind == "cosine":
            return (2.0 - 2.0 * F.cosine_similarity(pred, target, dim=-1)).mean()
        return F.mse_loss(pred, target)
