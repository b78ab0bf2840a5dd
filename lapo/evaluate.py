"""`lapo evaluate`: how good is a fine-tuned run? Held-out metrics, rollouts, plots.

Offline (``--labeled DATASET``), on the held-out episodes of the labelled
dataset: the same rule `lapo finetune` used (`lapo.labelled.select_budget`, with
the seed and val_fraction read from the run), so none of these windows was
trained on.

- ``decoder_accuracy`` (discrete) or ``decoder_mse`` (continuous): agent.label
  (IDM + decoder) against the true action of each window.
- ``policy_accuracy`` / ``policy_mse``: agent.act on the context alone, when the
  run has a policy.
- ``probe_accuracy`` and ``probe_majority_baseline`` (``probe_mse`` /
  ``probe_mean_baseline_mse``): a small MLP probe (lapo.probe) from latent actions
  to true actions, fitted on a split of the held-out windows (whole episodes
  apart when there are enough) and scored on the rest.
- ``fdm_psnr`` and ``fdm_psnr_copy_baseline``: the world model's prediction of
  o[t+1] from o[t-k+1..t] and z[t], against predicting o[t+1] = o[t] (mean of
  per-window PSNR in dB at the model's image size; pixel world model only).
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
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lapo.cli import RawHelpFormatter
from lapo.io import atomic_write_json
from lapo.labelled import load_windows, scan_labelled, select_budget
from lapo.models.common import psnr
from lapo.models.quantizers import code_histogram, perplexity_from_counts, usage_from_counts
from lapo.probe import fit_probe
from lapo.rollouts import rollout_metrics
from lapo.shards import read_manifest

# --------------------------------------------------------------------------- held-out data


def heldout_split(agent, labeled: str | Path, *, seed: int, val_fraction: float, max_windows: int):
    """(LabelledWindows of the held-out episodes, their Selection), as lapo finetune split them."""
    index = scan_labelled(labeled, context=agent.context, frame_gap=getattr(agent, "frame_gap", 1))
    # the held-out episodes do not depend on the budget: 1 asks for the smallest training set
    sel = select_budget(index, 1, seed, val_fraction, val_max=max_windows)
    return load_windows(index, sel.val, desc="held-out windows"), sel


@torch.no_grad()
def collect(agent, windows, *, batch_size: int, device: str, progress: bool = True) -> dict:
    """Run the agent over held-out windows; keep only small per-window results.

    Returns numpy arrays: true (N,) or (N, D); label (decoder's action) and act
    (policy's action) or None; latent (N, latent_dim) or None; codes (N, heads) or
    None; psnr sums for the world model and the copy baseline.
    """
    lapo_lam = agent.lam if agent.method == "lapo" else None
    can_label = agent.method != "bc"
    can_act = agent.has_policy
    out: dict = {"true": [], "label": [], "act": [], "latent": [], "codes": []}
    fdm_sum = copy_sum = 0.0
    has_fdm = False
    n = len(windows)
    bar = tqdm(total=n, desc="evaluate held-out", unit="win", disable=not progress)
    for i in range(0, n, batch_size):
        idx = torch.arange(i, min(i + batch_size, n))
        frames = windows.frames[windows.index[idx]].to(device)  # (B, k+1, 3, H, W) uint8
        out["true"].append(windows.actions[idx])
        if can_label:
            out["label"].append(agent.label(frames)["action"].cpu())
        if can_act:
            out["act"].append(agent.act(frames[:, :-1], greedy=True).cpu())  # context o[..t]
        if lapo_lam is not None:
            enc = lapo_lam.encode(frames)
            out["latent"].append(enc["latent"].float().cpu())
            if enc["codes"] is not None:
                out["codes"].append(enc["codes"].cpu())
            pred = lapo_lam.predict_next(frames[:, :-1], enc["latent"])  # (B, 3, S, S) or None
            if pred is not None:
                has_fdm = True
                x = lapo_lam.prepare(frames)  # (B, k+1, 3, S, S) float in [0, 1]
                fdm_sum += psnr(pred, x[:, -1]).item() * len(idx)  # psnr is a batch mean
                copy_sum += psnr(x[:, -2], x[:, -1]).item() * len(idx)
        bar.update(len(idx))
    bar.close()
    res = {k: (torch.cat(v).numpy() if v else None) for k, v in out.items()}
    res["n"] = n
    res["fdm_psnr"] = fdm_sum / n if has_fdm else None
    res["fdm_psnr_copy_baseline"] = copy_sum / n if has_fdm else None
    return res


def _score(pred: np.ndarray | None, true: np.ndarray, discrete: bool) -> float | None:
    if pred is None or len(true) == 0:
        return None
    if discrete:
        return float((pred == true).mean())
    return float(((pred.astype(np.float64) - true) ** 2).mean())


def offline_metrics(agent, res: dict, ids: list[tuple[str, int]], *, seed: int = 0) -> dict:
    """Metrics of `collect`'s results (see the module docstring for each key)."""
    discrete = agent.action_space["type"] == "discrete"
    true = res["true"]
    m: dict = {"heldout_windows": int(res["n"]), "heldout_episodes": len({e for e, _ in ids})}
    if discrete:
        m["decoder_accuracy"] = _score(res["label"], true, True)
        m["policy_accuracy"] = _score(res["act"], true, True)
        counts = np.bincount(true, minlength=agent.action_space["n"])
        m["heldout_action_histogram"] = counts.tolist()
        # the best constant guess on these very windows: what a decoder must beat
        m["decoder_majority_baseline"] = float(counts.max() / len(true)) if len(true) else None
    else:
        m["decoder_mse"] = _score(res["label"], true, False)
        m["policy_mse"] = _score(res["act"], true, False)
    m["fdm_psnr"] = res["fdm_psnr"]
    m["fdm_psnr_copy_baseline"] = res["fdm_psnr_copy_baseline"]
    probe_keys = (
        ("probe_accuracy", "probe_majority_baseline")
        if discrete
        else ("probe_mse", "probe_mean_baseline_mse")
    )
    m.update(dict.fromkeys(probe_keys))
    if res["latent"] is not None:
        p = fit_probe(
            torch.from_numpy(res["latent"]),
            torch.from_numpy(true),
            num_actions=agent.action_space["n"] if discrete else 0,
            keys=[e for e, _ in ids],  # whole episodes to one side when there are enough
            seed=seed,
        )
        if p:
            src = ("probe_acc", "probe_majority") if discrete else ("probe_mse", "probe_mse_mean")
            m[probe_keys[0]], m[probe_keys[1]] = p[src[0]], p[src[1]]
    m["codebook_perplexity"] = m["codebook_usage"] = None
    lam = agent.lam if agent.method == "lapo" else None
    if res["codes"] is not None and lam is not None and lam.num_codes > 0:
        counts = code_histogram(torch.from_numpy(res["codes"]), lam.num_codes)  # (heads, codes)
        m["codebook_perplexity"] = float(perplexity_from_counts(counts))
        m["codebook_usage"] = float(usage_from_counts(counts))
        m["codebook_size"] = int(lam.num_codes)
    return m


# --------------------------------------------------------------------------- label budgets


def budget_curve(budget_runs: str | Path, windows, *, batch_size: int, device: str) -> list[dict]:
    """Score each run of a label-budget curve (`lapo finetune --label-budgets`) on `windows`.

    A budget that has no run (more labels than the data holds) keeps its error.
    """
    from lapo.runs import load_agent, read_budget_curve

    rows = []
    for row in read_budget_curve(budget_runs):
        if "run" not in row:
            rows.append(row)
            continue
        fitted = load_agent(row["run"]).to(device)
        res = collect(fitted, windows, batch_size=batch_size, device=device, progress=False)
        discrete = fitted.action_space["type"] == "discrete"
        key = "decoder_accuracy" if discrete else "decoder_mse"
        score = _score(res["label"], res["true"], discrete)
        rows.append({"budget": row["budget"], key: score, "run": row["run"]})
    return rows


# --------------------------------------------------------------------------- the command


def _frame_size(agent) -> int:
    """Env frame size that matches the labelled data the run was fitted on (else the model's)."""
    shape = agent.info.get("image_shape")
    if shape:
        return int(shape[0])
    part = agent.lam if agent.lam is not None else agent.policy
    return int(part.image_size)


def _env_kwargs(agent, env: str, view: str | None) -> dict:
    """Rendering options of the labelled data the run was fitted on (BabyAI's view), if the
    rollout env is of the same family; `view` (--env-view) overrides."""
    grid = env.startswith(("babyai:", "minigrid:"))
    if view is not None and not grid:
        raise ValueError(f"lapo evaluate: --env-view applies to babyai/minigrid, not {env}")
    kwargs = dict(agent.info.get("env_kwargs") or {}) if grid else {}
    if view is not None:
        kwargs["view"] = view
    return kwargs


def _out_paths(out: str | Path) -> tuple[Path, str]:
    """--out may name the JSON file or a directory (then metrics.json inside it)."""
    out = Path(out)
    if out.suffix.lower() != ".json":
        return out / "metrics.json", "metrics"
    return out, out.stem


def evaluate(
    model: str | Path,
    out: str | Path,
    *,
    labeled: str | Path | None = None,
    env: str | None = None,
    episodes: int = 20,
    max_steps: int = 500,
    env_size: int | None = None,
    env_view: str | None = None,
    greedy: bool = True,
    budget_runs: str | Path | None = None,
    split: str = "heldout",
    max_windows: int | None = None,
    batch_size: int = 256,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Evaluate the run `model`; write the metrics JSON at `out` (plus figures); return it."""
    from lapo.config import FinetuneConfig, load_config
    from lapo.runs import load_agent

    if labeled is None and env is None:
        raise ValueError("lapo evaluate: give --labeled DATASET, --env SPEC, or both")
    if budget_runs is not None and labeled is None:
        raise ValueError("lapo evaluate: --budget-runs needs --labeled (the held-out windows)")
    if split not in ("heldout", "all"):
        raise ValueError(f"lapo evaluate: --split must be heldout or all, got {split!r}")
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
    saved = Path(model) / "config.yaml"
    ft = load_config(FinetuneConfig, saved) if saved.is_file() else FinetuneConfig()
    metrics: dict = {"model": str(Path(model).resolve()), "method": agent.method,
                     "action_space": agent.action_space}  # fmt: skip
    plots: dict[str, str] = {}
    if labeled is not None:
        val_max = ft.val_max if max_windows is None else max_windows
        frac = 1.0 - 1e-9 if split == "all" else ft.val_fraction  # "all": every episode but one
        windows, sel = heldout_split(
            agent, labeled, seed=ft.seed, val_fraction=frac, max_windows=val_max
        )
        res = collect(agent, windows, batch_size=batch_size, device=device, progress=progress)
        metrics.update(offline_metrics(agent, res, windows.ids, seed=seed))
        metrics["labeled"] = str(Path(labeled).resolve())
        metrics["split"] = {"rule": "lapo.labelled.select_budget", "seed": ft.seed,
                            "val_fraction": frac, "heldout_episodes": sel.heldout_episodes}  # fmt: skip
        if res["latent"] is not None and len(res["latent"]):
            from lapo.plots import plot_latents_2d

            true = res["true"] if agent.action_space["type"] == "discrete" else None
            names = (read_manifest(labeled).get("made_by") or {}).get("action_meanings")
            path = plot_latents_2d(res["latent"], true, json_path.parent / f"{stem}_latents.png",
                                   action_names=names if isinstance(names, list) else None,
                                   title=f"latent actions of held-out windows ({agent.method})")  # fmt: skip
            plots["latents"] = str(path)
        if budget_runs is not None:
            from lapo.plots import plot_budget_curve

            rows = budget_curve(budget_runs, windows, batch_size=batch_size, device=device)
            metrics["label_budgets"] = rows
            key = "decoder_accuracy" if agent.action_space["type"] == "discrete" else "decoder_mse"
            ok = [r for r in rows if r.get(key) is not None]
            if ok:
                path = plot_budget_curve(
                    [r["budget"] for r in ok], [r[key] for r in ok],
                    json_path.parent / f"{stem}_budgets.png",
                    ylabel=key.replace("_", " ") + " (held out)",
                    baseline=metrics.get("decoder_majority_baseline"),
                )  # fmt: skip
                plots["budgets"] = str(path)
    if env is not None:
        size = env_size or _frame_size(agent)
        env_kwargs = _env_kwargs(agent, env, env_view)
        roll, mine = rollout_metrics(agent, env, episodes=episodes, seed=seed, size=size,
                                     max_steps=max_steps, greedy=greedy, device=device,
                                     progress=progress, env_kwargs=env_kwargs)  # fmt: skip
        metrics.update(roll)
        from lapo.plots import save_rollout_gif, save_rollout_strip

        gif = save_rollout_gif(mine["frames"], json_path.parent / f"{stem}_rollout.gif")
        strip = save_rollout_strip(mine["frames"], json_path.parent / f"{stem}_rollout.png",
                                   actions=mine["actions"],
                                   title=f"{env} episode 0: return {mine['returns'][0]:.2f}")  # fmt: skip
        plots["rollout_gif"], plots["rollout_strip"] = str(gif), str(strip)
    metrics["plots"] = plots
    metrics["seconds"] = time.time() - t0
    atomic_write_json(json_path, metrics)
    return metrics


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``lapo evaluate`` parser (lapo.cli's subcommand protocol)."""
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
        default="heldout",
        help="heldout: the episodes lapo finetune holds out (default); all: every episode "
        "but one, for a dataset the run never trained on",
    )
    p.add_argument(
        "--max-windows",
        type=int,
        default=None,
        help="cap on held-out windows (default: the run's val_max; 0: all)",
    )
    p.add_argument("--env", help="environment for closed-loop rollouts: procgen:GAME or babyai:ID")
    p.add_argument("--episodes", type=int, default=20, help="rollout episodes (seeded 0..N-1)")
    p.add_argument("--max-steps", type=int, default=500, help="step cap per rollout episode")
    p.add_argument(
        "--env-size",
        type=int,
        default=None,
        help="frame size of the env (default: that of the data the run was fine-tuned on)",
    )
    p.add_argument(
        "--env-view",
        choices=("full", "agent"),
        default=None,
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
    p.add_argument("--batch-size", type=int, default=256, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0, help="seed of rollouts and the probe")
    p.add_argument(
        "--out", required=True, help="metrics JSON path (figures go next to it), or a directory"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p  # fmt: skip


def run(args: argparse.Namespace) -> int:
    metrics = evaluate(
        args.model, args.out, labeled=args.labeled, env=args.env, episodes=args.episodes,
        max_steps=args.max_steps, env_size=args.env_size, env_view=args.env_view,
        greedy=not args.sample,
        budget_runs=args.budget_runs, split=args.split, max_windows=args.max_windows,
        batch_size=args.batch_size, device=args.device, seed=args.seed,
        progress=not args.no_progress,
    )  # fmt: skip
    keys = ("decoder_accuracy", "decoder_mse", "probe_accuracy", "fdm_psnr", "fdm_psnr_copy_baseline",
            "codebook_perplexity", "return_mean", "success_rate", "random_return_mean",
            "random_success_rate")  # fmt: skip
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), float))
    print(f"lapo evaluate: {shown} -> {_out_paths(args.out)[0]}")
    return 0
