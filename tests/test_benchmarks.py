"""The CPU benchmark scripts run end to end on tiny sizes and print their figures.

They are not run for their numbers here (timed tests are noise on a shared machine), only
so that a change to the code they drive cannot break them unnoticed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_train_step_benchmark_times_both_loops_under_a_time_budget(tmp_path):
    """trainer.max_minutes set (as in procgen_cpu.yaml): the plain loop builds the schedule
    without a Trainer, the Lightning loop with its clock."""
    out = run_script(
        "benchmarks/train_step.py", "--config", "configs/lam/debug.yaml", "--steps", "2",
        "--warmup", "1", "--repeats", "1", "--json", str(tmp_path / "b.json"),
        "--out", str(tmp_path / "run"), "--set", "trainer.max_minutes=5",
    )  # fmt: skip
    figures = json.loads((tmp_path / "b.json").read_text())
    for loop in ("plain", "lightning"):
        assert figures[loop]["windows_per_s"] > 0 and f"{loop:9s}:" in out


@pytest.mark.slow
def test_loader_benchmark_compares_the_three_readers(tmp_path):
    out = run_script(
        "benchmarks/loader.py", "--clips", "8", "--frames", "16", "--size", "32",
        "--batch-size", "4", "--json", str(tmp_path / "l.json"),
    )  # fmt: skip
    assert "(a) decord loop" in out and "(b) lapo loader, one pass" in out and "(c) naive" in out
    assert (tmp_path / "l.json").stat().st_size > 0
