"""The LAPO claim, measured: how far do a few labels go after pretraining on video alone?

Two experiments, each a chain of ordinary lapo commands (printed as they run, so any
of them can be repeated by hand). A step is skipped when its output exists and was made
by the same command and inputs (`lapo.stages`), so a killed run resumes by running the
same line again, and one with other settings reruns what they change. Results go to OUT/table.md and
OUT/results.json.

procgen: record a Procgen game with the sticky random policy (train set, ~100k frames
by default, and a separate held-out recording), pretrain stage 1 on the train set as
unlabelled video, then decoder accuracy on the held-out recording against the label
budget for
  - lapo: a decoder from the frozen IDM's latent actions, fitted on N labels;
  - idm-supervised: an IDM of the same encoder trained from scratch on the same N labels;
  - idm-supervised from stage 1: the pretrained IDM itself trained on the same N labels
    (`lapo finetune --method idm-supervised --lam RUN`), as many updates as the one above;
  - ceiling: the supervised IDM trained on every label of the train set;
  - identifiable: the most an IDM that reads the action from o[t+1] can score when actions
    are drawn uniformly, measured in the emulator (experiments/action_ceiling.py: every
    action tried from the same states, those with the same next frame counted as one),
    written to OUT/eval/action_ceiling.json.

babyai: record expert (BabyAI bot) demos with random detours, pretrain stage 1 and clone the latent policy
on them as unlabelled video, then closed-loop success rate of
  - lapo: latent policy + decoder, fine-tuned end to end on a fraction of the transitions;
  - bc (same labels): behaviour cloning of the true actions on that fraction only;
  - bc (all labels): behaviour cloning on every labelled transition.

    python experiments/label_efficiency.py procgen --game bigfish --out runs/exp_procgen
    python experiments/label_efficiency.py babyai --out runs/exp_babyai

Defaults are sized for a 2-core CPU (about an hour each); ``--steps`` scales every
training length, and ``--impala-scale 4`` with ``--steps 10`` moves
towards the paper's scale on a GPU.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from lapo.cli_args import HelpFormatter, RawHelpFormatter
from lapo.config import CONFIGS, read_yaml
from lapo.identifiability import measure
from lapo.io import atomic_write_json
from lapo.stages import run_step


class Chain:
    """Runs commands in order, skipping those already made by the same command; logs each one."""

    def __init__(self, out: Path):
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = out / "commands.txt"

        self.times_file = out / "times.json"  # wall seconds of each step, kept across resumes
        self.times = json.loads(self.times_file.read_text()) if self.times_file.is_file() else {}

    def run(self, argv: list, marker: Path) -> float | None:
        """Runs (or skips) one step; returns the wall seconds it took when it ran, if known."""
        shown = " ".join(shlex.quote(str(a)) for a in argv)
        key = str(marker)
        t0 = time.time()
        if not run_step(argv, marker, label=shown, banner=f"[run] {shown}"):
            print(f"[skip] {shown}", flush=True)
            return self.times.get(key)
        seconds = time.time() - t0
        with self.log.open("a") as f:
            f.write(f"{shown}  # {seconds:.0f} s\n")
        self.times[key] = seconds
        self.times_file.write_text(json.dumps(self.times, indent=1))
        return seconds

    def seconds(self) -> dict[str, int]:
        """Wall seconds of each step that ran, named by its output folder (lam, idm_1000, ...);
        the scores in eval/ by file (eval/lapo, eval/idm_1000, ...)."""
        named = {}
        for marker, secs in self.times.items():
            p = Path(marker)
            named[f"eval/{p.stem}" if p.parent.name == "eval" else p.parent.name] = round(secs)
        return named


def metrics(path: Path) -> dict:
    return json.loads(path.read_text())


def steps(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def procgen(a: argparse.Namespace) -> dict:
    out = Path(a.out)
    c = Chain(out)
    if a.data:  # an earlier chain's recordings: nothing is recorded, nothing written there
        data = Path(a.data)
        train, held = data / "train", data / "heldout"
        for d in (train, held):
            if not (d / "manifest.json").is_file():
                raise SystemExit(
                    f"label_efficiency: --data {data}: no {d / 'manifest.json'}; expected the "
                    "train/ and heldout/ recordings of an earlier procgen chain (its OUT/data)"
                )
    else:
        train, held = out / "data" / "train", out / "data" / "heldout"
        rec = [
            "data_prep.record",
            f"procgen:{a.game}",
            "--policy",
            "sticky",
            "--workers",
            str(a.workers),
        ]
        c.run(
            [*rec, "--episodes", a.episodes, "--seed", a.seed, "--out", train],
            train / "manifest.json",
        )
        c.run(
            [*rec, "--episodes", max(10, a.episodes // 10), "--seed", a.seed + 1000, "--out", held],
            held / "manifest.json",
        )
    identifiable = out / "eval" / "action_ceiling.json"
    if a.action_states and not identifiable.is_file():  # seconds: no model, only the emulator
        found = measure(f"procgen:{a.game}", states=a.action_states, policy="sticky", seed=a.seed,
                        max_episode_steps=30)  # fmt: skip
        identifiable.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(identifiable, found)
    lam = out / "lam"
    size = ["--set", f"model.image_size={a.image_size}", f"model.impala_scale={a.impala_scale}"]
    recipe = read_yaml(CONFIGS / "lam" / "procgen_cpu.yaml")
    n = steps(a.lam_steps or recipe["trainer"]["max_steps"], a.steps)

    def pretrain(run: Path, *extra: str) -> list:
        """The stage-1 command of this chain into `run`, with `extra` settings before --lam-set."""
        return ["lapo.cli", "pretrain", "--config", CONFIGS / "lam" / "procgen_cpu.yaml", "--data",
                train, "--out", run, *size, "--set", f"trainer.max_steps={n}",
                *([f"model.bottleneck={a.bottleneck}"] if a.bottleneck else []),
                f"trainer.seed={a.seed}", f"trainer.val_every_n_steps={n}",
                f"trainer.ckpt_every_n_steps={max(200, n // 4)}", *extra, *a.lam_set]  # fmt: skip

    lam_seconds = c.run(pretrain(lam), lam / "model.safetensors")
    budgets = [int(b) for b in a.budgets.split(",")]
    ev = out / "eval"
    # lapo: a decoder per budget (lapo finetune --label-budgets), scored on the same held-out
    # windows (lapo evaluate --budget-runs); the largest budget's run is the one evaluated
    lapo_ft = ["--config", CONFIGS / "finetune" / "lapo.yaml", "--set", f"seed={a.seed}"]
    curve = out / "lapo_budgets"
    c.run(
        ["lapo.cli", "finetune", "--lam", lam, "--labeled", train, "--label-budgets", a.budgets,
         "--out", curve, *lapo_ft],
        curve / "budgets.json",
    )  # fmt: skip
    c.run(
        ["lapo.cli", "evaluate", "--model", curve / f"budget-{budgets[-1]}", "--labeled", held,
         "--split", "all", "--budget-runs", curve, "--out", ev / "lapo.json"],
        ev / "lapo.json",
    )  # fmt: skip
    idm = [
        "--config", CONFIGS / "finetune" / "idm_supervised.yaml", "--set",
        f"model.image_size={a.image_size}", f"model.impala_scale={a.impala_scale}", f"seed={a.seed}",
    ]  # fmt: skip
    idm_budgets = (
        budgets if a.idm_budgets is None else [int(b) for b in a.idm_budgets.split(",") if b]
    )

    def score(run: Path, name: str) -> None:
        """`lapo evaluate` of one run on the held-out recording, into eval/NAME.json."""
        c.run(
            ["lapo.cli", "evaluate", "--model", run, "--labeled", held, "--split", "all",
             "--out", ev / f"{name}.json"],
            ev / f"{name}.json",
        )  # fmt: skip

    def budget_epochs(b: int) -> list[str]:
        # a step budget rather than an epoch count: small budgets get as many updates as
        # they can use without the all-labels run costing hours on a CPU
        return [f"epochs={max(2, min(a.idm_epochs, round(a.idm_updates * 64 / b)))}"]

    for b in [*idm_budgets, *([0] if a.ceiling else [])]:
        name = f"idm_{b}" if b else "idm_all"
        run = out / name
        if b:
            epochs = budget_epochs(b)
        elif lam_seconds and not a.ceiling_epochs:  # the same wall time as stage 1
            epochs = ["epochs=1000", f"max_minutes={lam_seconds / 60:.1f}"]
        else:
            epochs = [f"epochs={a.ceiling_epochs or 3}"]
        c.run(
            ["lapo.cli", "finetune", "--method", "idm-supervised", "--labeled", train,
             "--label-budget", b, "--out", run, *idm, *epochs],
            run / "agent.json",
        )  # fmt: skip
        score(run, name)
    # the pretrained IDM fine-tuned on the N labels, with the updates of the baseline above
    lam_idm_budgets = idm_budgets if a.lam_idm_budgets is None else [int(b) for b in a.lam_idm_budgets.split(",") if b]  # fmt: skip
    for b in lam_idm_budgets:
        run = out / f"idm_lam_{b}"
        c.run(
            ["lapo.cli", "finetune", "--method", "idm-supervised", "--lam", lam, "--labeled", train,
             "--label-budget", b, "--out", run, "--config", CONFIGS / "finetune" / "idm_supervised.yaml",
             "--set", f"seed={a.seed}", *budget_epochs(b)],
            run / "agent.json",
        )  # fmt: skip
        score(run, f"idm_lam_{b}")
    # lapo, stage 1 with labels: the same N labels also train stage 1's weak-supervision
    # head (data.labeled), so each budget needs its own stage-1 run
    semi = {}
    for b in [int(x) for x in a.stage1_labels.split(",") if x]:
        lam_b, dec_b = out / f"lam_labels_{b}", out / f"lapo_labels_{b}"
        c.run(
            pretrain(lam_b, f"data.labeled={train}", f"data.label_budget={b}",
                     f"data.label_seed={a.seed}", f"model.sup_weight={a.sup_weight}"),
            lam_b / "model.safetensors",
        )  # fmt: skip
        c.run(
            ["lapo.cli", "finetune", "--lam", lam_b, "--labeled", train, "--label-budget", b,
             "--out", dec_b, *lapo_ft],
            dec_b / "agent.json",
        )  # fmt: skip
        score(dec_b, f"lapo_labels_{b}")
        semi[b] = metrics(ev / f"lapo_labels_{b}.json")
    lapo_rows = {r["budget"]: r for r in metrics(ev / "lapo.json")["label_budgets"]}
    ceiling = metrics(ev / "idm_all.json")["decoder_accuracy"] if a.ceiling else None
    n_all = metrics(out / "idm_all" / "metrics.json") if a.ceiling else None
    rows = []
    for b in budgets:
        rows.append(
            {"budget": b, "lapo": lapo_rows[b]["decoder_accuracy"],
             "lapo_stage1_labels": semi[b]["decoder_accuracy"] if b in semi else None,
             "idm_supervised": metrics(ev / f"idm_{b}.json")["decoder_accuracy"]
             if b in idm_budgets else None,
             "idm_from_stage1": metrics(ev / f"idm_lam_{b}.json")["decoder_accuracy"]
             if b in lam_idm_budgets else None, "ceiling": ceiling}
        )  # fmt: skip
    lam_m = metrics(ev / "lapo.json")
    found = metrics(identifiable) if identifiable.is_file() else {}
    res = {
        "experiment": "procgen", "game": a.game, "rows": rows, "ceiling_run": n_all,
        "identifiable": found.get("ceiling"), "identifiable_run": found or None,
        "still_share": lam_m.get("still_share"),
        "seconds": c.seconds(),
        "probe_accuracy": lam_m.get("probe_accuracy"),
        "probe_majority_baseline": lam_m.get("probe_majority_baseline"),
        "fdm_psnr": lam_m.get("fdm_psnr"), "fdm_psnr_copy_baseline": lam_m.get("fdm_psnr_copy_baseline"),
        "stage1_labels": {
            b: {k: m.get(k) for k in ("decoder_accuracy", "probe_accuracy", "probe_majority_baseline",
                                      "fdm_psnr", "fdm_psnr_copy_baseline")}
            for b, m in semi.items()
        },
    }  # fmt: skip
    lines = [
        f"Procgen {a.game}, sticky random policy; decoder accuracy on the held-out recording",
        "",
        "| labels | lapo | lapo, labels in stage 1 too | idm-supervised | idm-supervised from stage 1's IDM | ceiling (all labels) |",
        "|---:|---:|---:|---:|---:|---:|",
        *(f"| {r['budget']} | {r['lapo']:.3f} | {_cell(r['lapo_stage1_labels'])} | "
          f"{_cell(r['idm_supervised'])} | {_cell(r['idm_from_stage1'])} | {_cell(r['ceiling'])} |" for r in rows),
        "",
        f"identifiable: {_cell(res['identifiable'])}, the most an IDM that reads the action from "
        "o[t+1] can score under uniform actions (those with the same next frame are one, "
        "measured in the emulator)" + ("" if res["still_share"] is None else
        f"; {res['still_share']:.3f} of the held-out windows are still"),
        f"latent probe accuracy {res['probe_accuracy']} (majority {res['probe_majority_baseline']}); "
        f"FDM PSNR {res['fdm_psnr']} dB (copy-last-frame {res['fdm_psnr_copy_baseline']} dB)",
        *(f"stage 1 with {b} labels: probe {m['probe_accuracy']}, FDM PSNR {m['fdm_psnr']} dB"
          for b, m in res["stage1_labels"].items()),
        "wall seconds: " + ", ".join(f"{k} {v}" for k, v in res["seconds"].items()),
    ]  # fmt: skip
    return finish(out, res, lines)


def _cell(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def babyai(a: argparse.Namespace) -> dict:
    out = Path(a.out)
    c = Chain(out)
    data = out / "data" / "demos"
    c.run(
        ["data_prep.record", a.env, "--policy", "expert", "--episodes", a.episodes, "--seed", a.seed,
         "--out", data, "--workers", a.workers, "--episodes-per-shard", max(1, a.episodes // 8),
         "--epsilon", a.epsilon, "--view", a.view],
        data / "manifest.json",
    )  # fmt: skip
    frames = metrics(data / "manifest.json")
    transitions = int(frames["num_frames"]) - int(frames["num_samples"])  # clips overlap by 1
    budget = max(1, round(a.label_fraction * transitions))
    lam, pol = out / "lam", out / "policy"
    c.run(
        ["lapo.cli", "pretrain", "--config", CONFIGS / "lam" / "demo.yaml", "--data", data, "--out", lam,
         "--set", f"trainer.max_steps={steps(a.lam_steps, a.steps)}", f"trainer.seed={a.seed}",
         *a.lam_set],
        lam / "model.safetensors",
    )  # fmt: skip
    c.run(
        ["lapo.cli", "train-policy", "--lam", lam, "--data", data, "--out", pol,
         "--config", CONFIGS / "policy" / "demo.yaml",
         "--set", f"trainer.max_steps={steps(a.policy_steps, a.steps)}", f"trainer.seed={a.seed}"],
        pol / "policy.safetensors",
    )  # fmt: skip
    ft = ["--labeled", data, "--config", CONFIGS / "finetune" / "demo.yaml"]
    runs = {
        "lapo": (["--lam", lam, "--policy", pol, "--finetune-policy", "--label-budget", budget],
                 a.epochs),
        "bc": (["--method", "bc", "--label-budget", budget], a.epochs),
        "bc_all": (["--method", "bc", "--label-budget", 0], a.epochs_all),
    }  # fmt: skip
    ev = out / "eval"
    results = {}
    for name, (flags, epochs) in runs.items():
        run = out / name
        c.run(
            ["lapo.cli", "finetune", *flags, "--out", run, *ft, "--set", f"epochs={epochs}",
             f"seed={a.seed}"],
            run / "agent.json",
        )  # fmt: skip
        c.run(
            ["lapo.cli", "evaluate", "--model", run, "--env", a.env, "--episodes", a.eval_episodes,
             "--out", ev / f"{name}.json"],
            ev / f"{name}.json",
        )  # fmt: skip
        m = metrics(ev / f"{name}.json")
        labels = metrics(run / "selection.json")["train_transitions"]
        results[name] = {"labels": labels, "success_rate": m["success_rate"],
                         "return_mean": m["return_mean"], "random_success_rate": m["random_success_rate"]}  # fmt: skip
    res = {"experiment": "babyai", "env": a.env, "transitions": transitions, "results": results}
    ratio = results["lapo"]["success_rate"] / max(results["bc_all"]["success_rate"], 1e-9)
    lines = [
        f"{a.env}, {a.episodes} expert episodes ({transitions} transitions); "
        f"success rate over {a.eval_episodes} seeded episodes",
        "",
        "| agent | labelled transitions | success rate | mean return |",
        "|---|---:|---:|---:|",
        *(f"| {n} | {r['labels']} | {r['success_rate']:.3f} | {r['return_mean']:.3f} |" for n, r in results.items()),
        f"| random | 0 | {results['lapo']['random_success_rate']:.3f} | |",
        "",
        f"lapo / bc (all labels) success: {ratio:.2f}",
    ]  # fmt: skip
    return finish(out, res, lines)


def finish(out: Path, res: dict, lines: list[str]) -> dict:
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=RawHelpFormatter)
    sub = p.add_subparsers(dest="experiment", required=True)
    pg = sub.add_parser(
        "procgen",
        help="decoder accuracy against label budget on a Procgen game",
        formatter_class=HelpFormatter,
    )
    pg.add_argument("--game", default="bigfish", help="Procgen game to record")
    pg.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="use the recordings in DIR/train and DIR/heldout (an earlier chain's OUT/data) "
        "instead of recording; --game, --episodes and --seed then name and seed the runs only",
    )
    pg.add_argument(
        "--episodes", type=int, default=900, help="train episodes (bigfish: ~110 frames each)"
    )
    pg.add_argument("--budgets", default="100,300,1000,3000", help="label budgets, comma-separated")
    pg.add_argument(
        "--lam-steps",
        type=int,
        default=0,
        help="stage-1 training steps (0: trainer.max_steps of configs/lam/procgen_cpu.yaml)",
    )
    pg.add_argument(
        "--bottleneck",
        default=None,
        choices=["vq", "fsq", "continuous"],
        help="stage-1 bottleneck (default: the one in configs/lam/procgen_cpu.yaml)",
    )
    pg.add_argument(
        "--image-size",
        type=int,
        default=64,
        help="frames are resized to this for the models (32 px loses the player's motion)",
    )
    pg.add_argument(
        "--stage1-labels",
        default="",
        help="budgets (comma-separated) whose labels also train stage 1's weak-supervision head "
        "(data.labeled): one more stage-1 run, decoder and score per budget",
    )
    pg.add_argument(
        "--sup-weight", type=float, default=1.0, help="weight of that head's loss (--stage1-labels)"
    )
    pg.add_argument(
        "--idm-budgets",
        default=None,
        help="budgets (comma-separated) of the idm-supervised baseline (default: --budgets); "
        "each is a from-scratch IDM run, the chain's longest steps on a CPU",
    )
    pg.add_argument(
        "--lam-idm-budgets",
        default=None,
        help="budgets (comma-separated) at which stage 1's IDM is also trained on the labels "
        "(idm-supervised --lam; default: --idm-budgets; empty: none)",
    )
    pg.add_argument(
        "--no-ceiling",
        dest="ceiling",
        action="store_false",
        help="skip the all-labels supervised IDM (its cells stay empty)",
    )
    pg.add_argument(
        "--action-states",
        type=int,
        default=1000,
        help="emulator states at which every action is tried for the identifiable ceiling "
        "(experiments/action_ceiling.py; about 20 s per 1000; 0 skips it)",
    )
    pg.add_argument("--impala-scale", type=int, default=1, help="IMPALA encoder width factor")
    pg.add_argument("--idm-epochs", type=int, default=60, help="most epochs for a small budget")
    pg.add_argument(
        "--idm-updates", type=int, default=1500, help="optimiser steps aimed at per budget"
    )
    pg.add_argument(
        "--ceiling-epochs",
        type=int,
        default=0,
        help="epochs of the all-labels supervised IDM (0: as long as stage 1 took, in wall "
        "time; 3 epochs where that time is not known)",
    )
    pg.set_defaults(func=procgen)
    bb = sub.add_parser(
        "babyai",
        help="closed-loop success with a fraction of labels on BabyAI",
        formatter_class=HelpFormatter,
    )
    bb.add_argument(
        "--env",
        default="babyai:BabyAI-GoToObj-v0",
        help="a babyai level whose goal is in the picture (GoToLocal's is only in the text)",
    )
    bb.add_argument(
        "--view",
        choices=("agent", "full"),
        default="agent",
        help="the agent's own view (default) or the top-down grid; see lapo demo --help",
    )
    bb.add_argument(
        "--epsilon",
        type=float,
        default=0.25,
        help="chance of a random move in the recorded demos (a deterministic expert gives "
        "stage 1 nothing to learn; see lapo demo --help)",
    )
    bb.add_argument("--episodes", type=int, default=2000, help="demo episodes to record")
    bb.add_argument(
        "--label-fraction", type=float, default=0.02, help="share of transitions labelled"
    )
    bb.add_argument("--lam-steps", type=int, default=2000, help="stage-1 training steps")
    bb.add_argument("--policy-steps", type=int, default=3000, help="stage-2 training steps")
    bb.add_argument("--epochs", type=int, default=30, help="fine-tune epochs on the small budget")
    bb.add_argument("--epochs-all", type=int, default=5, help="bc epochs on all labels")
    bb.add_argument(
        "--eval-episodes", type=int, default=100, help="closed-loop evaluation episodes"
    )
    bb.set_defaults(func=babyai)
    for s in (pg, bb):
        s.add_argument("--out", required=True, help="experiment folder (a rerun resumes it)")
        s.add_argument("--seed", type=int, default=0, help="seed of recordings and training")
        s.add_argument("--steps", type=float, default=1.0, help="scale every training length")
        s.add_argument("--workers", type=int, default=2, help="recording processes")
        s.add_argument(
            "--lam-set",
            nargs="*",
            default=[],
            metavar="KEY=VALUE",
            help="extra stage-1 settings passed to lapo pretrain --set",
        )
    a = p.parse_args(argv)
    a.func(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
