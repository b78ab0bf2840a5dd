"""The demo's report: `report.md` and a self-contained `report.html` (images inlined).

Every number in the report is read from a metrics file written by the stage
that measured it (`eval/lapo.json`, `eval/bc.json`, `lam/metrics.json`, and for the
`lapo rl` runs `rl/*/metrics.csv` and `eval/rl/*.json`), and the table says which file
and key each came from, so the report can be checked against them (the demo test does).
The "Online RL" section appears only when an RL run is there.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lapo.config import ConfigError, RLConfig, load_config  # noqa: E402
from lapo.health import ADVICE  # noqa: E402
from lapo.plots import plot_rl_curves, read_rl_curve  # noqa: E402

# (row label, metrics file relative to the demo dir, key) for the main table
RESULT_COLUMNS = [
    ("success rate", "success_rate"),
    ("mean return", "return_mean"),
    ("policy action accuracy (held-out)", "policy_accuracy"),
    ("pseudo-label accuracy (IDM + decoder)", "decoder_accuracy"),
]


class RLRun(NamedTuple):
    """One of the demo's `lapo rl` runs; paths relative to the demo directory."""

    row: str  # its row in the results table
    legend: str  # its line in the RL figure and its row in the RL table
    about: str  # what it starts from, for the RL section's text
    run: str  # the run directory (lapo rl --out)
    eval: str  # its `lapo evaluate` JSON (not in eval/ itself, whose figures are lapo's)


# where `lapo demo` puts its RL runs, and how the report names them
RL_RUNS = [
    RLRun("lapo rl (latent policy, fresh action head, no labels)", "latent policy, no labels",
          "the stage-2 latent policy acting through a fresh action head (no action labels)",
          "rl/latent", "eval/rl/latent.json"),
    RLRun("rl from scratch (same network, no LAM)", "from scratch",
          "the same network from random weights, without the LAM (`--from-scratch`)",
          "rl/scratch", "eval/rl/scratch.json"),
]  # fmt: skip


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "n/a"
    if isinstance(v, (int, float)):
        return f"{v:.3f}"
    return str(v)


def results_table(out: Path, *, rl: bool = True) -> tuple[list[str], list[list[str]]]:
    """Rows of the main table: the lapo agent, bc on the same labels, each evaluated RL run
    (`RL_RUNS`, unless not `rl`), a random policy, the majority action."""
    lapo_m = _load(out / "eval" / "lapo.json")
    bc_m = _load(out / "eval" / "bc.json")
    header = ["agent", *[c for c, _ in RESULT_COLUMNS]]
    rows = [
        ["lapo (latent policy + decoder)", *[_fmt(lapo_m.get(k)) for _, k in RESULT_COLUMNS]],
        ["bc on the same labels", *[_fmt(bc_m.get(k)) for _, k in RESULT_COLUMNS]],
    ]
    for r in RL_RUNS if rl else []:
        if (out / r.eval).is_file():
            m = _load(out / r.eval)
            rows.append([r.row, *[_fmt(m.get(k)) for _, k in RESULT_COLUMNS]])
    rows += [
        [
            "random policy",
            _fmt(lapo_m.get("random_success_rate")),
            _fmt(lapo_m.get("random_return_mean")),
            "n/a",
            "n/a",
        ],
        [
            "majority action (held-out)",
            "n/a",
            "n/a",
            _fmt(lapo_m.get("decoder_majority_baseline")),
            _fmt(lapo_m.get("decoder_majority_baseline")),
        ],
    ]
    return header, rows


def lam_table(out: Path) -> tuple[list[str], list[list[str]]]:
    m = _load(out / "eval" / "lapo.json")
    keys = [
        ("latent probe accuracy (held-out)", "probe_accuracy"),
        ("probe majority-class baseline", "probe_majority_baseline"),
        ("world model PSNR (dB)", "fdm_psnr"),
        ("copy-last-frame PSNR (dB)", "fdm_psnr_copy_baseline"),
        ("codebook perplexity", "codebook_perplexity"),
        ("codebook usage", "codebook_usage"),
    ]
    return ["latent action model", "value"], [[name, _fmt(m.get(k))] for name, k in keys if k in m]


def health_table(out: Path) -> tuple[str, list[str], list[list[str]]]:
    """Stage 1's health verdict (`lam/metrics.json`, key ``health``): a sentence and a table."""
    health = _load(out / "lam" / "metrics.json").get("health")
    if not health:
        return "No stage-1 health verdict (`lam/metrics.json` has no `health`).", [], []
    step = health.get("step")
    at = f" at the validation of step {step}" if step is not None else ""
    verdict = {"pass": "passed", "fail": "FAILED", "unknown": "could not be judged"}
    text = (
        f"Stage-1 health check{at}: {verdict.get(health['verdict'], health['verdict'])} "
        "(`lam/metrics.json`, key `health`; thresholds in `lapo/health.py`)."
    )
    for name in health.get("failed", []):
        text += f" {name}: {ADVICE[name][0]}." if name in ADVICE else f" {name} failed."
    rows = []
    for name, c in health.get("checks", {}).items():
        result = "not measured" if c.get("passed") is None else ("pass" if c["passed"] else "FAIL")
        rows.append(
            [name, c.get("metric", ""), _fmt(c.get("value")), f">= {c['threshold']:g}", result]
        )
    return text, ["check", "measure", "value", "needs", "result"], rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _read_csv_logs(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalar series from Lightning's CSVLogger files under RUN/logs (any version dir)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(run.glob("logs/**/metrics.csv")):
        with f.open() as fh:
            for row in csv.DictReader(fh):
                step = row.get("step")
                if step in (None, ""):
                    continue
                for k, v in row.items():
                    if k in ("step", "epoch") or v in (None, ""):
                        continue
                    try:
                        series.setdefault(k, []).append((int(float(step)), float(v)))
                    except ValueError:
                        pass
    return series


def plot_curves(out: Path, dest: Path) -> Path | None:
    """Training curves from the CSV logs: stage-1 losses, stage-1 PSNR vs copy, stage-2 loss."""
    lam, pol = _read_csv_logs(out / "lam"), _read_csv_logs(out / "policy")
    panels = [
        ("stage 1: losses", lam, ["train/loss", "train/fdm_mse", "val/loss"], True),
        (
            "stage 1: world model PSNR (dB)",
            lam,
            ["train/psnr", "train/psnr_copy", "val/psnr"],
            False,
        ),
        ("stage 2: latent policy loss", pol, ["train/loss", "val/loss"], True),
    ]
    panels = [(t, s, [k for k in ks if len(s.get(k, [])) > 0], log) for t, s, ks, log in panels]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.3), squeeze=False)
    for ax, (title, series, keys, log) in zip(axes[0], panels):
        for k in keys:
            xs, ys = zip(*sorted(series[k]))
            ax.plot(xs, ys, label=k, marker="o" if len(xs) < 10 else None, markersize=3)
        if log and all(y > 0 for k in keys for _, y in series[k]):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest


def _results_source(out: Path, rl: bool) -> str:
    """The sentence under the results table naming the files its numbers come from."""
    files = ["eval/lapo.json", "eval/bc.json"]
    files += [r.eval for r in RL_RUNS if rl and (out / r.eval).is_file()]
    return f"Numbers from {_listed([f'`{f}`' for f in files])}."


def _listed(names: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def _span(values) -> str:
    return f"{values[0]:.3f} -> {values[-1]:.3f}" if len(values) else "n/a"


def rl_section(out: Path, dest: Path) -> tuple[str, list[str], list[list[str]], Path | None] | None:
    """The "Online RL" section: a sentence, a table (first and last update of each run) and the
    figure of mean return and success rate against env frames, one line per run of `RL_RUNS`
    whose metrics.csv exists; None when there is none."""
    runs = [r for r in RL_RUNS if (out / r.run / "metrics.csv").is_file()]
    if not runs:
        return None
    panels: dict[str, dict] = {"mean return": {}, "success rate": {}}
    rows, notes = [], []
    for r in runs:
        csv_path = out / r.run / "metrics.csv"
        try:
            frames, ret = read_rl_curve(csv_path, "return_mean")
            _, ok = read_rl_curve(csv_path, "success_rate")
        except (OSError, ValueError) as e:
            notes.append(f"{r.run}/metrics.csv could not be read ({e}).")
            continue
        if len(frames):
            panels["mean return"][r.legend] = [(frames, ret)]
        if len(ok):
            panels["success rate"][r.legend] = [(frames, ok)]
        last = f"{int(frames[-1])}" if len(frames) else "no episode ended"
        rows.append([r.legend, last, _span(ret), _span(ok)])
        if not _load(out / r.run / "sources.json").get("from_scratch") and len(frames):
            rl_cfg = _rl_config(out / r.run)
            if rl_cfg.self_label_epochs:
                by = "only" if rl_cfg.head_lr_scale == 0 else "as well as from reward"
                notes.append(
                    f"In {r.run} the action head learns {by} from the agent's own transitions "
                    f"(`self_label_epochs` {rl_cfg.self_label_epochs}, `head_lr_scale` "
                    f"{rl_cfg.head_lr_scale:g}): the frozen LAM's latent of each rollout "
                    "window -> the action taken; no labelled data."
                )
            start = rl_cfg.policy_start_frames
            if start >= frames[-1]:
                notes.append(
                    f"In {r.run} the pretrained policy's learning rate stays 0 for the first "
                    f"{start} frames (`policy_start_frames`), longer than the run: only the "
                    "action and value heads learned."
                )
    figure = None
    if any(panels.values()):
        figure = plot_rl_curves(panels, dest)
    about = "; ".join(f'"{r.legend}" is {r.about}' for r in runs)
    sources = _listed([f"`{r.run}/metrics.csv`" for r in runs])
    text = (
        f"`lapo rl` trains with PPO from reward, with no labelled data: {about}. Each point is one PPO update: "
        "the mean over the training episodes that ended in it (sampled actions). Numbers from "
        f"{sources}; the settings are in each run's `rl_config.yaml`."
    )
    text = " ".join([text, *notes])
    header = ["run", "env frames", "mean return, first -> last update",
              "success rate, first -> last update"]  # fmt: skip
    return text, header, rows, figure


def _rl_config(run: Path) -> RLConfig:
    """The settings of a `lapo rl` run (typed defaults where its rl_config.yaml is missing or
    unreadable: the report never fails on them)."""
    try:
        return load_config(RLConfig, run / "rl_config.yaml")
    except (OSError, ConfigError):
        return RLConfig()


def _step_of(p: Path) -> tuple[int, str]:
    digits = "".join(ch for ch in p.stem if ch.isdigit())
    return (int(digits) if digits else -1, p.name)


def _find(out: Path, patterns: list[str]) -> Path | None:
    """The newest file (highest step number in its name) matching the first pattern that hits."""
    for pat in patterns:
        hits = sorted(out.glob(pat), key=_step_of)
        if hits:
            return hits[-1]
    return None


def world_model_strip(out: Path) -> tuple[Path | None, str]:
    """Stage 1's picture of the final model (or, from an older run, its newest), and a caption.

    `LAMModule` names the end-of-training strip ``final-{val|train}-stepN.png``: val when it
    shows held-out windows, train when no validation batch was seen.
    """
    path = _find(out, ["lam/images/final-*.png", "lam/images/val-*.png", "lam/images/*.png"])
    if path is None:
        return None, "World model: o[t], predicted o[t+1], true o[t+1]"
    step = _step_of(path)[0]
    windows = "held-out" if path.name.startswith(("final-val", "val")) else "training"
    final = path.name.startswith("final-")
    when = f"after training (step {step})" if final else f"at step {step} (not the final model)"
    return path, f"World model {when}, {windows} windows: o[t], predicted o[t+1], true o[t+1]"


def _timing(commands: list[dict], wall_seconds: float) -> str:
    """How long the run took, and which stages it reused from earlier runs (and their time)."""
    reused = [c for c in commands if c.get("status") == "reused"]
    text = f"Wall time {wall_seconds / 60:.1f} min."
    if reused:
        then = sum(c.get("seconds") or 0.0 for c in reused)
        text += (
            f" {len(reused)} of {len(commands)} stages were reused from earlier runs of the same "
            f"commands, which took {then / 60:.1f} min then (see Commands)."
        )
    return text


def _command_lines(commands: list[dict]) -> list[str]:
    """Each stage's command, then a comment with its wall time, marked when it was reused."""
    lines = []
    for c in commands:
        secs = c.get("seconds")
        took = f"{secs:.0f} s" if secs is not None else "time unknown"
        if c.get("status") == "reused":
            took = f"reused: ran {c.get('finished')}, {took}"
        lines += [c["command"], f"#   {took}"]
    return lines


def _img_html(path: Path | None, caption: str, pixel_art: bool = False) -> str:
    if path is None or not path.is_file():
        return f"<p class='missing'>{html.escape(caption)}: not produced</p>"
    mime = "image/gif" if path.suffix == ".gif" else "image/png"
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f"<figure><img class='{'px' if pixel_art else ''}' src='data:{mime};base64,{data}' "
        f"alt='{html.escape(caption)}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#1d2330;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #dde;padding-bottom:.2em}
.sub{color:#667}
table{border-collapse:collapse;margin:.8em 0} th,td{border:1px solid #ccd;padding:.35em .8em;text-align:right}
th:first-child,td:first-child{text-align:left} thead{background:#eef1f7}
tbody tr:first-child{font-weight:600}
figure{margin:1em 0} img{max-width:100%;border:1px solid #dde} img.px{image-rendering:pixelated;min-width:420px}
figcaption{color:#556;font-size:.9em}
pre{background:#f5f6f9;padding:.8em;overflow-x:auto;font-size:.85em;border-radius:4px}
.missing{color:#a33}
"""


RL_CAPTION = "Online RL: mean return and success rate against env frames"


def write_report(
    out: Path, *, commands: list[dict], wall_seconds: float, env: str, scale, rl: bool = True
) -> dict:
    """Write OUT/report.md and OUT/report.html; return their paths. `rl`: the RL runs of
    `RL_RUNS` found in OUT get the "Online RL" section and rows in the results table (False:
    a demo run with --no-rl ignores those an earlier run left)."""
    out = Path(out)
    assets = out / "report_assets"
    assets.mkdir(exist_ok=True)
    curves = plot_curves(out, assets / "training_curves.png")
    wm_strip, wm_caption = world_model_strip(out)
    latent_2d = _find(out, ["eval/*latent*.png"])
    budget = _find(out, ["eval/*budget*.png"])
    rollout = _find(out, ["eval/*rollout*.gif", "eval/*rollout*.png"])

    header, rows = results_table(out, rl=rl)
    lh, lrows = lam_table(out)
    title = f"lapo demo: {env}"
    intro = (
        f"Whole pipeline on {env}: {scale.train_episodes} unlabelled expert episodes for "
        f"pretraining, a label budget of {scale.label_budget} transitions, "
        f"{scale.eval_episodes} closed-loop evaluation episodes. {_timing(commands, wall_seconds)}"
    )
    rel = lambda p: p.relative_to(out).as_posix() if p else None  # noqa: E731
    rl_part = rl_section(out, assets / "rl_curves.png") if rl else None
    md = [f"# {title}", "", intro, "", "## Results", "", _md_table(header, rows), ""]
    md += [_results_source(out, rl), "", "## Latent action model", ""]
    md += [_md_table(lh, lrows), ""]
    health_text, hh, hrows = health_table(out)
    md += [health_text, "", _md_table(hh, hrows) if hrows else "", ""]
    for cap, p in (
        ("Training curves", curves),
        (wm_caption, wm_strip),
        ("Latent actions in 2D, coloured by true action", latent_2d),
        ("Decoder accuracy against label budget", budget),
        ("Rollout of the final policy", rollout),
    ):
        md += [f"## {cap}", "", f"![{cap}]({rel(p)})" if p else "_not produced_", ""]
    if rl_part is not None:
        rl_text, rl_header, rl_rows, rl_fig = rl_part
        md += ["## Online RL", "", rl_text, ""]
        md += [_md_table(rl_header, rl_rows), ""] if rl_rows else []
        md += [f"![{RL_CAPTION}]({rel(rl_fig)})" if rl_fig else "_not produced_", ""]
    md += [
        "## Commands",
        "",
        "Each stage, as run, with its wall time (repeat any by hand at a larger scale):",
        "",
        "```",
    ]
    md += _command_lines(commands) + ["```", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))

    cmds = html.escape("\n".join(_command_lines(commands)))
    body = [
        f"<h1>{html.escape(title)}</h1><p class='sub'>{html.escape(intro)}</p>",
        "<h2>Results</h2>",
        _html_table(header, rows),
        "<h2>Latent action model</h2>",
        _html_table(lh, lrows),
        f"<p>{html.escape(health_text.replace('`', ''))}</p>",
        _html_table(hh, hrows) if hrows else "",
        "<h2>Training</h2>",
        _img_html(curves, "Training curves"),
        "<h2>World model</h2>",
        _img_html(wm_strip, wm_caption, pixel_art=True),
        "<h2>Latent actions</h2>",
        _img_html(latent_2d, "Latent actions in 2D, coloured by true action"),
        _img_html(budget, "Decoder accuracy against label budget"),
        "<h2>Rollout</h2>",
        _img_html(rollout, "Rollout of the final policy", pixel_art=True),
    ]
    if rl_part is not None:
        body += [
            "<h2>Online RL</h2>",
            f"<p>{html.escape(rl_text.replace('`', ''))}</p>",
            _html_table(rl_header, rl_rows) if rl_rows else "",
            _img_html(rl_fig, RL_CAPTION),
        ]
    body += [
        "<h2>Commands</h2>",
        f"<pre>{cmds}</pre>",
    ]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )
    html_path = out / "report.html"
    html_path.write_text(page)
    return {"html": html_path, "md": md_path}
