"""LAPO's online claim, measured: PPO from the latent policy against PPO from scratch.

For each seed, one `lapo rl` run per method on the same env with the same settings and
frame budget, none with action labels: from a stage-2 latent policy whose action head
learns from reward alone (latent, LAPO's paper) or from the agent's own transitions
(self-label, lapo's CPU default), and `--from-scratch` (the same network with fresh
weights, no LAM).
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
import json
from pathlib import Path

import numpy as np
from label_efficiency import CONFIGS, Chain

from lapo.cli_args import HelpFormatter
from lapo.plots import plot_rl_curves, read_rl_curve

# --set of each method, after the config's: "latent" pins the paper's head (reward only)
# whatever the config says; "self-label" takes --self-label-epochs/--self-label-frames
METHODS = {
    "latent": ["self_label_epochs=0", "head_lr_scale=1"],
    "scratch": [],
    "self-label": [],
}
COLOURS = {"latent": "tab:blue", "scratch": "tab:grey", "self-label": "tab:orange"}
KEYS = {"success": "success_rate", "return": "return_mean"}  # --by -> metrics.csv column


def frames_to(frames: np.ndarray, values: np.ndarray, target: float) -> int | None:
    """Env frames at the first (smoothed) value that reaches `target` (None: never)."""
    hit = np.flatnonzero(values >= target)
    return int(frames[hit[0]]) if len(hit) else None


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
    p.add_argument(
        "--methods",
        default="latent,scratch",
        help="which runs, comma-separated: latent (the latent policy, its head from reward "
        "only, as in LAPO's paper, whatever --config says), scratch (--from-scratch), "
        "self-label (the latent policy, its head fitted to the agent's own transitions: "
        "--self-label-epochs; configs/rl/cpu.yaml's setting)",
    )
    p.add_argument(
        "--self-label-epochs", type=int, default=2, help="self_label_epochs of the self-label runs"
    )
    p.add_argument(
        "--self-label-frames", type=int, default=0, help="self_label_frames of the self-label runs"
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more lapo rl --set")
    a = p.parse_args(argv)

    out = Path(a.out)
    c = Chain(out)
    seeds = [int(s) for s in a.seeds.split(",")]
    methods = [m for m in a.methods.split(",") if m]
    if bad := [m for m in methods if m not in METHODS]:
        p.error(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(METHODS)}")
    curves: dict[str, list] = {m: [] for m in methods}
    reached: dict[str, list] = {m: [] for m in methods}
    for seed in seeds:
        for m in methods:
            run = out / f"{m}_{seed}"
            c.run(
                ["lapo.cli", "rl", "--policy", a.policy, "--env", a.env, "--out", run,
                 "--config", a.config, *(["--from-scratch"] if m == "scratch" else []),
                 "--set", f"seed={seed}", f"total_frames={a.frames}", *METHODS[m], *a.set,
                 *([f"self_label_epochs={a.self_label_epochs}",
                    f"self_label_frames={a.self_label_frames}"] if m == "self-label" else [])],
                run / "agent.json",
            )  # fmt: skip
            frames, values = read_rl_curve(run / "metrics.csv", KEYS[a.by], a.smooth)
            curves[m].append((frames, values))
            reached[m].append(frames_to(frames, values, a.target))

    def summary(xs: list[int | None]) -> str:
        done = [x for x in xs if x is not None]
        med = f"median {int(np.median(done))}" if len(done) == len(xs) else "not all reached it"
        return ", ".join("never" if x is None else str(x) for x in xs) + f" ({med})"

    what = f"{a.by} {a.target}"
    config = Path(a.config).resolve()
    if config.is_relative_to(CONFIGS.resolve()):  # the packaged configs, named as in the repo
        config = Path("configs") / config.relative_to(CONFIGS.resolve())
    lines = [
        f"{a.env}: env frames until the episodes of {a.smooth} consecutive updates reach {what} "
        f"({a.frames} frames a run, seeds {a.seeds}; {config})",
        "",
        "| start | frames to target, per seed | final (smoothed) value, per seed |",
        "|---|---|---|",
        *(f"| {m} | {summary(reached[m])} | "
          + ", ".join(f"{v[-1]:.3f}" if len(v) else "-" for _, v in curves[m]) + " |"
          for m in methods),
    ]  # fmt: skip
    for m in (x for x in ("latent", "self-label") if x in methods and "scratch" in methods):
        lat = [x for x in reached[m] if x is not None]
        scr = [x if x is not None else a.frames for x in reached["scratch"]]
        if len(lat) == len(seeds):
            bound = "at least " if None in reached["scratch"] else ""
            ratio = np.median(scr) / max(np.median(lat), 1)
            lines += ["", f"from scratch / {m}, medians: {bound}{ratio:.1f}x"]
    ylabel = "success rate" if a.by == "success" else "mean return"
    plot_rl_curves({ylabel: curves}, out / "curves.png", title=a.env, target=a.target,
                   colours=COLOURS)  # fmt: skip
    res = {
        "env": a.env, "policy": str(a.policy), "frames": a.frames, "seeds": seeds, "by": a.by,
        "target": a.target, "smooth": a.smooth, "frames_to_target": reached,
        "curves": {m: [[f.tolist(), v.tolist()] for f, v in cs] for m, cs in curves.items()},
        "seconds": c.seconds(),
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
