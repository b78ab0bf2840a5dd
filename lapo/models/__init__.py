"""Plain nn.Modules for lapo: no Lightning, no data code, no device handling; they take tensors.

Frames are (B, T, C, H, W): uint8, or float in [0, 1]. Every model resizes to its own
image_size inside (`prepare_frames`).
"""

from .common import prepare_frames, psnr, psnr_from_mse
from .encoders import ImpalaEncoder, SpaceTimeEncoder, build_encoder
from .fdm import LatentFDM, UNetFDM
from .idm import IDM
from .lam_model import LatentActionModel
from .policy import ActionDecoder, LatentPolicy
from .quantizers import (
    BottleneckOut,
    ContinuousBottleneck,
    FSQBottleneck,
    VQBottleneck,
    build_bottleneck,
    code_histogram,
    codebook_stats,
    perplexity_from_counts,
    usage_from_counts,
)

__all__ = [
    "IDM",
    "ActionDecoder",
    "BottleneckOut",
    "ContinuousBottleneck",
    "FSQBottleneck",
    "ImpalaEncoder",
    "LatentActionModel",
    "LatentFDM",
    "LatentPolicy",
    "SpaceTimeEncoder",
    "UNetFDM",
    "VQBottleneck",
    "build_bottleneck",
    "build_encoder",
    "code_histogram",
    "codebook_stats",
    "perplexity_from_counts",
    "prepare_frames",
    "psnr",
    "psnr_from_mse",
    "usage_from_counts",
]
