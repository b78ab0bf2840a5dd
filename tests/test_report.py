"""The demo's report on made-up metrics files: the Online RL section and its curve appear
when a `lapo rl` run is there, and the report is as before when none is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import lapo.report as report
from lapo.demo import SCALES
from lapo.plots import read_rl_curve
from lapo.report import RESULT_COLUMNS, RL_RUNS, _fmt, write_report

HEADER = "frames,updates,episodes,return_mean,length_mean,success_rate,fps,lr,loss"
# one row per PPO update, as lapo rl writes them; the second update saw no episode end
LATENT_CSV = [
    "1024,1,4,0.1,50.0,0.25,130.0,0.001,0.5",
    "2048,2,0,,,,128.0,0.001,0.4",
    "3072,3,6,0.5,30.0,0.5,131.0,0.001,0.3",
]
SCRATCH_CSV = ["1024,1,5,0.2,45.0,0.4,90.0,0.001,0.6", "2048,2,5,0.3,40.0,0.6,88.0,0.001,0.5"]
EVAL = {"success_rate": 0.7, "return_mean": 0.61, "policy_accuracy": 0.42,
        "decoder_accuracy": 0.55}  # fmt: skip


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _demo_dir(tmp_path: Path) -> Path:
    """What the report reads of a demo without RL: the two evaluations."""
    out = tmp_path / "demo"
    lapo_m = {"success_rate": 0.9, "return_mean": 0.8, "policy_accuracy": 0.6,
              "decoder_accuracy": 0.7, "random_success_rate": 0.4, "random_return_mean": 0.2,
              "decoder_majority_baseline": 0.5}  # fmt: skip
    _write(out / "eval" / "lapo.json", json.dumps(lapo_m))
    _write(out / "eval" / "bc.json", json.dumps({"success_rate": 0.3, "return_mean": 0.25}))
    return out


def _add_rl(out: Path, *, scratch: bool = True) -> None:
    latent = out / RL_RUNS[0].run
    _write(latent / "metrics.csv", "\n".join([HEADER, *LATENT_CSV]) + "\n")
    _write(latent / "rl_config.yaml", "total_frames: 3072\npolicy_start_frames: 20000\n")
    _write(latent / "sources.json", json.dumps({"from_scratch": False}))
    _write(out / RL_RUNS[0].eval, json.dumps(EVAL))
    if scratch:  # a run, but not evaluated
        run = out / RL_RUNS[1].run
        _write(run / "metrics.csv", "\n".join([HEADER, *SCRATCH_CSV]) + "\n")
        _write(run / "sources.json", json.dumps({"from_scratch": True}))


def _report(out: Path, **kw) -> tuple[str, str]:
    paths = write_report(out, commands=[], wall_seconds=60.0, env="babyai:BabyAI-GoToObj-v0",
                         scale=SCALES["quick"], **kw)  # fmt: skip
    return paths["md"].read_text(), paths["html"].read_text()


def _md_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_read_rl_curve_skips_updates_without_episodes_and_weights_by_episodes(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("\n".join([HEADER, *LATENT_CSV]) + "\n")
    frames, ret = read_rl_curve(path, "return_mean")
    assert frames.tolist() == [1024, 3072] and np.allclose(ret, [0.1, 0.5])
    _, ok = read_rl_curve(path, "success_rate", smooth=2)  # (4 * 0.25 + 6 * 0.5) / 10
    assert np.allclose(ok, [0.25, 0.4])
    assert read_rl_curve(path, "no_such_column")[0].size == 0
    path.write_text(HEADER + "\n1024,1,x,0.1,50,0.25,1,1,1\n")
    with pytest.raises(ValueError, match="metrics.csv: not a lapo rl metrics.csv"):
        read_rl_curve(path)


def test_the_report_draws_the_rl_curve_from_the_runs_metrics_csv(tmp_path, monkeypatch):
    out = _demo_dir(tmp_path)
    _add_rl(out)
    drawn = {}

    def spy(panels, path, **kw):
        drawn.update(panels)
        return plot(panels, path, **kw)

    plot = report.plot_rl_curves
    monkeypatch.setattr(report, "plot_rl_curves", spy)
    md, page = _report(out)

    # the curve: each run's updates that saw episodes, return and success against env frames
    latent, scratch = RL_RUNS[0].legend, RL_RUNS[1].legend
    assert list(drawn) == ["mean return", "success rate"]
    (frames, ret), = drawn["mean return"][latent]  # fmt: skip
    assert frames.tolist() == [1024, 3072] and np.allclose(ret, [0.1, 0.5])
    (frames, ok), = drawn["success rate"][scratch]  # fmt: skip
    assert frames.tolist() == [1024, 2048] and np.allclose(ok, [0.4, 0.6])
    assert (out / "report_assets" / "rl_curves.png").is_file()
    assert f"![{report.RL_CAPTION}](report_assets/rl_curves.png)" in md

    assert "## Online RL" in md and "`rl/latent/metrics.csv` and `rl/scratch/metrics.csv`" in md
    rows = _md_rows(md)
    assert rows[latent] == ["3072", "0.100 -> 0.500", "0.250 -> 0.500"]
    assert rows[scratch] == ["2048", "0.200 -> 0.300", "0.400 -> 0.600"]
    # the latent run stopped before its policy could move, and the report says so
    assert "stays 0 for the first 20000 frames" in md
    # the evaluated RL agent has its row in the results table, from its JSON; the other none
    assert rows[RL_RUNS[0].row] == [_fmt(EVAL[k]) for _, k in RESULT_COLUMNS]
    assert RL_RUNS[1].row not in rows
    assert "and `eval/rl/latent.json`." in md
    assert "<h2>Online RL</h2>" in page and page.count("data:image/png;base64,") == 1


def test_a_report_without_rl_runs_is_as_before(tmp_path):
    out = _demo_dir(tmp_path)
    md, page = _report(out)
    assert "Online RL" not in md and "Online RL" not in page
    assert not (out / "report_assets" / "rl_curves.png").exists()
    assert "Numbers from `eval/lapo.json` and `eval/bc.json`." in md
    agents = ["lapo (latent policy + decoder)", "bc on the same labels", "random policy",
              "majority action (held-out)"]  # fmt: skip
    assert [r for r in _md_rows(md) if r in agents or r.startswith(("lapo rl", "rl "))] == agents

    # a demo run with --no-rl ignores the runs an earlier one left
    _add_rl(out)
    assert _report(out, rl=False) == (md, page)


def test_an_unreadable_rl_csv_is_named_and_the_report_still_written(tmp_path):
    out = _demo_dir(tmp_path)
    _write(out / "rl" / "latent" / "metrics.csv", HEADER + "\n1024,1,x,0.1,50,0.25,1,1,1\n")
    md, _ = _report(out)
    assert "rl/latent/metrics.csv could not be read" in md
    assert "## Online RL" in md and "_not produced_" in md.split("## Online RL")[1]
