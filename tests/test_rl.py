"""`lapo rl`: PPO fine-tuning of a latent policy through an action head (stable-baselines3).

The LAM and policy runs are untrained debug-size models written in exactly the format
stage 1 / stage 2 export (`tests.test_finetune.write_lam` / `write_policy`). The toy env
shows one flat colour per frame; the action of the same index earns 1, so the best action
is visible in the image and a random policy earns a third of the best return.
"""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces

from lapo.cli import main
from lapo.config import RLConfig, load_config
from lapo.envs import Env
from lapo.rl.train import train_rl
from lapo.runs import load_agent
from tests.test_finetune import write_lam, write_policy

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "rl" / "debug.yaml"
STEPS = 8  # toy episode length: best return 8, random 8/3
KILL = {"at": None, "n": 0}  # the toy env sends SIGTERM to this process at its `at`-th step


class ToyEnv(Env):
    """Each frame is one flat colour c in {red, green, blue}; action c earns 1; 8 steps."""

    spec, size, num_actions = "toy", 32, 3
    action_meanings, sample_actions = ["red", "green", "blue"], (0, 1, 2)

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def _frame(self) -> np.ndarray:
        frame = np.zeros((self.size, self.size, 3), np.uint8)
        frame[..., self.c] = 255
        return frame

    def reset(self, seed: int | None = None) -> np.ndarray:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.t, self.c = 0, int(self.rng.integers(3))
        return self._frame()

    def step(self, action) -> tuple[np.ndarray, float, bool, dict]:
        KILL["n"] += 1
        if KILL["at"] is not None and KILL["n"] == KILL["at"]:
            os.kill(os.getpid(), signal.SIGTERM)
        reward = self.reward(action)
        self.t, self.c = self.t + 1, int(self.rng.integers(3))
        done = self.t >= STEPS
        return self._frame(), reward, done, ({"success": True} if done else {})

    def reward(self, action) -> float:
        return float(int(action) == self.c)


class ToyMoveEnv(ToyEnv):
    """The action picks the next frame's colour, so a frame pair shows the action taken; the
    action of the current colour still earns 1."""

    def step(self, action) -> tuple[np.ndarray, float, bool, dict]:
        reward = self.reward(action)
        self.t, self.c = self.t + 1, int(action)
        done = self.t >= STEPS
        return self._frame(), reward, done, ({"success": True} if done else {})


class ToyBoxEnv(ToyEnv):
    """The same colours with a continuous action: reward -|a - c|."""

    action_space = spaces.Box(-1.0, 3.0, (1,), np.float32)

    def reward(self, action) -> float:
        return -float(abs(np.asarray(action).reshape(-1)[0] - self.c))


def cfg(*overrides: str) -> RLConfig:
    return load_config(RLConfig, DEBUG, list(overrides))


def colour_contexts() -> tuple[torch.Tensor, torch.Tensor]:
    """Every toy context (previous colour, current colour): (9, 2, 3, 32, 32) uint8, (9,) colour."""
    flat = np.zeros((3, 32, 32, 3), np.uint8)
    for c in range(3):
        flat[c, ..., c] = 255
    pairs = [(a, b) for a in range(3) for b in range(3)]
    ctx = np.stack([np.stack([flat[a], flat[b]]) for a, b in pairs]).transpose(0, 1, 4, 2, 3)
    return torch.from_numpy(ctx), torch.tensor([b for _, b in pairs])


def regress_policy(run: Path, target: torch.Tensor, steps: int) -> Path:
    """RUN_P's policy fitted (MSE) to `target` (9, D) on the 9 toy contexts, exported again."""
    from lapo.runs import POLICY_KIND, POLICY_NAME, export_model, load_policy, read_policy_meta

    meta, policy = read_policy_meta(run), load_policy(run).train()
    ctx, _ = colour_contexts()
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(policy(ctx), target).backward()
        opt.step()
    export_model(
        run, policy, kind=POLICY_KIND, config=meta["config"], extra=meta["extra"], name=POLICY_NAME
    )
    return run


def inform_policy(run: Path) -> Path:
    """Stand-in for stage 2 on the toy: RUN_P's policy regresses one latent per current colour,
    as a policy cloned from an IDM whose latents tell the moves apart would. Which latent
    means which action is still unknown: that is what PPO has to find out from reward."""
    from lapo.runs import read_policy_meta

    dim = read_policy_meta(run)["extra"]["kwargs"]["latent_dim"]
    _, colour = colour_contexts()
    target = torch.randn(3, dim, generator=torch.Generator().manual_seed(0))[colour]
    return regress_policy(run, target, steps=60)


def move_windows() -> tuple[torch.Tensor, torch.Tensor]:
    """Every ToyMoveEnv window (previous, current, next colour): (27, 3, 3, 32, 32) uint8 and
    the action each shows (the next colour)."""
    ctx, _ = colour_contexts()
    nxt = ctx[[0, 4, 8], -1:]  # (3, 1, 3, 32, 32): one flat frame per colour
    windows = torch.cat([ctx.repeat_interleave(3, 0), nxt.repeat(9, 1, 1, 1, 1)], dim=1)
    return windows, torch.arange(3).repeat(9)


def move_lam(run: Path) -> Path:
    """Stand-in for stage 1 on ToyMoveEnv: the debug LAM's IDM trained so that its latent
    names the move (one random latent per next colour), as a LAM that learnt would."""
    from lapo.runs import export_model, read_lam

    write_lam(run, "model.bottleneck=continuous")
    meta = read_lam(run)
    lam = meta.load().train()
    windows, move = move_windows()
    target = torch.randn(3, lam.cfg.latent_dim, generator=torch.Generator().manual_seed(0))[move]
    opt = torch.optim.Adam([*lam.idm.parameters(), *lam.bottleneck.parameters()], lr=1e-2)
    for _ in range(80):  # in train mode, so the bottleneck's batch statistics follow
        opt.zero_grad()
        torch.nn.functional.mse_loss(lam.encode(windows)["latent"], target).backward()
        opt.step()
    export_model(run, lam.eval(), kind="lam", config=meta.config, extra=meta.kwargs)
    return run


def lam_informed_policy(run: Path, lam_run: Path) -> Path:
    """Stand-in for stage 2 on ToyMoveEnv: the policy predicts the LAM's own latent of the
    rewarded transition (stay on the current colour), as a policy cloned from that IDM's
    latents would."""
    from lapo.runs import load_lam

    ctx, _ = colour_contexts()
    with torch.no_grad():
        target = load_lam(lam_run).eval().encode(torch.cat([ctx, ctx[:, -1:]], dim=1))["pre"]
    return regress_policy(run, target, steps=100)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rl")
    lam = write_lam(root / "lam", "model.bottleneck=continuous")
    return {"lam": lam, "policy": inform_policy(write_policy(root / "policy", lam))}


@pytest.fixture(autouse=True)
def _no_kill():
    KILL.update(at=None, n=0)
    yield
    KILL.update(at=None, n=0)


def greedy_return(agent, episodes: int = 64, seed: int = 123, env_cls=ToyEnv) -> float:
    """Mean return of agent.act (argmax) on fresh toy episodes."""
    env, total = env_cls(seed), 0.0
    for _ in range(episodes):
        frames, done = [env.reset()] * 2, False  # the first frame repeated, as in training
        while not done:
            ctx = torch.from_numpy(np.stack(frames[-2:]).transpose(0, 3, 1, 2))[None]
            frame, r, done, _ = env.step(int(agent.act(ctx)[0]))
            frames.append(frame)
            total += r
    return total / episodes


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- it learns


def test_ppo_through_the_latent_policy_improves_the_return(runs, tmp_path):
    """Zero labels: a fresh head on the latent policy, reward only. Before training the
    zero head is uniform, so argmax always picks action 0 (return 8/3 on average)."""
    m = train_rl(cfg(), tmp_path / "r", runs["policy"], ToyEnv)
    assert m["finished"] and m["frames"] == 2048
    agent = load_agent(tmp_path / "r")
    assert agent.method == "lapo" and agent.action_space == {"type": "discrete", "n": 3}
    assert greedy_return(agent) >= 6.5  # best 8, chance 2.67
    rows = read_csv(tmp_path / "r" / "metrics.csv")
    first, last = float(rows[0]["return_mean"]), float(rows[-1]["return_mean"])
    assert last >= first + 2.0, (first, last)


def test_from_scratch_trains_the_same_trunk_without_the_lam(runs, tmp_path):
    m = train_rl(cfg("total_frames=512"), tmp_path / "s", runs["policy"], ToyEnv, from_scratch=True)
    agent = load_agent(tmp_path / "s")
    assert m["finished"] and agent.method == "bc" and agent.lam is None
    assert agent.policy.head[-1].out_features == 3


def test_a_policy_that_failed_stage_2_is_named_before_ppo_starts(runs, tmp_path):
    import shutil
    import warnings

    from lapo.health import assess_policy

    policy = tmp_path / "policy"
    shutil.copytree(runs["policy"], policy)
    health = assess_policy({"val/latent_mse": 0.11, "val/latent_mse_baseline": 0.09})
    (policy / "metrics.json").write_text(json.dumps({"global_step": 4, "health": health}))
    with pytest.warns(UserWarning, match="failed its health check .* -0.222, needs >= 0.02"):
        train_rl(cfg("total_frames=256"), tmp_path / "r", policy, ToyEnv)
    with warnings.catch_warnings():  # from scratch the stage-2 policy is not used
        warnings.filterwarnings("error", message=".*failed its health check")
        train_rl(cfg("total_frames=256"), tmp_path / "s", policy, ToyEnv, from_scratch=True)


def test_the_agents_own_transitions_fit_the_head(runs, tmp_path):
    """self_label_epochs: the head also learns latent -> action from the rollouts themselves,
    so the sampled policy is sharp after a few updates where reward alone has barely moved
    it. Seeds 0-2 at 768 frames: last rollout's mean return 5.84 / 5.40 / 5.78 against
    3.03 / 2.81 / 2.81 from reward only (random 2.67, best 8); the head's accuracy on each
    new rollout before fitting it 0.71 / 0.66 / 0.73 (chance 0.33)."""
    lam = move_lam(tmp_path / "lam")
    policy = lam_informed_policy(write_policy(tmp_path / "p", lam), lam)
    base = ("total_frames=768", "ckpt_every_frames=0", "policy_start_frames=100000")
    m = train_rl(cfg(*base, "self_label_epochs=2"), tmp_path / "s", policy, ToyMoveEnv)
    rows = read_csv(tmp_path / "s" / "metrics.csv")
    assert m["finished"] and all(r["self_label_loss"] for r in rows)
    assert float(rows[-1]["self_label_acc"]) >= 0.5
    train_rl(cfg(*base), tmp_path / "r", policy, ToyMoveEnv)
    reward_only = read_csv(tmp_path / "r" / "metrics.csv")
    assert reward_only[-1]["self_label_loss"] == ""
    assert float(rows[-1]["return_mean"]) >= float(reward_only[-1]["return_mean"]) + 1.5
    # self_label_frames: only the first update's rollout fits the head
    c = cfg(*base, "self_label_epochs=2", "self_label_frames=256", "total_frames=512")
    train_rl(c, tmp_path / "f", policy, ToyMoveEnv)
    assert [r["self_label_loss"] != "" for r in read_csv(tmp_path / "f" / "metrics.csv")] == [
        True,
        False,
    ]


def test_rollout_windows_stop_at_episode_starts():
    from lapo.rl.self_label import rollout_windows

    t, n, k = 6, 2, 2
    obs = np.zeros((t, n, k, 1, 1, 1), np.float32)
    obs[:, :, -1, 0, 0, 0] = np.arange(t * n).reshape(t, n) + 10  # o[t] of env i: an id
    obs[:, :, 0, 0, 0, 0] = obs[:, :, -1, 0, 0, 0] - n  # o[t-1]
    acts = np.arange(t * n).reshape(t, n) + 100
    starts = np.zeros((t, n))
    starts[3, 1] = 1  # env 1 starts an episode at step 3
    for gap, want in ((1, [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (0, 1), (1, 1), (3, 1), (4, 1)]),
                      (2, [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (3, 1)])):  # fmt: skip
        win, a = rollout_windows(obs, acts, starts, gap)
        assert win.dtype == torch.uint8 and win.shape == (len(want), k + 1, 1, 1, 1)
        pairs = sorted(((int(x) - 100) // n, (int(x) - 100) % n) for x in a)
        assert pairs == sorted(want), gap
        # the window ends with o[t+gap] of the same env
        last = win[:, -1, 0, 0, 0].long() - win[:, -2, 0, 0, 0].long()
        assert (last == gap * n).all()


# --------------------------------------------------------------------------- the head


@pytest.mark.parametrize("env_cls", [ToyEnv, ToyBoxEnv])
def test_the_head_maps_to_valid_actions(runs, tmp_path, env_cls):
    """Discrete: Categorical over the env's ids; Box: a Gaussian around the head's output.
    The actor's deterministic action is what the saved agent's act() returns."""
    from lapo.rl.env import make_vec_env
    from lapo.rl.train import _PPO  # noqa: F401  (the policy is checked as the run builds it)

    train_rl(
        cfg("total_frames=256", "ckpt_every_frames=0"), tmp_path / "h", runs["policy"], env_cls
    )
    agent = load_agent(tmp_path / "h")
    venv = make_vec_env(env_cls, num_envs=4, context=2, size=32, seed=5)
    obs = torch.from_numpy(venv.reset())  # (4, 2, 3, 32, 32) uint8
    venv.close()
    act = agent.act(obs)
    if env_cls is ToyEnv:
        assert agent.action_space == {"type": "discrete", "n": 3}
        assert act.dtype == torch.int64 and ((act >= 0) & (act < 3)).all()
    else:
        assert agent.action_space == {"type": "continuous", "dim": 1}
        assert act.shape == (4, 1) and torch.isfinite(act).all()
    # and the same through SB3's distributions, sampled
    from lapo.rl.net import ActorCriticNet, LatentActorCritic
    from lapo.rl.train import LRSchedule

    space = env_cls.action_space if env_cls is ToyBoxEnv else spaces.Discrete(3)
    obs_space = spaces.Box(0, 255, (2, 3, 32, 32), np.uint8)
    pol = LatentActorCritic(obs_space, space, LRSchedule(1e-3, False), net=ActorCriticNet(agent))
    with torch.no_grad():
        sampled, values, logp = pol(obs)
        greedy, _, _ = pol(obs, deterministic=True)
    assert values.shape == (4, 1) and torch.isfinite(logp).all()
    if env_cls is ToyEnv:
        assert all(space.contains(int(a)) for a in sampled) and torch.equal(greedy, act)
    else:
        assert sampled.shape == (4, 1) and torch.allclose(greedy, act)


# --------------------------------------------------------------------------- resume


def test_an_interrupted_run_resumes_to_the_same_frames(runs, tmp_path):
    """SIGTERM during the 2nd rollout: the run saves after that update (512 frames) and
    stops; --resume ends at the same frame count as a run never stopped, with a valid agent
    and one CSV row per update. Up to the stop both runs are bitwise equal (same seeds); after
    it they differ, because env states are not checkpointed: the resumed envs start new
    episodes (on new levels) where the stopped run was mid-episode."""
    c = cfg("total_frames=1024", "ckpt_every_frames=256", "keep_checkpoints=10")
    full = train_rl(c, tmp_path / "full", runs["policy"], ToyEnv)
    KILL.update(at=400, n=0)  # the 400th env step of 8 envs: inside the 2nd rollout (257..512)
    cut = train_rl(c, tmp_path / "cut", runs["policy"], ToyEnv)
    assert cut == {"finished": False, "frames": 512}
    KILL.update(at=None)
    saved = sorted((tmp_path / "cut" / "checkpoints").glob("*.pt"))
    assert [p.name for p in saved] == ["frames-0000000256.pt", "frames-0000000512.pt"]
    a = torch.load(saved[-1], weights_only=True)["policy"]
    b = torch.load(tmp_path / "full/checkpoints/frames-0000000512.pt", weights_only=True)["policy"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    done = train_rl(c, tmp_path / "cut", runs["policy"], ToyEnv, resume=True)
    assert done["finished"] and done["frames"] == full["frames"] == 1024
    assert load_agent(tmp_path / "cut").method == "lapo"
    rows = read_csv(tmp_path / "cut" / "metrics.csv")
    assert [int(r["frames"]) for r in rows] == [256, 512, 768, 1024]
    assert [int(r["updates"]) for r in rows] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- the command


def test_cli_on_a_real_env_and_lapo_evaluate_reads_the_result(runs, tmp_path, capsys):
    from lapo.config import EvaluateConfig
    from lapo.evaluate import evaluate

    out, env = tmp_path / "cli", "minigrid:MiniGrid-Empty-5x5-v0"
    argv = ["rl", "--policy", str(runs["policy"]), "--env", env, "--out", str(out), "--config",
            str(DEBUG), "--set", "total_frames=64", "num_envs=2", "rollout_steps=32", "minibatches=2"]  # fmt: skip
    assert main(argv) == 0
    assert "done at 64 frames" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["frames"] == 64
    cfg = EvaluateConfig(episodes=2, max_steps=10, progress=False)
    m = evaluate(cfg, out, tmp_path / "eval.json", env=env)
    assert m["method"] == "lapo" and m["episodes"] == 2 and "return_mean" in m


def test_cli_trains_on_procgen_through_its_batched_env(runs, tmp_path, capsys, monkeypatch):
    """vec_env auto: all procgen games in one gym3 env (`lapo.rl.env.ProcgenVecEnv`)."""
    from lapo.rl.env import ProcgenVecEnv

    steps, step_wait = [], ProcgenVecEnv.step_wait
    monkeypatch.setattr(ProcgenVecEnv, "step_wait", lambda self: steps.append(1) or step_wait(self))
    out = tmp_path / "procgen"
    argv = ["rl", "--policy", str(runs["policy"]), "--env", "procgen:bigfish", "--out", str(out),
            "--config", str(DEBUG), "--set", "total_frames=256", "num_envs=4", "rollout_steps=32",
            "minibatches=2"]  # fmt: skip
    assert main(argv) == 0
    assert "done at 256 frames" in capsys.readouterr().out
    assert len(steps) == 64  # 64 batched steps of 4 games
    assert json.loads((out / "metrics.json").read_text())["frames"] == 256
    assert load_agent(out).action_space == {"type": "discrete", "n": 15}


def test_cli_errors_name_the_flag(runs, tmp_path, capsys):
    base = ["rl", "--out", str(tmp_path / "x"), "--config", str(DEBUG)]
    assert main([*base, "--policy", str(tmp_path / "nope"), "--env", "procgen:bigfish"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lapo rl: error:") and "nope" in err and len(err.splitlines()) == 1
    assert main([*base, "--policy", str(runs["policy"]), "--env", "procgen:bigfsh"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--env" in err and "bigfsh" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()  # nothing written for bad input
