"""`lapo rl` against plain stable-baselines3 PPO: env frames per second, same env and network.

    python benchmarks/rl.py                                  # procgen:bigfish, configs/rl/cpu.yaml
    python benchmarks/rl.py --env babyai:BabyAI-GoToObj-v0 --frames 8192
    python benchmarks/rl.py --policy runs/bigfish-policy     # a trained stage-2 run
    python benchmarks/rl.py --vec-envs                       # procgen: batched vs DummyVecEnv

Both runs train the same actor-critic (`lapo.rl.net`: the latent policy of RUN_P, the
frozen LAM, a fresh action head and a value head) with the same PPO settings on the same
vectorised env, for the same number of frames:

(a) plain: SB3's own `PPO(...).learn(N)` on that policy, nothing else;
(b) lapo:  `lapo.rl.train.train_rl`, what `lapo rl` runs: per-part learning rates, the
           CSV row, finiteness check and checkpoint after each update, the progress
           bar's bookkeeping, the stop-signal check.

Only `learn` is timed (building the nets and envs is not). Without ``--policy`` the LAM
and policy are untrained, exported from ``--lam-config`` / ``--policy-config`` (speed
does not depend on the weights). Repeats alternate the two so that load from other jobs
hits both alike; the overhead is (plain frames/s / lapo frames/s - 1) of the medians,
target < 10%.

``--vec-envs`` compares instead the two ways `lapo rl` can step a procgen env, both built
by `policy_vec_env`: vec_env=batched (all games in one Procgen gym3 env, one C++ call a
step) against vec_env=dummy (SB3's DummyVecEnv of one-game envs). Each repeat times, for
both, (a) the VecEnv alone: ``--frames`` frames of uniformly random actions, no policy,
which is the part that differs, and (b) `lapo rl`'s learn loop (skip it with
``--steps-only``). It prints frames/s of the medians and the ratio batched / dummy:

    python benchmarks/rl.py --vec-envs --frames 4096 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lapo.rl  # noqa: E402,F401  (imports stable-baselines3 with gym's notice hidden)
from lapo.config import (  # noqa: E402
    CONFIGS,
    PolicyConfig,
    PretrainConfig,
    RLConfig,
    load_config,
    to_dict,
)
from lapo.runs import (  # noqa: E402
    POLICY_KIND,
    POLICY_NAME,
    export_model,
    lam_info,
    load_lam,
    policy_extra,
    read_lam,
)


def untrained_runs(root: Path, lam_config: str, policy_config: str) -> Path:
    """An untrained LAM and latent policy, exported as stages 1 and 2 do; returns RUN_P."""
    from lapo.models import LatentActionModel, LatentPolicy

    torch.manual_seed(0)
    cfg = load_config(PretrainConfig, lam_config)
    kwargs = {"in_channels": 3, "num_actions": 0, "action_dim": 0, "context": cfg.data.context}
    lam_run = root / "lam"
    lam = LatentActionModel(cfg.model, **kwargs, sync_codebook=False)
    export_model(lam_run, lam, kind="lam", config=to_dict(cfg), extra=kwargs)
    pcfg = load_config(PolicyConfig, policy_config)
    policy = LatentPolicy.for_lam(pcfg.policy, load_lam(lam_run))
    info = lam_info(read_lam(lam_run))
    run = root / "policy"
    export_model(run, policy, kind=POLICY_KIND, config=to_dict(pcfg),
                 extra=policy_extra(policy, info), name=POLICY_NAME)  # fmt: skip
    return run


def run_plain(cfg: RLConfig, policy_run: Path, env: str, frames: int) -> float:
    """Seconds of SB3's PPO.learn(frames) on lapo's actor-critic."""
    from stable_baselines3 import PPO

    from lapo.rl.net import ActorCriticNet, LatentActorCritic, action_space_dict, build_agent
    from lapo.rl.train import policy_vec_env

    venv = policy_vec_env(cfg, env, policy_run)  # the very env `lapo rl` builds
    agent, _ = build_agent(policy_run, action_space_dict(venv.action_space), cfg)
    batch = cfg.num_envs * cfg.rollout_steps
    model = PPO(
        LatentActorCritic, venv, learning_rate=cfg.lr, n_steps=cfg.rollout_steps,
        batch_size=batch // cfg.minibatches, n_epochs=cfg.epochs, gamma=cfg.gamma,
        gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_range, clip_range_vf=cfg.clip_value or None,
        normalize_advantage=cfg.normalize_advantage, ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef,
        max_grad_norm=cfg.max_grad_norm, device=cfg.device, seed=cfg.seed,
        policy_kwargs={"net": ActorCriticNet(agent), "freeze_encoder": cfg.freeze_encoder},
    )  # fmt: skip
    t0 = time.perf_counter()
    model.learn(frames)
    seconds = time.perf_counter() - t0
    venv.close()
    return seconds


def run_lapo(cfg: RLConfig, policy_run: Path, env: str, out: Path) -> float:
    """Seconds of `lapo rl`'s learn loop (train_rl's own timer: set-up excluded)."""
    from lapo.rl.train import train_rl

    return float(train_rl(cfg, out, policy_run, env)["seconds_this_session"])


def run_steps(cfg: RLConfig, policy_run: Path, env: str, frames: int) -> float:
    """Seconds of stepping `lapo rl`'s VecEnv for `frames` frames of random actions."""
    import numpy as np

    from lapo.rl.train import policy_vec_env

    venv = policy_vec_env(cfg, env, policy_run)
    venv.action_space.seed(cfg.seed)
    steps = -(-frames // cfg.num_envs)
    actions = [np.array([venv.action_space.sample() for _ in range(cfg.num_envs)])
               for _ in range(steps)]  # fmt: skip
    venv.reset()
    t0 = time.perf_counter()
    for a in actions:
        venv.step(a)
    seconds = time.perf_counter() - t0
    venv.close()
    return seconds * frames / (steps * cfg.num_envs)


def compare_vec_envs(a: argparse.Namespace, policy: Path, tmp: Path) -> None:
    """--vec-envs: batched against dummy (see the module docstring)."""
    kinds = ("dummy", "batched")
    cfgs = {k: load_config(RLConfig, a.config, [f"total_frames={a.frames}", "progress=false",
                                                "ckpt_every_frames=0", f"vec_env={k}"])
            for k in kinds}  # fmt: skip
    c = cfgs["dummy"]
    print(f"{a.env}, {a.config}: {c.num_envs} envs x {c.rollout_steps} steps a rollout, "
          f"{a.frames} frames per run, torch threads {torch.get_num_threads()}")  # fmt: skip
    parts = ("env steps",) if a.steps_only else ("env steps", "lapo rl")
    secs = {(p, k): [] for p in parts for k in kinds}
    for r in range(a.repeats):
        line = []
        for part in parts:
            for k in kinds:
                if part == "env steps":
                    t = run_steps(cfgs[k], policy, a.env, a.frames)
                else:
                    t = run_lapo(cfgs[k], policy, a.env, tmp / f"rl-{k}-{r}")
                secs[part, k].append(t)
                line.append(f"{part} {k} {a.frames / t:.0f}")
        print(f"  repeat {r}: " + ", ".join(line) + " frames/s")
    for part in parts:
        fps = {k: a.frames / statistics.median(secs[part, k]) for k in kinds}
        print(f"{part}: batched {fps['batched']:.0f} frames/s, dummy {fps['dummy']:.0f} "
              f"frames/s, batched / dummy = {fps['batched'] / fps['dummy']:.2f}x")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--env", default="procgen:bigfish", help="env spec, as lapo rl --env")
    p.add_argument("--config", default=str(CONFIGS / "rl/cpu.yaml"), help="RL settings")
    p.add_argument("--policy", help="a stage-2 run (default: untrained, from the two configs)")
    p.add_argument("--lam-config", default=str(CONFIGS / "lam/procgen_cpu.yaml"))
    p.add_argument("--policy-config", default=str(CONFIGS / "policy/debug.yaml"))
    p.add_argument("--frames", type=int, default=4096, help="env frames per timed run")
    p.add_argument("--repeats", type=int, default=2, help="alternating (plain, lapo) pairs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument(
        "--vec-envs",
        action="store_true",
        help="compare vec_env batched against dummy instead (procgen envs)",
    )
    p.add_argument(
        "--steps-only",
        action="store_true",
        help="with --vec-envs: time the VecEnv stepping only, not lapo rl's loop",
    )
    a = p.parse_args()
    if a.steps_only and not a.vec_envs:
        p.error("--steps-only needs --vec-envs")
    if a.vec_envs and not a.env.startswith("procgen:"):
        p.error(
            f"--vec-envs compares Procgen's batched env: --env must be procgen:<game>, got {a.env}"
        )
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="lapo-bench-rl-") as tmp:
        tmp = Path(tmp)
        policy = Path(a.policy) if a.policy else untrained_runs(tmp, a.lam_config, a.policy_config)
        if a.vec_envs:
            compare_vec_envs(a, policy, tmp)
            return
        # checkpoints at the config's interval, but at least one inside the timed frames
        ckpt = min(load_config(RLConfig, a.config).ckpt_every_frames or a.frames, a.frames)
        cfg = load_config(RLConfig, a.config, [f"total_frames={a.frames}", "progress=false",
                                               f"ckpt_every_frames={ckpt}"])  # fmt: skip
        print(f"{a.env}, {a.config}: {cfg.num_envs} envs x {cfg.rollout_steps} steps a "
              f"rollout, {a.frames} frames per run, torch threads {torch.get_num_threads()}")  # fmt: skip
        secs: dict[str, list[float]] = {"plain": [], "lapo": []}
        for r in range(a.repeats):
            secs["plain"].append(run_plain(cfg, policy, a.env, a.frames))
            secs["lapo"].append(run_lapo(cfg, policy, a.env, tmp / f"rl-{r}"))
            print(f"  repeat {r}: plain {a.frames / secs['plain'][-1]:.0f} frames/s, "
                  f"lapo {a.frames / secs['lapo'][-1]:.0f} frames/s")  # fmt: skip
    fps = {k: a.frames / statistics.median(v) for k, v in secs.items()}
    print(f"plain SB3 PPO: {fps['plain']:.0f} frames/s   lapo rl: {fps['lapo']:.0f} frames/s")
    print(f"overhead of lapo rl: {100 * (fps['plain'] / fps['lapo'] - 1):+.1f}% (target < 10%)")


if __name__ == "__main__":
    main()
