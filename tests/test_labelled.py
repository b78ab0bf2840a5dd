"""Labelled-budget selection and loading (lapo.labelled) on real H.264 shards.

tests.datagen streams: every frame carries its clip-time and episode number as readable
bits, clips hold episode ends mid-clip, and the actions are known; BabyAI recordings:
real environment frames whose clips share one frame. Expected values are recomputed
here from what the generators wrote, never hard-coded.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from lapo.labelled import (
    LabelledDataError,
    load_labelled,
    load_windows,
    scan_labelled,
    select_budget,
)
from lapo.record import record_dataset
from lapo.shards import load_npy, read_manifest
from lapo.tars import iter_tar_samples
from lapo.video import decode_video_bytes
from tests.datagen import frame_episode, frame_time, make_dataset

CLIP = 16


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """Four recordings of 3 clips x 16 frames, episodes of 6-12 frames crossing clip edges."""
    return make_dataset(
        tmp_path_factory.mktemp("stream"), shards=4, clips_per_shard=3, clip_frames=CLIP
    )


@pytest.fixture(scope="module")
def babyai(tmp_path_factory):
    """Eight short random BabyAI episodes at 32 px; clips of 6 frames share one frame."""
    out = tmp_path_factory.mktemp("babyai")
    record_dataset("babyai:BabyAI-GoToLocal-v0", out, episodes=8, policy="random", size=32,
                   clip_frames=6, episodes_per_shard=3, max_episode_steps=12, progress=False,
                   verbose=False)  # fmt: skip
    return out


def truth(ds) -> dict[int, dict]:
    """Per recording: frame-wise actions, dones and episode numbers as written."""
    out: dict[int, dict] = {}
    for _key, c in sorted(ds.clips.items()):
        rec = out.setdefault(c["shard"], {"actions": [], "dones": [], "episodes": []})
        rec["actions"].append(c["actions"])
        rec["dones"].append(c["dones"])
        rec["episodes"].append(c["episodes"])
    return {s: {k: np.concatenate(v) for k, v in r.items()} for s, r in out.items()}


def test_budget_is_exact_deterministic_and_never_touches_held_out_episodes(stream):
    index = scan_labelled(stream.path, context=2)
    total = index.num_transitions
    heldout = None
    for budget in (1, 7, 25, 40):
        a = select_budget(index, budget, seed=3, val_fraction=0.25)
        b = select_budget(scan_labelled(stream.path, context=2), budget, seed=3, val_fraction=0.25)
        assert sum(len(r) for r in a.train.values()) == budget == a.info["train_transitions"]
        assert a.heldout_episodes == b.heldout_episodes and a.whole_episodes == b.whole_episodes
        assert {e: r.tolist() for e, r in a.train.items()} == {
            e: r.tolist() for e, r in b.train.items()
        }
        assert not set(a.train) & set(a.heldout_episodes)
        assert set(a.val) == set(a.heldout_episodes)
        # the held-out episodes depend on the seed only, not on the budget
        heldout = heldout or a.heldout_episodes
        assert a.heldout_episodes == heldout
        # every selected row is a real labelled transition of its episode, taken once
        for e, rows in a.train.items():
            assert len(set(rows.tolist())) == len(rows)
            assert set(rows.tolist()) <= set(index.episodes[e].rows.tolist())
    assert len(heldout) == round(0.25 * len(index.episodes))
    assert (
        select_budget(index, 25, seed=4, val_fraction=0.25).heldout_episodes != heldout or total < 4
    )


def test_whole_episodes_first_then_clips_then_a_subset_of_one_clip(stream):
    index = scan_labelled(stream.path, context=2)
    sel = select_budget(index, 33, seed=0, val_fraction=0.2)
    partial_clips = []
    for e, rows in sel.train.items():
        ep = index.episodes[e]
        if e in sel.whole_episodes:
            assert rows.tolist() == ep.rows.tolist()
            continue
        for c in np.unique(ep.owner):
            owned = ep.rows[ep.owner == c]
            taken = np.intersect1d(owned, rows)
            if 0 < len(taken) < len(owned):
                partial_clips.append((e, int(c)))
    assert len(partial_clips) <= 1  # only the clip that tops the budget up to exactly N
    assert sel.whole_episodes  # 33 transitions hold at least one whole episode here


def test_selection_does_not_depend_on_the_order_of_shards(stream, tmp_path):
    import shutil

    copy = tmp_path / "reordered"
    shutil.copytree(stream.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][::-1]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    a = select_budget(stream.path, 30, seed=1, val_fraction=0.2, context=2)
    b = select_budget(copy, 30, seed=1, val_fraction=0.2, context=2)
    assert a.heldout_episodes == b.heldout_episodes
    assert {e: r.tolist() for e, r in a.train.items()} == {
        e: r.tolist() for e, r in b.train.items()
    }


def test_loaded_windows_are_the_recorded_frames_and_actions(stream):
    split = load_labelled(stream.path, 40, context=2, seed=0, val_fraction=0.25)
    rec = truth(stream)
    index = scan_labelled(stream.path, context=2)
    for ds in (split.train, split.val):
        assert ds.frames.dtype == torch.uint8 and ds.frames.shape[1:] == (3, 32, 32)
        for i, (eid, t) in enumerate(ds.ids):
            r = rec[int(index.episodes[eid].source.removeprefix("rec"))]
            item = ds[i]
            frames = item["frames"].numpy()  # (k+1, 3, H, W)
            assert int(item["actions"]) == int(r["actions"][t])
            assert not r["dones"][t]  # a transition never leaves its episode
            # the last context frame is o[t], the target o[t+1]; both carry their time code
            assert frame_time(frames[1]) == t % CLIP and frame_time(frames[2]) == (t + 1) % CLIP
            ep = {frame_episode(f) for f in frames}
            assert ep == {int(r["episodes"][t]) % 256}  # context never reaches the previous episode
            if t == 0 or r["dones"][t - 1]:  # first frame of an episode: context repeats it
                assert (frames[0] == frames[1]).all()
    # held-out windows show no frame of a training episode
    train_eps = {frame_episode(f) for f in split.train.frames.numpy()}
    val_eps = {frame_episode(f) for f in split.val.frames.numpy()}
    assert not train_eps & val_eps


def test_babyai_windows_match_independently_decoded_clips(babyai):
    split = load_labelled(babyai, 20, context=3, seed=2, val_fraction=0.25)
    frames, actions = {}, {}
    for shard in read_manifest(babyai)["shards"]:
        for s in iter_tar_samples(babyai / shard["name"]):
            meta = json.loads(s["json"])
            clip = decode_video_bytes(s["mp4"])  # (T, H, W, 3)
            acts = load_npy(s["actions.npy"])
            for j in range(len(clip)):
                frames[(meta["episode"], meta["start"] + j)] = clip[j]
                actions[(meta["episode"], meta["start"] + j)] = acts[j]
    assert len(split.train) == 20
    for ds in (split.train, split.val):
        for i, (eid, t) in enumerate(ds.ids):
            want = [frames[(eid, max(t + d, 0))] for d in (-2, -1, 0, 1)]  # k=3 context + next
            got = ds[i]["frames"].permute(0, 2, 3, 1).numpy()
            assert np.array_equal(got, np.stack(want))
            assert int(ds[i]["actions"]) == int(actions[(eid, t)])
    assert not {e for e, _ in split.train.ids} & {e for e, _ in split.val.ids}


def test_a_budget_larger_than_the_labels_is_a_clear_error(stream):
    index = scan_labelled(stream.path, context=2)
    sel = select_budget(index, 1, seed=0, val_fraction=0.2)
    available = index.num_transitions - sel.info["val_transitions_available"]
    assert (
        select_budget(index, available, seed=0, val_fraction=0.2).info["train_transitions"]
        == available
    )
    with pytest.raises(
        LabelledDataError, match=rf"budget {available + 1} exceeds the {available} labelled"
    ):
        select_budget(index, available + 1, seed=0, val_fraction=0.2)
    every = select_budget(index, 0, seed=0, val_fraction=0.2)  # 0: all labels (the ceiling)
    assert every.info["budget"] == every.info["train_transitions"] == available
    assert not set(every.train) & set(every.heldout_episodes)


def test_unlabelled_data_and_too_few_episodes_are_errors(tmp_path):
    none = make_dataset(tmp_path / "none", shards=1, actions=None)
    with pytest.raises(LabelledDataError, match="no action labels"):
        scan_labelled(none.path, context=2)
    one = make_dataset(
        tmp_path / "one", shards=1, clips_per_shard=1, clip_frames=8, episode_len=(20, 20)
    )
    with pytest.raises(LabelledDataError, match="need at least 2"):
        select_budget(one.path, 1, context=2)


def test_mixed_clips_count_only_labelled_rows_and_val_is_capped(tmp_path):
    ds = make_dataset(
        tmp_path / "mixed", shards=3, clips_per_shard=4, clip_frames=CLIP, actions="mixed"
    )
    index = scan_labelled(ds.path, context=2)
    for ep in index.episodes.values():
        tl = index.timelines[ep.source]
        assert (tl.action_owner[ep.rows] >= 0).all()
        assert all(tl.clips[c].has_actions for c in tl.action_owner[ep.rows])
    sel = select_budget(index, 10, seed=0, val_fraction=0.3, val_max=5)
    assert sel.info["val_transitions"] == 5 <= sel.info["val_transitions_available"]
    val = load_windows(index, sel.val)
    assert len(val) == 5 and Counter(e for e, _ in val.ids).keys() <= set(sel.heldout_episodes)
