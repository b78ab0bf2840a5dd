"""`lapo.stages.run_step`: a stage is reused only when its stamp says the same command,
config and inputs made it; otherwise it reruns from a clean output, and so does what reads it.

The stage here is a real ``python -m`` command (a tiny module written by the test) that
records its arguments in its output directory, so every run is visible in what it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lapo.io import file_sha256
from lapo.stages import read_stamp, run_step, stamp_path

STAGE_MODULE = """
import sys
from pathlib import Path

args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)
runs = out / "runs.txt"
runs.write_text((runs.read_text() if runs.exists() else "") + " ".join(args) + "\\n")
(out / "done").write_text("ok")
"""


@pytest.fixture
def stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Runs the test's stage module into tmp_path/NAME; returns (ran, output directory)."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "toy_stage.py").write_text(STAGE_MODULE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "mods"))

    def run(name: str, *flags: object, fresh: bool = False) -> tuple[bool, Path]:
        out = tmp_path / name
        ran = run_step(["toy_stage", *flags, "--out", out], out / "done", fresh=fresh, label=name)
        return ran, out

    return run


def runs_of(out: Path) -> list[str]:
    return (out / "runs.txt").read_text().splitlines()


def test_same_command_is_reused_and_the_stamp_records_it(stage) -> None:
    ran, a = stage("a", "--n", 1)
    assert ran
    stamp = read_stamp(a / "done")
    assert stamp_path(a / "done") == a / "done.stamp.json"
    assert stamp["command"] == ["toy_stage", "--n", "1", "--out", str(a)]
    assert stamp["wall_seconds"] >= 0 and stamp["finished"]
    assert stage("a", "--n", 1) == (False, a)
    assert len(runs_of(a)) == 1


def test_other_settings_rerun_from_a_clean_output(stage, capsys) -> None:
    _, a = stage("a", "--n", 1)
    (a / "stale.txt").write_text("left by the first run")
    capsys.readouterr()
    ran, _ = stage("a", "--n", 2)
    assert ran
    assert "--n: 1 -> 2" in capsys.readouterr().out
    assert runs_of(a) == [f"--n 2 --out {a}"]  # the old output was deleted first
    assert not (a / "stale.txt").exists()
    assert read_stamp(a / "done")["command"][2] == "2"


def test_an_edited_config_or_a_remade_input_reruns_what_reads_it(stage, tmp_path, capsys) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("lr: 1\n")
    _, a = stage("a", "--n", 1)
    ran, b = stage("b", "--data", a, "--config", cfg)
    assert ran and str(a / "done.stamp.json") in read_stamp(b / "done")["inputs"]
    assert str(cfg) in read_stamp(b / "done")["files"]
    assert not stage("b", "--data", a, "--config", cfg)[0]

    cfg.write_text("lr: 2\n")
    capsys.readouterr()
    assert stage("b", "--data", a, "--config", cfg)[0]
    assert f"{cfg} changed" in capsys.readouterr().out

    assert stage("a", "--n", 3)[0]  # the upstream stage reruns with another setting ...
    capsys.readouterr()
    assert stage("b", "--data", a, "--config", cfg)[0]  # ... so the same command downstream reruns
    assert "an input was made again" in capsys.readouterr().out
    assert not stage("b", "--data", a, "--config", cfg)[0]


def test_a_config_edited_only_in_its_comments_is_the_same_setting(stage, tmp_path, capsys) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("# a recipe\nlr: 1\nsteps: 10\n")
    assert stage("a", "--config", cfg)[0]
    cfg.write_text("# the same recipe, its figures measured\nsteps: 10   # why\nlr: 1\n")
    assert not stage("a", "--config", cfg)[0]  # comments, order and spacing are no setting
    cfg.write_text("lr: 1\nsteps: 20\n")
    capsys.readouterr()
    assert stage("a", "--config", cfg)[0]
    assert f"{cfg} changed" in capsys.readouterr().out


def test_a_stamp_holding_a_configs_bytes_digest_still_matches(stage, tmp_path) -> None:
    """Stamps written before configs were digested by their settings stay valid."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("lr: 1\n")
    _, a = stage("a", "--config", cfg)
    stamp = read_stamp(a / "done")
    assert stamp["files"][str(cfg)].startswith("yaml:")
    stamp["files"][str(cfg)] = file_sha256(cfg)[:16]
    stamp_path(a / "done").write_text(json.dumps(stamp))
    assert not stage("a", "--config", cfg)[0]
    cfg.write_text("lr: 2\n")
    assert stage("a", "--config", cfg)[0]


def test_output_without_a_stamp_or_with_fresh_reruns(stage) -> None:
    _, a = stage("a", "--n", 1)
    stamp_path(a / "done").unlink()  # e.g. made before stamps existed
    assert stage("a", "--n", 1)[0]
    assert stage("a", "--n", 1, fresh=True)[0]
    assert len(runs_of(a)) == 1
    assert json.loads(stamp_path(a / "done").read_text())["command"][-1] == str(a)
