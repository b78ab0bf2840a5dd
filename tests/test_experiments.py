"""experiments/rl_curves.py: the commands each method runs and the table built from their
curves (the lapo rl runs themselves are replaced by written metrics.csv files);
experiments/label_efficiency.py: reading an earlier chain's recordings."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import label_efficiency  # noqa: E402
import rl_curves  # noqa: E402


def _fake_runs(monkeypatch, reach: dict[str, int | None]) -> list[list[str]]:
    """Chain.run writes a metrics.csv whose success rate reaches 1.0 at `reach[method]` frames."""
    ran = []

    def run(self, argv, marker):
        argv = [str(a) for a in argv]
        ran.append(argv)
        run_dir = Path(marker).parent
        run_dir.mkdir(parents=True, exist_ok=True)
        method = run_dir.name.rsplit("_", 1)[0]
        with open(run_dir / "metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["frames", "episodes", "success_rate", "return_mean"])
            for frames in range(1024, 8193, 1024):
                hit = reach[method] is not None and frames >= reach[method]
                w.writerow([frames, 10, 1.0 if hit else 0.2, 0.0])
        Path(marker).write_text("{}")
        return 1.0

    monkeypatch.setattr(rl_curves.Chain, "run", run)
    return ran


def _setting(argv: list[str], key: str) -> str | None:
    """The last --set value of `key` in a command (later settings win in lapo rl)."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"{key}=")]
    return values[-1] if values else None


def test_each_method_runs_its_own_head_setting(tmp_path, monkeypatch):
    ran = _fake_runs(monkeypatch, {"latent": 4096, "scratch": None, "self-label": 2048})
    out = tmp_path / "exp"
    args = ["--policy", "P", "--env", "babyai:BabyAI-GoToObj-v0", "--out", str(out),
            "--frames", "8192", "--seeds", "0", "--smooth", "1",
            "--methods", "latent,scratch,self-label", "--self-label-epochs", "3"]  # fmt: skip
    assert rl_curves.main(args) == 0
    by_run = {Path(argv[argv.index("--out") + 1]).name: argv for argv in ran}
    assert set(by_run) == {"latent_0", "scratch_0", "self-label_0"}
    # latent is LAPO's head from reward, even though configs/rl/cpu.yaml self-labels
    assert _setting(by_run["latent_0"], "self_label_epochs") == "0"
    assert _setting(by_run["latent_0"], "head_lr_scale") == "1"
    assert "--from-scratch" not in by_run["latent_0"]
    assert "--from-scratch" in by_run["scratch_0"]
    assert _setting(by_run["self-label_0"], "self_label_epochs") == "3"
    assert all(_setting(a, "total_frames") == "8192" and _setting(a, "seed") == "0" for a in ran)
    table = (out / "table.md").read_text()
    assert "| latent | 4096 (median 4096) |" in table
    assert "| scratch | never (not all reached it) |" in table
    assert "| self-label | 2048 (median 2048) |" in table
    assert "from scratch / self-label, medians: at least 4.0x" in table
    assert "seeds 0; configs/rl/cpu.yaml)" in table  # the packaged config, not a machine path
    assert (out / "curves.png").is_file()


def test_an_unknown_method_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        rl_curves.main(["--policy", "P", "--env", "babyai:X", "--out", str(tmp_path),
                        "--methods", "latent,ppo"])  # fmt: skip
    assert "unknown ppo" in capsys.readouterr().err


# --------------------------------------------------------------------------- label_efficiency --data


class _Stop(Exception):
    pass


def test_label_efficiency_reads_an_earlier_recording_with_data(tmp_path, monkeypatch):
    """--data DIR: no recording step, and stage 1 trains on DIR/train; the identifiable
    ceiling is measured in the emulator before it."""
    ran = []

    def run(self, argv, marker):
        ran.append([str(a) for a in argv])
        if "pretrain" in ran[-1]:
            raise _Stop

    monkeypatch.setattr(label_efficiency.Chain, "run", run)
    data = tmp_path / "rec"
    for split in ("train", "heldout"):
        (data / split).mkdir(parents=True)
        (data / split / "manifest.json").write_text("{}")
    with pytest.raises(_Stop):
        label_efficiency.main(["procgen", "--game", "miner", "--out", str(tmp_path / "exp"),
                               "--data", str(data), "--action-states", "12"])  # fmt: skip
    assert len(ran) == 1 and not any("data_prep.record" in a for a in ran[0])
    found = json.loads((tmp_path / "exp" / "eval" / "action_ceiling.json").read_text())
    assert found["spec"] == "procgen:miner" and found["states"] == 12
    assert 1 / 15 <= found["ceiling"] <= 1
    assert ran[0][ran[0].index("--data") + 1] == str(data / "train")
    assert not (tmp_path / "exp" / "data").exists()


def test_label_efficiency_names_a_data_folder_without_recordings(tmp_path, capsys):
    (tmp_path / "rec" / "train").mkdir(parents=True)
    (tmp_path / "rec" / "train" / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit, match="heldout"):
        label_efficiency.main(["procgen", "--out", str(tmp_path / "exp"),
                               "--data", str(tmp_path / "rec")])  # fmt: skip
