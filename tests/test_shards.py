"""lapo.shards: sample building, atomic shard/manifest writing and dataset validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lapo import shards, tars, validate
from lapo.video import decode_video_bytes
from tests.datagen import assert_same_shard


def frames(t: int, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (1, size // 4, size // 4, 3), dtype=np.uint8)
    out = np.repeat(np.repeat(np.repeat(base, t, 0), 4, 1), 4, 2)  # (T, size, size, 3) blocky
    for i in range(t):
        out[i, :, i % size] = 255  # a moving bar so frames differ
    return out


def make_dataset(tmp_path, clips_per_shard=(3, 2), t=10, continuous=False):
    infos, k = [], 0
    for s, n in enumerate(clips_per_shard):
        samples = []
        for _ in range(n):
            acts = (
                np.random.default_rng(k).normal(size=(t, 2)).astype(np.float32)
                if continuous
                else np.arange(t) % 5
            )
            samples.append(
                shards.clip_sample(
                    shards.clip_key(f"ep.{k}", 0),
                    frames(t, seed=k),
                    fps=15,
                    source=f"ep{k}.mp4",
                    episode=f"ep{k}",
                    start=0,
                    actions=acts,
                    rewards=np.ones(t),
                    dones=np.arange(t) == t - 1,
                )
            )
            k += 1
        infos.append(shards.write_shard(tmp_path / shards.shard_name(s), samples))
    space = {"type": "continuous", "dim": 2} if continuous else {"type": "discrete", "n": 5}
    shards.write_manifest(
        tmp_path, infos, height=32, width=32, fps=15, action_space=space, made_by={"by": "test"}
    )
    return infos


def test_names_and_keys():
    assert shards.shard_name(7) == "shard-000007.tar"
    assert shards.clip_key("my video.v2/x", 3) == "my_video_v2_x__c00003"
    assert shards.sanitize_stem("a__b..c") == "a_b_c"
    with pytest.raises(ValueError):
        shards.clip_key("a", 100_000)


def test_clip_spans():
    assert shards.clip_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shards.clip_spans(9, 4) == [(0, 4), (4, 8)]  # a 1-frame tail is dropped
    assert shards.clip_spans(9, 4, min_frames=1) == [(0, 4), (4, 8), (8, 9)]
    assert shards.clip_spans(1, 4) == []
    assert shards.clip_spans(8, 4) == [(0, 4), (4, 8)]


def test_clip_sample_contents():
    f = frames(6)
    s = shards.clip_sample(
        "v__c00001",
        f,
        fps=10,
        source="v.mp4",
        episode="v",
        start=6,
        actions=[1, 2, 3, 0, 1, 2],
        extra={"src_fps": 30.0},
    )
    meta = json.loads(s["json"])
    assert meta == {
        "source": "v.mp4",
        "episode": "v",
        "start": 6,
        "num_frames": 6,
        "fps": 10.0,
        "height": 32,
        "width": 32,
        "src_fps": 30.0,
    }
    acts = shards.load_npy(s["actions.npy"])
    assert acts.dtype == np.int64 and acts.shape == (6,)
    assert decode_video_bytes(s["mp4"]).shape == (6, 32, 32, 3)
    cont = shards.clip_sample("c", f, fps=10, source="c", episode="c", start=0, actions=np.zeros(6))
    assert shards.load_npy(cont["actions.npy"]).dtype == np.float32
    assert shards.load_npy(cont["actions.npy"]).shape == (6, 1)


def test_clip_sample_rejects_bad_input():
    f = frames(4)
    with pytest.raises(ValueError, match="dots"):
        shards.clip_sample("a.b", f, fps=10, source="a", episode="a", start=0)
    with pytest.raises(ValueError, match="rows"):
        shards.clip_sample("a", f, fps=10, source="a", episode="a", start=0, actions=[1, 2])
    with pytest.raises(ValueError, match="replace"):
        shards.clip_sample("a", f, fps=10, source="a", episode="a", start=0, extra={"fps": 3})


@pytest.mark.parametrize("continuous", [False, True])
def test_shard_and_manifest_round_trip(tmp_path, continuous):
    infos = make_dataset(tmp_path, continuous=continuous)
    assert [i["samples"] for i in infos] == [3, 2]
    assert [i["frames"] for i in infos] == [30, 20]
    assert not list(tmp_path.glob("*.tmp"))
    m = shards.read_manifest(tmp_path)
    assert m["num_samples"] == 5 and m["num_frames"] == 50 and m["format_version"] == 1
    assert [s["name"] for s in m["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    samples = list(tars.iter_tar_samples(tmp_path / "shard-000000.tar"))
    assert [s["__key__"] for s in samples] == ["ep_0__c00000", "ep_1__c00000", "ep_2__c00000"]
    s = samples[1]
    assert set(s) == {"__key__", "mp4", "json", "actions.npy", "rewards.npy", "dones.npy"}
    np.testing.assert_array_equal(shards.load_npy(s["dones.npy"]), np.arange(10) == 9)
    clip = decode_video_bytes(s["mp4"])
    assert np.abs(clip.astype(int) - frames(10, seed=1).astype(int)).mean() < 8
    assert validate.validate_dataset(tmp_path, decode=True) == []


def test_shards_are_reproducible(tmp_path):
    """Same input, same shards: members, order, arrays and metadata byte for byte.

    The mp4 bytes are compared by their decoded frames (tests.datagen.assert_same_shard):
    two encodes of the same frames have, rarely, differed in size, so byte equality of
    the video is not something lapo can promise.
    """
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    make_dataset(a)
    make_dataset(b)
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert_same_shard(a / name, b / name)


def test_failed_write_leaves_nothing(tmp_path):
    def gen():
        yield shards.clip_sample("a", frames(3), fps=10, source="a", episode="a", start=0)
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        shards.write_shard(tmp_path / "shard-000000.tar", gen())
    assert list(tmp_path.iterdir()) == []


def test_validate_finds_problems(tmp_path):
    make_dataset(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["shards"][0]["frames"] += 1
    m["num_frames"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    (tmp_path / "shard-000001.tar").rename(tmp_path / "shard-000009.tar")
    (tmp_path / "shard-000003.tar.tmp").write_bytes(b"x")
    problems = validate.validate_dataset(tmp_path)
    text = "\n".join(problems)
    assert "shard-000000.tar: 30 frames, manifest says 31" in text
    assert "shard-000001.tar: listed in the manifest but missing" in text
    assert "shard-000009.tar: shard file not listed" in text
    assert "leftover temporary file" in text


def test_validate_truncated_tar_and_missing_manifest(tmp_path):
    make_dataset(tmp_path)
    p = tmp_path / "shard-000000.tar"
    p.write_bytes(p.read_bytes()[:3000])
    assert any("shard-000000.tar" in x for x in validate.validate_dataset(tmp_path))
    assert "no manifest.json" in validate.validate_dataset(tmp_path / "nowhere")[0]


def test_validate_checks_actions_against_space(tmp_path):
    make_dataset(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["action_space"] = {"type": "discrete", "n": 3}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    assert any("[0, 3)" in p for p in validate.validate_dataset(tmp_path))


def test_action_spaces():
    a = shards.action_space_of(shards.normalize_actions(np.array([0, 4, 2])))
    assert a == {"type": "discrete", "n": 5}
    assert shards.merge_action_spaces(a, {"type": "discrete", "n": 9})["n"] == 9
    assert shards.merge_action_spaces(None, a) == a
    with pytest.raises(ValueError, match="mixed"):
        shards.merge_action_spaces(a, {"type": "continuous", "dim": 2})
