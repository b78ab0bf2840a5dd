"""`lapo evaluate`: how good is a fine-tuned run? Held-out metrics, rollouts, plots.

Offline (``--labeled DATASET``), on the held-out episodes of the labelled
dataset: the same rule `lapo finetune` used (`lapo.labelled.select_budget`, with
the seed and val_fraction read from the run), so none of these windows was
trained on.

- ``decoder_accuracy`` (discrete) or ``decoder_mse`` (continuous): agent.label
  (IDM + decoder) against the true action of each window.
- ``still_share``, ``decoder_accuracy_still`` and ``decoder_accuracy_moving`` (or the
  ``_mse`` ones), ``still_majority_baseline``: the share of held-out windows whose o[t+1]
  is within ``still_threshold`` grey levels of o[t], and the decoder on those and on the
  rest. A still window shows nothing of its action: there no decoder beats the best
  constant guess, so a low ``decoder_accuracy`` with most windows still is the video's
  limit, not the model's.
- ``policy_accuracy`` / ``policy_mse``: agent.act on the context alone, when the
  run has a policy.
- ``probe_accuracy`` and ``probe_majority_baseline`` (``probe_mse`` /
  ``probe_mean_baseline_mse``): a small MLP probe (lapo.probe) from latent actions
  to true actions, fitted on a split of the held-out windows (whole episodes
  apart when there are enough) and scored on the rest.
- ``fdm_psnr`` and ``fdm_psnr_copy_baseline``: the world model's prediction of
  o[t+1] from o[t-k+1..t] and z[t], against predicting o[t+1] = o[t] (PSNR in dB of
  the squared error pooled over every window, at the model's image size; pixel world
  model only).
- ``codebook_perplexity``, ``codebook_usage``: exp(entropy) of the code
  histogram and the fraction of codes used, averaged over heads (vq / fsq).

The latent-model metrics are reported for method ``lapo`` (a pretrained LAM);
they are null for the baselines.

Online (``--env``): ``--episodes`` seeded episodes of agent.act (greedy unless
``--sample``) and of a uniform random policy on the same seeds, each cut at
``--max-steps``: ``return_mean``, ``return_std``, ``success_rate``,
``positive_return_rate`` and the same with a ``random_`` prefix (lapo.rollouts). Success is the env adapter's:
BabyAI/MiniGrid, the episode terminated with reward > 0; Procgen, the game's
``prev_level_complete`` flag at the episode end. An episode cut by the step cap
counts as no success.

``--budget-runs DIR`` scores the runs of a label-budget curve (``lapo finetune
--label-budgets 100,300,1000 --out DIR``: one decoder per budget, trained there) on the
same held-out windows as ``decoder_accuracy``; ``label_budgets`` lists the results.
Evaluation trains nothing.

Figures next to the JSON: ``<stem>_latents.png`` (latent actions in 2D by true
action), ``<stem>_budgets.png``, ``<stem>_rollout.gif`` and ``<stem>_rollout.png``.
The JSON's ``config`` holds the settings used: `EvaluateConfig` (lapo/config.py) <
--config YAML < --set key=value < the flags that set one (--episodes, --split, ...).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lapo.cli_args import RawHelpFormatter, add_config_arguments, config_from_args
from lapo.config import EvaluateConfig, FinetuneConfig, load_config, to_dict
from lapo.heldout import budget_curve, collect, heldout_split, offline_metrics, still_mask
from lapo.io import atomic_write_json
from lapo.rollouts import rollout_metrics
from lapo.runs import load_agent
from lapo.shards import read_manifest


def _frame_size(agent) -> int:
    """Env frame size that matches the labelled data the run was fitted on (else the model's)."""
    shape = agent.info.get("image_shape")
    if shape:
        return int(shape[0])
    part = agent.lam if agent.lam is not None else agent.policy
    return int(part.image_size)


def _env_kwargs(agent, env: str, view: str) -> dict:
    """Rendering options of the labelled data the run was fitted on (BabyAI's view), if the
    rollout env is of the same family; `view` (--env-view) overrides."""
    grid = env.startswith(("babyai:", "minigrid:"))
    if view and not grid:
        raise ValueError(f"lapo evaluate: --env-view applies to babyai/minigrid, not {env}")
    kwargs = dict(agent.info.get("env_kwargs") or {}) if grid else {}
    if view:
        kwargs["view"] = view
    return kwargs


def _out_paths(out: str | Path) -> tuple[Path, str]:
    """--out may name the JSON file or a directory (then metrics.json inside it)."""
    out = Path(out)
    if out.suffix.lower() != ".json":
        return out / "metrics.json", "metrics"
    return out, out.stem


def _offline(cfg: EvaluateConfig, agent, model: Path, labeled: str | Path,
             budget_runs: str | Path | None, device: str, json_path: Path, stem: str
             ) -> tuple[dict, dict]:  # fmt: skip
    """Metrics and figures of the held-out windows of `labeled` (and of the budget curve)."""
    from lapo.plots import plot_budget_curve, plot_latents_2d

    saved = model / "config.yaml"  # the split rule of the run: its seed and val_fraction
    ft = load_config(FinetuneConfig, saved) if saved.is_file() else FinetuneConfig()
    val_max = ft.val_max if cfg.max_windows is None else cfg.max_windows
    frac = 1.0 - 1e-9 if cfg.split == "all" else ft.val_fraction  # "all": every episode but one
    windows, sel = heldout_split(
        agent, labeled, seed=ft.seed, val_fraction=frac, max_windows=val_max
    )
    res = collect(agent, windows, batch_size=cfg.batch_size, device=device, progress=cfg.progress)
    still = still_mask(windows, cfg.still_threshold)  # (N,) bool, shared by the budget runs
    metrics = offline_metrics(agent, res, windows.ids, still, seed=cfg.seed)
    metrics["labeled"] = str(Path(labeled).resolve())
    metrics["split"] = {"rule": "lapo.labelled.select_budget", "seed": ft.seed,
                        "val_fraction": frac, "heldout_episodes": sel.heldout_episodes}  # fmt: skip
    plots: dict[str, str] = {}
    discrete = agent.action_space["type"] == "discrete"
    if res["latent"] is not None and len(res["latent"]):
        names = (read_manifest(labeled).get("made_by") or {}).get("action_meanings")
        path = plot_latents_2d(res["latent"], res["true"] if discrete else None,
                               json_path.parent / f"{stem}_latents.png",
                               action_names=names if isinstance(names, list) else None,
                               title=f"latent actions of held-out windows ({agent.method})")  # fmt: skip
        plots["latents"] = str(path)
    if budget_runs is not None:
        rows = budget_curve(budget_runs, windows, still, batch_size=cfg.batch_size, device=device)
        metrics["label_budgets"] = rows
        key = "decoder_accuracy" if discrete else "decoder_mse"
        ok = [r for r in rows if r.get(key) is not None]
        if ok:
            path = plot_budget_curve(
                [r["budget"] for r in ok], [r[key] for r in ok],
                json_path.parent / f"{stem}_budgets.png",
                ylabel=key.replace("_", " ") + " (held out)",
                baseline=metrics.get("decoder_majority_baseline"),
            )  # fmt: skip
            plots["budgets"] = str(path)
    return metrics, plots


def _online(cfg: EvaluateConfig, agent, env: str, device: str, json_path: Path, stem: str
            ) -> tuple[dict, dict]:  # fmt: skip
    """Rollout metrics of the agent and of a random policy in `env`, and the rollout figures."""
    from lapo.plots import save_rollout_gif, save_rollout_strip

    roll, mine = rollout_metrics(agent, env, episodes=cfg.episodes, seed=cfg.seed,
                                 size=cfg.env_size or _frame_size(agent), max_steps=cfg.max_steps,
                                 greedy=cfg.greedy, device=device, progress=cfg.progress,
                                 env_kwargs=_env_kwargs(agent, env, cfg.env_view))  # fmt: skip
    gif = save_rollout_gif(mine["frames"], json_path.parent / f"{stem}_rollout.gif")
    strip = save_rollout_strip(mine["frames"], json_path.parent / f"{stem}_rollout.png",
                               actions=mine["actions"],
                               title=f"{env} episode 0: return {mine['returns'][0]:.2f}")  # fmt: skip
    return roll, {"rollout_gif": str(gif), "rollout_strip": str(strip)}


def evaluate(
    cfg: EvaluateConfig,
    model: str | Path,
    out: str | Path,
    *,
    labeled: str | Path | None = None,
    env: str | None = None,
    budget_runs: str | Path | None = None,
) -> dict:
    """Evaluate the run `model`; write the metrics JSON at `out` (plus figures); return it.

    `labeled` gives the offline metrics on its held-out episodes, `env` the rollouts,
    `budget_runs` (with `labeled`) the scores of a label-budget curve's runs.
    """
    if labeled is None and env is None:
        raise ValueError("lapo evaluate: give --labeled DATASET, --env SPEC, or both")
    if budget_runs is not None and labeled is None:
        raise ValueError("lapo evaluate: --budget-runs needs --labeled (the held-out windows)")
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    json_path, stem = _out_paths(out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    agent = load_agent(model).to(device).eval()
    if env is not None and not agent.has_policy:
        raise ValueError(
            f"lapo evaluate: --env needs a run that can act, and {model} ({agent.method}) has no "
            "policy; finetune with --policy RUN_P (lapo) or --method bc"
        )
    metrics: dict = {"model": str(Path(model).resolve()), "method": agent.method,
                     "action_space": agent.action_space}  # fmt: skip
    plots: dict[str, str] = {}
    if labeled is not None:
        found, figures = _offline(cfg, agent, Path(model), labeled, budget_runs, device,
                                  json_path, stem)  # fmt: skip
        metrics.update(found)
        plots.update(figures)
    if env is not None:
        found, figures = _online(cfg, agent, env, device, json_path, stem)
        metrics.update(found)
        plots.update(figures)
    metrics["plots"] = plots
    metrics["config"] = to_dict(cfg)
    metrics["seconds"] = time.time() - t0
    atomic_write_json(json_path, metrics)
    return metrics


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``lapo evaluate`` parser (lapo.cli's subcommand protocol)."""
    d = EvaluateConfig
    p = sub.add_parser(
        "evaluate",
        help="probe accuracy, decoder accuracy, world-model PSNR, env returns",
        description=__doc__,
        formatter_class=RawHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="fine-tuned run directory (RUN_F from lapo finetune)"
    )
    p.add_argument(
        "--labeled",
        "--labelled",
        dest="labeled",
        help="labelled dataset: offline metrics on its held-out episodes",
    )
    p.add_argument(
        "--split",
        choices=["heldout", "all"],
        help="heldout: the episodes lapo finetune holds out; all: every episode but one, for a "
        f"dataset the run never trained on (sets split, default: {d.split})",
    )
    p.add_argument(
        "--max-windows",
        type=int,
        help="cap on held-out windows (sets max_windows; default: the run's val_max; 0: all)",
    )
    p.add_argument("--env", help="environment for closed-loop rollouts: procgen:GAME or babyai:ID")
    p.add_argument(
        "--episodes", type=int, help=f"rollout episodes, seeded 0..N-1 (default: {d.episodes})"
    )
    p.add_argument(
        "--max-steps", type=int, help=f"step cap per rollout episode (default: {d.max_steps})"
    )
    p.add_argument(
        "--env-size",
        type=int,
        help="frame size of the env (default: that of the data the run was fine-tuned on)",
    )
    p.add_argument(
        "--env-view",
        choices=("full", "agent"),
        help="babyai/minigrid: top-down grid or the agent's own view (default: as the labelled "
        "data the run was fitted on was recorded)",
    )
    p.add_argument(
        "--sample", action="store_true", help="sample actions from the policy instead of argmax"
    )
    p.add_argument(
        "--budget-runs",
        metavar="DIR",
        help="the label-budget curve: score the runs of `lapo finetune --label-budgets ... --out "
        "DIR` on the held-out windows",
    )
    p.add_argument(
        "--batch-size", type=int, help=f"windows per forward pass (default: {d.batch_size})"
    )
    p.add_argument("--device", help=f"auto, cpu, cuda, cuda:1, ... (default: {d.device})")
    p.add_argument("--seed", type=int, help=f"seed of rollouts and the probe (default: {d.seed})")
    p.add_argument(
        "--out", required=True, help="metrics JSON path (figures go next to it), or a directory"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_config_arguments(p, example_set="episodes=50 max_steps=200 env_view=agent")
    return p


def run(args: argparse.Namespace) -> int:
    flags = {"split": args.split, "max_windows": args.max_windows, "episodes": args.episodes,
             "max_steps": args.max_steps, "env_size": args.env_size, "env_view": args.env_view,
             "greedy": False if args.sample else None, "batch_size": args.batch_size,
             "device": args.device, "seed": args.seed,
             "progress": False if args.no_progress else None}  # fmt: skip
    cfg = config_from_args(EvaluateConfig, args, flags)
    metrics = evaluate(cfg, args.model, args.out, labeled=args.labeled, env=args.env,
                       budget_runs=args.budget_runs)  # fmt: skip
    keys = ("decoder_accuracy", "decoder_mse", "probe_accuracy", "fdm_psnr", "fdm_psnr_copy_baseline",
            "codebook_perplexity", "return_mean", "success_rate", "random_return_mean",
            "random_success_rate")  # fmt: skip
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), float))
    print(f"lapo evaluate: {shown} -> {_out_paths(args.out)[0]}")
    still, acc = metrics.get("still_share"), metrics.get("decoder_accuracy_still")
    moving = metrics.get("decoder_accuracy_moving")
    if all(isinstance(x, float) for x in (still, acc, moving)):  # discrete, both parts there
        print(f"lapo evaluate: {still:.0%} of the held-out windows are still (o[t+1] within "
              f"{cfg.still_threshold} grey levels of o[t]); the decoder scores {acc:.3f} there "
              f"(best constant {metrics['still_majority_baseline']:.3f}) and "
              f"{moving:.3f} on the others")  # fmt: skip
    return 0
