"""The streaming loader on tiny real datasets (H.264 shards written by lapo.shards).

Frames carry their clip index, episode and a square moved by the action
(tests/datagen.py), so alignment and episode boundaries are checked from the
pixels the loader delivers, not from its own bookkeeping.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import webdataset as wds

from lapo import ring as ring_module
from lapo.config import DataConfig
from lapo.data import (
    DatasetError,
    VideoDataModule,
    list_shards,
    make_loader,
    share,
    split_plan,
    split_train_val,
)
from lapo.ring import BatchRing
from lapo.shards import clip_key, clip_sample, shard_name, write_manifest, write_shard
from lapo.stream import rank_portion
from lapo.tars import iter_tar_samples
from lapo.windows import BadDataWarning, still_windows
from tests.datagen import frame_episode, frame_time, make_dataset
from tests.test_ddp import ROOT, free_port


def cfg_for(path, **kw) -> DataConfig:
    base = dict(path=str(path), batch_size=4, num_workers=0, shuffle_buffer=32, batches_per_epoch=6)
    return DataConfig(**{**base, **kw})


def all_windows(ds, context: int, gap: int) -> set[tuple[str, int]]:
    """Every (key, start) a full pass must give, from the episode ids written (not from dones)."""
    out = set()
    for key, clip in ds.clips.items():
        ep = clip["episodes"]
        for s in range(clip["num_frames"] - context * gap):
            if ep[s] == ep[s + context * gap]:
                out.add((key, s))
    return out


def collect(loader) -> list[tuple[str, int]]:
    return [(k, int(s)) for b in loader for k, s in zip(b["key"], b["start"])]


@pytest.fixture(scope="module")
def discrete(tmp_path_factory):
    return make_dataset(
        tmp_path_factory.mktemp("discrete"), shards=4, clips_per_shard=3, clip_frames=16
    )


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    return make_dataset(
        tmp_path_factory.mktemp("eight"), shards=8, clips_per_shard=2, clip_frames=12
    )


# --------------------------------------------------------------------------- windows


def test_batch_shapes_and_dtypes(discrete):
    cfg = cfg_for(discrete.path, context=3)
    batches = list(make_loader(cfg.path, cfg, train=True))
    assert len(batches) == cfg.batches_per_epoch
    b = batches[0]
    assert b["frames"].shape == (4, 4, 3, 32, 32) and b["frames"].dtype == torch.uint8
    assert b["actions"].shape == (4,) and b["actions"].dtype == torch.int64
    assert b["has_action"].dtype == torch.bool and b["has_action"].all()
    assert b["start"].dtype == torch.int64 and len(b["key"]) == 4


def test_continuous_actions_and_single_windows(tmp_path):
    ds = make_dataset(tmp_path, shards=2, clips_per_shard=2, actions="continuous")
    cfg = cfg_for(tmp_path, val_batches=0, val_shards=0)
    b = next(iter(make_loader(cfg.path, cfg, train=False)))
    assert b["actions"].shape == (4, 2) and b["actions"].dtype == torch.float32
    for i, key in enumerate(b["key"]):
        t = int(b["start"][i]) + cfg.context - 1
        assert torch.equal(b["actions"][i], torch.from_numpy(ds.clips[key]["actions"][t]))
    w = next(iter(make_loader(cfg.path, cfg, train=False, batched=False)))
    assert w["frames"].shape == (3, 3, 32, 32) and w["actions"].shape == (2,)


@pytest.mark.parametrize("context,gap,workers", [(2, 1, 0), (3, 2, 0), (3, 2, 2)])
def test_actions_align_with_last_context_frame(discrete, context, gap, workers):
    cfg = cfg_for(discrete.path, context=context, frame_gap=gap, num_workers=workers)
    seen = differs = 0
    for b in make_loader(cfg.path, cfg, train=True):
        for i, key in enumerate(b["key"]):
            frames = b["frames"][i].numpy()  # (k+1, 3, H, W)
            times = [frame_time(f) for f in frames]
            start = int(b["start"][i])
            assert times == [start + j * gap for j in range(context + 1)]
            t = times[context - 1]  # the last context frame, read from its pixels
            acts = discrete.clips[key]["actions"]
            assert b["actions"][i].item() == acts[t]
            differs += acts[t] != acts[t + 1]
            seen += 1
    assert seen == cfg.batches_per_epoch * cfg.batch_size
    assert differs > seen // 2  # an off-by-one index would have failed on these


def test_no_window_crosses_an_episode_end(discrete):
    assert any(c["dones"][:-1].any() for c in discrete.clips.values()), (
        "data must hold mid-clip ends"
    )
    cfg = cfg_for(discrete.path, context=2, frame_gap=2, val_batches=0, val_shards=0)
    got = []
    for b in make_loader(cfg.path, cfg, train=False):
        for i in range(len(b["key"])):
            assert len({frame_episode(f) for f in b["frames"][i].numpy()}) == 1
        got += [(k, int(s)) for k, s in zip(b["key"], b["start"])]
    assert sorted(got) == sorted(all_windows(discrete, 2, 2))


def test_unlabelled_clips_are_masked(tmp_path):
    ds = make_dataset(tmp_path, shards=2, clips_per_shard=4, actions="mixed")
    cfg = cfg_for(tmp_path, val_batches=0, val_shards=0)
    flags = Counter()
    for b in make_loader(cfg.path, cfg, train=False):
        for i, key in enumerate(b["key"]):
            labelled = ds.clips[key]["actions"] is not None
            assert b["has_action"][i].item() == labelled
            t = int(b["start"][i]) + 1
            want = ds.clips[key]["actions"][t] if labelled else 0
            assert b["actions"][i].item() == want
            flags[labelled] += 1
    assert flags[True] and flags[False]


def test_windows_per_clip_caps_the_cut(discrete):
    cfg = cfg_for(discrete.path, windows_per_clip=2, val_batches=0, val_shards=0)
    per_key = Counter(k for k, _ in collect(make_loader(cfg.path, cfg, train=False)))
    assert set(per_key.values()) == {2} and len(per_key) == discrete.num_clips


def held_frames_dataset(root: Path, clips: int = 4, frames: int = 24, size: int = 32) -> Path:
    """Clips whose square moves every second step: frame i shows it at place i // 2, so
    o[t] -> o[t+1] is still exactly when t is odd (a window starting at s has t = s + 1)."""
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for c in range(clips):
        video = np.zeros((frames, size, size, 3), dtype=np.uint8)
        for i in range(frames):
            x = (4 * (i // 2 + c)) % (size - 8)
            video[i, 8:16, x : x + 8] = 255
        samples.append(
            clip_sample(
                clip_key("held", c), video, fps=10.0, source="held", episode=str(c), start=0
            )
        )
    entry = write_shard(root / shard_name(0), samples)
    write_manifest(
        root,
        [entry],
        height=size,
        width=size,
        fps=10.0,
        action_space=None,
        made_by={"tool": "test"},
    )
    return root


def test_still_windows_are_left_out_of_training_only(tmp_path):
    path = held_frames_dataset(tmp_path / "held")
    base = dict(val_shards=0, val_batches=0, batch_size=8, batches_per_epoch=12)
    cfg = cfg_for(path, still_keep=0.0, **base)
    loader = make_loader(cfg.path, cfg, train=True)
    starts = [int(s) for b in loader for s in b["start"]]
    assert len(starts) == 12 * 8 and all(s % 2 == 0 for s in starts)
    stats = loader.stats.as_dict()
    assert stats["still_skipped"] > 0 and "still windows left out" in loader.stats.summary()
    # kept at 1 (the default) the still half trains too; validation always sees every window
    keep = cfg_for(path, **base)
    assert any(int(s) % 2 for b in make_loader(keep.path, keep, train=True) for s in b["start"])
    val = {int(s) for b in make_loader(cfg.path, cfg, train=False) for s in b["start"]}
    assert val == set(range(24 - 2))


def test_still_windows_measure_the_last_transition():
    frames = np.zeros((5, 3, 8, 8), dtype=np.uint8)
    frames[2:, :, :4] = 200  # changes between frames 1 and 2 only; s = 0 ends there
    frames[4, 0, 0, 0] = 201  # one grey level on one value: noise, still
    starts = np.arange(3)
    assert still_windows(frames, starts, 2, 1, 0.5).tolist() == [False, True, True]
    assert still_windows(frames, np.array([0]), 1, 2, 0.5).tolist() == [False]  # o[0] -> o[2]
    assert still_windows(frames, np.array([2]), 2, 1, 0.0).tolist() == [False]  # exact


# --------------------------------------------------------------------------- ranks, workers, epochs


@pytest.mark.parametrize("shards,ranks,workers", [(8, 2, 2), (3, 2, 2), (1, 3, 2), (5, 1, 3)])
def test_split_plan_gives_every_sample_one_reader(shards, ranks, workers):
    readers = Counter()
    owner: dict[int, int] = {}
    for r, w in itertools.product(range(ranks), range(workers)):
        ids, slots, slot = split_plan(shards, r, ranks, w, workers)
        assert ids, "every reader gets at least one shard"
        for i in ids:
            if shards >= ranks:
                assert owner.setdefault(i, r) == r, "a shard read by two ranks"
            for fake_key in range(60):  # slots partition clips whatever their keys
                if slots == 1 or fake_key % slots == slot:
                    readers[(i, fake_key)] += 1
    assert set(readers.values()) == {1} and len(readers) == shards * 60


def test_two_ranks_two_workers_read_disjoint_shards_and_exact_batches(eight):
    cfg = cfg_for(eight.path, num_workers=2, batches_per_epoch=5, val_shards=0)
    shards_of = []
    for rank in range(2):
        loader = make_loader(cfg.path, cfg, train=True, rank=rank, world_size=2)
        assert len(loader) == 5
        batches = list(loader)
        assert len(batches) == 5 and all(len(b["key"]) == 4 for b in batches)
        assert [row["batches"] for row in loader.stats.per_worker()] == [
            share(5, w, 2) for w in range(2)
        ]
        shards_of.append({eight.clips[k]["shard"] for b in batches for k in b["key"]})
    assert shards_of[0].isdisjoint(shards_of[1])
    assert shards_of[0] <= {0, 2, 4, 6} and shards_of[1] <= {1, 3, 5, 7}


@pytest.mark.parametrize("shards", [8, 3])
def test_validation_covers_every_window_once_across_ranks(tmp_path, shards):
    ds = make_dataset(tmp_path, shards=shards, clips_per_shard=2, clip_frames=12)
    cfg = cfg_for(tmp_path, num_workers=2, val_batches=0, val_shards=0, batch_size=5)
    got = []
    for rank in range(2):
        for b in make_loader(cfg.path, cfg, train=False, rank=rank, world_size=2):
            assert [frame_time(w[0]) for w in b["frames"].numpy()] == b["start"].tolist()
            got += [(k, int(s)) for k, s in zip(b["key"], b["start"])]
    assert len(got) == len(set(got))
    assert set(got) == all_windows(ds, 2, 1)


def test_val_batches_caps_each_rank(discrete):
    cfg = cfg_for(discrete.path, val_batches=3, val_shards=0)
    assert len(list(make_loader(cfg.path, cfg, train=False))) == 3


@pytest.mark.parametrize("shards,ranks,workers", [(8, 2, 2), (3, 2, 2), (1, 3, 2), (1, 2, 1)])
def test_rank_portion_is_what_the_rank_workers_read_together(shards, ranks, workers):
    for r in range(ranks):
        union = set()
        for w in range(workers):
            ids, slots, slot = split_plan(shards, r, ranks, w, workers)
            union |= {(i, v) for i in ids for v in range(60) if v % slots == slot}
        ids, slots, keep = rank_portion(shards, r, ranks, workers)
        assert union == {(i, v) for i in ids for v in range(60) if v % slots in keep}


def _val_owners(ds, val_urls, ranks: int, workers: int) -> dict[str, int]:
    """The rank that reads each validation clip in its own part, by the key-hash rule."""
    shard_of = {int(u[-10:-4]) for u in val_urls}
    owners = {}
    for key, clip in ds.clips.items():
        if clip["shard"] not in shard_of:
            continue
        for r, w in itertools.product(range(ranks), range(workers)):
            _, slots, slot = split_plan(len(val_urls), r, ranks, w, workers)
            if zlib.crc32(key.encode()) % slots == slot:
                owners[key] = r
    return owners


@pytest.mark.parametrize("shards,clips,workers", [(2, 1, 2), (3, 1, 2), (2, 2, 2), (3, 1, 0)])
@pytest.mark.parametrize("val_batches", [5, 0])
def test_every_rank_validates_on_the_same_nonzero_number_of_batches(
    tmp_path, shards, clips, workers, val_batches
):
    ds = make_dataset(tmp_path, shards=shards, clips_per_shard=clips, clip_frames=12)
    cfg = cfg_for(tmp_path, num_workers=workers, val_shards=1, val_batches=val_batches)
    _, val = split_train_val(cfg)
    assert len(val.urls) == 1
    owners = _val_owners(ds, val.urls, 2, max(workers, 1))
    if clips == 1:  # the case that left a rank without batches: its portion is empty
        assert set(owners.values()) != {0, 1}
    held_out = all_windows(ds, 2, 1) & {(k, s) for k in owners for s in range(12)}
    counts, own = [], set()
    for rank in range(2):
        loader = make_loader(val.urls, cfg, train=False, rank=rank, world_size=2, info=val)
        batches = list(loader)
        again = list(loader)  # deterministic: a second pass serves the very same batches
        assert [b["key"] for b in again] == [b["key"] for b in batches]
        assert all(torch.equal(a["frames"], b["frames"]) for a, b in zip(again, batches))
        got = []
        for b in batches:
            assert 0 < len(b["key"]) <= cfg.batch_size
            assert [frame_time(w[0]) for w in b["frames"].numpy()] == b["start"].tolist()
            got += [(k, int(s)) for k, s in zip(b["key"], b["start"])]
        assert set(got) <= held_out
        counts.append(len(batches))
        own |= {w for w in got if owners[w[0]] == rank}
    if val_batches:
        assert counts == [val_batches, val_batches]
    else:
        assert min(counts) >= 1
        assert own == held_out  # each rank still reads its whole portion


def test_validation_smaller_than_a_batch_gives_every_rank_a_partial_batch(tmp_path):
    ds = make_dataset(tmp_path, shards=1, clips_per_shard=1, clip_frames=8)
    windows = sorted(all_windows(ds, 2, 1))
    assert 0 < len(windows) < 16
    for val_batches, want in ((0, 1), (2, 2)):
        cfg = cfg_for(tmp_path, batch_size=16, num_workers=2, val_shards=0, val_batches=val_batches)
        for rank in range(2):
            batches = list(make_loader(cfg.path, cfg, train=False, rank=rank, world_size=2))
            assert len(batches) == want
            for b in batches:
                assert sorted(zip(b["key"], b["start"].tolist())) == windows


def test_capped_validation_cycles_over_the_rank_portion_in_order(discrete):
    cfg = cfg_for(discrete.path, val_shards=0, val_batches=0)
    one_pass = collect(make_loader(cfg.path, cfg, train=False))
    per_pass = -(-len(one_pass) // cfg.batch_size)
    capped = DataConfig(**{**cfg.__dict__, "val_batches": 2 * per_pass + 1})
    batches = list(make_loader(cfg.path, capped, train=False))
    assert len(batches) == 2 * per_pass + 1
    first = [(k, int(s)) for k, s in zip(batches[0]["key"], batches[0]["start"])]
    assert collect(batches) == one_pass + one_pass + first


def test_training_stream_is_a_function_of_seed_and_epoch(discrete):
    cfg = cfg_for(discrete.path, num_workers=2)

    def epoch(e: int, seed: int = 0) -> list:
        loader = make_loader(cfg.path, DataConfig(**{**cfg.__dict__, "seed": seed}), train=True)
        loader.set_epoch(e)
        return collect(loader)

    assert epoch(1) == epoch(1)
    assert epoch(0) != epoch(1)
    assert epoch(0) != epoch(0, seed=1)
    loader = make_loader(cfg.path, cfg, train=True)  # passes count epochs by themselves
    assert collect(loader) == epoch(0) and collect(loader) == epoch(1)


@pytest.mark.parametrize("workers,done,total", [(0, 3, 7), (2, 3, 7), (2, 4, 7), (2, 12, 14)])
def test_resume_mid_epoch_continues_exactly(discrete, workers, done, total, monkeypatch):
    # (2, 12, 14): each worker skips 6 batches, more than its ring slots (skipped batches
    # must not take slots, or the worker waits for one: WAIT_LIMIT_S, shortened here)
    monkeypatch.setattr(ring_module, "WAIT_LIMIT_S", 5.0)
    cfg = cfg_for(discrete.path, num_workers=workers, batches_per_epoch=total)
    full = make_loader(cfg.path, cfg, train=True)
    full.set_epoch(2)
    want = list(full)
    first = make_loader(cfg.path, cfg, train=True)
    first.set_epoch(2)
    state = next(s for i, s in enumerate(_states(first)) if i == done - 1)
    assert state == {"epoch": 2, "batches": done}
    resumed = make_loader(cfg.path, cfg, train=True)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == total - done
    for a, b in zip(rest, want[done:]):
        assert a["key"] == b["key"] and torch.equal(a["frames"], b["frames"])
    assert resumed.state_dict() == {"epoch": 2, "batches": total}


def test_resume_at_an_epochs_end_never_replays_an_epoch(discrete):
    # A checkpoint written after an epoch's last batch: the stream goes on with the next
    # epoch while Lightning's counter (epoch_fn) still says the finished one, and moves on
    # one pass later. Each pass must then be a new epoch, as in a run never stopped
    # (the Slurm stress test once saw epoch 4 served twice, at steps 16 and 20).
    cfg = cfg_for(discrete.path, num_workers=0, batches_per_epoch=3)

    def epoch(e: int) -> list:
        loader = make_loader(cfg.path, cfg, train=True)
        loader.set_epoch(e)
        return collect(loader)

    lightning_epoch = [3]
    resumed = make_loader(cfg.path, cfg, train=True, epoch_fn=lambda: lightning_epoch[0])
    resumed.load_state_dict({"epoch": 3, "batches": 3})
    assert collect(resumed) == epoch(4)
    lightning_epoch[0] = 4  # Lightning's counter catches up one pass late
    assert collect(resumed) == epoch(5)
    lightning_epoch[0] = 6  # and a counter ahead of the stream is followed
    assert collect(resumed) == epoch(6)


def test_an_abandoned_pass_does_not_disturb_the_next(discrete):
    cfg = cfg_for(discrete.path, num_workers=2, batches_per_epoch=6)
    want = make_loader(cfg.path, cfg, train=True)
    want.set_epoch(1)
    want = list(want)
    loader = make_loader(cfg.path, cfg, train=True)
    first = iter(loader)
    next(first), next(first)  # stop early; its workers stay alive while the next pass runs
    got = list(loader)
    assert loader.epoch == 1 and len(got) == 6
    for a, b in zip(got, want):
        assert a["key"] == b["key"] and torch.equal(a["frames"], b["frames"])
    del first


def test_ring_gives_up_instead_of_hanging(monkeypatch):
    monkeypatch.setattr(ring_module, "WAIT_LIMIT_S", 0.01)
    ring = BatchRing(1, 2, (2, 3, 3, 8, 8))
    window = np.full((3, 3, 8, 8), 7, dtype=np.uint8)
    addresses = [ring.put(0, [window, window]) for _ in range(2)]
    assert torch.equal(ring.take(addresses[0]), torch.full((2, 3, 3, 8, 8), 7, dtype=torch.uint8))
    ring.put(0, [window])  # the slot just taken is free again
    with pytest.raises(RuntimeError, match="waited"):
        ring.put(0, [window])  # both slots written, none taken


def _states(loader):
    for _ in loader:
        yield loader.state_dict()


# --------------------------------------------------------------------------- bad data


def _spoil(sample: dict) -> dict:
    key = sample["__key__"]
    if key == "rec000__c00001":
        sample["mp4"] = b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20
    elif key == "rec001__c00002":
        buf = io.BytesIO()
        np.save(buf, np.zeros(5, dtype=np.int64))  # 5 rows for a 16-frame clip
        sample["actions.npy"] = buf.getvalue()
    elif key == "rec002__c00001":
        del sample["mp4"]
    elif key == "rec002__c00002":
        buf = io.BytesIO()
        np.save(buf, np.ones(16, dtype=np.float32))  # float rows for a discrete action space
        sample["actions.npy"] = buf.getvalue()
    return sample


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    ds = make_dataset(tmp_path, shards=3, clips_per_shard=3, mutate=_spoil)
    _rewrite_shard(
        tmp_path / "shard-000001.tar",
        lambda x: {**x, "json": b"{not json"} if x["__key__"] == "rec001__c00000" else x,
    )
    cfg = cfg_for(tmp_path, val_batches=0, val_shards=0)
    loader = make_loader(cfg.path, cfg, train=False)
    with pytest.warns(BadDataWarning):
        got = collect(loader)
    stats = loader.stats.as_dict()
    counts = [stats[r] for r in ("bad_video", "bad_json", "bad_actions", "missing_video")]
    assert counts == [1, 1, 2, 1]
    bad = {"rec000__c00001", "rec001__c00000", "rec001__c00002", "rec002__c00001", "rec002__c00002"}
    assert set(got) == {w for w in all_windows(ds, 2, 1) if w[0] not in bad}
    train = make_loader(cfg.path, cfg, train=True)
    with pytest.warns(BadDataWarning):
        assert len(list(train)) == cfg.batches_per_epoch


def _rewrite_shard(path, change) -> None:
    """Rewrite a written shard with ``change(sample)`` applied (json the shard writer would refuse)."""
    samples = [change(x) for x in iter_tar_samples(path)]
    with wds.TarWriter(str(path)) as writer:
        for x in samples:
            writer.write(x)


def test_nan_continuous_actions_are_skipped(tmp_path):
    def nan(sample: dict) -> dict:
        if sample["__key__"] == "rec000__c00000":
            arr = np.load(io.BytesIO(sample["actions.npy"]))
            arr[3, 1] = np.nan
            buf = io.BytesIO()
            np.save(buf, arr)
            sample["actions.npy"] = buf.getvalue()
        return sample

    make_dataset(tmp_path, shards=1, clips_per_shard=2, actions="continuous", mutate=nan)
    cfg = cfg_for(tmp_path, val_batches=0, val_shards=0)
    loader = make_loader(cfg.path, cfg, train=False)
    with pytest.warns(BadDataWarning):
        keys = {k for k, _ in collect(loader)}
    assert keys == {"rec000__c00001"} and loader.stats.as_dict()["bad_actions"] == 1


def test_truncated_tar_is_skipped_and_training_goes_on(tmp_path):
    ds = make_dataset(tmp_path, shards=3, clips_per_shard=3)
    shard = tmp_path / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    cfg = cfg_for(tmp_path, val_batches=0, val_shards=0)
    loader = make_loader(cfg.path, cfg, train=False)
    with pytest.warns(BadDataWarning):
        got = collect(loader)
    assert loader.stats.as_dict()["tar_error"] >= 1
    whole = {w for w in all_windows(ds, 2, 1) if ds.clips[w[0]]["shard"] != 1}
    assert whole <= set(got)
    assert all(ds.clips[k]["shard"] == 1 for k, _ in set(got) - whole)
    train = make_loader(cfg.path, cfg, train=True, rank=0, world_size=1)
    with pytest.warns(BadDataWarning):
        assert len(list(train)) == cfg.batches_per_epoch


def test_training_on_only_corrupt_data_raises_instead_of_hanging(tmp_path):
    def garbage(sample: dict) -> dict:
        sample["mp4"] = b"junk" * 50
        return sample

    make_dataset(tmp_path, shards=2, clips_per_shard=2, mutate=garbage)
    cfg = cfg_for(tmp_path)
    with (
        pytest.warns(BadDataWarning),
        pytest.raises(DatasetError, match="without one usable window"),
    ):
        list(make_loader(cfg.path, cfg, train=True))


# --------------------------------------------------------------------------- hold-out by source


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """Ten source videos of two clips each, all in one shard (as shard_videos packs small videos)."""
    return make_dataset(
        tmp_path_factory.mktemp("one_shard"), shards=1, clips_per_shard=20, clip_frames=8,
        sources_per_shard=10,
    )  # fmt: skip


def test_one_shard_holds_out_whole_source_videos(one_shard):
    cfg = cfg_for(one_shard.path)  # val_shards=1 (the default) of a single shard
    train, val = split_train_val(cfg)
    sources = {k: c["source"] for k, c in one_shard.clips.items()}
    train_src, val_src = {sources[k] for k in train.keys}, {sources[k] for k in val.keys}
    assert not train_src & val_src and train_src | val_src == set(sources.values())
    assert train.keys | val.keys == set(sources) and len(val_src) == 1  # 10% of 10 videos
    assert val.num_samples == 2 and train.num_samples == 18
    again = split_train_val(cfg_for(one_shard.path, seed=7))  # data.seed does not move it
    assert again[1].keys == val.keys
    more = split_train_val(cfg_for(one_shard.path, val_fraction=0.5))[1]
    assert len({sources[k] for k in more.keys}) == 5

    # what the loaders deliver keeps to the split, on two ranks with two workers each
    cfg = cfg_for(one_shard.path, num_workers=2, val_batches=0, batches_per_epoch=8)
    seen = {"train": set(), "val": set()}
    for rank in range(2):
        for name, info in (("train", train), ("val", val)):
            loader = make_loader(
                info.urls, cfg, train=name == "train", rank=rank, world_size=2, info=info
            )
            seen[name] |= {k for b in loader for k in b["key"]}
    assert seen["val"] == val.keys and seen["train"] <= train.keys
    assert not {sources[k] for k in seen["train"]} & {sources[k] for k in seen["val"]}


@pytest.mark.parametrize("val_batches", [3, 0])
def test_every_rank_validates_equally_on_a_source_split(one_shard, val_batches):
    cfg = cfg_for(one_shard.path, num_workers=2, val_batches=val_batches)
    _, val = split_train_val(cfg)
    counts = []
    for rank in range(2):
        loader = make_loader(val.urls, cfg, train=False, rank=rank, world_size=2, info=val)
        batches = list(loader)
        assert all(set(b["key"]) <= val.keys for b in batches)
        counts.append(len(batches))
    if val_batches:
        assert counts == [val_batches, val_batches]
    else:
        assert min(counts) >= 1


def test_a_single_source_holds_out_its_last_clips(tmp_path):
    ds = make_dataset(tmp_path, shards=1, clips_per_shard=4, clip_frames=8)
    with pytest.warns(UserWarning, match="share this video"):
        train, val = split_train_val(cfg_for(tmp_path))
    assert val.keys == {"rec000__c00003"} and train.keys == set(ds.clips) - val.keys
    make_dataset(tmp_path / "one_clip", shards=1, clips_per_shard=1, clip_frames=8)
    with pytest.raises(DatasetError, match="1 clip\\(s\\).*data.val_path"):
        split_train_val(cfg_for(tmp_path / "one_clip"))


def test_a_training_worker_whose_clip_share_is_empty_reads_its_ranks(tmp_path):
    """Two clips that both hash to worker 0's slot: worker 1 must not stop the run."""
    ds = make_dataset(tmp_path, shards=1, clips_per_shard=2, clip_frames=8)
    assert {zlib.crc32(k.encode()) % 2 for k in ds.clips} == {0}
    cfg = cfg_for(tmp_path, num_workers=2, val_shards=0, batches_per_epoch=4)
    with pytest.warns(UserWarning, match="split their clips by key"):
        loader = make_loader(cfg.path, cfg, train=True)
    assert len(list(loader)) == 4


# --------------------------------------------------------------------------- start-up errors


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        list_shards(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="no manifest.json and no .tar"):
        list_shards(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        list_shards(str(tmp_path / "shard-{000000..000003}.tar"))


def test_empty_manifest_and_missing_shard_are_clear_errors(tmp_path, discrete):
    (tmp_path / "manifest.json").write_text(
        json.dumps({"format_version": 1, "shards": [], "height": 8, "width": 8, "fps": 1.0})
    )
    with pytest.raises(DatasetError, match="empty dataset"):
        list_shards(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(discrete.path, copy)
    (copy / "shard-000002.tar").unlink()
    with pytest.raises(DatasetError, match="shard-000002.tar"):
        list_shards(copy)


def test_context_longer_than_clips_is_a_clear_error(discrete):
    cfg = cfg_for(discrete.path, context=8, frame_gap=2)
    with pytest.raises(DatasetError, match="needs windows of 17 frames"):
        make_loader(cfg.path, cfg, train=True)


def test_patterns_and_manifest_metadata(discrete):
    pattern = str(discrete.path / "shard-{000000..000001}.tar")
    assert len(list_shards(pattern)) == 2
    cfg = cfg_for(pattern, val_batches=0)
    keys = {k for k, _ in collect(make_loader(pattern, cfg, train=False))}
    assert {discrete.clips[k]["shard"] for k in keys} == {0, 1}


def test_shards_without_manifest_stream_unlabelled(discrete, tmp_path):
    for name in ("shard-000000.tar", "shard-000001.tar"):
        shutil.copy(discrete.path / name, tmp_path / name)
    with pytest.warns(UserWarning, match="no manifest.json"):
        urls = list_shards(tmp_path)
    cfg = cfg_for(tmp_path, num_workers=2, val_batches=0)
    got = []
    for b in make_loader(urls, cfg, train=False):  # no frame size known: no ring, plain hand-over
        assert not b["has_action"].any() and b["frames"].shape[1:] == (3, 3, 32, 32)
        assert [frame_time(w[0]) for w in b["frames"].numpy()] == b["start"].tolist()
        got += [(k, int(s)) for k, s in zip(b["key"], b["start"])]
    assert sorted(got) == sorted(
        w for w in all_windows(discrete, 2, 1) if discrete.clips[w[0]]["shard"] < 2
    )


# --------------------------------------------------------------------------- Lightning


class _Probe(pl.LightningModule):
    """Records the keys of every training batch, by epoch and by global step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list] = {}
        self.by_step: dict[int, tuple] = {}
        self.val_windows = 0

    def training_step(self, batch, _):
        self.seen.setdefault(self.current_epoch, []).append(tuple(batch["key"]))
        self.by_step[self.global_step] = (tuple(batch["key"]), batch["start"].tolist())
        return (self.w - batch["frames"].float().mean() / 255).pow(2).sum()

    def validation_step(self, batch, _):
        self.val_windows += len(batch["key"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(**kw) -> pl.Trainer:
    base = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    return pl.Trainer(**{**base, **kw})


def test_datamodule_drives_a_lightning_fit(discrete):
    cfg = cfg_for(discrete.path, batches_per_epoch=3, val_shards=1, val_batches=0)
    dm = VideoDataModule(cfg)
    dm.setup()
    assert dm.action_space == {"type": "discrete", "n": 5} and dm.image_size == 32
    assert len(dm.train_info.urls) == 3 and len(dm.val_info.urls) == 1
    model = _Probe()
    _trainer(max_epochs=2).fit(model, datamodule=dm)
    assert [len(model.seen[e]) for e in (0, 1)] == [3, 3]
    assert model.seen[0] != model.seen[1]
    held_out = [k for k, c in discrete.clips.items() if c["shard"] == 3]
    assert all(k not in held_out for e in (0, 1) for batch in model.seen[e] for k in batch)
    want = {w for w in all_windows(discrete, 2, 1) if w[0] in held_out}
    assert model.val_windows == 2 * len(want)  # validated after each of the 2 epochs


def test_lightning_resumes_mid_epoch_on_the_same_batches(discrete, tmp_path):
    cfg = cfg_for(discrete.path, batches_per_epoch=3, val_shards=0, num_workers=2)
    whole = _Probe()
    _trainer(max_steps=5, limit_val_batches=0).fit(whole, datamodule=VideoDataModule(cfg))
    first = _Probe()
    trainer = _trainer(max_steps=4, limit_val_batches=0)  # stops inside epoch 1
    trainer.fit(first, datamodule=VideoDataModule(cfg))
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = _Probe()
    _trainer(max_steps=5, limit_val_batches=0).fit(
        resumed, datamodule=VideoDataModule(cfg), ckpt_path=tmp_path / "mid.ckpt"
    )
    assert sorted(resumed.by_step) == [4]
    assert resumed.by_step[4] == whole.by_step[4]
    assert [first.by_step[i] for i in range(4)] == [whole.by_step[i] for i in range(4)]


# Runs on every rank: validation logs with sync_dist=True, so a rank without batches would
# leave the others waiting in the end-of-pass all-reduce.
_DDP_WORKER = """
import sys
import lightning.pytorch as pl
import torch
from lapo.config import DataConfig
from lapo.data import VideoDataModule

class Probe(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.val_batches = 0
    def training_step(self, batch, _):
        return (self.w - batch["frames"].float().mean() / 255).pow(2).sum()
    def validation_step(self, batch, _):
        self.val_batches += 1
        self.log("val/mean", batch["frames"].float().mean(), sync_dist=True)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

cfg = DataConfig(path=sys.argv[1], batch_size=4, num_workers=2, val_shards=1,
                 val_batches=int(sys.argv[2]), batches_per_epoch=2, shuffle_buffer=8)
model = Probe()
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0)
trainer.fit(model, datamodule=VideoDataModule(cfg))
print(f"rank {trainer.global_rank}: {model.val_batches} val batches", flush=True)
"""


def _only_first_val_clip(sample: dict) -> dict | None:
    key = sample["__key__"]
    return None if key.startswith("rec002") and key != "rec002__c00000" else sample


@pytest.mark.slow
@pytest.mark.parametrize("val_batches", [3, 0])
def test_ddp_ranks_all_validate_on_a_one_clip_split(tmp_path, val_batches):
    """Two gloo ranks, one validation shard whose only clip belongs to rank 1 by key."""
    ds = make_dataset(tmp_path / "data", shards=3, clips_per_shard=6, mutate=_only_first_val_clip)
    _, val = split_train_val(cfg_for(ds.path, num_workers=2, val_shards=1))
    assert set(_val_owners(ds, val.urls, 2, 2).values()) == {1}
    counts = _ddp_val_batches(tmp_path, ds.path, val_batches)
    if val_batches:
        assert counts == [2 * val_batches] * 2  # two validation passes (one per epoch)
    else:
        assert min(counts) >= 2


@pytest.mark.slow
def test_ddp_ranks_validate_equally_on_a_source_split(tmp_path):
    """Two gloo ranks on one shard: the held-out source video is all the validation there is."""
    ds = make_dataset(tmp_path / "data", shards=1, clips_per_shard=12, sources_per_shard=6)
    assert _ddp_val_batches(tmp_path, ds.path, 3) == [6, 6]  # two passes of 3 on each rank


def _ddp_val_batches(tmp_path, data, val_batches: int) -> list[int]:
    """Validation batches seen by each of two gloo ranks training on `data` (_DDP_WORKER)."""
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", str(script), str(data), str(val_batches),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        # SIGTERM to the launcher: it stops the ranks (SIGTERM, then SIGKILL after 30 s);
        # they run in sessions of their own and ignore SIGTERM while Lightning runs.
        proc.terminate()
        out, _ = proc.communicate(timeout=120)
        pytest.fail(f"DDP validation hung:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return [int(re.search(rf"rank {r}: (\d+) val batches", out).group(1)) for r in (0, 1)]


def test_validation_holds_out_more_shards_when_the_last_is_too_small_to_fill_a_pass(tmp_path):
    """A recording's last shard can hold a few episodes (bigfish: 4 episodes, 431 windows,
    against 40 x 32 = 1280 read a pass): the split takes more of the last shards, up to half,
    so that a validation pass does not repeat windows."""
    ds = make_dataset(tmp_path, shards=6, clips_per_shard=1, clip_frames=12)  # 10 windows a shard
    _, val = split_train_val(cfg_for(ds.path, val_batches=5))  # 5 x 4 = 20 windows: 2 shards
    names = sorted(p.name for p in Path(ds.path).glob("*.tar"))
    assert [Path(u).name for u in val.urls] == names[-2:]
    _, val = split_train_val(cfg_for(ds.path, val_batches=50))  # 200: at most half of 6
    assert len(val.urls) == 3
    _, val = split_train_val(cfg_for(ds.path, val_batches=2))  # 8: one shard is enough
    assert len(val.urls) == 1
