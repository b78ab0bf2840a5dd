"""`lapo demo`: the whole pipeline on a small local default, with a report.

Every stage is run as the very command a user would type (recorded in
``commands.json`` and printed in the report), so any of them can be repeated by
hand at a larger scale. A stage whose output already exists is reused only when
the stamp beside it (`lapo.stages`) shows it was made by the same command, config
and inputs; otherwise it runs again, as does every stage after it that reads it
(``--fresh`` redoes all). The stages are, in order:

record (unlabelled train set, labelled set, held-out set) -> pretrain (stage 1)
-> train-policy (stage 2) -> finetune (stage 3, lapo) -> finetune (bc baseline,
same labels) -> label (held-out slice) -> finetune budgets (a decoder per label
budget) -> evaluate (each agent, with rollouts; the budgets' decoders) -> rl (PPO, no
labels: the latent policy with a fresh action head, and the same network from scratch;
``--no-rl`` skips it) -> evaluate (each RL agent) -> report.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from lapo.config import CONFIGS, RLConfig, load_config
from lapo.report import RL_RUNS, write_report
from lapo.stages import read_stamp, run_step


@dataclass
class Scale:
    """How big each stage is. `full` took 7.7 minutes end to end on an idle 2-core CPU before
    the RL stages (the README's measured run), which add roughly 3 minutes (from their
    measured frames/s); `quick` took 4.1 minutes, RL included."""

    train_episodes: int
    labeled_episodes: int
    heldout_episodes: int
    lam_steps: int
    policy_steps: int
    label_budget: int
    finetune_epochs: int
    eval_episodes: int
    label_budgets: list[int] = field(default_factory=list)
    rl_frames: int = 0  # env frames of each `lapo rl` run at --steps 1 (0: no RL)


SCALES = {
    "full": Scale(
        train_episodes=400,
        labeled_episodes=200,
        heldout_episodes=40,
        lam_steps=1200,
        policy_steps=2000,
        label_budget=200,
        finetune_epochs=30,
        eval_episodes=50,
        label_budgets=[50, 100, 200, 400, 800],
        rl_frames=8192,
    ),
    "quick": Scale(
        train_episodes=60,
        labeled_episodes=40,
        heldout_episodes=10,
        lam_steps=120,
        policy_steps=80,
        label_budget=60,
        finetune_epochs=8,
        eval_episodes=10,
        label_budgets=[30, 60, 120],
        rl_frames=2048,
    ),
}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on a small local dataset, with a report",
        description=(
            "Record expert demos from a real environment, pretrain the latent action model, "
            "clone the latent policy, fit the action decoder on a small label budget, fine-tune, "
            "pseudo-label a held-out slice, evaluate with closed-loop rollouts against behaviour "
            "cloning on the same labels, fine-tune the latent policy online with PPO, no labels "
            "(lapo rl) against the same network from scratch, and write report.html / "
            "report.md. At the default scale a measured run took 7.7 minutes on an idle 2-core "
            "CPU before the RL stages, which add roughly 3 (--no-rl skips them); --quick is a "
            "first look in a few minutes."
        ),
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument(
        "--quick", action="store_true", help="a first look in a few minutes: tiny data and steps"
    )
    p.add_argument(
        "--env",
        default="babyai:BabyAI-GoToObj-v0",
        help="environment to record and roll out in: babyai:<id> (expert demos), minigrid:<id> or "
        "procgen:<game> (sticky random demos, so success rates are low) "
        "(default: babyai:BabyAI-GoToObj-v0, whose goal is in the picture; in GoToLocal it is "
        "only in the text mission, which a pixel policy never sees)",
    )
    p.add_argument(
        "--view",
        choices=("agent", "full"),
        default="agent",
        help="babyai/minigrid: the agent's own 7x7 view, which turns with it (default), or the "
        "top-down grid. A small CNN reads heading and goal off the agent's view far more "
        "easily: bc on the same 1211 labels succeeded in 0.98 of GoToObj episodes with it, "
        "0.54 with the full grid",
    )
    p.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help="chance that a recorded move is random instead of the expert's (default 0.25 for "
        "babyai:*, 0 otherwise). A deterministic expert's next move follows from the frame, so "
        "the world model can predict it without the latent action, and stage 1 learns nothing",
    )
    p.add_argument(
        "--steps",
        type=float,
        default=1.0,
        help="multiply every training step count by this, the RL env frames included (e.g. 4 "
        "for a longer, better run)",
    )
    p.add_argument(
        "--no-rl",
        action="store_true",
        help="skip the lapo rl runs (and their evaluation and report section)",
    )
    p.add_argument(
        "--fresh", action="store_true", help="redo every stage even if its output exists"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for recording and training")
    p.add_argument("--workers", type=int, default=1, help="processes for recording and labelling")
    return p


class Pipeline:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.scale = SCALES["quick" if args.quick else "full"]
        self.commands: list[dict] = []
        self.env_kind = args.env.split(":", 1)[0]

    def steps(self, n: int) -> int:
        return max(1, int(round(n * self.args.steps)))

    def rl_frames(self, config: Path) -> int:
        """The scale's RL frames times --steps, in whole PPO rollouts of `config`, at least 2
        (so that the curve has two points)."""
        cfg = load_config(RLConfig, config)
        rollout = cfg.num_envs * cfg.rollout_steps
        return rollout * max(2, int(round(self.scale.rl_frames * self.args.steps / rollout)))

    def run_stage(self, name: str, argv: list[str], done_marker: Path, summary) -> None:
        """Run one stage's command unless the same command made its output; print a result line.

        ``commands.json`` gets the command with the wall time of the run that made the
        output: this one, or, for a reused stage, the earlier one its stamp records.
        """
        shown = " ".join(shlex.quote(a) for a in _user_facing(argv))
        label, banner = f"lapo demo: stage {name!r} ({shown})", f"== {name}: {shown}"
        ran = run_step(argv, done_marker, fresh=self.args.fresh, label=label, banner=banner)
        stamp = read_stamp(done_marker) or {}
        seconds = stamp.get("wall_seconds")
        status = "ran" if ran else "reused"
        self.commands.append(
            {"stage": name, "command": shown, "status": status, "seconds": seconds,
             "finished": stamp.get("finished")}
        )  # fmt: skip
        when = f"{seconds:.0f}s" if seconds is not None else "?"
        try:
            line = summary() if summary else ""
        except Exception as e:  # a summary is cosmetic; never let it stop the demo
            line = f"(no summary: {e})"
        shown_status = when if ran else f"reused (ran {stamp.get('finished')}, {when})"
        print(f"[demo] {name:<19} {shown_status:>7}  {line}", flush=True)

    # ------------------------------------------------------------------ stages

    def record(self, name: str, episodes: int, seed: int) -> Path:
        out = self.out / "data" / name
        expert = self.env_kind == "babyai"  # the BabyAI bot; other envs get sticky random moves
        eps = self.args.epsilon if self.args.epsilon is not None else (0.25 if expert else 0.0)
        argv = [
            "lapo.cli", "record", self.args.env, "--episodes", str(episodes),
            "--policy", "expert" if expert else "sticky", "--seed", str(seed), "--out", str(out),
            "--workers", str(self.args.workers), "--episodes-per-shard", str(max(1, episodes // 4)),
        ]  # fmt: skip
        if eps:
            argv += ["--epsilon", str(eps)]
        if self.env_kind in ("babyai", "minigrid"):
            argv += ["--view", self.args.view]
        self.run_stage(f"record {name}", argv, out / "manifest.json", lambda: _dataset_line(out))
        return out

    def rl(self, policy: Path, heldout: Path, env_flags: list[str]) -> None:
        """`lapo rl` from the latent policy (no labels) and from scratch, then `lapo evaluate`
        of each: the runs and JSONs the report's `RL_RUNS` names."""
        config, shown = CONFIGS / "rl" / "cpu.yaml", ["return_mean", "success_rate"]
        settings = ["--config", str(config), "--set", f"total_frames={self.rl_frames(config)}",
                    "--set", f"seed={self.args.seed}"]  # fmt: skip
        latent, scratch = RL_RUNS
        for r, name, start in ((latent, "rl", []), (scratch, "rl scratch", ["--from-scratch"])):
            run, ev = self.out / r.run, self.out / r.eval
            self.run_stage(
                name,
                ["lapo.cli", "rl", "--policy", str(policy), "--env", self.args.env, "--out",
                 str(run), *start, *settings],
                run / "agent.json",
                lambda run=run: _metrics_line(run / "metrics.json", shown),
            )  # fmt: skip
            self.run_stage(
                f"evaluate {name}",
                ["lapo.cli", "evaluate", "--model", str(run), "--labeled", str(heldout),
                 *env_flags, "--split", "all", "--out", str(ev)],
                ev,
                lambda ev=ev: _metrics_line(ev, shown),
            )  # fmt: skip

    def main(self) -> int:
        sc, a = self.scale, self.args
        self.out.mkdir(parents=True, exist_ok=True)
        t_start = time.time()
        train = self.record("train", sc.train_episodes, a.seed)
        labeled = self.record("labeled", sc.labeled_episodes, a.seed + 1000)
        heldout = self.record("heldout", sc.heldout_episodes, a.seed + 2000)

        lam = self.out / "lam"
        self.run_stage(
            "pretrain",
            ["lapo.cli", "pretrain", "--config", str(CONFIGS / "lam" / "demo.yaml"), "--data", str(train),
             "--out", str(lam), "--set", f"trainer.max_steps={self.steps(sc.lam_steps)}",
             "--set", f"trainer.seed={a.seed}"],
            lam / "model.safetensors",
            lambda: _metrics_line(lam / "metrics.json", ["val/psnr", "val/psnr_copy", "val/probe_acc", "val/probe_majority", "val/perplexity"]),
        )  # fmt: skip
        pol = self.out / "policy"
        self.run_stage(
            "train-policy",
            ["lapo.cli", "train-policy", "--lam", str(lam), "--data", str(train), "--out", str(pol),
             "--config", str(CONFIGS / "policy" / "demo.yaml"),
             "--set", f"trainer.max_steps={self.steps(sc.policy_steps)}", "--set", f"trainer.seed={a.seed}"],
            pol / "policy.safetensors",
            lambda: _metrics_line(pol / "metrics.json", ["val/latent_mse", "val/latent_mse_baseline", "val/code_acc"]),
        )  # fmt: skip
        ft_settings = ["--labeled", str(labeled), "--config", str(CONFIGS / "finetune" / "demo.yaml"),
                       "--set", f"epochs={sc.finetune_epochs}", "--set", f"seed={a.seed}"]  # fmt: skip
        ft_common = ["--label-budget", str(sc.label_budget), *ft_settings]
        agent = self.out / "agent"
        self.run_stage(
            "finetune",
            ["lapo.cli", "finetune", "--lam", str(lam), "--policy", str(pol), "--finetune-policy",
             "--out", str(agent), *ft_common],
            agent / "agent.json",
            lambda: _metrics_line(agent / "metrics.json", ["decoder_accuracy", "act_accuracy", "majority_baseline"]),
        )  # fmt: skip
        bc = self.out / "bc"
        self.run_stage(
            "finetune bc",
            ["lapo.cli", "finetune", "--method", "bc", "--out", str(bc), *ft_common],
            bc / "agent.json",
            lambda: _metrics_line(bc / "metrics.json", ["act_accuracy", "majority_baseline"]),
        )  # fmt: skip
        labelled = self.out / "data" / "heldout_labelled"
        self.run_stage(
            "label",
            ["lapo.cli", "label", "--model", str(agent), "--data", str(heldout), "--out", str(labelled)],
            labelled / "manifest.json",
            lambda: _dataset_line(labelled),
        )  # fmt: skip
        budgets = self.out / "budgets"  # a decoder per label budget, for the curve
        self.run_stage(
            "finetune budgets",
            ["lapo.cli", "finetune", "--lam", str(lam), "--label-budgets",
             ",".join(map(str, sc.label_budgets)), "--out", str(budgets), *ft_settings],
            budgets / "budgets.json",
            lambda: f"{len(list(budgets.glob('budget-*/agent.json')))} decoders",
        )  # fmt: skip
        ev = self.out / "eval"
        env_flags = ["--env", a.env, "--episodes", str(sc.eval_episodes)]
        self.run_stage(
            "evaluate",
            ["lapo.cli", "evaluate", "--model", str(agent), "--labeled", str(heldout), *env_flags,
             "--budget-runs", str(budgets), "--split", "all", "--out", str(ev / "lapo.json")],
            ev / "lapo.json",
            lambda: _metrics_line(ev / "lapo.json", ["decoder_accuracy", "success_rate", "return_mean"]),
        )  # fmt: skip
        self.run_stage(
            "evaluate bc",
            ["lapo.cli", "evaluate", "--model", str(bc), "--labeled", str(heldout), *env_flags,
             "--split", "all", "--out", str(ev / "bc.json")],
            ev / "bc.json",
            lambda: _metrics_line(ev / "bc.json", ["success_rate", "return_mean"]),
        )  # fmt: skip
        rl = not a.no_rl and sc.rl_frames > 0
        if rl:
            self.rl(pol, heldout, env_flags)
        (self.out / "commands.json").write_text(json.dumps(self.commands, indent=2))
        wall = time.time() - t_start
        report = write_report(self.out, commands=self.commands, wall_seconds=wall, env=a.env,
                              scale=sc, rl=rl)  # fmt: skip
        reused = sum(c["status"] == "reused" for c in self.commands)
        note = f" ({reused} of {len(self.commands)} stages reused)" if reused else ""
        print(
            f"\n[demo] done in {wall / 60:.1f} min{note}; report: {report['html']} and {report['md']}"
        )
        return 0


def _user_facing(argv: list[str]) -> list[str]:
    """`lapo.cli pretrain ...` -> `lapo pretrain ...`; any other module `m` -> `python -m m`.

    Paths inside the current directory are shown relative to it, as a user would type them.
    """
    cwd = Path.cwd()

    def short(a: str) -> str:
        if a.startswith("/"):
            try:
                return Path(a).relative_to(cwd).as_posix()
            except ValueError:
                return a
        return a

    argv = [short(a) for a in argv]
    if argv[0] == "lapo.cli":
        return ["lapo", *argv[1:]]
    return ["python", "-m", *argv]


def _dataset_line(path: Path) -> str:
    m = json.loads((path / "manifest.json").read_text())
    return f"{m.get('num_samples', '?')} clips, {m.get('num_frames', '?')} frames, {len(m.get('shards', []))} shards"


def _metrics_line(path: Path, keys: list[str]) -> str:
    m = json.loads(path.read_text())
    flat = _flatten(m)
    parts = []
    for k in keys:
        hit = next(
            (
                v
                for kk, v in flat.items()
                if kk == k or kk.endswith("/" + k) or kk.endswith("." + k)
            ),
            None,
        )
        if isinstance(hit, (int, float)):
            parts.append(f"{k}={hit:.3f}")
    if not parts and "loss" in flat:  # a run too short to reach its first validation
        parts.append(f"loss={flat['loss']:.3f} (no validation at this length)")
    return ", ".join(parts)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.fresh and out.exists():
        # only ever delete what a demo wrote
        if not (out / "commands.json").exists() and not (out / "data").exists():
            raise SystemExit(
                f"lapo demo: --fresh refuses to delete {out}: it is not a demo directory"
            )
        shutil.rmtree(out)
    return Pipeline(args).main()
