"""What a stage-3 method trains: the agent it builds and the phases that fit it.

- ``lapo``: a decoder from the frozen IDM's latents (computed once), then, with a policy
  and ``finetune_policy``, policy + a copy of that decoder end to end.
- ``idm-supervised``: an IDM of the LAM's architecture trained from scratch on the labels.
- ``bc``: a policy network cloning the true actions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

from torch import nn

from lapo.agent import Agent
from lapo.config import ConfigError, FinetuneConfig, to_dict
from lapo.finetune.loop import Phase
from lapo.finetune.objectives import BCFit, DecoderFit, IDMFit, PolicyFit, extract_latents
from lapo.labelled import LabelledSplit
from lapo.models import ActionDecoder, LatentActionModel, LatentPolicy
from lapo.runs import LamRun, load_policy, policy_model_config
from lapo.shards import recorded_env_kwargs


@dataclass
class Plan:
    """Everything one run trains and saves."""

    agent: Agent
    phases: list[Phase]
    lam_config: dict | None = None
    lam_kwargs: dict | None = None
    policy_config: dict | None = None


def window_shape(cfg: FinetuneConfig, lam: LamRun | None) -> tuple[int, int]:
    """(context k, frame_gap) of the windows: the LAM's when there is one (lapo, and
    idm-supervised started from a LAM's IDM), else the config's (or 2, 1)."""
    if lam is None:
        return cfg.context or 2, cfg.frame_gap or 1
    for key in ("context", "frame_gap"):
        mine, theirs = getattr(cfg, key), getattr(lam, key)
        if mine and mine != theirs:
            raise ConfigError(
                f"finetune.{key}: {mine} differs from the LAM's {theirs} ({lam.path}); leave it 0"
            )
    return lam.context, lam.frame_gap


def make_decoder(
    cfg: FinetuneConfig, space: dict, latent_dim: int, obs_dim: int = 0
) -> ActionDecoder:
    """A fresh ActionDecoder from `latent_dim` (+ `obs_dim`) to the actions of `space`."""
    n, d = (space["n"], 0) if space["type"] == "discrete" else (0, space["dim"])
    return ActionDecoder(
        latent_dim, num_actions=n, action_dim=d, hidden=cfg.decoder_hidden, obs_dim=obs_dim
    )


def make_plan(
    cfg: FinetuneConfig,
    split: LabelledSplit,
    lam_run: LamRun | None,
    policy_run: str | None,
    device,
) -> Plan:
    """The agent of `cfg.method` and its phases on `split` (LAM and policy moved to `device`)."""
    space, k = split.action_space, split.train.index.shape[1] - 1
    dataset = split.selection.info["dataset"]
    info = {"labeled": dataset, "label_budget": split.selection.info["budget"], "lam_run": lam_run and str(lam_run.path),
            "policy_run": policy_run, "policy_finetuned": False, "image_shape": list(split.image_shape),
            "env_kwargs": recorded_env_kwargs(dataset)}  # fmt: skip
    common = {"action_space": space, "context": k, "frame_gap": cfg.frame_gap or 1, "info": info}
    if cfg.method == "bc":
        n = space["n"] if space["type"] == "discrete" else space["dim"]
        pcfg = replace(cfg.policy, target="continuous")  # its "latent" is the action itself
        policy = LatentPolicy(pcfg, context=k, image_size=cfg.model.image_size, latent_dim=n)
        phase = Phase(
            "bc", lambda: BCFit(policy), split.train, split.val, cfg.epochs, cfg.lr, "act"
        )
        return Plan(
            Agent(method="bc", policy=policy, **common), [phase], policy_config=to_dict(pcfg)
        )
    if cfg.method == "idm-supervised":
        if lam_run is None:  # VPT's baseline: an IDM from random weights
            kwargs, model_config = {"in_channels": 3, "num_actions": 0, "action_dim": 0, "context": k}, to_dict(cfg.model)  # fmt: skip
            lam = LatentActionModel(cfg.model, **kwargs, sync_codebook=False)
        else:  # the stage-1 IDM, its architecture and weights, trained on the labels from there
            kwargs, model_config = lam_run.kwargs, lam_run.config["model"]
            lam = lam_run.load().train()
            common["frame_gap"], info["idm_init_sha256"] = lam_run.frame_gap, lam_run.sha256()
        decoder = make_decoder(cfg, space, lam.cfg.latent_dim)
        phase = Phase("idm", lambda: IDMFit(lam.idm, decoder, lam.image_size), split.train, split.val, cfg.epochs, cfg.lr, "label")  # fmt: skip
        agent = Agent(method="idm-supervised", lam=lam, decoder=decoder, **common)
        return Plan(agent, [phase], model_config, kwargs)
    common["frame_gap"] = lam_run.frame_gap
    lam = lam_run.load().to(device).requires_grad_(False)
    obs_dim = lam.cfg.embed_dim if cfg.use_obs_features else 0
    decoder = make_decoder(cfg, space, lam.cfg.latent_dim, obs_dim)
    train, val = (extract_latents(lam, ds, cfg, device) for ds in (split.train, split.val))
    phases = [
        Phase("decoder", lambda: DecoderFit(decoder), train, val, cfg.epochs, cfg.lr, "label")
    ]
    policy, pconfig = None, None
    if policy_run:
        policy, pconfig = load_policy(policy_run), policy_model_config(policy_run)
    agent = Agent(method="lapo", lam=lam, decoder=decoder, policy=policy,
                  use_obs_features=cfg.use_obs_features, **common)  # fmt: skip
    if policy is not None and cfg.finetune_policy:
        info["policy_finetuned"] = True

        def policy_phase() -> nn.Module:
            # a copy of the fitted decoder learns with the policy; label() keeps the original
            agent.act_decoder = copy.deepcopy(decoder)
            return PolicyFit(policy.to(device), agent.act_decoder, lam, cfg.use_obs_features)

        epochs = cfg.policy_epochs or cfg.epochs
        phases.append(
            Phase("policy", policy_phase, split.train, split.val, epochs, cfg.policy_lr, "act")
        )
    return Plan(agent, phases, lam_run.config["model"], lam_run.kwargs, pconfig)
