"""Frame-window encoders: (B, T, C, H, W) float in [0, 1] -> features (B, out_dim).

Two families, picked by `model.encoder` / `policy.encoder`:

- `ImpalaEncoder`: the IMPALA CNN (Espeholt et al. 2018) LAPO uses for 64x64 Procgen
  frames. The T frames are stacked on the channel axis, so temporal reasoning happens
  in the first convolution. Cheap and strong on small frames.
- `SpaceTimeEncoder`: a Genie-style spatio-temporal transformer for larger frames.
  Every frame is cut into patches; each block attends within a frame (space), then
  across frames at the same patch position (time), then applies an MLP. Factorising
  attention keeps the cost at O(T*N^2 + N*T^2) rather than O((T*N)^2).

Both end in a plain Linear (no activation): consumers add their own nonlinearity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .common import check_num_frames

IMPALA_CHANNELS = (16, 32, 32)


# --------------------------------------------------------------------------- IMPALA CNN


class ImpalaResidual(nn.Module):
    """relu -> conv -> relu -> conv, plus the input (pre-activation residual block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv0(F.relu(x))  # (B, C, H, W)
        h = self.conv1(F.relu(h))  # (B, C, H, W)
        return x + h


class ImpalaStage(nn.Module):
    """conv -> 3x3 max-pool (stride 2) -> two residual blocks: halves H and W."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.res0 = ImpalaResidual(out_channels)
        self.res1 = ImpalaResidual(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)  # (B, C_out, H, W)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)  # (B, C_out, ceil(H/2), ceil(W/2))
        return self.res1(self.res0(x))  # (B, C_out, H', W')


class ImpalaEncoder(nn.Module):
    """IMPALA CNN over a window of `num_frames` frames stacked on channels."""

    def __init__(
        self,
        *,
        num_frames: int,
        image_size: int,
        out_dim: int,
        scale: int = 4,
        in_channels: int = 3,
        pool: str = "flatten",
    ):
        super().__init__()
        if pool not in ("flatten", "max"):
            raise ValueError(f"lapo/models/encoders.py: pool {pool!r} not in flatten, max")
        self.num_frames = num_frames
        self.pool = pool
        chans = [c * scale for c in IMPALA_CHANNELS]
        stages, c_in, side = [], in_channels * num_frames, image_size
        for c_out in chans:
            stages.append(ImpalaStage(c_in, c_out))
            c_in, side = c_out, (side + 1) // 2
        self.stages = nn.Sequential(*stages)
        if pool == "max":
            # the same features at every cell, then the strongest response anywhere: the
            # output says what the frames show, not where
            self.fc = nn.Conv2d(c_in, out_dim, 1)
        else:
            self.fc = nn.Linear(c_in * side * side, out_dim)
        self.out_dim = out_dim

    def forward(self, frames: Tensor) -> Tensor:
        check_num_frames(
            frames,
            self.num_frames,
            where="lapo/models/encoders.py ImpalaEncoder",
            hint="the model's context (data.context) must match the windows fed to it",
        )
        x = rearrange(frames, "b t c h w -> b (t c) h w")  # (B, T*C, H, W)
        x = self.stages(x)  # (B, C', H/8, W/8)
        if self.pool == "max":
            return self.fc(F.relu(x)).amax(dim=(2, 3))  # (B, out_dim)
        x = F.relu(rearrange(x, "b c h w -> b (c h w)"))  # (B, C'*H/8*W/8)
        return self.fc(x)  # (B, out_dim)


# --------------------------------------------------------------------------- space-time transformer


class Attention(nn.Module):
    """Multi-head self-attention over the second-to-last axis of (N, L, D)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x)  # (N, L, 3D)
        q, k, v = rearrange(
            qkv, "n l (three h d) -> three n h l d", three=3, h=self.heads
        )  # (N, h, L, d) each
        y = F.scaled_dot_product_attention(q, k, v)  # (N, h, L, d)
        return self.proj(rearrange(y, "n h l d -> n l (h d)"))  # (N, L, D)


class SpaceTimeBlock(nn.Module):
    """Spatial attention within each frame, temporal attention per patch, then an MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm_s = nn.LayerNorm(dim)
        self.attn_s = Attention(dim, heads)
        self.norm_t = nn.LayerNorm(dim)
        self.attn_t = Attention(dim, heads)
        self.norm_m = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        b, t = x.shape[:2]
        s = rearrange(x, "b t n d -> (b t) n d")  # (B*T, N, D)
        s = s + self.attn_s(self.norm_s(s))  # (B*T, N, D)
        tt = rearrange(s, "(b t) n d -> (b n) t d", b=b, t=t)  # (B*N, T, D)
        tt = tt + self.attn_t(self.norm_t(tt))  # (B*N, T, D)
        x = rearrange(tt, "(b n) t d -> b t n d", b=b)  # (B, T, N, D)
        return x + self.mlp(self.norm_m(x))  # (B, T, N, D)


class SpaceTimeEncoder(nn.Module):
    """Genie-style patch transformer over a window of frames, mean-pooled to one vector."""

    def __init__(
        self,
        *,
        num_frames: int,
        image_size: int,
        out_dim: int,
        patch_size: int = 8,
        dim: int = 256,
        depth: int = 4,
        heads: int = 4,
        in_channels: int = 3,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"lapo/models/encoders.py: image_size {image_size} is not divisible by patch_size {patch_size}"
            )
        if dim % heads:
            raise ValueError(
                f"lapo/models/encoders.py: tf_dim {dim} is not divisible by tf_heads {heads}"
            )
        self.num_frames = num_frames
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Linear(in_channels * patch_size * patch_size, dim)
        self.pos_space = nn.Parameter(torch.randn(1, 1, num_patches, dim) * 0.02)  # (1, 1, N, D)
        self.pos_time = nn.Parameter(torch.randn(1, num_frames, 1, dim) * 0.02)  # (1, T, 1, D)
        self.blocks = nn.ModuleList(SpaceTimeBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, out_dim)
        self.out_dim = out_dim

    def forward(self, frames: Tensor) -> Tensor:
        check_num_frames(
            frames,
            self.num_frames,
            where="lapo/models/encoders.py SpaceTimeEncoder",
            hint="the model's context (data.context) must match the windows fed to it",
        )
        p = self.patch_size
        x = rearrange(
            frames, "b t c (h p1) (w p2) -> b t (h w) (p1 p2 c)", p1=p, p2=p
        )  # (B, T, N, p*p*C)
        x = self.patch_embed(x) + self.pos_space + self.pos_time  # (B, T, N, D)
        for block in self.blocks:
            x = block(x)  # (B, T, N, D)
        x = self.norm(x.mean(dim=(1, 2)))  # (B, D)
        return self.fc(x)  # (B, out_dim)


# --------------------------------------------------------------------------- factory


def build_encoder(
    cfg,
    *,
    num_frames: int,
    image_size: int,
    out_dim: int,
    in_channels: int = 3,
    pool: str = "flatten",
) -> nn.Module:
    """The encoder that `cfg` names for windows of `num_frames`.

    cfg: any settings object with the encoder fields (``encoder``, ``impala_scale``,
    ``patch_size``, ``tf_dim``, ``tf_depth``, ``tf_heads``): lapo.config's ModelConfig for
    the IDM and world model, PolicyModelConfig for the latent policy.
    """
    kind = cfg.encoder
    if kind == "impala":
        return ImpalaEncoder(
            num_frames=num_frames,
            image_size=image_size,
            out_dim=out_dim,
            scale=cfg.impala_scale,
            in_channels=in_channels,
            pool=pool,
        )
    if pool != "flatten":
        raise ValueError(
            f"lapo/models/encoders.py: pool {pool!r} (model.idm_pool) needs encoder impala, "
            f"got {kind!r}"
        )
    if kind == "transformer":
        return SpaceTimeEncoder(
            num_frames=num_frames,
            image_size=image_size,
            out_dim=out_dim,
            patch_size=cfg.patch_size,
            dim=cfg.tf_dim,
            depth=cfg.tf_depth,
            heads=cfg.tf_heads,
            in_channels=in_channels,
        )
    raise ValueError(
        f"lapo/models/encoders.py: unknown encoder {kind!r}; choose impala or transformer"
    )
