"""The actor-critic `lapo rl` trains: a lapo `Agent` (actor) plus a value head (critic).

Actor: the agent's own act path, observations -> latent policy -> latent action -> action
head (`lapo.agent.policy_action_logits`, the same function `Agent.act_logits` calls). The
head is the agent's decoder: a fresh `ActionDecoder` (zero labels) or the decoder of a
`lapo finetune` run (`--init`). `--from-scratch` builds a method-bc agent instead: a
`LatentPolicy` of RUN_P's architecture with fresh weights whose head outputs the actions.

Critic: one linear layer on the features the policy's trunk already computes
(`LatentPolicy.forward_with_features`: one encoder pass serves both).

`LatentActorCritic` is the SB3 `ActorCriticPolicy` around them: SB3's own distributions
(Categorical on logits for Discrete, DiagGaussian around the head's output with a learned
log-std for Box), its rollout buffer, GAE and clipped loss see an ordinary policy. Its
optimizer has one parameter group per part, each with an ``lr_scale`` (`lapo.rl.train`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import Tensor, nn

from lapo.agent import Agent, obs_features, policy_action_logits
from lapo.config import ConfigError, RLConfig
from lapo.models import ActionDecoder
from lapo.runs import (
    build_policy,
    check_policy_run,
    decoder_kwargs,
    load_agent,
    load_policy,
    policy_model_config,
    read_lam,
    read_policy_meta,
)


class _Given:
    """Stands in for the policy in `policy_action_logits`: returns a prediction already made."""

    def __init__(self, pred: Tensor, target: str) -> None:
        self.pred, self.target = pred, target

    def __call__(self, context: Tensor) -> Tensor:
        return self.pred


class ActorCriticNet(nn.Module):
    """Agent (actor) + value head on the policy trunk's features (critic)."""

    def __init__(self, agent: Agent) -> None:
        super().__init__()
        if agent.policy is None:
            raise ValueError("lapo/rl/net.py: the agent needs a policy to act")
        self.agent = agent
        self.value_head = nn.Linear(agent.policy.head[0].in_features, 1)

    def train(self, mode: bool = True) -> ActorCriticNet:
        super().train(mode)
        if self.agent.lam is not None:
            self.agent.lam.eval()  # frozen: no bottleneck noise, no codebook update
        return self

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """obs (B, k, 3, H, W) uint8 -> (action logits (B, A) or mean (B, D), value (B, 1))."""
        agent = self.agent
        pred, feats = agent.policy.forward_with_features(obs)  # (B, out), (B, hidden)
        if agent.method == "bc":
            return pred, self.value_head(feats)
        obs_feats = obs_features(agent.lam, obs) if agent.use_obs_features else None
        decoder = agent.act_decoder if agent.act_decoder is not None else agent.decoder
        given = _Given(pred, agent.policy.target)
        out = policy_action_logits(given, agent.lam, decoder, obs, obs_feats)  # (B, A)
        return out, self.value_head(feats)

    def value(self, obs: Tensor) -> Tensor:
        return self.value_head(self.agent.policy.features(obs))  # (B, 1)

    def param_groups(self, *, policy_scale: float, policy_start: int = 0,
                     freeze_encoder: bool = False, head_scale: float = 1.0) -> list[dict]:  # fmt: skip
        """Adam groups with an ``lr_scale`` and ``start_frames``: the value head at 1 from the
        start, the action head at `head_scale`, the pretrained policy at `policy_scale` from
        `policy_start` frames on. The first group holds the value head (and a log-std)."""
        agent = self.agent
        heads = [*self.value_head.parameters()]
        decoders = []
        for dec in (agent.decoder, agent.act_decoder):
            decoders += [*dec.parameters()] if dec is not None else []
        if agent.method == "bc":  # from scratch: the whole policy is new
            return [{"params": heads + decoders + [*agent.policy.parameters()], "lr_scale": 1.0}]
        if agent.lam is not None:
            agent.lam.requires_grad_(False)
        policy = [*agent.policy.head.parameters()]
        if freeze_encoder:
            agent.policy.encoder.requires_grad_(False)
        else:
            policy += [*agent.policy.encoder.parameters()]
        return [
            {"params": heads, "lr_scale": 1.0},
            {"params": decoders, "lr_scale": float(head_scale)},
            {"params": policy, "lr_scale": float(policy_scale), "start_frames": int(policy_start)},
        ]


class LatentActorCritic(ActorCriticPolicy):
    """SB3 policy over an `ActorCriticNet` (built by lapo, not by SB3's `_build`)."""

    def __init__(self, observation_space, action_space, lr_schedule, *, net: ActorCriticNet,
                 policy_scale: float = 1.0, policy_start: int = 0, freeze_encoder: bool = False,
                 head_scale: float = 1.0, log_std_init: float = 0.0, **kwargs) -> None:  # fmt: skip
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)
        self.net = net
        groups = net.param_groups(policy_scale=policy_scale, policy_start=policy_start,
                                  freeze_encoder=freeze_encoder, head_scale=head_scale)  # fmt: skip
        if isinstance(self.action_dist, DiagGaussianDistribution):
            dim = int(spaces.flatdim(action_space))
            self.log_std = nn.Parameter(torch.full((dim,), float(log_std_init)))
            groups[0]["params"].append(self.log_std)
        self.optimizer = self.optimizer_class(groups, lr=lr_schedule(1), **self.optimizer_kwargs)

    def _build(self, lr_schedule) -> None:
        """Nothing: SB3's MLP extractor and heads are replaced by `net` (see __init__)."""

    def _dist(self, out: Tensor):
        if isinstance(self.action_dist, DiagGaussianDistribution):
            return self.action_dist.proba_distribution(out.float(), self.log_std)
        return self.action_dist.proba_distribution(action_logits=out.float())

    def forward(self, obs: Tensor, deterministic: bool = False):
        out, values = self.net(obs)
        dist = self._dist(out)
        actions = dist.get_actions(deterministic=deterministic)
        log_prob = dist.log_prob(actions)
        return actions.reshape((-1, *self.action_space.shape)), values, log_prob

    def evaluate_actions(self, obs: Tensor, actions: Tensor):
        out, values = self.net(obs)
        dist = self._dist(out)
        return values, dist.log_prob(actions), dist.entropy()

    def get_distribution(self, obs: Tensor):
        return self._dist(self.net(obs)[0])

    def predict_values(self, obs: Tensor) -> Tensor:
        return self.net.value(obs)


# --------------------------------------------------------------------------- the agent


def action_space_dict(space) -> dict:
    from gymnasium import spaces

    if isinstance(space, spaces.Discrete):
        return {"type": "discrete", "n": int(space.n)}
    if isinstance(space, spaces.Box):
        return {"type": "continuous", "dim": int(spaces.flatdim(space))}
    raise ConfigError(f"--env: action space {space} is neither Discrete nor Box")


def _zero_last(layer: torch.nn.Linear) -> None:
    """A new head starts at zero output: a uniform (or zero-mean) first policy, as LAPO's own."""
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()


def build_agent(policy_run, space: dict, cfg: RLConfig, *, init=None, from_scratch=False):
    """(Agent to train, the keyword arguments `save_agent` needs to write it)."""
    meta = read_policy_meta(policy_run)
    pconfig, kw = policy_model_config(policy_run), meta["extra"]["kwargs"]
    common = {"action_space": space, "context": int(kw["context"]),
              "frame_gap": int(meta["extra"].get("frame_gap", 1))}  # fmt: skip
    n = space["n"] if space["type"] == "discrete" else space["dim"]
    if from_scratch:  # RUN_P's architecture, fresh weights, its head outputs the actions
        pcfg = {**pconfig, "target": "continuous"}
        policy = build_policy(pcfg, {**kw, "latent_dim": n, "num_codes": 0, "code_heads": 0})
        _zero_last(policy.head[-1])
        return Agent(method="bc", policy=policy, **common), {"policy_config": pcfg}
    lam_run = meta["extra"]["lam"]["run"]
    lam_meta = read_lam(lam_run)
    check_policy_run(policy_run, lam_meta)
    lam = lam_meta.load().requires_grad_(False)
    latent_dim = int(lam.cfg.latent_dim)
    if init:
        ft = load_agent(init)
        if ft.method != "lapo":
            raise ConfigError(f"--init {init}: a {ft.method} run has no latent-action decoder")
        if ft.action_space != space:
            raise ConfigError(f"--init {init}: its action space {ft.action_space} differs from "
                              f"the env's {space}")  # fmt: skip
        theirs = ft.info.get("lam_run")
        if theirs and Path(theirs).resolve() != Path(lam_run).resolve():
            raise ConfigError(f"--init {init} decodes the latents of the LAM {theirs}, but "
                              f"--policy {policy_run} clones {lam_run}")  # fmt: skip
        decoder = copy.deepcopy(ft.act_decoder if ft.act_decoder is not None else ft.decoder)
        if decoder_kwargs(decoder)["latent_dim"] != latent_dim:
            raise ConfigError(f"--init {init}: its decoder takes latents of another size than "
                              f"{latent_dim}")  # fmt: skip
        use_obs = ft.use_obs_features
    else:
        d = (n, 0) if space["type"] == "discrete" else (0, n)
        decoder = ActionDecoder(latent_dim, num_actions=d[0], action_dim=d[1],
                                hidden=cfg.head_hidden)  # fmt: skip
        _zero_last(decoder.net[-1])
        use_obs = False
    agent = Agent(method="lapo", lam=lam, decoder=decoder, policy=load_policy(policy_run),
                  use_obs_features=use_obs, **common)  # fmt: skip
    saves = {"lam_config": lam_meta.config["model"], "lam_kwargs": lam_meta.kwargs,
             "policy_config": pconfig}  # fmt: skip
    return agent, saves
