"""Stage 3 (Accelerate): from latent actions to real ones, on a small labelled set.

    lapo finetune --lam RUN --policy RUN_P --labeled DATASET --label-budget N --out RUN_F

Methods (``--method``):

- ``lapo``: the pretrained IDM is frozen; its latent actions z[t] of the N labelled
  transitions are computed once and an ActionDecoder z -> true action is fitted
  (cross-entropy, or MSE for continuous actions). With ``--policy RUN_P
  --finetune-policy`` a second phase trains policy + decoder end to end on the same
  demos: policy(o[t-k+1..t]) -> z -> decoder -> true action, starting from the
  fitted decoder. Without ``--policy`` the run can label but not act.
- ``idm-supervised`` (VPT): an IDM of the same architecture trained from scratch on
  the N labels only (``--config``/``--set model.*`` shape it; no --lam).
- ``bc``: a policy network cloning the true actions from context frames (no --lam).

The loop is plain Accelerate: ``accelerate launch --multi_gpu --num_processes N -m
lapo.cli finetune ...`` (or ``torchrun --nproc_per_node N -m lapo.cli finetune ...``)
runs N processes on GPUs (NCCL) or, on a machine without CUDA, on CPUs (gloo).
Accelerate 1.x's ``accelerate launch --cpu`` starts a single process whatever
``--num_processes`` says (it needs mpirun for more), hence ``--multi_gpu`` on CPUs too;
slurm/finetune.sbatch does this for you. Each epoch ends with an evaluation on
held-out labelled episodes (never trained on; see lapo.labelled), a line in
RUN_F/metrics.jsonl and a checkpoint RUN_F/checkpoints/<phase>/epoch-XXXX;
``--resume`` continues from the newest. SIGTERM or SIGUSR1 saves
``epoch-XXXX-batch-YYYYYY`` at the next step and exits cleanly; resuming from it
replays the rest of that epoch in the same order, so the result equals an
uninterrupted run's. A NaN/inf loss or gradient skips the step or stops the run
(``nan_policy``); it never reaches the weights. The result is RUN_F/agent.safetensors +
agent.json (self-contained: `lapo label --model RUN_F` needs nothing else) and
RUN_F/metrics.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pickle
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from lapo.agent import Agent, action_loss, obs_features, policy_action_logits
from lapo.checkpoint import CheckpointError, refusal
from lapo.config import (
    ConfigError,
    FinetuneConfig,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)
from lapo.errors import NonFiniteLossError
from lapo.io import atomic_write, atomic_write_json
from lapo.labelled import (
    LabelledDataError,
    LabelledWindows,
    load_selection,
    scan_labelled,
    select_budget,
)
from lapo.models import ActionDecoder, LatentActionModel, LatentPolicy, prepare_frames
from lapo.preempt import StopSignal
from lapo.runs import (
    LamRun,
    load_policy,
    policy_model_config,
    read_lam,
    read_policy_meta,
    save_agent,
)

# --------------------------------------------------------------------------- objectives


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
            batch["frames"], self.image_size, where="lapo/finetune.py"
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


# --------------------------------------------------------------------------- data


class EpochSampler(Sampler[int]):
    """A permutation that is a pure function of (seed, epoch): a resumed run replays the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


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


# --------------------------------------------------------------------------- the loop


class Interrupted(Exception):
    """A signal stopped the run after its state was saved; `--resume` continues it."""


def _agree(acc: Accelerator, *flags: bool) -> list[bool]:
    """Each flag OR-ed over all processes (one small all-reduce): every rank acts alike."""
    if acc.num_processes == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=acc.device)
    return [bool(v > 0) for v in acc.reduce(t, "sum")]


def _nonfinite(cfg: FinetuneConfig, what: str, where: str, count: int) -> int:
    """nan_policy: raise naming where, or warn and return the new count of skipped steps."""
    if cfg.nan_policy == "stop":
        raise NonFiniteLossError(f"non-finite {what} at {where}; nan_policy=stop")
    warnings.warn(
        f"lapo finetune: skipping a step with a non-finite {what} at {where} ({count + 1} so far)",
        stacklevel=2,
    )
    return count + 1


@dataclass
class Phase:
    name: str  # checkpoint folder and metrics prefix: decoder, policy, idm, bc
    make: Callable[[], nn.Module]  # built when the phase starts, after the phases before it
    train: Dataset
    val: Dataset
    epochs: int
    lr: float
    metric: str  # what the held-out evaluation measures: label or act


def _complete(ckpt_root: Path) -> list[Path]:
    """Epoch checkpoints whose save finished, oldest first."""
    return sorted(p.parent for p in ckpt_root.glob("epoch-*/progress.json"))


def evaluate(acc: Accelerator, model: nn.Module, loader: DataLoader, discrete: bool) -> dict:
    """Held-out accuracy (discrete) or MSE (continuous), over every rank's share."""
    model.eval()
    outs, targets = [], []
    with torch.no_grad():
        for batch in loader:
            out, y = acc.gather_for_metrics((model(batch).float(), batch["actions"]))
            outs.append(out.cpu())
            targets.append(y.cpu())
    model.train()
    out, y = torch.cat(outs), torch.cat(targets)
    if discrete:
        return {
            "accuracy": (out.argmax(-1) == y).float().mean().item(),
            "loss": action_loss(out, y, True).item(),
        }
    return {"mse": action_loss(out, y, False).item()}


def run_phase(
    acc: Accelerator,
    ph: Phase,
    cfg: FinetuneConfig,
    run_dir: Path,
    discrete: bool,
    stop: StopSignal | None = None,
) -> dict:
    """Train one phase with checkpoints and per-epoch evaluation; returns its last epoch's metrics.

    Raises `Interrupted` once `stop` has caught a signal and the state is saved.
    """
    root = run_dir / "checkpoints" / ph.name
    sampler = EpochSampler(len(ph.train), cfg.seed)
    train_dl = DataLoader(ph.train, cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers)
    val_dl = DataLoader(ph.val, cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers)
    module = ph.make()
    opt = torch.optim.AdamW(module.parameters(), lr=ph.lr, weight_decay=cfg.weight_decay)
    model, opt, train_dl, val_dl = acc.prepare(module, opt, train_dl, val_dl)
    total = ph.epochs * len(train_dl)
    start, step, last, resumed = 0, 0, {}, None
    done = _complete(root)
    if done:  # only present with --resume (a fresh run refuses an existing RUN_F)
        _load_state(acc, done[-1])
        last = json.loads((done[-1] / "progress.json").read_text())
        step = last["step"]
        if "batch" in last:  # saved mid-epoch by a signal: finish that epoch first
            start, resumed = last["epoch"], last
            acc.print(f"lapo finetune: {ph.name}: resumed in epoch {start} after batch "
                      f"{last['batch']} (step {step})")  # fmt: skip
        else:
            start = last["epoch"] + 1
            acc.print(
                f"lapo finetune: {ph.name}: resumed after epoch {last['epoch']} (step {step})"
            )
    stop, skipped = stop or StopSignal(), 0
    best = _Best(acc, root, discrete) if cfg.keep_best else None
    if best is not None and not done and ph.name == "policy":
        best.offer(acc.unwrap_model(model), evaluate(acc, model, val_dl, discrete), epoch=-1)
    budget, t_start, out_of_time = cfg.max_minutes * 60, time.time(), False
    for epoch in range(start, ph.epochs):
        train_dl.set_epoch(epoch)
        model.train()
        # batches already trained in this epoch (same order: EpochSampler), their loss sum
        first = resumed["batch"] if resumed and epoch == start else 0
        loss_sum = torch.tensor(resumed["loss_sum"] if first else 0.0, device=acc.device)
        n = resumed["batches"] if first else 0
        bar = tqdm(train_dl, desc=f"{ph.name} {epoch + 1}/{ph.epochs}", leave=False,
                   disable=not (cfg.progress and acc.is_local_main_process))  # fmt: skip
        for i, batch in enumerate(bar):
            if i < first:
                continue
            elapsed = time.time() - t_start
            done_frac = step / max(total, 1)
            if budget:  # a time budget: the schedule follows whichever runs out first
                done_frac = max(done_frac, elapsed / budget)
            lr = ph.lr * 0.5 * (1 + math.cos(math.pi * min(done_frac, 1.0)))  # cosine to 0
            for g in opt.param_groups:
                g["lr"] = lr
            loss = action_loss(model(batch), batch["actions"], discrete)
            stopping, bad, out_of_time = _agree(
                acc, stop.signum is not None, not bool(torch.isfinite(loss)),
                bool(budget) and elapsed >= budget,
            )  # fmt: skip
            if out_of_time and not stopping:  # this batch is not trained; the epoch ends here
                acc.print(f"lapo finetune: {ph.name}: the {cfg.max_minutes:g} min time budget "
                          f"is spent in epoch {epoch + 1} (step {step})")  # fmt: skip
                break
            if stopping:  # this batch is not trained: a resumed run starts with it
                progress = {"phase": ph.name, "epoch": epoch, "batch": i, "step": step,
                            "loss_sum": float(loss_sum), "batches": n, "signal": stop.name}  # fmt: skip
                _save(
                    acc, root / f"epoch-{epoch:04d}-batch-{i:06d}", progress, cfg.keep_checkpoints
                )
                raise Interrupted(
                    f"{stop.name} in phase {ph.name}, epoch {epoch}, batch {i} (step {step})"
                )
            where = f"phase {ph.name}, epoch {epoch}, batch {i} (step {step})"
            if bad:
                skipped = _nonfinite(cfg, f"loss ({loss.item()})", where, skipped)
            else:
                acc.backward(loss)
                clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                norm = acc.clip_grad_norm_(model.parameters(), clip)  # of the all-reduced grads
                # (fp16's grad scaler skips inf gradients itself)
                if acc.scaler is None and norm is not None and not torch.isfinite(norm):
                    skipped = _nonfinite(cfg, f"gradient norm ({float(norm)})", where, skipped)
                else:
                    opt.step()
                    loss_sum, n = loss_sum + loss.detach(), n + 1
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
        train_loss = acc.reduce(loss_sum / max(n, 1), "mean").item()
        val = evaluate(acc, model, val_dl, discrete)
        last = {"phase": ph.name, "epoch": epoch, "step": step, "train_loss": train_loss, "lr": lr,
                **{f"{ph.metric}_{k}": v for k, v in val.items()}, "time": time.time()}  # fmt: skip
        if skipped:
            last["nonfinite_steps"] = skipped
        if out_of_time:
            last["time_budget_spent"] = True
        if best is not None:
            best.offer(acc.unwrap_model(model), val, epoch)
        _save(acc, root / f"epoch-{epoch:04d}", last, cfg.keep_checkpoints)
        if acc.is_main_process:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(last) + "\n")
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in last.items() if k.startswith(ph.metric) or k == "train_loss"
        )
        acc.print(f"{ph.name} epoch {epoch + 1}/{ph.epochs}: {shown}")
        if _agree(acc, stop.signum is not None)[0]:  # saved just now: stop without another save
            raise Interrupted(f"{stop.name} after phase {ph.name}, epoch {epoch} (step {step})")
        if out_of_time:
            break
    if best is not None and best.epoch is not None and best.epoch != last.get("epoch"):
        best.restore(acc.unwrap_model(model))
        last = {**last, **{f"{ph.metric}_{k}": v for k, v in best.val.items()}}
        start_note = "its starting point" if best.epoch < 0 else f"epoch {best.epoch + 1}"
        acc.print(f"lapo finetune: {ph.name}: keeping {start_note}, the best on held-out data")
    if best is not None and best.epoch is not None:
        last["kept_epoch"] = best.epoch
    acc.wait_for_everyone()
    acc.free_memory()  # the next phase prepares its own model and optimiser
    return last


class _Best:
    """The best held-out weights of a phase so far, on disk too (``best.safetensors`` and
    ``best.json`` next to the epoch checkpoints), so a resumed run still knows them."""

    def __init__(self, acc: Accelerator, root: Path, discrete: bool):
        self.acc, self.root, self.discrete = acc, root, discrete
        self.epoch, self.val, self.state = None, {}, None
        meta = root / "best.json"
        if meta.is_file() and (root / "best.safetensors").is_file():
            from safetensors.torch import load_file

            info = json.loads(meta.read_text())
            self.epoch, self.val = info["epoch"], info["val"]
            self.state = load_file(str(root / "best.safetensors"))

    def score(self, val: dict) -> float:
        return val["accuracy"] if self.discrete else -val["mse"]

    def offer(self, module: nn.Module, val: dict, epoch: int) -> None:
        if self.epoch is not None and self.score(val) <= self.score(self.val):
            return  # ties keep the earlier weights
        self.epoch, self.val = epoch, dict(val)
        self.state = {
            k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()
        }
        if self.acc.is_main_process:
            from safetensors.torch import save_file

            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "best.json").unlink(missing_ok=True)  # the pair is whole or absent
            atomic_write(
                self.root / "best.safetensors", lambda tmp: save_file(self.state, str(tmp))
            )
            atomic_write_json(self.root / "best.json", {"epoch": epoch, "val": val}, indent=None)

    def restore(self, module: nn.Module) -> None:
        module.load_state_dict(self.state)


def _save(acc: Accelerator, path: Path, progress: dict, keep: int) -> None:
    # progress.json marks a checkpoint complete: it is removed before anything in the folder
    # is (over)written or deleted, so a kill -9 at any point leaves no complete-looking torn one
    if acc.is_main_process:
        (path / "progress.json").unlink(missing_ok=True)
    acc.wait_for_everyone()
    acc.save_state(str(path))
    acc.wait_for_everyone()
    if acc.is_main_process:
        atomic_write_json(path / "progress.json", progress, indent=None)  # marks it complete
        for old in _complete(path.parent)[:-keep]:
            (old / "progress.json").unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _load_state(acc: Accelerator, path: Path) -> None:
    """Accelerate's load_state (safetensors weights; torch.load(weights_only=True) for the rest)."""
    try:
        acc.load_state(str(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(refusal(path, e)) from None


# --------------------------------------------------------------------------- building a method


@dataclass
class Plan:
    """Everything one run trains and saves."""

    agent: Agent
    phases: list[Phase]
    lam_config: dict | None = None
    lam_kwargs: dict | None = None
    policy_config: dict | None = None


def window_shape(cfg: FinetuneConfig, lam: LamRun | None) -> tuple[int, int]:
    """(context k, frame_gap) of the windows: the LAM's for lapo, else the config's (or 2, 1)."""
    if cfg.method != "lapo":
        return cfg.context or 2, cfg.frame_gap or 1
    for key in ("context", "frame_gap"):
        mine, theirs = getattr(cfg, key), getattr(lam, key)
        if mine and mine != theirs:
            raise ConfigError(
                f"finetune.{key}: {mine} differs from the LAM's {theirs} ({lam.path}); leave it 0"
            )
    return lam.context, lam.frame_gap


def _decoder(cfg: FinetuneConfig, space: dict, latent_dim: int, obs_dim: int = 0) -> ActionDecoder:
    n, d = (space["n"], 0) if space["type"] == "discrete" else (0, space["dim"])
    return ActionDecoder(
        latent_dim, num_actions=n, action_dim=d, hidden=cfg.decoder_hidden, obs_dim=obs_dim
    )


def check_policy_run(policy_run: str | Path, lam: LamRun) -> None:
    """The stage-2 policy must have been cloned from this very LAM (same weights)."""
    trained_on = read_policy_meta(policy_run)["extra"].get("lam", {})
    if trained_on.get("sha256") not in (None, lam.sha256()):
        raise ConfigError(
            f"--policy {policy_run} was cloned from the LAM {trained_on.get('run')}, whose weights "
            f"differ from --lam {lam.path}; its latent actions would mean something else"
        )


def _env_kwargs(dataset: str) -> dict:
    """How lapo.record rendered the labelled data (e.g. BabyAI's view), so rollouts match it."""
    from lapo.shards import read_manifest

    try:
        made_by = read_manifest(dataset).get("made_by") or {}
    except (OSError, ValueError):
        return {}
    kwargs = made_by.get("env_kwargs") if made_by.get("tool") == "lapo.record" else None
    return dict(kwargs) if isinstance(kwargs, dict) else {}


def make_plan(
    cfg: FinetuneConfig, split, lam_run: LamRun | None, policy_run: str | None, device
) -> Plan:
    space, k = split.action_space, split.train.index.shape[1] - 1
    info = {"labeled": split.selection.info["dataset"], "label_budget": split.selection.info["budget"], "lam_run": lam_run and str(lam_run.path),
            "policy_run": policy_run, "policy_finetuned": False, "image_shape": list(split.image_shape),
            "env_kwargs": _env_kwargs(split.selection.info["dataset"])}  # fmt: skip
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
        kwargs = {"in_channels": 3, "num_actions": 0, "action_dim": 0, "context": k}
        lam = LatentActionModel(cfg.model, **kwargs, sync_codebook=False)
        decoder = _decoder(cfg, space, cfg.model.latent_dim)
        phase = Phase("idm", lambda: IDMFit(lam.idm, decoder, lam.image_size), split.train, split.val, cfg.epochs, cfg.lr, "label")  # fmt: skip
        agent = Agent(method="idm-supervised", lam=lam, decoder=decoder, **common)
        return Plan(agent, [phase], to_dict(cfg.model), kwargs)
    common["frame_gap"] = lam_run.frame_gap
    lam = lam_run.load().to(device).requires_grad_(False)
    obs_dim = lam.cfg.embed_dim if cfg.use_obs_features else 0
    decoder = _decoder(cfg, space, lam.cfg.latent_dim, obs_dim)
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


@torch.no_grad()
def final_metrics(
    acc: Accelerator, agent: Agent, val: LabelledWindows, cfg: FinetuneConfig
) -> dict:
    """The saved agent's own label() / act() on the held-out split (every rank's share)."""
    agent.eval()
    loader = acc.prepare(DataLoader(val, cfg.eval_batch_size, shuffle=False))
    got: dict[str, list] = {"label": [], "act": [], "true": []}
    for batch in loader:
        frames, y = batch["frames"], batch["actions"]  # (B, k+1, 3, H, W), (B,) / (B, D)
        got["true"].append(acc.gather_for_metrics(y).cpu())
        if agent.method != "bc":
            got["label"].append(acc.gather_for_metrics(agent.label(frames)["action"]).cpu())
        if agent.has_policy:
            got["act"].append(acc.gather_for_metrics(agent.act(frames[:, :-1])).cpu())
    acc.free_memory()
    y = torch.cat(got["true"])
    out = {"val_transitions": len(y)}
    if agent.discrete:
        out["majority_baseline"] = torch.bincount(y).max().item() / max(len(y), 1)
    for name in ("label", "act"):
        if got[name]:
            pred = torch.cat(got[name])
            if agent.discrete:
                out[f"{name}_accuracy"] = (pred == y).float().mean().item()
            else:
                out[f"{name}_mse"] = (pred.float() - y.float()).pow(2).mean().item()
    if "label_accuracy" in out or "label_mse" in out:  # the name `lapo evaluate` reports too
        out["decoder_accuracy" if agent.discrete else "decoder_mse"] = out.get(
            "label_accuracy", out.get("label_mse")
        )
    return out


# --------------------------------------------------------------------------- the run


RESUME_FREE = ("progress", "num_workers", "keep_checkpoints", "mixed_precision", "eval_batch_size",
               "nan_policy")  # fmt: skip


def _prepare_run(
    acc: Accelerator, cfg: FinetuneConfig, run_dir: Path, sources: dict, resume: bool
) -> None:
    """Refuse to overwrite a run; on resume insist on the same settings and inputs."""
    saved = run_dir / "config.yaml"
    if resume:
        if not saved.is_file():
            raise CheckpointError(
                f"--resume: {run_dir} holds no finetune run (no config.yaml); start without --resume"
            )
        old = load_config(FinetuneConfig, saved)
        for key in to_dict(cfg):
            if key not in RESUME_FREE and to_dict(old)[key] != to_dict(cfg)[key]:
                raise ConfigError(f"{key}: {to_dict(cfg)[key]!r} differs from {to_dict(old)[key]!r} in {saved}; "
                                  "--resume needs the same settings")  # fmt: skip
        old_sources = json.loads((run_dir / "sources.json").read_text())
        if old_sources != sources:
            raise ConfigError(
                f"--resume: inputs {sources} differ from {old_sources} ({run_dir}/sources.json)"
            )
    elif saved.exists() or (run_dir / "checkpoints").exists() or (run_dir / "agent.json").exists():
        raise CheckpointError(
            f"{run_dir} already holds a finetune run; pass --resume or choose another --out"
        )
    acc.wait_for_everyone()  # every rank has checked before anything is written
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, saved)
        atomic_write_json(run_dir / "sources.json", sources)
    acc.wait_for_everyone()


def make_accelerator(mixed_precision: str) -> Accelerator:
    """Accelerator for this process. Without CUDA it is told cpu=True, which is what makes
    Accelerate join the gloo process group that `accelerate launch --multi_gpu` or
    `torchrun` set up (a CPU machine otherwise runs every process on its own)."""
    cuda = torch.cuda.is_available()
    if mixed_precision == "fp16" and not cuda:
        warnings.warn("lapo finetune: fp16 needs a GPU; training in full precision", stacklevel=2)
        mixed_precision = "no"
    return Accelerator(mixed_precision=mixed_precision, cpu=not cuda)


def finetune(
    cfg: FinetuneConfig,
    run_dir: str | Path,
    labeled: str | Path,
    *,
    lam: str | Path | None = None,
    policy: str | Path | None = None,
    resume: bool = False,
    accelerator: Accelerator | None = None,
) -> dict:
    """Run stage 3 into `run_dir`; returns the final metrics (also RUN_F/metrics.json)."""
    run_dir = Path(run_dir)
    if cfg.method == "lapo" and not lam:
        raise ConfigError(
            "method lapo: needs --lam RUN (a stage-1 run); the baselines idm-supervised and bc do not"
        )
    if cfg.method != "lapo" and (lam or policy):
        warnings.warn(
            f"lapo finetune: method {cfg.method} ignores --lam and --policy", stacklevel=2
        )
        lam = policy = None
    if cfg.finetune_policy and not policy:
        raise ConfigError("finetune_policy: needs --policy RUN_P (the stage-2 policy to fine-tune)")
    lam_run = read_lam(lam) if lam else None  # model.json of the LAM, parsed once
    if policy:
        check_policy_run(policy, lam_run)
    acc = accelerator or make_accelerator(cfg.mixed_precision)
    sources = {"labeled": str(Path(labeled).resolve()), "lam": lam and str(Path(lam).resolve()),
               "policy": policy and str(Path(policy).resolve())}  # fmt: skip
    k, gap = window_shape(cfg, lam_run)
    # select before writing anything: a budget the data cannot meet leaves no run behind
    index = scan_labelled(labeled, context=k, frame_gap=gap)
    sel = select_budget(index, cfg.label_budget, cfg.seed, cfg.val_fraction, val_max=cfg.val_max)
    _prepare_run(acc, cfg, run_dir, sources, resume)
    set_seed(cfg.seed)  # same initial weights on every rank
    t0 = time.time()
    split = load_selection(index, sel, progress=cfg.progress and acc.is_local_main_process)
    if acc.is_main_process:
        atomic_write_json(run_dir / "selection.json", split.selection.summary(), indent=None)
    acc.print(f"lapo finetune (method {cfg.method}): {len(split.train)} labelled transitions for "
              f"training, {len(split.val)} held out in {len(split.selection.heldout_episodes)} "
              "episodes")  # fmt: skip
    plan = make_plan(cfg, split, lam_run, policy and str(policy), acc.device)
    discrete = split.action_space["type"] == "discrete"
    try:
        with StopSignal() as stop:
            phases = {
                ph.name: run_phase(acc, ph, cfg, run_dir, discrete, stop) for ph in plan.phases
            }
    except Interrupted as e:
        acc.wait_for_everyone()
        acc.print(f"lapo finetune: stopped early by {e}; state saved, resume with --resume")
        return {"method": cfg.method, "finished": False, "stopped": str(e)}
    agent = plan.agent.to(acc.device)
    metrics = {"method": cfg.method, "finished": True, **final_metrics(acc, agent, split.val, cfg), "phases": phases,
               "selection": split.selection.info, "seconds": time.time() - t0,
               "num_processes": acc.num_processes}  # fmt: skip
    if acc.is_main_process:
        agent.info["metrics"] = {
            k: v for k, v in metrics.items() if isinstance(v, (int, float, str))
        }
        save_agent(agent, run_dir, lam_config=plan.lam_config, lam_kwargs=plan.lam_kwargs, policy_config=plan.policy_config)  # fmt: skip
        atomic_write_json(run_dir / "metrics.json", metrics)
    acc.wait_for_everyone()
    shown = ", ".join(
        f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith(("accuracy", "mse", "baseline"))
    )
    acc.print(
        f"lapo finetune (method {cfg.method}): done in {metrics['seconds']:.0f} s; {shown}; "
        f"agent in {run_dir}"
    )
    return metrics


# --------------------------------------------------------------------------- command line


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "finetune",
        help="stage 3: fit the latent->action decoder (and policy) on labelled demos",
        description="Stage 3 (Accelerate): fit a decoder from latent to true actions on a budget of "
        "labelled transitions (and fine-tune the policy), or train a baseline. Writes RUN_F/config.yaml, "
        "selection.json, metrics.jsonl, checkpoints/, agent.safetensors + agent.json, metrics.json. "
        "Several processes (GPUs, or CPUs with gloo): accelerate launch --multi_gpu --num_processes N "
        "-m lapo.cli finetune ...",
    )
    p.add_argument("--lam", help="stage-1 run directory (RUN); required for --method lapo")
    p.add_argument(
        "--policy", help="stage-2 run directory (RUN_P): the agent can act; see --finetune-policy"
    )
    p.add_argument("--labeled", "--labelled", dest="labeled", required=True,
                   help="labelled dataset directory (shards + manifest.json with an action space)")  # fmt: skip
    p.add_argument(
        "--label-budget",
        type=int,
        help="labelled transitions to train on (sets label_budget, default "
        f"{FinetuneConfig.label_budget}; 0: all outside the held-out split)",
    )
    p.add_argument("--out", required=True, help="run directory RUN_F")
    p.add_argument(
        "--method",
        choices=["lapo", "idm-supervised", "bc"],
        help=f"sets method (default {FinetuneConfig.method})",
    )
    p.add_argument(
        "--finetune-policy",
        action="store_true",
        help="lapo: also fine-tune policy + decoder end to end",
    )
    p.add_argument(
        "--config",
        help="YAML file overriding the typed defaults (e.g. configs/finetune/lapo.yaml)",
    )
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set epochs=5 decoder_hidden=64 model.image_size=32")  # fmt: skip
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                   help=f"sets mixed_precision (default {FinetuneConfig.mixed_precision})")  # fmt: skip
    return p


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """Defaults < --config YAML < --set pairs < explicit flags."""
    tree = parse_overrides(args.overrides)
    flags = {"method": args.method, "label_budget": args.label_budget, "mixed_precision": args.mixed_precision,
             "finetune_policy": True if args.finetune_policy else None}  # fmt: skip
    tree.update({k: v for k, v in flags.items() if v is not None})
    return load_config(FinetuneConfig, args.config, tree)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        finetune(cfg, args.out, args.labeled, lam=args.lam, policy=args.policy, resume=args.resume)
    except LabelledDataError as e:  # e.g. a budget larger than the labels: one line, no traceback
        print(f"lapo finetune: error: {e}", file=sys.stderr)
        return 2
    return 0
