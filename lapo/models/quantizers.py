"""Information bottlenecks on the latent action: VQ, FSQ (both from vector-quantize-pytorch) or
a small noisy continuous vector.

Every bottleneck maps the IDM's pre-quantisation latent (B, D) to a latent action (B, D)
of the same width and returns a `BottleneckOut`:

- `latent`: what the world model sees; gradients reach the IDM through it (rotation
  trick / straight-through for VQ, straight-through rounding for FSQ).
- `codes`: (B, heads) long code indices for vq/fsq, None for continuous.
- `loss`: the quantisation loss (VQ commitment; zero otherwise, and zero in eval mode).

`codes_to_latent(codes)` inverts the lookup (the library's get_output_from_indices /
indices_to_codes), so stored codes can be turned back into latents.

Codebook sync under DDP: the VQ codebook is an EMA buffer updated inside forward, so
each rank would drift apart on its own data. vector-quantize-pytorch all-reduces the
EMA statistics when built with `sync_codebook=True`, but its default (`is_distributed()`,
cached on first call) is read when the module is *constructed*, and Lightning builds
models before it starts the process group. `VQBottleneck` therefore resolves "auto"
twice: at construction, and again at the first training forward, when it rebuilds the
library module with sync on (copying its state) if a process group of >1 rank exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn
from vector_quantize_pytorch import FSQ, VectorQuantize

from .common import exists


@dataclass
class BottleneckOut:
    latent: Tensor
    """(B, D) latent action fed to the world model."""
    codes: Tensor | None
    """(B, heads) long indices (vq/fsq) or None (continuous)."""
    loss: Tensor
    """Scalar quantisation loss (already weighted)."""


def _distributed_world() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class BatchStandardise(nn.BatchNorm1d):
    """Zero mean, unit variance per dimension over the batch (no gain or bias to learn).

    Under DDP each rank normalises with its own batch's statistics, as `nn.BatchNorm1d`
    does, but the running mean and variance that eval mode uses are averaged over the
    ranks after every training step, so all ranks (and the checkpoint rank zero writes)
    hold the same buffers. Averaging the per-rank updates equals one update with the
    ranks' mean statistics, since the running update is linear.
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        if self.training and _distributed_world():
            world = dist.get_world_size()
            stats = torch.cat([self.running_mean, self.running_var])
            dist.all_reduce(stats)
            self.running_mean.copy_(stats[: self.num_features] / world)
            self.running_var.copy_(stats[self.num_features :] / world)
        return out


# --------------------------------------------------------------------------- VQ


class VQBottleneck(nn.Module):
    """EMA vector quantisation with one codebook per head (vector-quantize-pytorch)."""

    def __init__(
        self,
        dim: int,
        *,
        codebook_size: int,
        heads: int = 1,
        decay: float = 0.8,
        commitment: float = 0.25,
        kmeans_init: bool = False,
        dead_code_threshold: float = 0.0,
        cosine: bool = False,
        sync_codebook: bool | None = None,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(
                f"lapo/models/quantizers.py: latent_dim {dim} not divisible by vq_heads {heads}"
            )
        self.num_codes = codebook_size
        self.code_heads = heads
        self._kwargs = dict(
            dim=dim,
            codebook_size=codebook_size,
            codebook_dim=dim // heads,  # heads * codebook_dim == dim: no projection layers
            heads=heads,
            separate_codebook_per_head=True,
            decay=decay,
            commitment_weight=commitment,
            kmeans_init=kmeans_init,
            threshold_ema_dead_code=dead_code_threshold,
            use_cosine_sim=cosine,  # unit-norm codes and inputs: z cannot shrink towards 0
        )
        self._sync_fixed = sync_codebook is not None  # explicit choice: never re-resolved
        self.synced = bool(sync_codebook) if self._sync_fixed else _distributed_world()
        self.vq = self._build(self.synced)
        # Cosine codes: standardise over the batch first (see FSQBottleneck). Windows of one
        # game share most pixels, so a fresh IDM's outputs differ by ~1% around a common
        # offset and, once unit-normed, all point one way: every code (and every dead code
        # re-seeded from the batch) sits at one point and the world model ignores z[t].
        # Euclidean codes track the offset through the EMA codebook and were measured to
        # learn worse standardised (sprite world: probe 0.30-1.00 against 1.00).
        self.standardise = BatchStandardise(dim) if cosine else nn.Identity()

    def _build(self, sync: bool) -> VectorQuantize:
        if not sync:
            return VectorQuantize(**self._kwargs, sync_codebook=False)
        try:
            return VectorQuantize(**self._kwargs, sync_codebook=True)
        except AssertionError as e:  # the library refuses k-means init of several synced codebooks
            raise ValueError(
                f"lapo/models/quantizers.py: cannot build a synced VQ codebook ({e}); with several "
                "processes set model.vq_kmeans_init=false or model.vq_heads=1"
            ) from e

    @torch.compiler.disable  # a module swap is no business of a compiled graph
    def _resolve_sync(self) -> None:
        """Turn on codebook all-reduce if a process group appeared after construction."""
        if self._sync_fixed or self.synced or not _distributed_world():
            return
        state = self.vq.state_dict()
        self.vq = self._build(True).to(next(iter(state.values())).device)
        self.vq.load_state_dict(state)
        self.synced = True

    def forward(self, pre: Tensor) -> BottleneckOut:
        if self.training:
            self._resolve_sync()
        latent, indices, loss = self.vq(self.standardise(pre))  # (B, D), (B, heads) or (B,), ()
        codes = indices if indices.ndim == 2 else rearrange(indices, "b -> b 1")  # (B, heads)
        return BottleneckOut(latent=latent, codes=codes.long(), loss=loss)

    def codes_to_latent(self, codes: Tensor) -> Tensor:
        """(B, heads) long -> (B, D): the codebook vectors, concatenated over heads."""
        # separate codebooks per head: the library wants (B, heads) even for one head
        return self.vq.get_output_from_indices(codes)  # (B, D)

    @property
    def codebook(self) -> Tensor:
        """(heads, codebook_size, D / heads) current codebook vectors."""
        cb = self.vq.codebook
        return cb if cb.ndim == 3 else rearrange(cb, "n d -> 1 n d")


# --------------------------------------------------------------------------- FSQ


class FSQBottleneck(nn.Module):
    """Finite scalar quantisation: batch-standardise, project D -> len(levels), round, project back."""

    def __init__(self, dim: int, *, levels: list[int]):
        super().__init__()
        # Standardise each dimension over the batch. Windows of one game share most pixels,
        # so a fresh IDM's outputs differ between samples by ~1% of their common offset and
        # all round to one code; the straight-through gradient then grows the offset, not
        # the differences, and FSQ stays collapsed (seen on the sprite world in the tests).
        # A per-sample LayerNorm does not help: it keeps the offset. Eval uses running stats.
        self.norm = BatchStandardise(dim)
        # levels of 2 only work with the library's symmetric variant
        self.fsq = FSQ(
            levels=list(levels), dim=dim, preserve_symmetry=any(lv == 2 for lv in levels)
        )
        self.num_codes = int(math.prod(levels))
        self.code_heads = 1

    def forward(self, pre: Tensor) -> BottleneckOut:
        z = rearrange(self.norm(pre), "b d -> b 1 d")  # (B, 1, D): FSQ wants a sequence axis
        out, indices = self.fsq(z)  # (B, 1, D), (B, 1)
        latent = rearrange(out, "b 1 d -> b d")  # (B, D)
        return BottleneckOut(latent=latent, codes=indices.long(), loss=pre.new_zeros(()))

    def codes_to_latent(self, codes: Tensor) -> Tensor:
        """(B, 1) long -> (B, D)."""
        out = self.fsq.indices_to_codes(codes.int())  # (B, 1, D)
        return rearrange(out, "b 1 d -> b d")  # (B, D)


# --------------------------------------------------------------------------- continuous


class ContinuousBottleneck(nn.Module):
    """A small continuous vector: project to `small_dim`, bound it, add noise in training, project back.

    The bound (tanh or unit l2 norm) and the fixed-std Gaussian noise together cap how
    many bits z[t] can carry, the continuous analogue of a codebook size (LAOM; "latent
    action world models in the wild").
    """

    def __init__(self, dim: int, *, small_dim: int, norm: str = "tanh", noise: float = 0.1):
        super().__init__()
        if norm not in ("none", "l2", "tanh"):
            raise ValueError(
                f"lapo/models/quantizers.py: continuous_norm {norm!r} not in none, l2, tanh"
            )
        self.project_in = nn.Linear(dim, small_dim)
        # Standardise over the batch before bounding, as FSQBottleneck does. A fresh IDM's
        # outputs differ between windows of one video by ~1% (std 0.003 on the sprite world
        # of the tests), far below the noise, so the world model learns to ignore z[t] and
        # the IDM gets no signal: 2 of 5 seeds stuck at chance. Standardised, 5 of 5 learn.
        self.standardise = BatchStandardise(small_dim)
        self.project_out = nn.Linear(small_dim, dim)
        self.norm = norm
        self.noise = noise
        self.num_codes = 0
        self.code_heads = 0

    def squash(self, pre: Tensor) -> Tensor:
        """(B, D) -> (B, small_dim) bounded vector, before noise."""
        v = self.standardise(self.project_in(pre))  # (B, small_dim), unit variance per dim
        if self.norm == "tanh":
            v = torch.tanh(v)
        elif self.norm == "l2":
            v = nn.functional.normalize(v, dim=-1)
        return v  # (B, small_dim)

    def forward(self, pre: Tensor) -> BottleneckOut:
        v = self.squash(pre)  # (B, small_dim)
        if self.training and self.noise > 0:
            v = v + self.noise * torch.randn_like(v)  # (B, small_dim)
        return BottleneckOut(latent=self.project_out(v), codes=None, loss=pre.new_zeros(()))

    def codes_to_latent(self, codes: Tensor) -> Tensor:
        raise ValueError("lapo/models/quantizers.py: the continuous bottleneck has no codes")


# --------------------------------------------------------------------------- factory + stats


def build_bottleneck(cfg, *, sync_codebook: bool | None = None) -> nn.Module:
    """The bottleneck named by `cfg.bottleneck` (cfg: lapo.config.ModelConfig)."""
    if cfg.bottleneck == "vq":
        return VQBottleneck(
            cfg.latent_dim,
            codebook_size=cfg.vq_codebook_size,
            heads=cfg.vq_heads,
            decay=cfg.vq_decay,
            commitment=cfg.vq_commitment,
            kmeans_init=cfg.vq_kmeans_init,
            dead_code_threshold=cfg.vq_dead_code_threshold,
            cosine=cfg.vq_cosine,
            sync_codebook=sync_codebook,
        )
    if cfg.bottleneck == "fsq":
        return FSQBottleneck(cfg.latent_dim, levels=cfg.fsq_levels)
    if cfg.bottleneck == "continuous":
        return ContinuousBottleneck(
            cfg.latent_dim,
            small_dim=cfg.continuous_dim,
            norm=cfg.continuous_norm,
            noise=cfg.continuous_noise,
        )
    raise ValueError(f"lapo/models/quantizers.py: unknown bottleneck {cfg.bottleneck!r}")


def code_histogram(codes: Tensor, num_codes: int) -> Tensor:
    """(B, heads) long -> (heads, num_codes) float counts; sum these over batches for corpus stats."""
    heads = codes.shape[1]
    counts = codes.new_zeros(heads, num_codes, dtype=torch.float32)  # (heads, num_codes)
    ones = torch.ones_like(codes, dtype=torch.float32)  # (B, heads)
    counts.scatter_add_(1, rearrange(codes, "b h -> h b"), rearrange(ones, "b h -> h b"))
    return counts


def perplexity_from_counts(counts: Tensor) -> Tensor:
    """exp(entropy) of the code distribution, averaged over heads; counts (heads, num_codes)."""
    p = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)  # (heads, num_codes)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)  # (heads,)
    return entropy.exp().mean()


def usage_from_counts(counts: Tensor) -> Tensor:
    """Fraction of codes used at least once, averaged over heads; counts (heads, num_codes)."""
    return (counts > 0).float().mean()


def codebook_stats(codes: Tensor | None, num_codes: int) -> dict[str, Tensor]:
    """Batch perplexity and usage of (B, heads) codes; {} without codes."""
    if not exists(codes) or num_codes <= 0:
        return {}
    counts = code_histogram(codes, num_codes)  # (heads, num_codes)
    return {"perplexity": perplexity_from_counts(counts), "usage": usage_from_counts(counts)}
