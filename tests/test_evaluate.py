"""`lapo evaluate`: held-out metrics, rollouts and figures on real BabyAI recordings.

The fast tests evaluate real, untrained stage-3 runs written with lapo.agent (see
tests/test_label.py), recomputing the metrics here from windows cut
independently; the slow one runs the whole chain (pretrain, finetune, the label-budget
runs, evaluate) through the library and the CLI.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lapo.agent import Agent
from lapo.config import EvaluateConfig, PolicyModelConfig, to_dict
from lapo.evaluate import evaluate
from lapo.labelled import select_budget
from lapo.models import LatentPolicy
from lapo.models.common import psnr
from lapo.record import record_dataset
from lapo.rollouts import play
from lapo.runs import load_agent, save_agent
from lapo.shards import load_npy, read_manifest
from lapo.tars import iter_tar_samples
from lapo.video import decode_video_bytes
from tests.datagen import make_dataset
from tests.test_label import write_agent

ROOT = Path(__file__).resolve().parents[1]
SPEC = "babyai:BabyAI-GoToLocal-v0"
QUIET = EvaluateConfig(device="cpu", progress=False)
KEYS = ("probe_accuracy", "probe_majority_baseline", "decoder_accuracy", "fdm_psnr",
        "fdm_psnr_copy_baseline", "codebook_perplexity", "codebook_usage", "return_mean",
        "success_rate", "random_return_mean", "random_success_rate")  # fmt: skip


@pytest.fixture(scope="module")
def babyai(tmp_path_factory) -> Path:
    """Ten short random BabyAI episodes at 32 px (two held out by the default split)."""
    out = tmp_path_factory.mktemp("babyai")
    record_dataset(SPEC, out, episodes=10, policy="random", size=32, clip_frames=8,
                   episodes_per_shard=5, max_episode_steps=12, progress=False, verbose=False)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, babyai) -> Path:
    return write_agent(tmp_path_factory.mktemp("run_f"), read_manifest(babyai)["action_space"])


@pytest.fixture(scope="module")
def metrics(tmp_path_factory, babyai, run) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("eval") / "m.json"
    cfg = EvaluateConfig(episodes=3, max_steps=10, device="cpu", progress=False)
    evaluate(cfg, run, out, labeled=babyai, env=SPEC)
    return json.loads(out.read_text()), out


def heldout_windows(dataset: Path, k: int, seed: int = 0, val_fraction: float = 0.2):
    """Windows of the held-out episodes cut here from the decoded clips: o[t-k+1..t], o[t+1],
    the episode's first frame repeated before its start; true action a[t]."""
    held = set(select_budget(dataset, 1, seed, val_fraction, context=k).heldout_episodes)
    episodes: dict[str, dict] = {}
    for shard in sorted(dataset.glob("shard-*.tar")):
        for s in iter_tar_samples(shard):
            meta = json.loads(s["json"])
            if meta["episode"] not in held:
                continue
            ep = episodes.setdefault(meta["episode"], {"frames": {}, "actions": {}, "dones": {}})
            frames = decode_video_bytes(s["mp4"])
            for j, (f, a, d) in enumerate(
                zip(frames, load_npy(s["actions.npy"]), load_npy(s["dones.npy"]))
            ):
                ep["frames"][meta["start"] + j] = f
                ep["actions"][meta["start"] + j] = a
                ep["dones"][meta["start"] + j] = d
    windows, actions = [], []
    for ep in episodes.values():
        n = len(ep["frames"])
        for t in range(n - 1):
            if ep["dones"][t]:
                continue
            idx = [max(t - j, 0) for j in range(k - 1, -1, -1)] + [t + 1]
            windows.append(np.stack([ep["frames"][i] for i in idx]))
            actions.append(ep["actions"][t])
    frames = torch.from_numpy(np.stack(windows)).permute(0, 1, 4, 2, 3)  # (N, k+1, 3, H, W)
    return frames, torch.tensor(actions), held


def test_writes_every_key_finite_and_in_range(metrics):
    m, _ = metrics
    for key in KEYS:
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    for key in ("probe_accuracy", "probe_majority_baseline", "decoder_accuracy", "success_rate",
                "random_success_rate", "codebook_usage", "policy_accuracy"):  # fmt: skip
        assert 0.0 <= m[key] <= 1.0, key
    assert 1.0 <= m["codebook_perplexity"] <= m["codebook_size"] == 8
    assert m["episodes"] == 3 and m["max_steps"] == 10
    assert m["episode_length_mean"] <= 10 and m["random_episode_length_mean"] <= 10


def test_figures_are_written_next_to_the_json(metrics):
    m, out = metrics
    assert set(m["plots"]) == {"latents", "rollout_gif", "rollout_strip"}
    for path in m["plots"].values():
        assert Path(path).parent == out.parent and Path(path).name.startswith("m_")
    with Image.open(m["plots"]["latents"]) as im:
        assert im.format == "PNG" and im.size[0] > 100
    with Image.open(m["plots"]["rollout_gif"]) as im:
        assert im.format == "GIF" and im.size == (32, 32)  # PIL merges repeated frames


def test_gif_holds_the_episode_frames(tmp_path):
    from lapo.plots import save_rollout_gif

    frames = np.zeros((5, 16, 16, 3), np.uint8)
    for t in range(5):
        frames[t, t, :] = 255  # a bar moving down: every frame differs
    with Image.open(save_rollout_gif(frames, tmp_path / "r.gif")) as im:
        assert im.n_frames == 5
        im.seek(3)
        assert np.asarray(im.convert("RGB"))[3].min() == 255


def test_metrics_match_an_independent_computation(metrics, babyai, run):
    m, _ = metrics
    agent = load_agent(run)
    frames, actions, held = heldout_windows(babyai, agent.context)
    assert sorted(m["split"]["heldout_episodes"]) == sorted(held)
    assert m["heldout_windows"] == len(actions)
    label = agent.label(frames)
    assert m["decoder_accuracy"] == pytest.approx(
        (label["action"] == actions).float().mean().item()
    )
    act = agent.act(frames[:, :-1])
    assert m["policy_accuracy"] == pytest.approx((act == actions).float().mean().item())
    with torch.no_grad():
        x = agent.lam.prepare(frames)  # (N, k+1, 3, S, S)
        pred = agent.lam.predict_next(frames[:, :-1], label["latent"])
        assert m["fdm_psnr"] == pytest.approx(psnr(pred, x[:, -1]).item(), rel=1e-4)
        assert m["fdm_psnr_copy_baseline"] == pytest.approx(
            psnr(x[:, -2], x[:, -1]).item(), rel=1e-4
        )
        codes = agent.lam.encode(frames)["codes"]  # (N, heads)
    usage = np.mean([len(torch.unique(codes[:, h])) / 8 for h in range(codes.shape[1])])
    assert m["codebook_usage"] == pytest.approx(usage)
    counts = np.bincount(actions.numpy(), minlength=7)
    assert m["decoder_majority_baseline"] == pytest.approx(counts.max() / counts.sum())
    # the still / moving split: o[t+1] within 0.5 grey levels of o[t], by its own measure
    diff = (frames[:, -1].double() - frames[:, -2].double()).abs().flatten(1).mean(1)
    still = (diff < 0.5).numpy()
    assert 0 < still.sum() < len(still)  # BabyAI's turns and bumps against walls are still
    right = (label["action"] == actions).numpy()
    assert m["still_share"] == pytest.approx(still.mean())
    assert m["decoder_accuracy_still"] == pytest.approx(right[still].mean())
    assert m["decoder_accuracy_moving"] == pytest.approx(right[~still].mean())
    still_counts = np.bincount(actions.numpy()[still], minlength=7)
    assert m["still_majority_baseline"] == pytest.approx(still_counts.max() / still.sum())


def test_rollouts_are_seeded_bounded_and_finite():
    def random_choose(ctx, alive, rngs, envs):
        assert ctx.dtype == torch.uint8 and ctx.shape[1:] == (2, 3, 32, 32)
        return [int(rngs[i].integers(0, 3)) for i in alive]

    runs = [play(SPEC, random_choose, episodes=3, seed=5, size=32, context=2, max_steps=15,
                 record=True, progress=False) for _ in range(2)]  # fmt: skip
    a, b = runs
    assert np.array_equal(a["returns"], b["returns"]) and np.array_equal(a["length"], b["length"])
    assert np.isfinite(a["returns"]).all() and (a["length"] <= 15).all()
    assert a["frames"].shape[1:] == (32, 32, 3) and len(a["frames"]) == a["length"][0] + 1
    assert len(a["actions"]) == a["length"][0]


def test_bc_run_reports_policy_metrics_and_null_latent_ones(babyai, tmp_path):
    torch.manual_seed(0)
    pcfg = PolicyModelConfig(impala_scale=1, hidden=16, target="continuous")
    policy = LatentPolicy(pcfg, context=2, image_size=32, latent_dim=7)  # outputs action logits
    space = read_manifest(babyai)["action_space"]
    agent = Agent(method="bc", action_space=space, context=2, policy=policy)
    save_agent(agent, tmp_path / "bc", policy_config=to_dict(pcfg))
    cfg = EvaluateConfig(episodes=2, max_steps=5, device="cpu", progress=False)
    m = evaluate(cfg, tmp_path / "bc", tmp_path / "out", labeled=babyai, env=SPEC)
    assert (tmp_path / "out" / "metrics.json").is_file()  # --out as a directory
    assert m["decoder_accuracy"] is None and m["fdm_psnr"] is None and m["probe_accuracy"] is None
    assert 0.0 <= m["policy_accuracy"] <= 1.0
    assert 0.0 <= m["random_success_rate"] <= 1.0


def test_continuous_actions_give_mse_keys(tmp_path):
    ds = make_dataset(tmp_path / "dg", shards=4, clips_per_shard=2, clip_frames=16, size=32,
                      actions="continuous", episode_len=(5, 9))  # fmt: skip
    run = write_agent(tmp_path / "run", ds.action_space)
    m = evaluate(QUIET, run, tmp_path / "m.json", labeled=ds.path)
    for key in ("decoder_mse", "policy_mse", "probe_mse", "probe_mean_baseline_mse", "fdm_psnr"):
        assert isinstance(m[key], float) and m[key] >= 0, key
    assert "decoder_accuracy" not in m


def test_env_without_a_policy_is_refused(babyai, tmp_path):
    run = write_agent(tmp_path / "run", read_manifest(babyai)["action_space"])
    meta = json.loads((run / "agent.json").read_text())
    agent = load_agent(run)
    agent.policy = None
    save_agent(agent, tmp_path / "nopol", lam_config=meta["lam"]["config"],
               lam_kwargs=meta["lam"]["kwargs"])  # fmt: skip
    with pytest.raises(ValueError, match="no policy"):
        evaluate(QUIET, tmp_path / "nopol", tmp_path / "m.json", env=SPEC)


@pytest.mark.slow  # Lightning pretrain + Accelerate finetunes + CLI processes: ~1-2 min
def test_pipeline_end_to_end_with_label_budgets(babyai, tmp_path):
    from lapo.config import FinetuneConfig, PretrainConfig, load_config
    from lapo.finetune import finetune
    from lapo.lam import pretrain

    cfg = load_config(PretrainConfig, ROOT / "configs" / "lam" / "debug.yaml",
                      [f"data.path={babyai}", "data.context=2", "trainer.max_steps=2"])  # fmt: skip
    pretrain(cfg, tmp_path / "lam")
    ft = load_config(FinetuneConfig, None, {"label_budget": 30, "epochs": 2, "progress": False})
    finetune(ft, tmp_path / "ft", babyai, lam=tmp_path / "lam")
    # the curve's decoders are trained by lapo finetune; lapo evaluate only scores them
    budgets = tmp_path / "budgets"
    lapo = [sys.executable, "-m", "lapo.cli"]
    res = subprocess.run(
        [*lapo, "finetune", "--lam", str(tmp_path / "lam"), "--labeled", str(babyai),
         "--label-budgets", "10,30,100000", "--set", "epochs=2", "progress=false",
         "--out", str(budgets)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in budgets.glob("budget-*")) == ["budget-10", "budget-30"]
    out = tmp_path / "eval" / "lapo.json"
    res = subprocess.run(
        [*lapo, "evaluate", "--model", str(tmp_path / "ft"), "--labeled", str(babyai),
         "--budget-runs", str(budgets), "--device", "cpu", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(out.read_text())
    assert "decoder_accuracy" in res.stdout
    assert f"{m['still_share']:.0%} of the held-out windows are still" in res.stdout
    rows = {r["budget"]: r for r in m["label_budgets"]}
    assert 0 <= rows[10]["decoder_accuracy"] <= 1 and 0 <= rows[30]["decoder_accuracy"] <= 1
    assert "exceeds" in rows[100000]["error"]
    # the budget-30 refit has RUN_F's settings and data: the same decoder, the same accuracy
    assert rows[30]["decoder_accuracy"] == pytest.approx(m["decoder_accuracy"])
    for key in ("decoder_accuracy_still", "decoder_accuracy_moving"):  # the split, per budget
        assert rows[30][key] == pytest.approx(m[key])
    assert Path(m["plots"]["budgets"]).is_file()
    for key in KEYS[:7]:
        assert math.isfinite(m[key]), key


def test_rollouts_render_as_the_labelled_data_was(tmp_path):
    """A run fitted on agent-view BabyAI data is rolled out in the agent's view, unasked."""
    from lapo.envs import episode_seeds, make_env
    from lapo.shards import recorded_env_kwargs

    data = tmp_path / "ego"
    record_dataset(SPEC, data, episodes=2, policy="expert", clip_frames=8, episodes_per_shard=2,
                   size=32, env_kwargs={"view": "agent"}, progress=False, verbose=False)  # fmt: skip
    assert recorded_env_kwargs(data) == {"view": "agent"}
    torch.manual_seed(0)
    pcfg = PolicyModelConfig(impala_scale=1, hidden=16, target="continuous")
    policy = LatentPolicy(pcfg, context=2, image_size=32, latent_dim=7)
    space = read_manifest(data)["action_space"]
    agent = Agent(method="bc", action_space=space, context=2, policy=policy,
                  info={"env_kwargs": recorded_env_kwargs(data), "image_shape": [32, 32]})  # fmt: skip
    save_agent(agent, tmp_path / "bc", policy_config=to_dict(pcfg))
    cfg = EvaluateConfig(episodes=1, max_steps=3, device="cpu", progress=False)
    m = evaluate(cfg, tmp_path / "bc", tmp_path / "m.json", env=SPEC)
    assert m["env_kwargs"] == {"view": "agent"}
    first = np.asarray(Image.open(tmp_path / "m_rollout.gif").convert("RGB"))
    env_seed, _ = episode_seeds(0, 0)
    ego = make_env(SPEC, size=32, view="agent").reset(env_seed)
    top = make_env(SPEC, size=32).reset(env_seed)
    err = lambda a, b: np.abs(a.astype(int) - b.astype(int)).mean()  # noqa: E731
    assert err(first, ego) < err(first, top)
    m = evaluate(replace(cfg, env_view="full"), tmp_path / "bc", tmp_path / "full.json", env=SPEC)
    assert m["env_kwargs"] == {"view": "full"}
    with pytest.raises(ValueError, match="env-view"):
        evaluate(replace(cfg, env_view="agent"), tmp_path / "bc", tmp_path / "x.json",
                 env="procgen:bigfish")  # fmt: skip


def test_latent_scatter_spreads_piled_codes_so_every_point_shows(tmp_path):
    """Three codes hold 45 windows of three classes; the rarest class sits on every code."""
    from lapo.plots import plot_latents_2d, spread_spots

    codes = np.array([[0, 0], [5, 0], [0, 5]], dtype=np.float32)
    acts = np.repeat([0, 1, 2], [30, 12, 3])
    spot = np.array([0] * 15 + [1] * 15 + [0] * 6 + [1] * 6 + [0, 1, 2])
    pts, spots = spread_spots(codes[spot])
    assert spots == 3
    gaps = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(len(pts)) * 1e9  # (N, N)
    span = np.ptp(pts, axis=0).max()
    assert gaps.min() > 0.02 * span, "two points drawn on top of each other"
    assert np.linalg.norm(pts - codes[spot], axis=1).max() <= 5 / 3 + 1e-6  # by its own code
    again, _ = spread_spots(codes[spot])
    assert np.array_equal(pts, again)  # seeded
    scattered = np.random.default_rng(0).normal(size=(40, 2))
    assert spread_spots(scattered)[0] is scattered  # points that do not pile up stay as they are
    # many codes, a few windows each (45 windows on 17 spots): every pile is spread too,
    # and a window alone on its code stays on it
    rng = np.random.default_rng(1)
    many = rng.normal(size=(17, 2))
    on = np.concatenate([np.arange(17), rng.integers(0, 17, 28)])
    pts, spots = spread_spots(many[on])
    gaps = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(len(pts)) * 1e9  # (N, N)
    assert spots == 17 and gaps.min() > 1e-3 * np.ptp(pts, axis=0).max()
    alone = np.flatnonzero(np.bincount(on, minlength=17) == 1)
    for s in alone:
        assert np.array_equal(pts[on == s], many[[s]])
    path = plot_latents_2d(
        codes[spot], acts, tmp_path / "latents.png", action_names=["f", "l", "r"]
    )
    assert Image.open(path).size[0] > 100
