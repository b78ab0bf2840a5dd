"""The action head fitted to the agent's own transitions (`self_label_epochs`).

A rollout is a set of labelled transitions that no one had to annotate: the agent knows
which action it took between o[t] and o[t+g]. Before each PPO update, `SelfLabel.fit`
fits the action head to them the way `lapo finetune` fits a decoder to a labelled set:
the frozen LAM's latent of the window (o[t-(k-1)g], ..., o[t], o[t+g]) -> the action
taken at t (cross-entropy, or MSE for a continuous space). PPO then trains the same head
from reward as before. With it off (0 epochs) the head learns from reward alone, as in
LAPO.

The windows come from SB3's rollout buffer before PPO flattens it: observation t holds
o[t-(k-1)g..t] and observation t+g ends with o[t+g]. A transition is used only when no
episode starts in (t, t+g] and t+g is inside the rollout. The head has its own Adam
(the PPO optimizer keeps its own moments for the same weights); its state is part of
the run's checkpoints, so a resumed run continues it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lapo.agent import action_loss, obs_features


def rollout_windows(
    observations: np.ndarray, actions: np.ndarray, episode_starts: np.ndarray, gap: int
) -> tuple[Tensor, Tensor]:
    """Windows and actions of a rollout buffer's transitions.

    observations: (T, N, k, C, S, S) frame stacks (any dtype holding 0..255); actions
    (T, N) or (T, N, A); episode_starts (T, N), 1 where observation t is an episode's first.
    Returns windows (M, k+1, C, S, S) uint8 and actions (M,) or (M, A), env-major.
    """
    t_len = observations.shape[0]
    if t_len <= gap:
        return torch.empty(0), torch.empty(0)
    starts = np.asarray(episode_starts, dtype=bool)  # (T, N)
    # transition t crosses an episode boundary if any of t+1..t+gap starts an episode
    crossed = np.zeros_like(starts[: t_len - gap])  # (T-g, N)
    for d in range(1, gap + 1):
        crossed |= starts[d : t_len - gap + d]
    t_idx, n_idx = np.nonzero(~crossed)  # (M,), (M,)
    obs = torch.from_numpy(np.asarray(observations))
    context = obs[t_idx, n_idx]  # (M, k, C, S, S)
    nxt = obs[t_idx + gap, n_idx, -1:]  # (M, 1, C, S, S)
    windows = torch.cat([context, nxt], dim=1).round().clamp(0, 255).to(torch.uint8)
    acts = torch.from_numpy(np.asarray(actions)[t_idx, n_idx])
    return windows, acts


class SelfLabel:
    """Fits an agent's action head to (LAM latent of the window -> action taken)."""

    def __init__(self, agent, *, epochs: int, batch_size: int, frame_gap: int) -> None:
        if agent.lam is None:
            raise ValueError("lapo/rl/self_label.py: the agent has no LAM to read latents with")
        self.lam, self.use_obs = agent.lam, agent.use_obs_features
        self.head = agent.act_decoder if agent.act_decoder is not None else agent.decoder
        self.epochs, self.batch_size, self.gap = int(epochs), int(batch_size), int(frame_gap)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=1e-3)
        self.generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def _inputs(self, windows: Tensor, device) -> tuple[Tensor, Tensor | None]:
        """(latents (M, D), obs features (M, E) or None) in chunks, the LAM frozen."""
        lat, feats = [], []
        for chunk in windows.split(512):
            chunk = chunk.to(device)
            lat.append(self.lam.encode(chunk)["latent"].float())
            if self.use_obs:
                feats.append(obs_features(self.lam, chunk[:, :-1]).float())
        return torch.cat(lat), (torch.cat(feats) if feats else None)

    def fit(self, buffer, lr: float) -> dict[str, float]:
        """`epochs` passes over the rollout in `buffer` at learning rate `lr`; the mean loss
        (and accuracy, discrete) of the first pass, before each minibatch's step."""
        actions = buffer.actions
        if self.head.discrete:
            actions = actions.reshape(actions.shape[:2])  # (T, N, 1) -> (T, N)
        windows, acts = rollout_windows(buffer.observations, actions, buffer.episode_starts,
                                        self.gap)  # fmt: skip
        if len(windows) == 0 or self.epochs == 0:
            return {}
        device = next(self.head.parameters()).device
        latents, feats = self._inputs(windows, device)  # the LAM is in eval mode (ActorCriticNet)
        acts = acts.to(device)
        if self.head.discrete:
            acts = acts.long()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        losses, hits = [], []
        for epoch in range(self.epochs):
            order = torch.randperm(len(latents), generator=self.generator).to(device)
            for idx in order.split(self.batch_size):
                out = self.head(latents[idx], feats[idx] if feats is not None else None)
                loss = action_loss(out, acts[idx], self.head.discrete)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                if epoch == 0:
                    losses.append(float(loss.detach()))
                    if self.head.discrete:
                        hits.append(float((out.argmax(-1) == acts[idx]).float().mean()))
        stats = {"self_label_loss": float(np.mean(losses))}
        if hits:
            stats["self_label_acc"] = float(np.mean(hits))
        return stats

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
