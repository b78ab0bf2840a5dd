"""Stage 1's validation pass: what one batch cannot show, summed over the whole pass.

Per rank, `ValidationSums` keeps the sums of the loss terms, the code histogram, the sums
of the health checks (`lapo.health`: the world model's error with each window's z[t],
another window's and zeros; the moments of z[t]) and the latents of the windows that carry
a true action. Ranks may hold different numbers of val batches (few val shards, many
ranks), so nothing here runs a collective per batch: `ValidationSums.finish` exchanges the
sums once, on every rank, at the end of the pass, and rank zero gets every rank's latents
for the probe (`probe_scores`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lapo.health import latent_gain_db, latent_spread
from lapo.models import (
    LatentActionModel,
    code_histogram,
    perplexity_from_counts,
    psnr_from_mse,
    usage_from_counts,
)
from lapo.probe import fit_probe
from lapo.windows import still_transitions


class ValidationSums:
    """One rank's sums over a validation pass of stage 1 (`add` per batch, `finish` once)."""

    def __init__(self, still_threshold: float = 0.5) -> None:
        self.still_threshold = still_threshold  # data.still_threshold, grey levels
        self.sums: dict[str, float] = {}  # loss term -> sum over windows
        self.n = 0  # windows
        self.counts: Tensor | None = None  # (heads, num_codes) code histogram
        self.health: dict = {}  # sums for the health checks
        self.probe: list = []  # (latents, actions, keys, starts) of windows with an action

    def add(
        self, model: LatentActionModel, batch: dict, logs: dict, enc: dict, batch_idx: int
    ) -> None:
        """One val batch: its `model.loss` logs and `model.encode` of its frames."""
        frames = batch["frames"]  # (B, k+1, C, H, W) uint8
        actions, has_action = batch.get("actions"), batch.get("has_action")
        b = frames.shape[0]
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * b
        pair = frames[:, -2:].cpu().numpy()  # (B, 2, C, H, W) uint8: o[t], o[t+1]
        still = float(still_transitions(pair[:, 0], pair[:, 1], self.still_threshold).sum())
        self.sums["still_share"] = self.sums.get("still_share", 0.0) + still
        self.n += b
        codes = enc["codes"]  # (B, heads) long or None
        if codes is not None and model.num_codes > 0:
            counts = code_histogram(codes, model.num_codes).cpu()  # (heads, num_codes)
            self.counts = counts if self.counts is None else self.counts + counts
        self._add_health(model, frames, enc["latent"], batch_idx)
        if actions is not None and has_action is not None and bool(has_action.any()):
            keep = has_action.bool()  # (B,)
            keys = [k for k, m in zip(batch.get("key", [""] * b), keep.tolist()) if m]
            starts = batch.get("start")
            starts = [int(s) for s in starts[keep.cpu().numpy()]] if starts is not None else None
            self.probe.append(
                (enc["latent"][keep].float().cpu(), actions[keep].cpu(), keys, starts)
            )

    def _add_health(
        self, model: LatentActionModel, frames: Tensor, latent: Tensor, batch_idx: int
    ) -> None:
        """World-model error with true/shuffled/zeroed z, and the moments of z."""
        h, b = self.health, latent.shape[0]
        # every rank runs the same forward passes per batch, whatever its size (FSDP)
        errors = model.latent_dependence(frames, latent, seed=batch_idx)
        if b >= 2:  # one window has no other window's latent to borrow
            for k, v in errors.items():
                h[k] = h.get(k, 0.0) + float(v) * b
            h["n"] = h.get("n", 0) + b
        z = latent.detach().double().cpu()  # (B, D)
        h["z_sum"] = h.get("z_sum", 0.0) + z.sum(0)  # (D,)
        h["z_sq"] = h.get("z_sq", 0.0) + z.pow(2).sum(0)  # (D,)
        h["z_n"] = h.get("z_n", 0) + b

    def finish(self) -> tuple[dict[str, float], list | None]:
        """(metrics of the whole pass, the same on every rank; the probe's windows of every
        rank on rank zero, None on the others). Every rank must call it."""
        parts = all_gather((self.sums, self.n, self.counts, self.health))
        val: dict[str, float] = {}
        n = sum(p[1] for p in parts)
        if n > 0:
            for k in sorted({k for p in parts for k in p[0]}):
                val[k] = sum(p[0].get(k, 0.0) for p in parts) / n
            # PSNRs of the error pooled over the pass, not means of each batch's PSNR
            for name, mse in (("psnr", "pred_mse"), ("psnr_copy", "copy_mse")):
                if mse in val:
                    val[name] = float(psnr_from_mse(val[mse]))
        counts = [p[2] for p in parts if p[2] is not None]
        if counts:
            total = torch.stack(counts).sum(0)  # (heads, num_codes) over the whole val pass
            val["codebook_perplexity"] = float(perplexity_from_counts(total))
            val["codebook_usage"] = float(usage_from_counts(total))
        val.update(health_metrics([p[3] for p in parts]))
        return val, gather_to_zero(self.probe)


def health_metrics(parts: list[dict]) -> dict[str, float]:
    """Every rank's health sums -> val metrics (latent_gain_db, latent_spread, ...)."""
    sums: dict = {}
    for part in parts:
        for k, v in part.items():
            sums[k] = sums.get(k, 0.0) + v
    out: dict[str, float] = {}
    n = sums.pop("n", 0)
    z_sum, z_sq, z_n = sums.pop("z_sum", None), sums.pop("z_sq", None), sums.pop("z_n", 0)
    if n:
        means = {k: float(v) / n for k, v in sums.items()}
        for k, v in means.items():
            if k.startswith("mse_"):  # the pooled error, as dB (val/psnr_shuffled, ...)
                out["psnr" + k[3:]] = float(psnr_from_mse(v))
            elif k.endswith(("_shuffled", "_zeroed")):
                out[k] = v
        for name, suffix in (("latent_gain_db", "_shuffled"), ("latent_zero_gain_db", "_zeroed")):
            gain = latent_gain_db(means, suffix)
            if gain is not None:
                out[name] = gain
    if z_n >= 2:
        out["latent_spread"] = latent_spread(z_sum, z_sq, z_n)
    return out


def probe_scores(
    collected: list, *, num_actions: int, seed: int, device: torch.device
) -> dict[str, float]:
    """The latent -> true action probe fitted on the gathered val windows ({} without any)."""
    if not collected:
        return {}
    latents = torch.cat([c[0] for c in collected])  # (N, D)
    actions = torch.cat([c[1] for c in collected])  # (N,) or (N, A)
    keys = [k for c in collected for k in c[2]]
    # the val pass repeats windows when the held-out data is short: each counts once
    ids = None
    if all(keys) and all(c[3] is not None for c in collected):
        ids = list(zip(keys, (s for c in collected for s in c[3])))
    return fit_probe(
        latents.to(device),
        actions.to(device),
        num_actions=num_actions,
        keys=keys if all(keys) else None,
        windows=ids,
        seed=seed,
    )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather(obj: object) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] without a process group)."""
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_zero(items: list) -> list | None:
    """All ranks' `items` concatenated on rank 0 (None on the other ranks)."""
    if not _distributed():
        return items
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(items, out, dst=0)
    if dist.get_rank() != 0:
        return None
    return [x for part in out for x in part]
