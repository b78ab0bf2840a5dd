"""The `lapo rl` run: building the agent, SB3's PPO around it, and the run directory.

RUN_R holds rl_config.yaml and sources.json (what --resume must find unchanged),
metrics.csv (one row per PPO update), tb/ (TensorBoard, SB3's logger),
checkpoints/frames-XXXXXXXXXX.pt (policy, value head, optimizer, frames, random
generators; `torch.load(weights_only=True)`), and at the end agent.safetensors +
agent.json (`lapo.runs.save_agent`, so `lapo evaluate --model RUN_R` works) and
metrics.json.

Written by hand, because SB3's PPO cannot say it: per-part learning rates
(`_PPO._update_learning_rate`), and what happens after each update (`_PPO.train` calls
`_Run.after_update`): the CSV row, the check that losses and weights are finite,
periodic checkpoints, and the stop after SIGTERM / SIGUSR1 (`lapo.preempt.StopSignal`:
the handler only sets a flag; it is read after the update of the rollout in progress,
which is saved before the run exits).
"""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.utils import set_random_seed
from tqdm import tqdm

from lapo.checkpoint import atomic_torch_save, safe_torch_load
from lapo.config import ConfigError, RLConfig, save_config
from lapo.io import atomic_write_json
from lapo.preempt import StopSignal, requeue_slurm_job
from lapo.resume import check_run_dir, rng_state, set_rng_state
from lapo.rl.env import make_vec_env
from lapo.rl.net import ActorCriticNet, LatentActorCritic, action_space_dict, build_agent
from lapo.rl.self_label import SelfLabel
from lapo.runs import read_policy_meta, save_agent

FIELDS = ("frames", "updates", "episodes", "return_mean", "length_mean", "success_rate", "fps",
          "lr", "loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction",
          "explained_variance", "self_label_loss", "self_label_acc")  # fmt: skip
SB3_KEYS = {"loss": "train/loss", "policy_loss": "train/policy_gradient_loss",
            "value_loss": "train/value_loss", "approx_kl": "train/approx_kl",
            "clip_fraction": "train/clip_fraction", "explained_variance": "train/explained_variance"}  # fmt: skip
CONFIG = "rl_config.yaml"  # not config.yaml: lapo evaluate reads that as a finetune config
RESUME_FREE = (
    "progress",
    "device",
    "vec_env",
    "env_threads",
    "keep_checkpoints",
    "ckpt_every_frames",
    "tensorboard",
)


class Stopped(Exception):
    """A stop signal arrived; the checkpoint after the last update is saved."""


# --------------------------------------------------------------------------- SB3 pieces


class LRSchedule:
    """SB3 schedule of the base learning rate (progress remaining 1 -> 0): constant, or
    falling linearly to 0 at the end. Warm-ups are per parameter group (`ramp`)."""

    def __init__(self, lr: float, anneal: bool) -> None:
        self.lr, self.anneal = lr, anneal

    def __call__(self, remaining: float) -> float:
        return self.lr * (remaining if self.anneal else 1.0)


def ramp(frames: int, start: int, warmup: int) -> float:
    """0 before `start` frames, then rising linearly to 1 over `warmup` frames."""
    if frames < start:
        return 0.0
    return min(1.0, (frames - start) / warmup) if warmup else 1.0


class _PPO(PPO):
    """SB3's PPO with per-group learning rates, the head's fit to the rollout's own
    transitions before each update (`lapo.rl.self_label`) and a hook after it."""

    after_update = None
    warmup_frames = 0
    self_label = None  # a SelfLabel, or None
    self_label_frames = 0  # fit it only up to this many frames (0: always)
    self_label_stats: dict = {}

    def _update_learning_rate(self, optimizers) -> None:
        lr = self.lr_schedule(self._current_progress_remaining)
        self.logger.record("train/learning_rate", lr)
        for g in self.policy.optimizer.param_groups:
            warm = ramp(self.num_timesteps, g.get("start_frames", 0), self.warmup_frames)
            g["lr"] = lr * g.get("lr_scale", 1.0) * warm

    def train(self) -> None:
        limit = self.self_label_frames
        self.self_label_stats = {}
        if self.self_label is not None and (not limit or self.num_timesteps <= limit):
            lr = self.lr_schedule(self._current_progress_remaining)
            # before super().train(), which flattens the buffer
            self.self_label_stats = self.self_label.fit(self.rollout_buffer, lr)
        super().train()
        if self.after_update is not None:
            self.after_update()


class _Steps(BaseCallback):
    """Per env step: the progress bar, and the episodes that ended (return, length, success)."""

    def __init__(self, bar: tqdm) -> None:
        super().__init__()
        self.bar, self.episodes = bar, []

    def _on_step(self) -> bool:
        self.bar.update(self.training_env.num_envs)
        for info in self.locals["infos"]:
            if "episode" in info:
                ep = info["episode"]
                self.episodes.append((ep["r"], ep["l"], bool(info.get("success", False))))
        return True


# --------------------------------------------------------------------------- the run directory


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("frames-*.pt"))


def _prepare(cfg: RLConfig, run_dir: Path, sources: dict, resume: bool) -> None:
    """Refuse to overwrite a run; on resume insist on the same settings and inputs."""
    check_run_dir(cfg, run_dir, sources, resume=resume, config=CONFIG, free=RESUME_FREE,
                  what="lapo rl run")  # fmt: skip
    if resume:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG)
    atomic_write_json(run_dir / "sources.json", sources)


def _env_kwargs(cfg: RLConfig, spec, policy_run) -> dict:
    """babyai/minigrid rendering: env_view, else as RUN_P's training data was recorded."""
    if not isinstance(spec, str) or not spec.startswith(("babyai:", "minigrid:")):
        return {}
    if cfg.env_view:
        return {"view": cfg.env_view}
    from lapo.shards import recorded_env_kwargs

    data = read_policy_meta(policy_run)["config"].get("data", {}).get("path")
    return {k: v for k, v in (recorded_env_kwargs(data) if data else {}).items() if k == "view"}


def policy_vec_env(cfg: RLConfig, env, policy_run, *, first: int = 0):
    """The vectorised env `lapo rl` trains RUN_P's agent on: frames rendered and stacked as
    its training windows were (context, frame gap, image size, BabyAI view)."""
    meta = read_policy_meta(policy_run)
    kw = meta["extra"]["kwargs"]
    gap = int(meta["extra"].get("frame_gap", 1))  # the context spacing the policy learnt on
    return make_vec_env(env, num_envs=cfg.num_envs, context=int(kw["context"]),
                        size=cfg.env_size or int(kw["image_size"]), seed=cfg.seed, first=first,
                        kind=cfg.vec_env, env_kwargs=_env_kwargs(cfg, env, policy_run),
                        frame_gap=gap, num_threads=cfg.env_threads)  # fmt: skip


def _finite(x) -> bool:
    return x is None or math.isfinite(float(x))


# --------------------------------------------------------------------------- the run


def warn_unhealthy_policy(policy_run) -> None:
    """A warning when stage 2's health check failed: PPO then starts from a policy that has
    learnt nothing, so lapo's start is worth no more than --from-scratch."""
    path = Path(policy_run) / "metrics.json"
    try:
        health = json.loads(path.read_text()).get("health") or {}
    except (OSError, ValueError):
        return  # no verdict (a run from before the check): nothing to say
    if health.get("verdict") == "fail":
        check = health["checks"]["predicts_latent"]
        warnings.warn(
            f"lapo rl: the stage-2 policy of {policy_run} failed its health check "
            f"({check['metric']} = {check['value']:.3g}, needs >= {check['threshold']:g}): it "
            "predicts z[t] no better than the mean latent, so PPO starts from a policy that has "
            "learnt nothing from the video (see its metrics.json)",
            stacklevel=2,
        )


def train_rl(cfg: RLConfig, run_dir, policy_run, env, *, init=None, from_scratch=False,
             resume=False) -> dict:  # fmt: skip
    """PPO-train the agent of `policy_run` on `env` (a spec, or a callable seed -> Env) into `run_dir`."""
    from lapo.envs import EnvError

    run_dir = Path(run_dir)
    meta = read_policy_meta(policy_run)  # a missing RUN_P fails here, naming it
    if not from_scratch:
        warn_unhealthy_policy(policy_run)
    size = cfg.env_size or int(meta["extra"]["kwargs"]["image_size"])
    env_kwargs = _env_kwargs(cfg, env, policy_run)
    ckpts = _checkpoints(run_dir) if resume else []
    state = safe_torch_load(ckpts[-1]) if ckpts else None
    frames0 = int(state["frames"]) if state else 0
    try:
        venv = policy_vec_env(cfg, env, policy_run, first=frames0)
    except EnvError as e:
        raise ConfigError(f"--env: {e}") from None
    space = action_space_dict(venv.action_space)
    sources = {"policy": str(Path(policy_run).resolve()), "init": init and str(Path(init).resolve()),
               "from_scratch": bool(from_scratch), "env": env if isinstance(env, str) else repr(env)}  # fmt: skip
    set_random_seed(cfg.seed)  # python, numpy, torch: the new parts' weights
    try:  # a bad --init fails here, before anything is written
        agent, saves = build_agent(policy_run, space, cfg, init=init, from_scratch=from_scratch)
        _prepare(cfg, run_dir, sources, resume)
    except BaseException:
        venv.close()
        raise
    net = ActorCriticNet(agent)
    batch = cfg.num_envs * cfg.rollout_steps
    model = _PPO(
        LatentActorCritic, venv, learning_rate=LRSchedule(cfg.lr, cfg.anneal_lr),
        n_steps=cfg.rollout_steps, batch_size=batch // cfg.minibatches, n_epochs=cfg.epochs,
        gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_range,
        clip_range_vf=cfg.clip_value or None, normalize_advantage=cfg.normalize_advantage,
        ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef, max_grad_norm=cfg.max_grad_norm,
        target_kl=cfg.target_kl or None, device=cfg.device, seed=None,
        policy_kwargs={"net": net, "policy_scale": 1.0 if from_scratch else cfg.policy_lr_scale,
                       "policy_start": 0 if from_scratch else cfg.policy_start_frames,
                       "freeze_encoder": cfg.freeze_encoder and not from_scratch,
                       "head_scale": 1.0 if from_scratch else cfg.head_lr_scale,
                       "log_std_init": cfg.log_std_init},
    )  # fmt: skip
    model.warmup_frames = cfg.warmup_frames
    if cfg.self_label_epochs and not from_scratch:
        model.self_label = SelfLabel(net.agent, epochs=cfg.self_label_epochs,
                                     batch_size=batch // cfg.minibatches,
                                     frame_gap=net.agent.frame_gap)  # fmt: skip
        model.self_label_frames = cfg.self_label_frames
    model.set_logger(configure(str(run_dir / "tb"), ["tensorboard"] if cfg.tensorboard else []))
    updates = 0
    if state:  # the weights, optimizer, counters and generators of the newest checkpoint
        model.policy.load_state_dict(state["policy"])
        model.policy.optimizer.load_state_dict(state["optimizer"])
        model.num_timesteps, updates = frames0, int(state["updates"])
        set_rng_state(state["rng"])
        if model.self_label is not None:
            model.self_label.load_state_dict(state["self_label"])
    run = _Run(cfg, run_dir, model, frames0, updates)
    run.trim_csv()
    t0 = time.time()
    try:
        with StopSignal() as stop:
            run.stop = stop
            model.after_update = run.after_update
            model.learn(max(cfg.total_frames - frames0, 0), callback=run.steps,
                        reset_num_timesteps=False, progress_bar=False)  # fmt: skip
    except Stopped as e:
        print(
            f"lapo rl: stopped by {e}; saved at {model.num_timesteps} frames, resume with --resume"
        )
        if stop.wants_requeue:
            requeue_slurm_job()
        return {"finished": False, "frames": int(model.num_timesteps)}
    finally:
        run.bar.close()
        venv.close()
    ret = [e["r"] for e in model.ep_info_buffer]
    metrics = {"finished": True, "frames": int(model.num_timesteps), "updates": run.updates,
               "return_mean": float(np.mean(ret)) if ret else None,
               "episodes_in_mean": len(ret), "last_update": run.last_row,
               "seconds_this_session": time.time() - t0, "env": sources["env"],
               "method": "from-scratch" if from_scratch else "lapo"}  # fmt: skip
    agent = net.agent.cpu().eval()
    agent.info = {"rl": {"policy_run": sources["policy"], "init_run": sources["init"],
                         "from_scratch": bool(from_scratch), "env": sources["env"]},
                  "lam_run": meta["extra"]["lam"]["run"], "image_shape": [size, size, 3],
                  "env_kwargs": env_kwargs, "metrics": {k: v for k, v in metrics.items()
                                                        if isinstance(v, (int, float, str))}}  # fmt: skip
    save_agent(agent, run_dir, **saves)
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics


class _Run:
    """What happens after each PPO update (see the module docstring)."""

    def __init__(self, cfg: RLConfig, run_dir: Path, model: _PPO, frames: int, updates: int):
        self.cfg, self.run_dir, self.model, self.updates = cfg, run_dir, model, updates
        self.saved_frames, self.stop, self.last_row = frames, None, None
        self.bar = tqdm(total=cfg.total_frames, initial=frames, unit="frame", unit_scale=True,
                        desc="lapo rl", disable=not cfg.progress, dynamic_ncols=True)  # fmt: skip
        self.steps = _Steps(self.bar)
        self.t = time.time()

    @property
    def csv_path(self) -> Path:
        return self.run_dir / "metrics.csv"

    def trim_csv(self) -> None:
        """Drop rows past the checkpoint a resumed run starts from (they will be done again)."""
        rows = []
        if self.csv_path.is_file():
            with open(self.csv_path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["frames"]) <= self.saved_frames]
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            w.writeheader()
            w.writerows(rows)

    def after_update(self) -> None:
        m, cfg = self.model, self.cfg
        self.updates += 1
        frames, logged = int(m.num_timesteps), m.logger.name_to_value
        eps, self.steps.episodes = self.steps.episodes, []
        now = time.time()
        row = {"frames": frames, "updates": self.updates, "episodes": len(eps),
               "fps": cfg.num_envs * cfg.rollout_steps / max(now - self.t, 1e-9),
               "lr": logged.get("train/learning_rate"),
               "entropy": -logged["train/entropy_loss"] if "train/entropy_loss" in logged else None,
               **{k: logged.get(v) for k, v in SB3_KEYS.items()}, **m.self_label_stats}  # fmt: skip
        self.t = now
        row = {k: v if v is None or isinstance(v, int) else float(v) for k, v in row.items()}
        if eps:
            r, ln, ok = zip(*eps)
            row.update(return_mean=float(np.mean(r)), length_mean=float(np.mean(ln)),
                       success_rate=float(np.mean(ok)))  # fmt: skip
        bad = [k for k in ("loss", "policy_loss", "value_loss", "entropy") if not _finite(row[k])]
        bad += [n for n, p in m.policy.named_parameters() if not torch.isfinite(p).all()][:3]
        if bad:
            raise FloatingPointError(f"lapo rl: non-finite {', '.join(bad)} at update {self.updates} "
                                     f"({frames} frames); resume from the last checkpoint in "
                                     f"{self.run_dir / 'checkpoints'}, e.g. with a lower lr")  # fmt: skip
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow(row)
        self.last_row = row
        recent = [e["r"] for e in m.ep_info_buffer]
        self.bar.set_postfix(ret=f"{np.mean(recent):.3g}" if recent else "-", upd=self.updates)
        every = cfg.ckpt_every_frames
        if every and frames // every > self.saved_frames // every:
            self.save()
        if self.stop is not None and self.stop.requested:
            if self.saved_frames != frames:
                self.save()
            raise Stopped(self.stop.name)

    def save(self) -> None:
        m, frames = self.model, int(self.model.num_timesteps)
        state = {"policy": m.policy.state_dict(), "optimizer": m.policy.optimizer.state_dict(),
                 "frames": frames, "updates": self.updates, "rng": rng_state()}  # fmt: skip
        if m.self_label is not None:
            state["self_label"] = m.self_label.state_dict()
        path = self.run_dir / "checkpoints" / f"frames-{frames:010d}.pt"
        atomic_torch_save(state, path)
        for old in _checkpoints(self.run_dir)[: -self.cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)
        self.saved_frames = frames
