"""LAPO's online claim, measured: PPO from the latent policy against PPO from scratch.

For each seed, two `lapo rl` runs on the same env with the same settings and frame
budget: one from a stage-2 latent policy with no action labels (the action head learns
from reward alone), one `--from-scratch` (the same network with fresh weights, no LAM).
Each run's metrics.csv (one row per PPO update) gives its learning curve; the figure
reported is the env frames until the episodes of ``--smooth`` consecutive updates first
reach ``--target`` success rate (or mean return, with ``--by return``). Results go to
OUT/table.md, OUT/results.json and OUT/curves.png. A step is skipped when its output
exists and was made by the same command (`lapo.stages`), so a rerun resumes.

    python experiments/rl_curves.py --policy runs/demo/policy --env babyai:BabyAI-GoToObj-v0 \\
        --out runs/exp/rl_babyai --frames 100000 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from label_efficiency import CONFIGS, Chain

from lapo.cli_args import HelpFormatter

METHODS = {"latent": [], "scratch": ["--from-scratch"]}


def read_curve(path: Path, by: str, smooth: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """metrics.csv -> (frames, success rate or mean return) of the updates that saw episodes,
    each value the episode-weighted mean over that update and the `smooth` - 1 before it."""
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if int(r["episodes"] or 0) > 0]
    key = "success_rate" if by == "success" else "return_mean"
    frames = np.array([int(r["frames"]) for r in rows], np.int64)
    values = np.array([float(r[key]) for r in rows], np.float64)
    counts = np.array([int(r["episodes"]) for r in rows], np.float64)
    sums = np.cumsum(np.concatenate([[0.0], values * counts]))
    ns = np.cumsum(np.concatenate([[0.0], counts]))
    lo = np.maximum(np.arange(len(rows)) + 1 - smooth, 0)
    hi = np.arange(len(rows)) + 1
    return frames, (sums[hi] - sums[lo]) / np.maximum(ns[hi] - ns[lo], 1)


def frames_to(frames: np.ndarray, values: np.ndarray, target: float) -> int | None:
    """Env frames at the first (smoothed) value that reaches `target` (None: never)."""
    hit = np.flatnonzero(values >= target)
    return int(frames[hit[0]]) if len(hit) else None


def plot(curves: dict, path: Path, *, by: str, target: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colours = {"latent": "tab:blue", "scratch": "tab:grey"}
    for method, runs in curves.items():
        for i, (frames, values) in enumerate(runs):
            label = f"{method} ({len(runs)} seeds)" if i == 0 else None
            ax.plot(frames, values, color=colours.get(method), alpha=0.8, label=label)
    ax.axhline(target, color="k", linestyle=":", linewidth=1)
    ax.set_xlabel("env frames")
    ax.set_ylabel("success rate" if by == "success" else "mean return")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--policy", required=True, help="stage-2 run directory (lapo train-policy)")
    p.add_argument("--env", required=True, help="procgen:GAME, babyai:ID or minigrid:ID")
    p.add_argument("--out", required=True, help="experiment folder (a rerun resumes it)")
    p.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated")
    p.add_argument("--frames", type=int, default=100_000, help="env frames per run")
    p.add_argument("--config", default=str(CONFIGS / "rl" / "cpu.yaml"), help="lapo rl config")
    p.add_argument(
        "--by", choices=["success", "return"], default="success", help="what --target measures"
    )
    p.add_argument("--target", type=float, default=0.9, help="success rate (or return) to reach")
    p.add_argument(
        "--smooth",
        type=int,
        default=3,
        help="updates averaged (episode-weighted) before the target is checked: one update's "
        "few dozen episodes are noisy",
    )
    p.add_argument("--methods", default="latent,scratch", help="which runs, comma-separated")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more lapo rl --set")
    a = p.parse_args(argv)

    out = Path(a.out)
    c = Chain(out)
    seeds = [int(s) for s in a.seeds.split(",")]
    methods = [m for m in a.methods.split(",") if m]
    curves: dict[str, list] = {m: [] for m in methods}
    reached: dict[str, list] = {m: [] for m in methods}
    for seed in seeds:
        for m in methods:
            run = out / f"{m}_{seed}"
            c.run(
                ["lapo.cli", "rl", "--policy", a.policy, "--env", a.env, "--out", run,
                 "--config", a.config, *METHODS[m], "--set", f"seed={seed}",
                 f"total_frames={a.frames}", *a.set],
                run / "agent.json",
            )  # fmt: skip
            frames, values = read_curve(run / "metrics.csv", a.by, a.smooth)
            curves[m].append((frames, values))
            reached[m].append(frames_to(frames, values, a.target))

    def summary(xs: list[int | None]) -> str:
        done = [x for x in xs if x is not None]
        med = f"median {int(np.median(done))}" if len(done) == len(xs) else "not all reached it"
        return ", ".join("never" if x is None else str(x) for x in xs) + f" ({med})"

    what = f"{a.by} {a.target}"
    lines = [
        f"{a.env}: env frames until the episodes of {a.smooth} consecutive updates reach {what} "
        f"({a.frames} frames a run, seeds {a.seeds}; {a.config})",
        "",
        "| start | frames to target, per seed | final (smoothed) value, per seed |",
        "|---|---|---|",
        *(f"| {m} | {summary(reached[m])} | "
          + ", ".join(f"{v[-1]:.3f}" if len(v) else "-" for _, v in curves[m]) + " |"
          for m in methods),
    ]  # fmt: skip
    if set(methods) >= {"latent", "scratch"}:
        lat = [x for x in reached["latent"] if x is not None]
        scr = [x if x is not None else a.frames for x in reached["scratch"]]
        if len(lat) == len(seeds):
            bound = "at least " if None in reached["scratch"] else ""
            ratio = np.median(scr) / max(np.median(lat), 1)
            lines += ["", f"from scratch / latent, medians: {bound}{ratio:.1f}x"]
    plot(curves, out / "curves.png", by=a.by, target=a.target, title=a.env)
    res = {
        "env": a.env, "policy": str(a.policy), "frames": a.frames, "seeds": seeds, "by": a.by,
        "target": a.target, "smooth": a.smooth, "frames_to_target": reached,
        "curves": {m: [[f.tolist(), v.tolist()] for f, v in cs] for m, cs in curves.items()},
        "seconds": {Path(k).parent.name: round(v) for k, v in c.times.items()},
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
