"""PNG and GIF figures: those `lapo evaluate` writes next to its metrics.json, and the
learning curves of `lapo rl` runs (the demo's report, experiments/rl_curves.py).

Matplotlib runs on the Agg backend (no display needed: clusters, CI). Every
function takes plain arrays and a path, draws one figure and returns the path,
so the plots can be reused from notebooks without the evaluation code;
`read_rl_curve` turns a `lapo rl` run's metrics.csv into such arrays.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from PIL import Image  # noqa: E402


def project_2d(latents: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, str]:
    """Latents (N, D) -> points (N, 2) and the method's name.

    UMAP when the optional `umap-learn` package is installed (it keeps clusters
    apart better), PCA otherwise via `torch.pca_lowrank` (centred, seeded).
    """
    x = np.asarray(latents, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"lapo/plots.py: latents must be (N, D) with N > 0, got {x.shape}")
    if x.shape[1] == 1:  # one dimension: plot it against a zero axis
        return np.concatenate([x, np.zeros_like(x)], axis=1), "identity"
    if x.shape[1] == 2:
        return x, "identity"
    try:
        import umap  # type: ignore[import-not-found]

        if len(x) >= 16:
            reducer = umap.UMAP(n_components=2, random_state=seed)
            return np.asarray(reducer.fit_transform(x), dtype=np.float32), "UMAP"
    except ImportError:
        pass
    torch.manual_seed(seed)  # pca_lowrank uses a randomised range finder
    t = torch.from_numpy(x)  # (N, D)
    q = min(2, *t.shape)
    u, s, _ = torch.pca_lowrank(t, q=q, center=True)  # u (N, q), s (q,)
    pts = (u * s).numpy()  # (N, q) principal-component scores
    if pts.shape[1] < 2:
        pts = np.concatenate([pts, np.zeros((len(pts), 2 - pts.shape[1]), pts.dtype)], axis=1)
    return pts, "PCA"


MARKERS = "osD^vP*X<>ph"  # one per class, so classes differ in shape as well as colour


def spread_spots(pts: np.ndarray, seed: int = 0) -> tuple[np.ndarray, int]:
    """Points (N, 2) piled on a few spots (discrete codes) -> the same points laid out
    around their spot, and the number of spots.

    The points of a spot holding more than one fill a sunflower disc, in a seeded order,
    whose radius is a third of the distance to the nearest other spot: no point hides
    another and discs never touch. A point alone on its spot stays where it is; when no
    two points share a spot, `pts` itself is returned.
    """
    spots, which, sizes = np.unique(
        np.round(pts, 6), axis=0, return_inverse=True, return_counts=True
    )
    which = which.reshape(-1)
    if not len(pts) or sizes.max() == 1:
        return pts, len(spots)
    if len(spots) > 1:
        gaps = np.linalg.norm(spots[:, None] - spots[None], axis=-1)  # (S, S)
        np.fill_diagonal(gaps, np.inf)
        radius = gaps.min(axis=1) / 3  # (S,)
    else:
        radius = np.ones(1)
    rng = np.random.default_rng(seed)
    out = pts.astype(np.float64)
    golden = np.pi * (3 - np.sqrt(5))
    for s in np.flatnonzero(sizes > 1):
        members = rng.permutation(np.flatnonzero(which == s))
        k = np.arange(len(members))
        r = radius[s] * np.sqrt((k + 0.5) / len(members))  # even density over the disc
        out[members] = spots[s] + np.stack([r * np.cos(k * golden), r * np.sin(k * golden)], 1)
    return out, len(spots)


def plot_latents_2d(
    latents: np.ndarray,
    true_actions: np.ndarray | None,
    path: str | Path,
    *,
    action_names: list[str] | None = None,
    title: str = "latent actions",
    max_points: int = 5000,
    seed: int = 0,
) -> Path:
    """Scatter of latent actions in 2D, coloured and shaped by the true discrete action.

    Points of discrete codes pile up on a few spots; `spread_spots` lays each pile
    out so that every point shows. Classes are drawn from the most common to the
    rarest, so a rare class is never painted over, and the legend counts each.
    """
    rng = np.random.default_rng(seed)
    latents = np.asarray(latents)
    idx = np.arange(len(latents))
    if len(idx) > max_points:  # keep the figure readable and the PCA cheap
        idx = np.sort(rng.choice(idx, size=max_points, replace=False))
    pts, method = project_2d(latents[idx], seed=seed)
    pts, spots = spread_spots(pts, seed=seed)
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    discrete = true_actions is not None and np.asarray(true_actions).ndim == 1
    if discrete:
        acts = np.asarray(true_actions)[idx]
        classes, counts = np.unique(acts, return_counts=True)
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        draw = np.argsort(-counts, kind="stable")  # most common first, the rarest on top
        for i in draw:
            a, m = classes[i], acts == classes[i]
            name = action_names[int(a)] if action_names and int(a) < len(action_names) else str(a)
            ax.scatter(pts[m, 0], pts[m, 1], s=10, alpha=0.8, color=cmap(i % cmap.N),
                       marker=MARKERS[i % len(MARKERS)], linewidths=0,
                       label=f"{name} ({counts[i]})")  # fmt: skip
        handles, labels = ax.get_legend_handles_labels()
        order = np.argsort(draw)  # the legend lists the classes in action order
        ax.legend([handles[j] for j in order], [labels[j] for j in order], fontsize=7,
                  title="true action (windows)", markerscale=1.5, loc="best", ncol=2)  # fmt: skip
    else:
        ax.scatter(pts[:, 0], pts[:, 1], s=10, alpha=0.8, color="tab:blue", linewidths=0)
    where = f"{len(idx)} points"
    if spots < len(idx):
        where += f" on {spots} spots, those sharing one spread into a disc"
    ax.set_title(f"{title}\n({method}, {where})", fontsize=10)
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    return _save(fig, path)


def plot_budget_curve(
    budgets: list[int],
    scores: list[float],
    path: str | Path,
    *,
    ylabel: str = "decoder accuracy (held out)",
    baseline: float | None = None,
    baseline_label: str = "majority class",
) -> Path:
    """Decoder quality against the number of labelled transitions (log x axis)."""
    if len(budgets) != len(scores) or not budgets:
        raise ValueError(
            f"lapo/plots.py: budgets and scores must be equal-length and non-empty, "
            f"got {len(budgets)} and {len(scores)}"
        )
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.plot(budgets, scores, marker="o", color="tab:blue", label="decoder")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="grey", label=baseline_label)
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])  # the budgets themselves, not 10^k
    ax.minorticks_off()
    ax.set_xlabel("label budget (transitions)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def read_rl_curve(
    path: str | Path, key: str = "return_mean", smooth: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """A `lapo rl` run's metrics.csv (one row per PPO update) -> (env frames, `key`) of the
    updates in which episodes ended, each value the episode-weighted mean over that update
    and the `smooth` - 1 before it. A column the CSV lacks or leaves empty gives no points.
    """
    path = Path(path)
    if smooth < 1:
        raise ValueError(f"lapo/plots.py: smooth must be >= 1, got {smooth}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        rows = [r for r in rows if int(r.get("episodes") or 0) > 0 and r.get(key) not in (None, "")]
        frames = np.array([int(r["frames"]) for r in rows], np.int64)
        values = np.array([float(r[key]) for r in rows], np.float64)
        counts = np.array([int(r["episodes"]) for r in rows], np.float64)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a lapo rl metrics.csv ({type(e).__name__}: {e})") from None
    sums = np.cumsum(np.concatenate([[0.0], values * counts]))
    ns = np.cumsum(np.concatenate([[0.0], counts]))
    hi = np.arange(len(rows)) + 1
    lo = np.maximum(hi - smooth, 0)
    return frames, (sums[hi] - sums[lo]) / np.maximum(ns[hi] - ns[lo], 1)


def plot_rl_curves(
    panels: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]],
    path: str | Path,
    *,
    title: str = "",
    target: float | None = None,
    colours: dict[str, str] | None = None,
) -> Path:
    """Learning curves of `lapo rl` runs against env frames, side by side.

    `panels` maps a y-axis label (e.g. "mean return") to {method: [(frames, values) of each
    run]}: one panel per label, one colour per method, one line per run (seed); the legend
    counts the seeds of a method that has more than one. `target`, if given, is a dotted
    line on every panel. `colours` fixes a method's colour (others take the next free one).
    """
    panels = {label: runs for label, runs in panels.items() if runs}
    if not panels:
        raise ValueError("lapo/plots.py: plot_rl_curves needs at least one panel with a run")
    colours = dict(colours or {})
    taken = {to_hex(c) for c in colours.values()}
    free = iter([c for c in plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3
                 if to_hex(c) not in taken])  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (label, methods) in zip(axes[0], panels.items()):
        for method, runs in methods.items():
            if method not in colours:
                colours[method] = next(free, None)
            runs = [(f, v) for f, v in runs if len(f)]
            for i, (frames, values) in enumerate(runs):
                name = None if i else (f"{method} ({len(runs)} seeds)" if len(runs) > 1 else method)
                ax.plot(frames, values, color=colours[method], alpha=0.8, label=name,
                        marker="o" if len(frames) < 10 else None, markersize=3)  # fmt: skip
        if target is not None:
            ax.axhline(target, color="k", linestyle=":", linewidth=1)
        ax.set_xlabel("env frames")
        ax.set_ylabel(label)
        if title:
            ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def save_rollout_gif(frames: np.ndarray, path: str | Path, *, fps: float = 10.0) -> Path:
    """Frames (T, H, W, 3) uint8 -> an animated GIF (loops forever)."""
    frames = _check_frames(frames)
    images = [Image.fromarray(f) for f in frames]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(
        path,
        save_all=True,
        append_images=images[1:],
        duration=max(int(1000 / fps), 20),
        loop=0,
    )
    return path


def save_rollout_strip(
    frames: np.ndarray,
    path: str | Path,
    *,
    num: int = 8,
    actions: np.ndarray | None = None,
    title: str = "policy rollout",
) -> Path:
    """`num` evenly spaced frames of an episode in one row, each titled with its step (and action)."""
    frames = _check_frames(frames)
    picks = np.unique(
        np.linspace(0, len(frames) - 1, num=min(num, len(frames))).round().astype(int)
    )
    fig, axes = plt.subplots(1, len(picks), figsize=(1.6 * len(picks), 1.9), dpi=100, squeeze=False)
    for ax, t in zip(axes[0], picks):
        ax.imshow(frames[t])
        label = f"t={t}"
        if actions is not None and t < len(actions):
            label += f" a={int(actions[t])}"
        ax.set_title(label, fontsize=7)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(
            f"lapo/plots.py: frames must be (T, H, W, 3) with T > 0, got {frames.shape}"
        )
    if frames.dtype != np.uint8:
        raise ValueError(f"lapo/plots.py: frames must be uint8, got {frames.dtype}")
    return frames


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)  # many figures in one process: free each one
    return path
