"""`lapo demo --quick` end to end: every artefact exists and the report's numbers are the metrics
files' (slow); and, without running them, the commands the demo would run (fast)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lapo.demo as demo
from lapo.cli import build_parser
from lapo.cli_args import config_from_args
from lapo.config import CONFIGS, RLConfig
from lapo.report import RESULT_COLUMNS, RL_RUNS, _fmt

slow = pytest.mark.slow  # the tests of a real demo run (the demo_dir fixture)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    cmd = [sys.executable, "-m", "lapo.cli", "demo", "--quick", "--steps", "0.1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@slow
def test_artefacts_exist(demo_dir: Path) -> None:
    for rel in (
        "data/train/manifest.json",
        "data/labeled/manifest.json",
        "data/heldout/manifest.json",
        "data/heldout_labelled/manifest.json",
        "lam/model.safetensors",
        "lam/config.yaml",
        "policy/policy.safetensors",
        "agent/agent.json",
        "agent/agent.safetensors",
        "bc/agent.json",
        "eval/lapo.json",
        "eval/bc.json",
        "commands.json",
        "report.md",
        "report.html",
        "report_assets/training_curves.png",
        "rl/latent/metrics.csv",
        "rl/latent/agent.json",
        "rl/scratch/metrics.csv",
        "eval/rl/latent.json",
        "eval/rl/scratch.json",
        "report_assets/rl_curves.png",
    ):
        assert (demo_dir / rel).is_file(), f"demo did not write {rel}"
    # the world-model picture is the trained model's, and the report says so
    assert "World model after training (step 12)" in (demo_dir / "report.md").read_text()
    html = (demo_dir / "report.html").read_text()
    assert "data:image/png;base64," in html  # images are inlined: the page opens offline
    assert "src='http" not in html and 'src="http' not in html


def _md_row(md: str, label: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"report.md has no row {label!r}")


@slow
def test_report_numbers_equal_metrics(demo_dir: Path) -> None:
    md = (demo_dir / "report.md").read_text()
    lapo_m = json.loads((demo_dir / "eval" / "lapo.json").read_text())
    bc_m = json.loads((demo_dir / "eval" / "bc.json").read_text())
    rl_m = [(r.row, json.loads((demo_dir / r.eval).read_text())) for r in RL_RUNS]
    for label, metrics in (
        ("lapo (latent policy + decoder)", lapo_m),
        ("bc on the same labels", bc_m),
        *rl_m,
    ):
        row = _md_row(md, label)
        assert row == [_fmt(metrics.get(k)) for _, k in RESULT_COLUMNS], label
        # and the numbers really are numbers where the metrics file has them
        for (_, k), cell in zip(RESULT_COLUMNS, row):
            if isinstance(metrics.get(k), float):
                assert abs(float(cell) - metrics[k]) < 5e-4
    random_row = _md_row(md, "random policy")
    assert random_row[0] == _fmt(lapo_m["random_success_rate"])
    assert random_row[1] == _fmt(lapo_m["random_return_mean"])
    assert _md_row(md, "world model PSNR (dB)") == [_fmt(lapo_m["fdm_psnr"])]
    assert 0.0 <= lapo_m["success_rate"] <= 1.0


@slow
def test_commands_are_repeatable(demo_dir: Path) -> None:
    commands = json.loads((demo_dir / "commands.json").read_text())
    stages = [c["stage"] for c in commands]
    assert stages[:3] == ["record train", "record labeled", "record heldout"]
    for needed in ("pretrain", "train-policy", "finetune", "finetune bc", "label",
                   "finetune budgets", "evaluate", "rl", "evaluate rl", "rl scratch"):  # fmt: skip
        assert needed in stages
    md = (demo_dir / "report.md").read_text()
    for c in commands:
        assert c["command"] in md
        assert re.match(r"^(lapo|python -m data_prep)\b", c["command"]), c["command"]


@slow
def test_rerun_reuses_finished_stages(demo_dir: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "lapo.cli",
        "demo",
        "--quick",
        "--steps",
        "0.1",
        "--out",
        str(demo_dir),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    statuses = [c["status"] for c in json.loads((demo_dir / "commands.json").read_text())]
    assert statuses and all(s == "reused" for s in statuses)


@slow
def test_other_settings_rerun_and_the_report_follows(demo_dir: Path) -> None:
    """A second demo into the same --out with fewer training steps: stage 1 and everything
    that reads it rerun; what the step count does not touch (the recordings, the bc
    baseline and its evaluation: same commands, same inputs) is reused and says so; the
    report describes that run. Last in the file: it changes the shared demo directory."""
    before = {c["stage"]: c for c in json.loads((demo_dir / "commands.json").read_text())}
    cmd = [sys.executable, "-m", "lapo.cli", "demo", "--quick", "--steps", "0.05"]
    proc = subprocess.run(
        [*cmd, "--out", str(demo_dir)], capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trainer.max_steps: 12 -> 6" in proc.stdout  # says why stage 1 runs again

    after = {c["stage"]: c for c in json.loads((demo_dir / "commands.json").read_text())}
    assert after.keys() == before.keys()
    untouched = ("record train", "record labeled", "record heldout", "finetune bc", "evaluate bc")
    for name, c in after.items():
        if name in untouched:  # reused, with the command and wall time of when it ran
            assert c["status"] == "reused" and c["command"] == before[name]["command"], name
            assert c["seconds"] == before[name]["seconds"] > 0
        else:
            assert c["status"] == "ran", name
    assert "trainer.max_steps=6" in after["pretrain"]["command"]
    assert json.loads((demo_dir / "lam" / "metrics.json").read_text())["global_step"] == 6
    images = sorted(p.name for p in (demo_dir / "lam" / "images").glob("*.png"))
    assert "final-val-step0000006.png" in images or "final-train-step0000006.png" in images
    assert not [n for n in images if "step0000012" in n]  # the first run's output is gone

    md = (demo_dir / "report.md").read_text()
    assert before["pretrain"]["command"] not in md
    assert all(c["command"] in md for c in after.values())
    assert "reused: ran" in md and "5 of 15 stages were reused" in md
    assert "World model after training (step 6)" in md
    test_report_numbers_equal_metrics(demo_dir)


# ---------------------------------------------------------------- the commands, not run


def _planned(tmp_path: Path, monkeypatch, *flags: str) -> tuple[Path, dict, dict]:
    """What `lapo demo --quick FLAGS` runs, without running it: {stage: (argv, marker)}, in
    order, and the keyword arguments of its report."""
    ran, reports = [], []
    monkeypatch.setattr(
        demo, "run_step", lambda argv, marker, **kw: ran.append((argv, marker)) or True
    )
    report = {"html": "report.html", "md": "report.md"}
    monkeypatch.setattr(demo, "write_report", lambda out, **kw: reports.append(kw) or report)
    out = tmp_path / "demo"
    parser, _ = build_parser("demo")
    assert demo.run(parser.parse_args(["demo", "--quick", "--out", str(out), *flags])) == 0
    stages = [c["stage"] for c in json.loads((out / "commands.json").read_text())]
    assert len(stages) == len(ran)
    return out, dict(zip(stages, ran)), reports[0]


def test_the_demo_runs_lapo_rl_from_its_policy_then_evaluates_it(tmp_path, monkeypatch):
    out, plan, report = _planned(tmp_path, monkeypatch)
    assert list(plan)[-4:] == ["rl", "evaluate rl", "rl scratch", "evaluate rl scratch"]
    policy = plan["train-policy"][0][plan["train-policy"][0].index("--out") + 1]
    env = "babyai:BabyAI-GoToObj-v0"
    settings = ["--config", str(CONFIGS / "rl" / "cpu.yaml"), "--set", "total_frames=2048",
                "--set", "seed=0"]  # fmt: skip
    latent, scratch = (out / r.run for r in RL_RUNS)
    assert plan["rl"] == (
        ["lapo.cli", "rl", "--policy", policy, "--env", env, "--out", str(latent), *settings],
        latent / "agent.json",
    )
    assert plan["rl scratch"] == (
        ["lapo.cli", "rl", "--policy", policy, "--env", env, "--out", str(scratch),
         "--from-scratch", *settings],
        scratch / "agent.json",
    )  # fmt: skip
    for name, r in (("evaluate rl", RL_RUNS[0]), ("evaluate rl scratch", RL_RUNS[1])):
        ev = out / r.eval  # where the report reads it
        heldout = str(out / "data" / "heldout")
        assert plan[name] == (
            ["lapo.cli", "evaluate", "--model", str(out / r.run), "--labeled", heldout, "--env",
             env, "--episodes", "10", "--split", "all", "--out", str(ev)],
            ev,
        )  # fmt: skip
    # each is a valid `lapo rl` command, with the demo's settings
    parser, _ = build_parser("rl")
    for name, scratch_flag in (("rl", False), ("rl scratch", True)):
        args = parser.parse_args(plan[name][0][1:])
        cfg = config_from_args(RLConfig, args)
        assert args.from_scratch == scratch_flag and args.init is None
        assert (cfg.total_frames, cfg.seed, cfg.num_envs, cfg.device) == (2048, 0, 8, "cpu")
    shown = json.loads((out / "commands.json").read_text())
    assert any(c["command"].startswith("lapo rl --policy ") for c in shown)
    assert report["rl"] is True


@pytest.mark.parametrize("steps, frames", [("1", 2048), ("4", 8192), ("1.3", 3072), ("0.1", 2048)])
def test_rl_frames_follow_steps_in_whole_rollouts(tmp_path, monkeypatch, steps, frames):
    """--steps scales the RL frames too, in whole PPO rollouts (8 envs x 128 steps in
    configs/rl/cpu.yaml), and never below two, so the curve has two points."""
    _, plan, _ = _planned(tmp_path, monkeypatch, "--steps", steps)
    for name in ("rl", "rl scratch"):
        assert f"total_frames={frames}" in plan[name][0]


def test_no_rl_skips_the_rl_stages_and_the_report_section(tmp_path, monkeypatch):
    _, plan, report = _planned(tmp_path, monkeypatch, "--no-rl")
    assert list(plan)[-1] == "evaluate bc"
    assert not [s for s in plan if "rl" in s.split()]
    assert report["rl"] is False
