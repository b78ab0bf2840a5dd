"""What each stage-3 phase trains: a module from a batch to action logits, and its data.

Every objective maps a batch dict (``frames`` (B, k+1, 3, H, W) uint8 and ``actions``, or
precomputed ``latent`` rows) to (B, A): logits for discrete actions, values for
continuous ones; `lapo.agent.action_loss` scores them against ``batch["actions"]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from lapo.agent import obs_features, policy_action_logits
from lapo.config import FinetuneConfig
from lapo.labelled import LabelledWindows
from lapo.models import ActionDecoder, LatentActionModel, LatentPolicy, prepare_frames


class DecoderFit(nn.Module):
    """lapo phase 1: precomputed latents (+ obs features) -> decoder."""

    def __init__(self, decoder: ActionDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, batch: dict) -> Tensor:
        return self.decoder(batch["latent"], batch.get("feats"))  # (B, A)


class PolicyFit(nn.Module):
    """lapo phase 2: context -> policy -> latent (frozen bottleneck) -> decoder, end to end."""

    def __init__(
        self, policy: LatentPolicy, decoder: ActionDecoder, lam: LatentActionModel, use_obs: bool
    ):
        super().__init__()
        self.policy, self.decoder, self.use_obs = policy, decoder, use_obs
        self.frozen = [lam]  # a list keeps the LAM out of parameters(), DDP and checkpoints

    def forward(self, batch: dict) -> Tensor:
        lam, context = self.frozen[0], batch["frames"][:, :-1]  # (B, k, 3, H, W)
        feats = None
        if self.use_obs:
            with torch.no_grad():
                feats = obs_features(lam, context)  # (B, E)
        return policy_action_logits(self.policy, lam, self.decoder, context, feats)  # (B, A)


class IDMFit(nn.Module):
    """idm-supervised: window -> IDM (trained from scratch) -> pre -> decoder."""

    def __init__(self, idm: nn.Module, decoder: ActionDecoder, image_size: int):
        super().__init__()
        self.idm, self.decoder, self.image_size = idm, decoder, image_size

    def forward(self, batch: dict) -> Tensor:
        x = prepare_frames(
            batch["frames"], self.image_size, where="lapo/finetune/objectives.py"
        )  # (B, k+1, 3, S, S)
        _, pre = self.idm(x)  # (B, D)
        return self.decoder(pre)  # (B, A)


class BCFit(nn.Module):
    """bc: context -> policy -> true action."""

    def __init__(self, policy: LatentPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict) -> Tensor:
        return self.policy(batch["frames"][:, :-1])  # (B, A)


class Rows(Dataset):
    """Tensors sharing their first axis, served as dicts (the decoder fit's latents)."""

    def __init__(self, **tensors: Tensor):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.tensors.items()}


@torch.no_grad()
def extract_latents(
    lam: LatentActionModel, ds: LabelledWindows, cfg: FinetuneConfig, device
) -> Rows:
    """The frozen IDM's latents (and obs features) of every window, computed once."""
    lats, feats = [], []
    for i in range(0, len(ds), cfg.eval_batch_size):
        frames = ds.frames[ds.index[i : i + cfg.eval_batch_size]].to(device)  # (B, k+1, 3, H, W)
        lats.append(lam.encode(frames)["latent"].float().cpu())  # (B, D)
        if cfg.use_obs_features:
            feats.append(obs_features(lam, frames[:, :-1]).float().cpu())  # (B, E)
    extra = {"feats": torch.cat(feats)} if feats else {}
    return Rows(latent=torch.cat(lats), actions=ds.actions, **extra)
