"""Trained run directories, read and written without Lightning.

| stage                        | files                                | loader              |
| ---------------------------- | ------------------------------------ | ------------------- |
| 1 (`lapo pretrain`)          | `model.safetensors` + `model.json`   | `load_lam`          |
| 2 (`lapo train-policy`)      | `policy.safetensors` + `policy.json` | `load_policy`       |
| 3 (`lapo finetune`, `rl`)    | `agent.safetensors` + `agent.json`   | `load_agent`        |
| 3 (`--label-budgets`)        | `budgets.json` + a run per budget    | `read_budget_curve` |

Weights are safetensors and settings JSON (`export_model`, `save_agent`), written with
`lapo.io.atomic_write`; loading them runs no pickle, so a run directory can be shared and
opened safely. A stage-1 run's model.json is parsed in one place, `read_lam`: whatever
depends on a LAM (its window, frame size, weights' hash) reads the `LamRun` it returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model
from torch import Tensor, nn

from lapo.agent import Agent, AgentError
from lapo.checkpoint import CheckpointError
from lapo.config import ConfigError, ModelConfig, PolicyModelConfig, from_dict
from lapo.io import atomic_write, atomic_write_json, file_sha256
from lapo.models import ActionDecoder, LatentActionModel, LatentPolicy

EXPORT_FORMAT_VERSION = 1
LAM_KIND = "lam"  # RUN/model.safetensors + RUN/model.json
POLICY_KIND = POLICY_NAME = "policy"  # RUN_P/policy.safetensors + RUN_P/policy.json
AGENT_WEIGHTS, AGENT_META = "agent.safetensors", "agent.json"
AGENT_FORMAT_VERSION = 1
BUDGET_CURVE = "budgets.json"  # DIR/budgets.json of `lapo finetune --label-budgets`


# --------------------------------------------------------------------------- exported models


def export_model(
    run_dir: str | Path,
    model: nn.Module,
    *,
    kind: str,
    config: dict,
    extra: dict | None = None,
    state_dict: dict[str, Tensor] | None = None,
    name: str = "model",
) -> Path:
    """Write ``RUN/model.safetensors`` and ``RUN/model.json`` (``RUN/<name>.*`` with `name`).

    `kind` names the class that reads it back (``"lam"``, ``"policy"``, ...); `config`
    is the plain dict of settings that rebuilds the module; `extra` holds anything else
    its constructor needs (e.g. ``num_actions``). `state_dict`, when given, replaces
    ``model.state_dict()`` (FSDP gathers the full one outside the module).
    """
    run_dir = Path(run_dir)
    state = model.state_dict() if state_dict is None else state_dict
    # safetensors refuses tensors that share memory (tied weights); a private copy of
    # each breaks the sharing, and loading both names into the tied module is harmless.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    weights = f"{name}.safetensors"
    atomic_write(run_dir / weights, lambda tmp: save_file(tensors, str(tmp), {"kind": kind}))
    meta = {
        "format_version": EXPORT_FORMAT_VERSION,
        "kind": kind,
        "config": config,
        "extra": extra or {},
        "weights": weights,
    }
    atomic_write_json(run_dir / f"{name}.json", meta)
    return run_dir / weights


def read_model_meta(run_dir: str | Path, kind: str | None = None, *, name: str = "model") -> dict:
    """Read ``RUN/model.json`` (``RUN/<name>.json``); with `kind`, check the kind of model."""
    path = Path(run_dir) / f"{name}.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist: {run_dir} holds no exported model (did training finish?)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format_version") != EXPORT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {meta.get('format_version')} is not supported"
        )
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{path}: holds a {meta.get('kind')!r} model, expected {kind!r}")
    return meta


def load_weights(
    model: nn.Module, run_dir: str | Path, *, strict: bool = True, name: str = "model"
) -> None:
    """Fill `model` from ``RUN/model.safetensors`` (``RUN/<name>.safetensors``; no pickle)."""
    path = Path(run_dir) / f"{name}.safetensors"
    missing, unexpected = _fill(model, path, CheckpointError)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path} does not match {type(model).__name__}: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )


def _fill(module: nn.Module, path: Path, error: type[Exception]) -> tuple[list, list]:
    """Load the safetensors file `path` into `module`: (missing, unexpected) keys. A file that
    is absent or not safetensors raises `error` naming it."""
    if not path.is_file():
        raise error(f"{path} does not exist")
    try:
        return load_model(module, str(path), strict=False)
    except SafetensorError as e:  # not safetensors (e.g. a pickle renamed): never unpickled
        raise error(f"{path}: not a safetensors file ({e})") from None


# --------------------------------------------------------------------------- stage 1: the LAM


@dataclass(frozen=True)
class LamRun:
    """A stage-1 run as its model.json describes it (`read_lam`)."""

    path: Path
    """The run directory, as given."""
    config: dict
    """Its PretrainConfig as a plain dict; ``config["model"]`` rebuilds the LatentActionModel."""
    kwargs: dict
    """The LatentActionModel's other constructor arguments (in_channels, num_actions, ...)."""
    weights: Path
    """RUN/model.safetensors."""
    context: int
    """k: the IDM sees windows o[t-k+1..t+1]."""
    frame_gap: int
    """Frames between two consecutive frames of a window."""
    image_size: int
    """Side of the square frames the model sees."""
    bottleneck: str
    """continuous, vq or fsq."""
    latent_dim: int
    in_channels: int
    dataset: str | None
    """The dataset it was trained on (data.path)."""

    def sha256(self) -> str:
        """Hex SHA-256 of the weights: which LAM a policy or agent was built on."""
        return file_sha256(self.weights)

    def load(self, map_location: str | torch.device = "cpu") -> LatentActionModel:
        """The trained LatentActionModel, in eval mode, from its safetensors (no pickle)."""
        model = build_lam(self.config["model"], self.kwargs)
        load_weights(model, self.path)
        return model.to(map_location).eval()


def read_lam(run_dir: str | Path) -> LamRun:
    """Parse ``RUN/model.json`` of a stage-1 run, checking that it holds a LAM."""
    meta = read_model_meta(run_dir, kind=LAM_KIND)
    config, kwargs, model = meta["config"], meta["extra"], meta["config"]["model"]
    data = config.get("data", {})
    return LamRun(
        path=Path(run_dir),
        config=config,
        kwargs=kwargs,
        weights=Path(run_dir) / meta["weights"],
        context=int(kwargs["context"]),
        frame_gap=int(data.get("frame_gap", 1)),
        image_size=int(model["image_size"]),
        bottleneck=model["bottleneck"],
        latent_dim=int(model["latent_dim"]),
        in_channels=int(kwargs.get("in_channels", 3)),
        dataset=data.get("path"),
    )


def load_lam(run_dir: str | Path, map_location: str | torch.device = "cpu") -> LatentActionModel:
    """The trained LatentActionModel of a stage-1 run, in eval mode, from RUN/model.{json,safetensors}."""
    return read_lam(run_dir).load(map_location)


def build_lam(config: dict, kwargs: dict) -> LatentActionModel:
    """A LatentActionModel from its ModelConfig dict and constructor arguments (no codebook sync)."""
    cfg = from_dict(ModelConfig, config, prefix="model")
    return LatentActionModel(cfg, **kwargs, sync_codebook=False)


def lam_info(lam: LamRun) -> dict[str, Any]:
    """What policy.json and stage 2's checkpoints record about the LAM: where, which, its shape."""
    return {
        "run": str(lam.path.resolve()),
        "sha256": lam.sha256(),
        "bottleneck": lam.bottleneck,
        "latent_dim": lam.latent_dim,
        "in_channels": lam.in_channels,
        "context": lam.context,
        "frame_gap": lam.frame_gap,
        "image_size": lam.image_size,
    }


# --------------------------------------------------------------------------- stage 2: the policy


def read_policy_meta(run_dir: str | Path) -> dict:
    """``RUN_P/policy.json``: config (PolicyConfig), extra (kwargs, target, frame_gap, lam)."""
    return read_model_meta(run_dir, kind=POLICY_KIND, name=POLICY_NAME)


def policy_model_config(run_dir: str | Path) -> dict:
    """The PolicyModelConfig of a stage-2 run as a plain dict (rebuilds its LatentPolicy)."""
    return read_policy_meta(run_dir)["config"]["policy"]


def check_policy_run(policy_run: str | Path, lam: LamRun) -> None:
    """The stage-2 policy must have been cloned from this very LAM (same weights)."""
    trained_on = read_policy_meta(policy_run)["extra"].get("lam", {})
    if trained_on.get("sha256") not in (None, lam.sha256()):
        raise ConfigError(
            f"--policy {policy_run} was cloned from the LAM {trained_on.get('run')}, whose weights "
            f"differ from --lam {lam.path}; its latent actions would mean something else"
        )


def load_policy(run_dir: str | Path, map_location: str | torch.device = "cpu") -> LatentPolicy:
    """The trained LatentPolicy of a stage-2 run, in eval mode, from RUN_P/policy.{json,safetensors}."""
    meta = read_policy_meta(run_dir)
    policy = build_policy(meta["config"]["policy"], meta["extra"]["kwargs"])
    load_weights(policy, run_dir, name=POLICY_NAME)
    return policy.to(map_location).eval()


def build_policy(config: dict, kwargs: dict) -> LatentPolicy:
    """A LatentPolicy from its PolicyModelConfig dict and constructor arguments."""
    return LatentPolicy(from_dict(PolicyModelConfig, config, prefix="policy"), **kwargs)


def policy_kwargs(policy: LatentPolicy) -> dict:
    """The constructor arguments of `policy` besides its config (read back from the module)."""
    return {
        "context": policy.context,
        "image_size": policy.image_size,
        "latent_dim": policy.latent_dim,
        "num_codes": policy.num_codes,
        "code_heads": policy.code_heads,
    }


def policy_extra(policy: LatentPolicy, lam_info: dict) -> dict:
    """policy.json's ``extra``: the constructor arguments and where the labels came from."""
    return {
        "kwargs": {**policy_kwargs(policy), "in_channels": lam_info["in_channels"]},
        "target": policy.target,
        "frame_gap": lam_info["frame_gap"],
        "lam": lam_info,
    }


# --------------------------------------------------------------------------- stage 3: the agent


def decoder_kwargs(decoder: ActionDecoder) -> dict:
    """The constructor arguments of `decoder` (read back from the module)."""
    first = decoder.net[0]
    return {
        "latent_dim": first.in_features - decoder.obs_dim,
        "num_actions": decoder.num_actions,
        "action_dim": decoder.action_dim,
        "hidden": first.out_features,
        "obs_dim": decoder.obs_dim,
    }


def save_agent(
    agent: Agent,
    run_dir: str | Path,
    *,
    lam_config: dict | None = None,
    lam_kwargs: dict | None = None,
    policy_config: dict | None = None,
) -> Path:
    """Write RUN/agent.safetensors + RUN/agent.json (atomically); returns the json path.

    `lam_config` / `policy_config` are the ModelConfig / PolicyModelConfig dicts that
    rebuild the parts; `lam_kwargs` the LatentActionModel's other constructor arguments.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": AGENT_FORMAT_VERSION,
        "kind": "agent",
        "method": agent.method,
        "action_space": agent.action_space,
        "context": agent.context,
        "frame_gap": agent.frame_gap,
        "use_obs_features": agent.use_obs_features,
        "lam": None,
        "decoder": None,
        "act_decoder": None,
        "policy": None,
        "info": agent.info,
    }
    if agent.lam is not None:
        if lam_config is None or lam_kwargs is None:
            raise AgentError("lapo/runs.py: save_agent needs lam_config and lam_kwargs for the LAM")
        meta["lam"] = {"config": lam_config, "kwargs": lam_kwargs}
    for name in ("decoder", "act_decoder"):
        if getattr(agent, name) is not None:
            meta[name] = {"kwargs": decoder_kwargs(getattr(agent, name))}
    if agent.policy is not None:
        if policy_config is None:
            raise AgentError("lapo/runs.py: save_agent needs policy_config for the policy")
        meta["policy"] = {"config": policy_config, "kwargs": policy_kwargs(agent.policy)}
    # save_model copes with tied weights; tensors go to CPU first so any device works
    cpu = {k: v.detach().cpu() for k, v in agent.state_dict().items()}
    holder = _Holder(cpu)
    atomic_write(run_dir / AGENT_WEIGHTS, lambda t: save_model(holder, str(t), {"kind": "agent"}))
    return atomic_write_json(run_dir / AGENT_META, meta)


class _Holder(nn.Module):
    """A module whose state dict is the given tensors (what save_model serialises)."""

    def __init__(self, tensors: dict[str, Tensor]):
        super().__init__()
        self._tensors = tensors

    def state_dict(self, *args, **kwargs):  # noqa: D102 - the tensors as they were given
        return dict(self._tensors)


def read_agent_meta(run_dir: str | Path) -> dict:
    """RUN/agent.json, checked for the format version."""
    path = Path(run_dir) / AGENT_META
    if not path.is_file():
        raise AgentError(f"{path} does not exist: {run_dir} is not a finished lapo finetune run")
    meta = json.loads(path.read_text())
    if meta.get("kind") != "agent" or meta.get("format_version") != AGENT_FORMAT_VERSION:
        raise AgentError(f"{path}: not an agent.json of format {AGENT_FORMAT_VERSION}")
    return meta


def load_agent(run_dir: str | Path, map_location: str | torch.device = "cpu") -> Agent:
    """The Agent of a finetune run from RUN/agent.{json,safetensors} alone, in eval mode."""
    run_dir = Path(run_dir)
    meta = read_agent_meta(run_dir)
    lam = build_lam(**meta["lam"]) if meta["lam"] else None
    decoder = ActionDecoder(**meta["decoder"]["kwargs"]) if meta["decoder"] else None
    act_decoder = (
        ActionDecoder(**meta["act_decoder"]["kwargs"]) if meta.get("act_decoder") else None
    )
    policy = build_policy(**meta["policy"]) if meta["policy"] else None
    agent = Agent(
        method=meta["method"], action_space=meta["action_space"], context=meta["context"],
        frame_gap=meta.get("frame_gap", 1), lam=lam, decoder=decoder, policy=policy, act_decoder=act_decoder,
        use_obs_features=meta.get("use_obs_features", False), info=meta.get("info"),
    )  # fmt: skip
    path = run_dir / AGENT_WEIGHTS
    missing, unexpected = _fill(agent, path, AgentError)
    if missing or unexpected:
        raise AgentError(
            f"{path} does not match its agent.json: missing {sorted(missing)[:6]}, "
            f"unexpected {sorted(unexpected)[:6]}"
        )
    return agent.to(map_location).eval()


# --------------------------------------------------------------------------- a label-budget curve


def read_budget_curve(directory: str | Path) -> list[dict]:
    """The rows of ``DIR/budgets.json`` (`lapo finetune --label-budgets`): each
    ``{"budget": N, "run": DIR/budget-N}`` or ``{"budget": N, "error": why it has no run}``."""
    path = Path(directory) / BUDGET_CURVE
    if not path.is_file():
        raise AgentError(
            f"{path} does not exist: {directory} holds no finished `lapo finetune --label-budgets`"
        )
    rows = json.loads(path.read_text()).get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "budget" in r for r in rows):
        raise AgentError(f'{path}: expected {{"rows": [{{"budget": N, "run": ...}}, ...]}}')
    # runs are named relative to DIR, which may have moved since
    return [{**r, "run": str(Path(directory) / r["run"])} if "run" in r else r for r in rows]
