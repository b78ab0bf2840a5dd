"""Stage-1 health: does the latent action model learn anything?

A latent action model can train without error and still learn nothing: the world model
predicts o[t+1] from the context alone and z[t] carries no action. Its losses look
fine. These checks read the validation metrics of `lapo.lam` and say which failure
shows, with its likely causes and what to try:

- ``beats_copy``: the pixel world model's PSNR over copying o[t] (dB), each of the
  squared error pooled over the pass (see `lapo.models.common.psnr`).
- ``codes_used``: codebook perplexity over the whole val pass, per head (vq, fsq): 1.0
  means every window gets the same code.
- ``latent_spread``: per-dimension std of z[t] across val windows, relative to the size
  of z[t]: ~0 means one latent for every window, whatever the bottleneck.
- ``latent_used``: the world model's error with another window's z[t] (shuffled within
  the batch) against its own, in dB. The decisive check: a world model can beat copying
  by several dB on a scrolling background while z[t] carries nothing (seen on a
  sticky-random Procgen game: +5.7 dB over copy, probe below the majority rate).
- ``probe``: a probe z[t] -> true action on held-out val windows against always guessing
  the majority action (or, for continuous actions, the share of variance explained).

Every threshold lives in `HealthThresholds`, with the reason for its value. They are
deliberately loose: each flags a model that has *not* learnt, not one that learnt less
than it could. Plain Python, no Lightning: `assess` maps a metrics dict to verdicts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import Tensor


@dataclass(frozen=True)
class HealthThresholds:
    warmup_fraction: float = 0.2
    """Validation passes before this share of the run (of max_steps, or of trainer.max_minutes if further along) do not warn: a fresh model fails every check."""
    min_copy_gain_db: float = 0.5
    """PSNR over copying o[t]: 0.5 dB is an MSE 11% below the copy's. Working models beat copy by several dB (21 on the BabyAI demo)."""
    min_code_perplexity: float = 1.5
    """Codes per head in use (exp entropy over the val pass): 1.0 is one code for everything; 1.5 is far below any useful spread."""
    min_latent_spread: float = 0.01
    """Per-dimension std of z[t] across windows over its RMS size: ~0 when every window gets the same z[t], as in a collapsed run (README: per-dimension std 5e-4)."""
    min_latent_gain_db: float = 0.1
    """PSNR lost when each window gets another window's z[t] (latent world model: 10 log10 of its loss ratio). A world model that cannot see z[t] gives exactly 0; 0.1 dB is an error 2.3% larger."""
    min_probe_gain: float = 0.02
    """Probe accuracy above always guessing the majority action (absolute)."""
    min_probe_r2: float = 0.05
    """Continuous actions: share of the action variance the probe explains on held-out windows."""
    min_probe_windows: int = 100
    """Fewer labelled val windows than this: the probe's held-out part (a fifth) is too small to judge."""
    still_note_share: float = 0.5
    """A failing latent_used or probe check adds a note when at least this share of the validation windows are still (o[t+1] within data.still_threshold of o[t]): half the data can teach the latent nothing."""
    min_policy_r2: float = 0.02
    """Stage 2: share of the variance of the IDM's z[t] across val windows that the policy's latent explains (1 - latent_mse / latent_mse_baseline). Always answering the mean latent scores about 0 (a little below: the baseline uses each batch's own mean); the BabyAI demo's policy 0.37; a policy cloned from sticky-random Procgen video -0.20."""


THRESHOLDS = HealthThresholds()

# what each check says when it fails: (what it means, likely causes, what to try)
ADVICE = {
    "beats_copy": (
        "the world model predicts o[t+1] no better than copying o[t]",
        "too few steps or too low a learning rate; frames that barely change, so the pixel MSE "
        "is tiny next to the quantiser's loss",
        "model.fdm_loss_scale=copy; more trainer.max_steps; check the frames with "
        "`python -m data_prep.inspect`",
    ),
    "codes_used": (
        "the codebook collapsed: about one code per head over the validation windows",
        "the commitment loss outweighs the world model's (small MSEs); dead codes not replaced",
        "model.fdm_loss_scale=copy; model.vq_cosine=true; model.vq_dead_code_threshold above 0 "
        "(but below a quarter of batch / codebook size, see `codebook_churn`); a lower "
        "model.vq_commitment",
    ),
    "latent_spread": (
        "the latent action is (almost) the same for every window",
        "the quantiser or the noise of the continuous bottleneck drowns the IDM's signal; the "
        "world-model loss too small to matter",
        "model.fdm_loss_scale=copy; model.vq_cosine=true; a lower model.continuous_noise",
    ),
    "latent_used": (
        "the world model predicts as well with another window's latent: z[t] carries nothing "
        "it uses",
        "o[t+1] follows from the context alone (a deterministic expert, a scrolling background, "
        "a long context); a collapsed latent",
        "data with varied actions (random detours, a sticky-random policy); a shorter "
        "data.context; model.fdm_loss_scale=copy; model.fdm=latent when much of the frame is "
        "background; model.sup_weight > 0 if some windows carry labels",
    ),
    "predicts_latent": (
        "the latent policy predicts the IDM's z[t] no better than always answering the mean "
        "latent: it has learnt nothing to act on",
        "actions that do not follow from the frames (a random or sticky-random agent: the next "
        "action is mostly chance); a stage-1 latent that carries no action (its health check); "
        "too few steps",
        "video of agents that act with purpose; fix stage 1 first; more trainer.max_steps",
    ),
    "probe": (
        "a probe from z[t] to the true action does no better than the majority action",
        "z[t] encodes something other than the action (see latent_used), such as where in "
        "the frame something changed, or the actions have no visible effect in these frames",
        "model.idm_pool=max (z[t] then cannot say where); the fixes for latent_used; "
        "model.sup_weight > 0 with a few labels (LAOM)",
    ),
}


def codebook_churn(model_cfg, windows_per_step: int) -> str | None:
    """A warning when the VQ dead-code rule would re-seed codes that are in fine use.

    The library counts each code's uses per batch (EMA, summed over ranks) and replaces a
    code whose count falls below ``vq_dead_code_threshold``. A codebook used evenly gives
    each code windows_per_step / codebook_size uses a batch; at or below the threshold,
    most codes count as dead at every step and are replaced by batch vectors (reported on
    random batches of 32 with 64 codes and threshold 1: 256 of 512 codes re-seeded each
    step), so no code lives long enough to mean anything. None when the rule is safe.

    model_cfg: lapo.config.ModelConfig; windows_per_step: batch size times data ranks.
    """
    if model_cfg.bottleneck != "vq" or model_cfg.vq_dead_code_threshold <= 0:
        return None
    even = windows_per_step / model_cfg.vq_codebook_size
    if model_cfg.vq_dead_code_threshold < even:
        return None
    safe = even / 4
    return (
        f"model.vq_dead_code_threshold={model_cfg.vq_dead_code_threshold:g} with "
        f"{model_cfg.vq_codebook_size} codes a head and {windows_per_step} windows a step: a "
        f"codebook in even use gives each code {even:.2g} uses a step, not above the threshold, so "
        "most codes are re-seeded at every step and none keeps a meaning (codebook churn); "
        f"use a threshold of about {safe:.2g} (a quarter of even use), fewer codes "
        "(model.vq_codebook_size) or a larger batch"
    )


def latent_spread(total: Tensor, total_sq: Tensor, n: int) -> float:
    """Mean per-dimension std of z[t] over n windows, divided by the RMS of z[t].

    total, total_sq: (D,) sums of z[t] and z[t]**2 over the windows (float64: a collapsed
    latent is a large mean with a tiny spread, and float32 sums would cancel).
    """
    if n < 2:
        return float("nan")
    mean = total.double() / n  # (D,)
    mean_sq = total_sq.double() / n  # (D,)
    std = (mean_sq - mean**2).clamp_min(0.0).sqrt()  # (D,)
    rms = float(mean_sq.mean().sqrt())
    return float(std.mean()) / rms if rms > 0 else 0.0


def latent_gain_db(errors: dict[str, float], suffix: str = "_shuffled") -> float | None:
    """dB the world model loses when z[t] is replaced (suffix ``_shuffled`` or ``_zeroed``).

    errors: means over the same windows of mse and mse{suffix} (pixel world model),
    fdm_loss and fdm_loss{suffix} (latent world model), or psnr and psnr{suffix} (dB);
    None when no pair is there.
    """
    if "psnr" in errors and f"psnr{suffix}" in errors:
        return errors["psnr"] - errors[f"psnr{suffix}"]
    for key in ("mse", "fdm_loss"):
        if key in errors and f"{key}{suffix}" in errors:
            true, other = errors[key], errors[f"{key}{suffix}"]
            if true <= 0:
                return 0.0 if other <= 0 else math.inf
            return 10.0 * math.log10(max(other, 1e-12) / true)
    return None


def _values(m: dict[str, float], p: str) -> dict[str, tuple[float | None, str]]:
    """check -> (value, what it is); value None when its metrics are missing."""

    def get(k: str) -> float | None:
        v = m.get(p + k)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    def diff(a: str, b: str) -> float | None:
        x, y = get(a), get(b)
        return None if x is None or y is None else x - y

    out = {
        "beats_copy": (diff("psnr", "psnr_copy"), f"{p}psnr - {p}psnr_copy (dB)"),
        "codes_used": (get("codebook_perplexity"), f"{p}codebook_perplexity (codes per head)"),
        "latent_spread": (get("latent_spread"), f"{p}latent_spread (std / RMS of z[t])"),
        "latent_used": (get("latent_gain_db"), f"{p}latent_gain_db (true vs shuffled z[t])"),
    }
    if get("probe_acc") is not None:
        out["probe"] = (diff("probe_acc", "probe_majority"), f"{p}probe_acc - {p}probe_majority")
    elif get("probe_mse") is not None and get("probe_mse_mean"):
        r2 = 1.0 - get("probe_mse") / get("probe_mse_mean")
        out["probe"] = (r2, f"1 - {p}probe_mse / {p}probe_mse_mean (variance explained)")
    else:
        out["probe"] = (None, f"{p}probe_acc or {p}probe_mse")
    return out


def assess(
    metrics: dict[str, float], thresholds: HealthThresholds = THRESHOLDS, *, prefix: str = "val/"
) -> dict:
    """Verdicts of every check on one set of validation metrics (keys ``prefix`` + name).

    Returns ``{"verdict": "pass" | "fail" | "unknown", "failed": [names], "checks": {name:
    {"value", "threshold", "passed", "metric"}}, "thresholds": {...}}``. A check whose
    metrics are missing (no codebook, no labelled windows, no validation) has passed None
    and a ``skipped`` reason; "unknown" means no check could be made.
    """
    t = thresholds
    limits = {
        "beats_copy": t.min_copy_gain_db,
        "codes_used": t.min_code_perplexity,
        "latent_spread": t.min_latent_spread,
        "latent_used": t.min_latent_gain_db,
        "probe": t.min_probe_r2 if f"{prefix}probe_mse" in metrics else t.min_probe_gain,
    }
    checks: dict[str, dict] = {}
    for name, (value, what) in _values(metrics, prefix).items():
        entry = {"value": value, "threshold": limits[name], "passed": None, "metric": what}
        n_probe = metrics.get(f"{prefix}probe_n")
        if value is None:
            entry["skipped"] = f"not measured ({what})"
        elif name == "probe" and n_probe is not None and n_probe < t.min_probe_windows:
            entry["skipped"] = f"only {int(n_probe)} labelled val windows (< {t.min_probe_windows})"
        else:
            entry["passed"] = bool(value >= limits[name])
        checks[name] = entry
    failed = [k for k, c in checks.items() if c["passed"] is False]
    made = [k for k, c in checks.items() if c["passed"] is not None]
    verdict = "fail" if failed else ("pass" if made else "unknown")
    out = {"verdict": verdict, "failed": failed, "checks": checks, "thresholds": asdict(t)}
    if metrics.get(f"{prefix}still_share") is not None:  # not a check: it explains one
        out["still_share"] = float(metrics[f"{prefix}still_share"])
    return out


def assess_policy(
    metrics: dict[str, float], thresholds: HealthThresholds = THRESHOLDS, *, prefix: str = "val/"
) -> dict:
    """Stage 2's verdict (`lapo train-policy`), shaped like `assess`: does the policy's latent
    explain any of the IDM's z[t] across validation windows?"""
    mse, base = metrics.get(f"{prefix}latent_mse"), metrics.get(f"{prefix}latent_mse_baseline")
    what = f"1 - {prefix}latent_mse / {prefix}latent_mse_baseline (variance of z[t] explained)"
    entry = {"value": None, "threshold": thresholds.min_policy_r2, "passed": None, "metric": what}
    if mse is None or base is None or not base > 0 or math.isnan(float(mse)):
        entry["skipped"] = f"not measured ({what})"
    else:
        entry["value"] = 1.0 - float(mse) / float(base)
        entry["passed"] = bool(entry["value"] >= thresholds.min_policy_r2)
    failed = ["predicts_latent"] if entry["passed"] is False else []
    verdict = "fail" if failed else ("unknown" if entry["passed"] is None else "pass")
    return {"verdict": verdict, "failed": failed, "checks": {"predicts_latent": entry},
            "thresholds": asdict(thresholds)}  # fmt: skip


def warning_text(
    health: dict, *, step: int, final: bool = False, command: str = "lapo pretrain",
    stage: str = "stage-1",
) -> str:  # fmt: skip
    """The block a failing verdict prints: each failed check, its likely causes, what to try."""
    when = "final model" if final else "validation"
    made = sum(c["passed"] is not None for c in health["checks"].values())
    lines = [
        f"{command}: {stage} health check FAILED ({when}, step {step}): "
        f"{len(health['failed'])} of {made} checks (thresholds: lapo/health.py)"
    ]
    for name in health["failed"]:
        c = health["checks"][name]
        means, causes, fixes = ADVICE[name]
        lines += [
            f"  - {name}: {c['metric']} = {c['value']:.4g}, needs >= {c['threshold']:g}",
            f"      {means}.",
            f"      likely: {causes}.",
            f"      try: {fixes}.",
        ]
    share = health.get("still_share")
    if (
        share is not None
        and share >= health["thresholds"]["still_note_share"]
        and {"latent_used", "probe"} & set(health["failed"])
    ):
        lines.append(
            f"  note: {share:.0%} of the validation windows are still (o[t+1] within "
            "data.still_threshold of o[t]): they show nothing of the action; data.still_keep=0.1 "
            "spends training on the windows where something moves"
        )
    return "\n".join(lines)
