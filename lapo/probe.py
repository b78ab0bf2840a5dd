"""Linear-ish probes: how much of the true action a latent action carries.

A small MLP is fitted from latent actions z[t] to true actions a[t] on one part of a
set of windows and scored on the rest. The majority-class (or mean-action) score on
the same held-out part is the baseline a useful latent must beat.

A window seen on both sides of the split is memorised, not generalised, so:
- repeated windows (same ``windows`` id, e.g. clip key and start) count once: stage 1's
  validation repeats windows when the held-out data holds fewer than ``data.val_batches``
  batches (a 4-episode shard gave a probe of 0.61 where the same latents scored 0.13-0.19
  without repeats);
- neighbouring windows share frames (and, under a sticky policy, actions), so with keys
  the split holds out whole sources (episodes, videos) when there are at least
  `MIN_GROUPS` of them, else whole clips, and only then single windows.

Used online during stage-1 validation (`lapo.lam`) and offline by `lapo evaluate`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def source_of(key: str) -> str:
    """``<source-stem>__c00012`` -> ``<source-stem>`` (the shard format's clip key)."""
    return key.rsplit("__c", 1)[0]


MIN_GROUPS = 5  # fewest sources (or clips) for a grouped split to be meaningful


def split_indices(
    n: int, *, keys: Sequence[str] | None = None, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """(train_idx, test_idx) over n items: whole sources, else whole clips, to one side
    when the keys allow it (see the module docstring); else single items."""
    g = torch.Generator().manual_seed(seed)
    for group_of in (source_of, str) if keys is not None else ():
        groups = sorted({group_of(k) for k in keys})
        if len(groups) >= MIN_GROUPS:
            order = torch.randperm(len(groups), generator=g).tolist()
            n_test = max(1, round(test_fraction * len(groups)))
            held = {groups[i] for i in order[:n_test]}
            is_test = torch.tensor([group_of(k) in held for k in keys])
            return (~is_test).nonzero().flatten(), is_test.nonzero().flatten()
    perm = torch.randperm(n, generator=g)
    n_test = max(1, round(test_fraction * n))
    return perm[n_test:], perm[:n_test]


def first_occurrences(windows: Sequence[Hashable]) -> list[int]:
    """Indices, in order, of the first occurrence of each window id."""
    seen: set = set()
    out = []
    for i, w in enumerate(windows):
        if w not in seen:
            seen.add(w)
            out.append(i)
    return out


def _mlp(d_in: int, d_out: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def fit_probe(
    latents: Tensor,
    actions: Tensor,
    *,
    num_actions: int = 0,
    keys: Sequence[str] | None = None,
    windows: Sequence[Hashable] | None = None,
    steps: int = 300,
    hidden: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    min_samples: int = 20,
) -> dict[str, float]:
    """Fit latents (N, D) -> actions and score it on a held-out split.

    Discrete actions (N,) int64 with `num_actions` > 0 give ``probe_acc`` and
    ``probe_majority``; continuous (N, A) float give ``probe_mse`` and
    ``probe_mse_mean`` (predicting the training mean). Returns {} with fewer than
    `min_samples` windows. `windows`: an id per row (e.g. (clip key, start)); rows with
    an id seen before are dropped. Runs on the latents' device with gradients enabled,
    so it may be called from inside a validation loop.
    """
    if windows is not None:  # repeated windows count once (module docstring)
        keep = first_occurrences(windows)
        if len(keep) < latents.shape[0]:
            idx = torch.as_tensor(keep, device=latents.device)
            latents, actions = latents[idx], actions[idx]
            keys = [keys[i] for i in keep] if keys is not None else None
    n = latents.shape[0]
    if n < min_samples:
        return {}
    train_idx, test_idx = split_indices(n, keys=keys, seed=seed)
    device = latents.device
    train_idx, test_idx = train_idx.to(device), test_idx.to(device)
    # clone: tensors made under inference_mode cannot take part in autograd
    with torch.inference_mode(False), torch.enable_grad():
        x = latents.detach().float().clone()  # (N, D)
        y = actions.detach().clone()  # (N,) or (N, A)
        mean, std = x[train_idx].mean(0), x[train_idx].std(0).clamp_min(1e-6)
        x = (x - mean) / std  # (N, D) standardised with training statistics only
        discrete = num_actions > 0 and not y.is_floating_point()
        d_out = num_actions if discrete else (y.shape[1] if y.ndim == 2 else 1)
        y = y.long() if discrete else y.float().reshape(n, d_out)  # (N,) or (N, A)
        # a fixed init that neither reads nor advances the training run's RNG stream
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            probe = _mlp(x.shape[1], d_out, hidden).to(device)
        opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
        xt, yt = x[train_idx], y[train_idx]
        for _ in range(steps):
            out = probe(xt)  # (Ntr, d_out)
            loss = F.cross_entropy(out, yt) if discrete else F.mse_loss(out, yt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            out = probe(x[test_idx])  # (Nte, d_out)
            ye = y[test_idx]
            if discrete:
                majority = torch.bincount(yt, minlength=num_actions).argmax()
                return {
                    "probe_acc": (out.argmax(-1) == ye).float().mean().item(),
                    "probe_majority": (ye == majority).float().mean().item(),
                    "probe_n": float(n),
                }
            return {
                "probe_mse": F.mse_loss(out, ye).item(),
                "probe_mse_mean": F.mse_loss(yt.mean(0, keepdim=True).expand_as(ye), ye).item(),
                "probe_n": float(n),
            }
