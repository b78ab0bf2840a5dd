"""Recording real Procgen / BabyAI episodes into shards, read back with webdataset."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_prep.record import main as record_cli
from lapo.envs import episode_seeds, make_env
from lapo.record import clip_starts, record_dataset
from lapo.shards import load_npy, read_manifest
from lapo.validate import validate_dataset
from lapo.video import decode_video_bytes, encode_video
from tests.datagen import assert_same_manifest, assert_same_sample, assert_same_shard

PROCGEN = dict(
    episodes=5, policy="sticky", seed=3, max_episode_steps=30, clip_frames=12, episodes_per_shard=2
)
BABYAI = dict(episodes=4, policy="expert", seed=0, clip_frames=4, episodes_per_shard=2)
# Mean |decoded - raw| per pixel allowed: yuv420p halves chroma, which costs ~5-7 levels on
# Procgen's saturated textures even at crf 10 (exact checks compare re-encoded bytes instead).
CODEC_TOL = 8.0


def record(spec: str, out: Path, **kw) -> dict:
    return record_dataset(spec, out, progress=False, verbose=False, **kw)


def assert_same_shards(a: Path, b: Path) -> None:
    """Same shard files holding the same clips (videos compared by decoded frames)."""
    names = [p.name for p in sorted(a.glob("shard-*.tar"))]
    assert names == [p.name for p in sorted(b.glob("shard-*.tar"))]
    for name in names:
        assert_same_shard(a / name, b / name)


def read_episodes(out: Path) -> dict[str, dict]:
    """Decode every clip and stitch each episode back together (dropping the shared frames)."""
    manifest = read_manifest(out)
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    clips = defaultdict(list)
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        frames = decode_video_bytes(sample["mp4"])
        actions, rewards, dones = (
            load_npy(sample[k]) for k in ("actions.npy", "rewards.npy", "dones.npy")
        )
        assert sample["__key__"].endswith(f"__c{meta['clip_index']:05d}")
        assert frames.shape == (meta["num_frames"], meta["height"], meta["width"], 3)
        assert len(actions) == len(rewards) == len(dones) == meta["num_frames"]
        assert actions.dtype == np.int64 and rewards.dtype == np.float32 and dones.dtype == bool
        assert actions.min() >= 0 and actions.max() < manifest["action_space"]["n"]
        clips[meta["episode"]].append((meta, frames, actions, rewards, dones, sample["mp4"]))
    episodes = {}
    for eid, parts in clips.items():
        parts.sort(key=lambda p: p[0]["start"])
        meta0 = parts[0][0]
        starts = clip_starts(meta0["episode_frames"], manifest["made_by"]["clip_frames"], 1)
        assert [p[0]["start"] for p in parts] == starts
        for (_, f, a, r, d, _), (_, f2, a2, r2, d2, _) in zip(parts, parts[1:]):
            # consecutive clips share one frame, whose row is identical in both
            assert a[-1] == a2[0] and r[-1] == r2[0] and d[-1] == d2[0] == False  # noqa: E712
            assert np.abs(f[-1].astype(int) - f2[0]).mean() < CODEC_TOL
        # drop each later clip's first row: it repeats the previous clip's last one
        rows = [p[1:5] if i == 0 else [x[1:] for x in p[1:5]] for i, p in enumerate(parts)]
        frames, actions, rewards, dones = (np.concatenate([r[k] for r in rows]) for k in range(4))
        episodes[eid] = dict(
            meta=meta0, frames=frames, actions=actions, rewards=rewards, dones=dones
        )
        episodes[eid]["clips"] = [(p[0]["start"], p[0]["num_frames"], p[5]) for p in parts]
    return episodes


def check_episodes(episodes: dict, spec: str, seed: int, n: int) -> None:
    assert sorted(episodes) == sorted(f"{spec}-s{seed}-e{e}" for e in range(n))
    for ep in episodes.values():
        t = ep["meta"]["episode_frames"]
        assert len(ep["frames"]) == len(ep["actions"]) == t
        assert ep["dones"].tolist() == [False] * (t - 1) + [True]
        assert ep["rewards"].sum() == pytest.approx(ep["meta"]["episode_return"], abs=1e-5)


def replay(spec: str, seed: int, ep: dict) -> tuple[np.ndarray, float, bool]:
    """Play the recorded actions from the episode's seed in a fresh env.

    Checks that every recorded clip decodes as the encoding of the replayed frames does, and returns the frames, return and done flag.
    """
    env = make_env(spec)
    env_seed, _ = episode_seeds(seed, ep["meta"]["episode_index"])
    frames, total, done = [env.reset(env_seed)], 0.0, False
    steps = len(ep["actions"]) - (1 if ep["meta"]["terminal_frame"] else 0)  # last row: filler
    for a in ep["actions"][:steps]:
        assert not done
        frame, reward, done, info = env.step(int(a))
        total += reward
        if not done or info["terminal_frame"]:
            frames.append(frame)
    frames = np.stack(frames)
    assert len(frames) == len(ep["frames"])
    for start, num, mp4 in ep["clips"]:
        again = encode_video(frames[start : start + num], 15.0)
        assert_same_sample({"mp4": again}, {"mp4": mp4}, f"clip at {start}")
    return frames, total, done


@pytest.fixture(scope="module")
def procgen_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("bigfish")
    return out, record("procgen:bigfish", out, **PROCGEN)


@pytest.fixture(scope="module")
def babyai_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("goto")
    return out, record("babyai:BabyAI-GoToLocal-v0", out, **BABYAI)


def test_procgen_shards_valid_and_replayable(procgen_ds):
    out, result = procgen_ds
    assert validate_dataset(out, decode=True) == []
    manifest = read_manifest(out)
    assert manifest["action_space"] == {"type": "discrete", "n": 15}
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(3)]
    made = manifest["made_by"]
    assert (made["spec"], made["policy"], made["seed"], made["episodes"]) == (
        "procgen:bigfish",
        "sticky",
        3,
        5,
    )
    episodes = read_episodes(out)
    check_episodes(episodes, "procgen:bigfish", 3, 5)
    assert result["summary"]["episode_frames"] == sum(len(e["frames"]) for e in episodes.values())
    for ep in episodes.values():
        t = len(ep["frames"])
        # 30 actions: cut with the 31st frame kept (filler row) unless the fish died first
        assert t <= 31 and (ep["meta"]["terminal_frame"] == (t == 31))
        frames, total, done = replay("procgen:bigfish", 3, ep)
        assert frames.shape == ep["frames"].shape
        err = np.abs(frames.astype(int) - ep["frames"]).mean(axis=(1, 2, 3))
        assert err.max() < CODEC_TOL
        assert total == pytest.approx(ep["rewards"].sum())
        assert done == (not ep["meta"]["terminal_frame"])


def test_babyai_expert_shards_replay_and_succeed(babyai_ds):
    out, result = babyai_ds
    assert validate_dataset(out, decode=True) == []
    assert read_manifest(out)["action_space"] == {"type": "discrete", "n": 7}
    episodes = read_episodes(out)
    check_episodes(episodes, "babyai:BabyAI-GoToLocal-v0", 0, 4)
    assert result["summary"]["success_rate"] == 1.0
    assert any(len(e["frames"]) > BABYAI["clip_frames"] for e in episodes.values())  # >1 clip
    for ep in episodes.values():
        assert ep["meta"]["mission"].startswith("go to") and ep["meta"]["terminal_frame"]
        assert ep["actions"][-1] == 0 and ep["rewards"][-1] == 0  # the terminal frame's filler
        assert set(ep["actions"][:-1].tolist()) <= {0, 1, 2}
        frames, total, done = replay("babyai:BabyAI-GoToLocal-v0", 0, ep)
        assert done and total > 0 and ep["rewards"][-2] > 0
        diff = np.abs(frames.astype(int) - ep["frames"]).mean(axis=(1, 2, 3))
        assert diff.max() < CODEC_TOL
        # the tolerance is tight enough to notice a one-step misalignment
        moved = np.abs(frames[1:].astype(int) - ep["frames"][:-1]).mean(axis=(1, 2, 3))
        assert moved.max() > diff.max()


def test_same_seed_same_bytes_other_seed_differs(procgen_ds, tmp_path):
    out, _ = procgen_ds
    record("procgen:bigfish", tmp_path / "again", **PROCGEN)
    assert_same_shards(tmp_path / "again", out)
    record("procgen:bigfish", tmp_path / "other", **{**PROCGEN, "seed": 4})
    first = lambda d: read_episodes(d)  # noqa: E731
    a = [e["actions"] for e in first(out).values()]
    b = [e["actions"] for e in first(tmp_path / "other").values()]
    assert not all(len(x) == len(y) and (x == y).all() for x, y in zip(a, b))


def test_two_workers_match_one(babyai_ds, tmp_path):
    out, _ = babyai_ds
    result = record("babyai:BabyAI-GoToLocal-v0", tmp_path / "w2", workers=2, **BABYAI)
    assert_same_shards(tmp_path / "w2", out)
    assert result["summary"]["shards_written"] == 2
    assert_same_manifest(tmp_path / "w2", out)


def test_resume_regenerates_a_deleted_shard(procgen_ds, tmp_path):
    out, _ = procgen_ds
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    (copy / "shard-000001.tar").unlink()
    (copy / "manifest.json").unlink()
    (copy / "shard-000001.tar.tmp").write_bytes(b"half a shard from a killed run")
    result = record("procgen:bigfish", copy, **PROCGEN)
    assert (result["summary"]["shards_written"], result["summary"]["shards_skipped"]) == (1, 2)
    assert_same_shards(copy, out)
    assert validate_dataset(copy) == []
    assert result["summary"]["episodes"] == 5
    (copy / "shard-000002.tar").write_bytes(b"not a tar")  # damaged after the fact
    assert record("procgen:bigfish", copy, **PROCGEN)["summary"]["shards_written"] == 1
    assert_same_shards(copy, out)
    with pytest.raises(ValueError, match="other settings"):
        record("procgen:bigfish", copy, **{**PROCGEN, "seed": 9})


def test_clip_starts_cover_every_transition():
    for t in range(1, 40):
        for c, o in ((4, 1), (5, 2), (8, 0), (2, 1)):
            starts = clip_starts(t, c, o)
            covered = {s + j for s in starts for j in range(min(c, t - s) - 1)}  # transition j->j+1
            if o >= 1:
                assert covered == set(range(t - 1))
            assert starts[-1] + c >= t and all(s < t for s in starts)


def test_cli_records_and_rejects_unknown_env(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["procgen:bigfish", "--episodes", "2", "--out", str(out), "--max-steps", "8"]
    assert record_cli(argv + ["--clip-frames", "4", "--no-progress"]) == 0
    assert "2 episodes" in capsys.readouterr().out
    assert read_manifest(out)["num_samples"] >= 2
    with pytest.raises(SystemExit) as e:
        record_cli(["procgen:pong", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "bigfish" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # a mistyped BabyAI id: one line naming the closest ids, not the usage and ~100 ids
    with pytest.raises(SystemExit) as e:
        record_cli(["babyai:GoToObjj", "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("record: error: ") and "did you mean BabyAI-GoToObj-v0" in err, err
    assert "BabyAI-KeyCorridor" not in err and not (tmp_path / "y").exists()


def test_lapo_record_is_the_same_command(tmp_path, capsys):
    """`lapo record` (what `lapo demo` runs) records what `python -m data_prep.record` does
    and reports a flag of another env family in one line, writing nothing."""
    from lapo.cli import main as lapo_main

    argv = ["procgen:bigfish", "--episodes", "2", "--max-steps", "8", "--clip-frames", "4",
            "--no-progress"]  # fmt: skip
    assert lapo_main(["record", *argv, "--out", str(tmp_path / "a")]) == 0
    assert record_cli([*argv, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "record_args.json").read_text() == (
        tmp_path / "b" / "record_args.json"
    ).read_text()
    capsys.readouterr()
    assert lapo_main(["record", *argv, "--view", "agent", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert (
        err == "lapo record: error: --view applies to babyai/minigrid only, not procgen:bigfish\n"
    )
    assert not (tmp_path / "c").exists()


def test_epsilon_expert_detours_replay_and_still_succeed(tmp_path):
    """--epsilon swaps some expert moves for random ones; the bot replans and still wins."""
    kw = dict(episodes=6, policy="expert", seed=1, clip_frames=64, episodes_per_shard=6)
    spec = "babyai:BabyAI-GoToObj-v0"
    plain = read_episodes_of(record(spec, tmp_path / "plain", **kw), tmp_path / "plain")
    result = record(spec, tmp_path / "noisy", epsilon=0.4, **kw)
    noisy = read_episodes_of(result, tmp_path / "noisy")
    assert result["summary"]["success_rate"] == 1.0
    assert json.loads((tmp_path / "noisy" / "record_args.json").read_text())["epsilon"] == 0.4
    assert "epsilon" not in json.loads((tmp_path / "plain" / "record_args.json").read_text())
    # same levels (seeds), other moves: the detours make episodes longer on the whole
    assert sum(len(e["actions"]) for e in noisy.values()) > sum(
        len(e["actions"]) for e in plain.values()
    )
    for ep in noisy.values():
        assert ep["meta"]["epsilon"] == 0.4
        frames, total, done = replay(spec, 1, ep)
        assert done and total > 0
    with pytest.raises(ValueError, match="epsilon"):
        record(spec, tmp_path / "bad", epsilon=1.5, **kw)


def read_episodes_of(result: dict, out: Path) -> dict:
    assert result["summary"]["episodes"] == 6
    return read_episodes(out)
