"""Small helpers shared by the models: frame preparation, PSNR, option defaults.

Every model takes frames as (B, T, C, H, W). Data arrives as uint8 straight from the
video decoder; models want float in [0, 1] at the size they were built for. One
helper, `prepare_frames`, does both so the conversion lives in exactly one place.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

T = TypeVar("T")


def exists(v: object) -> bool:
    return v is not None


def default(v: T | None, d: T) -> T:
    return v if v is not None else d


def prepare_frames(frames: Tensor, image_size: int, *, where: str = "lapo/models") -> Tensor:
    """uint8 or float frames (B, T, C, H, W) -> float32 in [0, 1] at (image_size, image_size).

    uint8 is divided by 255; float input is assumed to be in [0, 1] already. Frames of
    another size (or non-square ones) are resized with bilinear interpolation
    (antialiased when shrinking), so a 96x96 dataset can feed a 64x64 model: the aspect
    ratio is not kept, as the config promises square frames.
    """
    if frames.ndim != 5:
        raise ValueError(
            f"{where}: expected frames of shape (B, T, C, H, W), got {tuple(frames.shape)}"
        )
    if frames.dtype == torch.uint8:
        x = frames.float() / 255.0  # (B, T, C, H, W)
    elif frames.is_floating_point():
        x = frames.float()  # (B, T, C, H, W)
    else:
        raise ValueError(f"{where}: frames must be uint8 or float, got {frames.dtype}")
    h, w = x.shape[-2:]
    if (h, w) != (image_size, image_size):
        b = x.shape[0]
        flat = rearrange(x, "b t c h w -> (b t) c h w")  # (B*T, C, H, W)
        shrink = h > image_size or w > image_size
        flat = F.interpolate(
            flat,
            size=(image_size, image_size),
            mode="bilinear",
            align_corners=False,
            antialias=shrink,
        )  # (B*T, C, S, S)
        x = rearrange(flat, "(b t) c h w -> b t c h w", b=b).clamp(0.0, 1.0)  # (B, T, C, S, S)
    return x


def psnr(pred: Tensor, target: Tensor, *, max_value: float = 1.0) -> Tensor:
    """PSNR in dB of the mean squared error over the whole batch; pred, target (B, C, H, W)
    in [0, max_value].

    Of the pooled error, not a mean of per-image PSNRs: a frame copied exactly scores 100
    dB on its own (the error's floor), so where many frames do not change (a blocked move,
    a still scene: more than half of a sticky-random Procgen miner recording) a per-image
    mean gives copying o[t] about 70 dB and hides every error on the frames that move.
    """
    return psnr_from_mse((pred.float() - target.float()).pow(2).mean(), max_value=max_value)


def psnr_from_mse(mse: Tensor | float, *, max_value: float = 1.0) -> Tensor:
    """PSNR in dB of a mean squared error (floored at 1e-10, i.e. 100 dB for a unit range)."""
    mse = torch.as_tensor(mse, dtype=torch.float64 if isinstance(mse, float) else None)
    return 10.0 * torch.log10(max_value**2 / mse.clamp_min(1e-10))


def check_num_frames(x: Tensor, expected: int, *, where: str, hint: str) -> None:
    """Fail with a message naming the module when a window has the wrong number of frames."""
    if x.shape[1] != expected:
        raise ValueError(
            f"{where}: expected {expected} frames per window, got {x.shape[1]} "
            f"(input shape {tuple(x.shape)}); {hint}"
        )
