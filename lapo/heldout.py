"""An agent's offline metrics on the held-out windows of a labelled dataset (`lapo evaluate`).

The held-out episodes are those `lapo finetune` held out (`lapo.labelled.select_budget`
with the run's seed and val_fraction), so none of these windows was trained on.
`collect` runs the agent over them once, keeping small per-window results; `offline_metrics`
turns those into decoder and policy accuracy (or MSE), the latent probe, the world model's
PSNR against copying o[t], and codebook perplexity and usage; `budget_curve` scores each
run of a label-budget curve on the same windows.

The decoder is also scored apart on the still windows (o[t+1] within `still_threshold` grey
levels of o[t], the measure `data.still_keep` uses) and on the others. A still window shows
nothing of the action, so on those no model that reads the action from the frames' change
can beat the best constant guess (`still_majority_baseline`); where a decoder falls short
overall, the split tells a latent that missed visible actions from video whose actions
mostly do not show.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lapo.labelled import load_windows, scan_labelled, select_budget
from lapo.models.common import psnr_from_mse
from lapo.models.quantizers import code_histogram, perplexity_from_counts, usage_from_counts
from lapo.probe import fit_probe
from lapo.runs import load_agent, read_budget_curve
from lapo.windows import still_transitions

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
    None; fdm_psnr and fdm_psnr_copy_baseline, the PSNRs of the world model's and of
    copying o[t]'s squared error pooled over every window.
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
                # squared errors pooled over every window, turned into dB at the end
                fdm_sum += F.mse_loss(pred, x[:, -1]).item() * len(idx)
                copy_sum += F.mse_loss(x[:, -2], x[:, -1]).item() * len(idx)
        bar.update(len(idx))
    bar.close()
    res = {k: (torch.cat(v).numpy() if v else None) for k, v in out.items()}
    res["n"] = n
    res["fdm_psnr"] = float(psnr_from_mse(fdm_sum / n)) if has_fdm else None
    res["fdm_psnr_copy_baseline"] = float(psnr_from_mse(copy_sum / n)) if has_fdm else None
    return res


def score(pred: np.ndarray | None, true: np.ndarray, discrete: bool) -> float | None:
    """Accuracy (discrete) or mean squared error of `pred` against `true`; None without either."""
    if pred is None or len(true) == 0:
        return None
    if discrete:
        return float((pred == true).mean())
    return float(((pred.astype(np.float64) - true) ** 2).mean())


def still_mask(windows, threshold: float, batch_size: int = 1024) -> np.ndarray:
    """(N,) bool: which windows are still, o[t+1] within `threshold` grey levels of o[t].
    A property of the windows alone, so one mask serves every run scored on them."""
    parts = []
    for i in range(0, len(windows), batch_size):
        pair = windows.frames[windows.index[i : i + batch_size, -2:]].numpy()  # (B, 2, 3, H, W)
        parts.append(still_transitions(pair[:, 0], pair[:, 1], threshold))
    return np.concatenate(parts) if parts else np.zeros(0, bool)


def offline_metrics(
    agent, res: dict, ids: list[tuple[str, int]], still: np.ndarray, *, seed: int = 0
) -> dict:
    """Metrics of `collect`'s results on windows whose `still_mask` is `still` (see the
    module docstring for each key)."""
    discrete = agent.action_space["type"] == "discrete"
    true = res["true"]
    m: dict = {"heldout_windows": int(res["n"]), "heldout_episodes": len({e for e, _ in ids})}
    if discrete:
        m["decoder_accuracy"] = score(res["label"], true, True)
        m["policy_accuracy"] = score(res["act"], true, True)
        counts = np.bincount(true, minlength=agent.action_space["n"])
        m["heldout_action_histogram"] = counts.tolist()
        # the best constant guess on these very windows: what a decoder must beat
        m["decoder_majority_baseline"] = float(counts.max() / len(true)) if len(true) else None
    else:
        m["decoder_mse"] = score(res["label"], true, False)
        m["policy_mse"] = score(res["act"], true, False)
    m.update(still_split(res, still, agent.action_space))
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


def still_split(res: dict, still: np.ndarray, space: dict) -> dict:
    """The decoder scored apart on still and moving windows (see the module docstring).

    still_share: the share of still windows; decoder_accuracy_still / _moving (discrete) or
    decoder_mse_still / _moving, None where a part is empty or the agent cannot label;
    still_majority_baseline: the best constant guess on the still windows (discrete).
    """
    true, pred = res["true"], res["label"]
    n = len(true)
    discrete = space["type"] == "discrete"
    key = "decoder_accuracy" if discrete else "decoder_mse"
    out: dict = {"still_share": float(still.mean()) if n else None}
    for part, mask in (("still", still), ("moving", ~still)):
        out[f"{key}_{part}"] = None if pred is None else score(pred[mask], true[mask], discrete)
    if discrete:
        counts = np.bincount(true[still], minlength=space["n"])
        out["still_majority_baseline"] = float(counts.max() / still.sum()) if still.any() else None
    return out


# --------------------------------------------------------------------------- label budgets


def budget_curve(
    budget_runs: str | Path, windows, still: np.ndarray, *, batch_size: int, device: str
) -> list[dict]:
    """Score each run of a label-budget curve (`lapo finetune --label-budgets`) on `windows`.

    A budget that has no run (more labels than the data holds) keeps its error.
    """
    rows = []
    for row in read_budget_curve(budget_runs):
        if "run" not in row:
            rows.append(row)
            continue
        fitted = load_agent(row["run"]).to(device)
        res = collect(fitted, windows, batch_size=batch_size, device=device, progress=False)
        discrete = fitted.action_space["type"] == "discrete"
        key = "decoder_accuracy" if discrete else "decoder_mse"
        split = {k: v for k, v in still_split(res, still, fitted.action_space).items()
                 if k.startswith(key)}  # fmt: skip
        rows.append({"budget": row["budget"], key: score(res["label"], res["true"], discrete),
                     **split, "run": row["run"]})  # fmt: skip
    return rows
