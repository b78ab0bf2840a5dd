"""data_prep.inspect on a good dataset and on broken copies of it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.inspect import inspect_dataset, main
from lapo import shards, tars

ROOT = Path(__file__).resolve().parents[1]


def clip(t: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.repeat(rng.integers(0, 255, (1, 16, 16, 3), dtype=np.uint8), t, 0)  # (T, 16, 16, 3)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Two shards: 3 labelled clips (actions 0..3) and one unlabelled clip."""
    out = tmp_path / "ds"
    out.mkdir()
    acts = {0: [0, 1, 1, 2, 2, 2], 1: [3, 3, 0, 0, 1, 1], 2: [2, 2, 2, 2, 2, 2]}
    infos = []
    for s, ids in enumerate([[0, 1], [2, 3]]):
        samples = [
            shards.clip_sample(
                shards.clip_key(f"ep{i}", 0),
                clip(6, i),
                fps=10,
                source=f"ep{i}",
                episode=f"ep{i}",
                start=0,
                actions=acts.get(i),
            )
            for i in ids
        ]
        infos.append(shards.write_shard(out / shards.shard_name(s), samples))
    shards.write_manifest(
        out,
        infos,
        height=16,
        width=16,
        fps=10,
        action_space={"type": "discrete", "n": 5},
        made_by={"tool": "test"},
    )
    return out


def test_good_dataset(dataset, capsys):
    assert main([str(dataset)]) == 0
    text = capsys.readouterr().out
    assert "valid: manifest matches the shards" in text
    assert "clips       4" in text and "frames      24" in text
    assert "labelled    3/4 clips, 75.0% of frames" in text
    r = inspect_dataset(dataset)
    assert r["action_histogram"] == [3, 4, 9, 2, 0]  # n = 5 from the manifest, 4 never taken
    assert r["hours"] == pytest.approx(24 / 10 / 3600)
    assert r["bytes"] == sum(p.stat().st_size for p in dataset.glob("shard-*.tar"))
    assert r["problems"] == []


def test_json_output_via_subprocess(dataset):
    res = subprocess.run(
        [sys.executable, "-m", "data_prep.inspect", str(dataset), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["clips"] == 4 and r["shards"] == 2 and r["width"] == 16


def test_continuous_stats(tmp_path):
    a = np.stack([np.linspace(-1, 1, 8), np.full(8, 3.0)], 1).astype(np.float32)
    s = shards.clip_sample(
        "x__c00000", clip(8, 0), fps=5, source="x", episode="x", start=0, actions=a
    )
    info = shards.write_shard(tmp_path / shards.shard_name(0), [s])
    shards.write_manifest(
        tmp_path,
        [info],
        height=16,
        width=16,
        fps=5,
        action_space={"type": "continuous", "dim": 2},
        made_by={},
    )
    r = inspect_dataset(tmp_path)
    np.testing.assert_allclose(r["action_mean"], a.mean(0), atol=1e-6)
    np.testing.assert_allclose(r["action_std"], a.std(0), atol=1e-5)


def test_broken_dataset(dataset, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    (broken / "shard-000001.tar").unlink()
    m = json.loads((broken / "manifest.json").read_text())
    m["shards"][0]["samples"] = 7
    (broken / "manifest.json").write_text(json.dumps(m))
    assert main([str(broken)]) == 1
    text = capsys.readouterr().out
    assert "INVALID: 3 problem(s)" in text
    assert "manifest: num_samples is 4 but its shards sum to 9" in text
    assert "shard-000001.tar: listed in the manifest but missing" in text
    assert "shard-000000.tar: 2 samples, manifest says 7" in text


def test_corrupt_clip_found_with_decode(dataset, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    samples = list(tars.iter_tar_samples(dataset / "shard-000000.tar"))
    samples[1]["mp4"] = b"\x00" * 500
    info = shards.write_shard(bad / shards.shard_name(0), samples)
    shards.write_manifest(
        bad,
        [info],
        height=16,
        width=16,
        fps=10,
        action_space={"type": "discrete", "n": 5},
        made_by={},
    )
    assert inspect_dataset(bad)["problems"] == []  # without decoding the bytes look fine
    problems = inspect_dataset(bad, decode=True)["problems"]
    assert len(problems) == 1 and "ep1__c00000" in problems[0] and "decode" in problems[0]
    assert main([str(bad), "--decode"]) == 1
