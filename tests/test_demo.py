"""`lapo demo --quick` end to end: every artefact exists and the report's numbers are the metrics files'."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lapo.report import RESULT_COLUMNS, _fmt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    cmd = [sys.executable, "-m", "lapo.cli", "demo", "--quick", "--steps", "0.1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


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


def test_report_numbers_equal_metrics(demo_dir: Path) -> None:
    md = (demo_dir / "report.md").read_text()
    lapo_m = json.loads((demo_dir / "eval" / "lapo.json").read_text())
    bc_m = json.loads((demo_dir / "eval" / "bc.json").read_text())
    for label, metrics in (
        ("lapo (latent policy + decoder)", lapo_m),
        ("bc on the same labels", bc_m),
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


def test_commands_are_repeatable(demo_dir: Path) -> None:
    commands = json.loads((demo_dir / "commands.json").read_text())
    stages = [c["stage"] for c in commands]
    assert stages[:3] == ["record train", "record labeled", "record heldout"]
    for needed in ("pretrain", "train-policy", "finetune", "finetune bc", "label",
                   "finetune budgets", "evaluate"):  # fmt: skip
        assert needed in stages
    md = (demo_dir / "report.md").read_text()
    for c in commands:
        assert c["command"] in md
        assert re.match(r"^(lapo|python -m data_prep)\b", c["command"]), c["command"]


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
    assert "reused: ran" in md and "5 of 11 stages were reused" in md
    assert "World model after training (step 6)" in md
    test_report_numbers_equal_metrics(demo_dir)
