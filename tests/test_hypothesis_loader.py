"""Property: whatever damage is done to the shards, the loader never hangs, never crashes, and
yields only well-formed windows, with exactly the right frames and actions for undamaged clips.

Hypothesis draws damage (bytes overwritten, inserted, deleted or cut off anywhere in a tar;
members replaced by random bytes, cut, dropped, or by valid npy arrays of the wrong shape,
dtype or values; json fields changed; whole samples dropped; junk members added) and loader
settings (context, frame gap, train / validation, batched or not, 0 or 1 worker). Each
example runs the loader in a thread with a timeout, so a hang fails the test instead of
stalling it. ``LAPO_FUZZ_EXAMPLES=500`` explores further (with a fresh random seed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lapo.config import DataConfig
from lapo.data import DatasetError, make_loader
from lapo.shards import npy_bytes
from lapo.tars import iter_tar_samples
from tests.datagen import NUM_ACTIONS, frame_time, make_dataset

EXAMPLES = int(os.environ.get("LAPO_FUZZ_EXAMPLES", "25"))
TIMEOUT_S = 120.0  # generous for 2 shared cores; a healthy example takes about a second
MEMBERS = ("mp4", "json", "actions.npy", "dones.npy")
SIZE, CLIP_FRAMES, CLIPS = 32, 12, 3


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two shards of three 12-frame clips; the original samples, for telling damaged ones apart."""
    ds = make_dataset(tmp_path_factory.mktemp("fuzz"), shards=2, clips_per_shard=CLIPS,
                      clip_frames=CLIP_FRAMES, size=SIZE)  # fmt: skip
    originals = {
        s["__key__"]: s for p in sorted(ds.path.glob("shard-*.tar")) for s in iter_tar_samples(p)
    }
    return ds, originals


# --------------------------------------------------------------------------- damage


def npy_arrays(draw) -> bytes:
    """A valid .npy of a plausible-but-wrong shape, dtype or value range."""
    dtype = draw(st.sampled_from(["int64", "int32", "uint8", "float32", "float64", "bool"]))
    rows = draw(st.sampled_from([0, 1, 5, CLIP_FRAMES - 1, CLIP_FRAMES, CLIP_FRAMES + 1]))
    shape = draw(st.sampled_from([(rows,), (rows, 1), (rows, 2), (rows, 3)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    arr = rng.integers(-2, NUM_ACTIONS + 3, size=shape).astype(dtype)
    if arr.dtype.kind == "f" and arr.size and draw(st.booleans()):
        arr.flat[rng.integers(arr.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return npy_bytes(arr)


@st.composite
def sample_damage(draw) -> tuple:
    kind = draw(st.sampled_from(["replace", "cut", "drop", "npy", "json_field", "drop_sample", "junk"]))  # fmt: skip
    index = draw(st.integers(0, CLIPS - 1))
    member = draw(st.sampled_from(MEMBERS))
    if kind == "replace":
        return (kind, index, member, draw(st.binary(max_size=80)))
    if kind == "cut":
        return (kind, index, member, draw(st.floats(0, 1)))
    if kind == "npy":
        return (kind, index, draw(st.sampled_from(["actions.npy", "dones.npy"])), npy_arrays(draw))
    if kind == "json_field":
        value = draw(st.one_of(st.integers(-3, 40), st.text(max_size=3), st.none(), st.floats()))
        field = draw(st.sampled_from(["num_frames", "start", "height", "episode"]))
        return (kind, index, field, value)
    if kind == "junk":
        name = draw(st.sampled_from(["README.txt", "x.y.mp4", "noext", "rec000__c00000.mp4"]))
        return (kind, index, name, draw(st.binary(max_size=40)))
    return (kind, index, member, None)


@st.composite
def byte_damage(draw) -> tuple:
    kind = draw(st.sampled_from(["overwrite", "insert", "delete", "truncate"]))
    return (kind, draw(st.floats(0, 1)), draw(st.binary(min_size=1, max_size=64)))


def damage_plan():
    """1-3 edits, each (shard 0 or 1, sample edit or byte edit); sample edits are applied first."""
    edit = st.tuples(st.integers(0, 1), st.one_of(sample_damage(), byte_damage()))
    return st.lists(edit, min_size=1, max_size=3)


def edit_samples(samples: list[dict], op: tuple) -> list[dict]:
    kind, i, what, arg = op
    if i >= len(samples):
        return samples
    s = dict(samples[i])
    if kind == "drop_sample":
        return samples[:i] + samples[i + 1 :]
    if kind == "junk":
        return samples[:i] + [{"__key__": what.split(".")[0], what.split(".", 1)[-1] or "bin": arg}] + samples[i:]  # fmt: skip
    if kind == "json_field":
        if "json" not in s:
            return samples
        meta = json.loads(s["json"])
        meta[what] = arg
        s["json"] = json.dumps(meta).encode()  # NaN floats give the non-standard NaN token: fine
    elif what not in s:
        return samples
    elif kind == "replace" or kind == "npy":
        s[what] = arg
    elif kind == "cut":
        s[what] = s[what][: int(arg * len(s[what]))]
    elif kind == "drop":
        del s[what]
    return samples[:i] + [s] + samples[i + 1 :]


def edit_bytes(data: bytes, op: tuple) -> bytes:
    kind, where, junk = op
    at = int(where * len(data))
    if kind == "overwrite":
        return data[:at] + junk + data[at + len(junk) :]
    if kind == "insert":
        return data[:at] + junk + data[at:]
    if kind == "delete":
        return data[:at] + data[at + len(junk) :]
    return data[:at]


def apply_damage(src: Path, dst: Path, plan: list) -> set[int]:
    """Copy the dataset with the damage done; return the shards that were touched."""
    shutil.copytree(src, dst)
    touched = {shard for shard, _ in plan}
    for shard in touched:
        path = dst / f"shard-{shard:06d}.tar"
        samples = list(iter_tar_samples(path))
        ops = [op for s, op in plan if s == shard]
        for op in (op for op in ops if len(op) == 4):
            samples = edit_samples(samples, op)
        with wds.TarWriter(str(path)) as writer:
            for s in samples:
                writer.write(s)
        data = path.read_bytes()
        for op in (op for op in ops if len(op) == 3):
            data = edit_bytes(data, op)
        path.write_bytes(data)
    return touched


def intact_keys(path: Path, originals: dict) -> set[str]:
    """Keys whose every member still holds its original bytes, read as tolerantly as possible."""
    keys, seen = set(), set()
    for shard in sorted(path.glob("shard-*.tar")):
        try:
            for s in iter_tar_samples(shard):
                key = s["__key__"]
                if key in seen:  # a clip met twice (junk named like it) is not trusted
                    keys.discard(key)
                    continue
                seen.add(key)
                if key in originals and s == originals[key]:
                    keys.add(key)
        except Exception:  # noqa: BLE001 - damaged tar: what came before is what we know
            pass
    return keys


# --------------------------------------------------------------------------- the property


def run_in_thread(fn, timeout: float) -> dict:
    """Run ``fn`` in a daemon thread; a hang fails the test instead of stalling the suite."""
    out: dict = {}

    def target() -> None:
        try:
            out["items"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the loader hung for more than {timeout:.0f} s"
    return out


def check_item(item: dict, cfg: DataConfig, batched: bool, ds, originals, intact) -> int:
    """Assert one delivered batch (or window) is well formed; return its window count."""
    k, g = cfg.context, cfg.frame_gap
    frames, actions, has_action = item["frames"], item["actions"], item["has_action"]
    keys, starts = item["key"], item["start"]
    if not batched:
        frames, actions, has_action = frames[None], actions[None], has_action[None]
        keys, starts = [keys], starts[None]
    n = len(keys)
    assert 1 <= n <= (cfg.batch_size if batched else 1)
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (n, k + 1, 3, SIZE, SIZE)
    assert actions.dtype == torch.int64 and tuple(actions.shape) == (n,)
    assert has_action.dtype == torch.bool and tuple(has_action.shape) == (n,)
    assert starts.dtype == torch.int64 and tuple(starts.shape) == (n,)
    assert ((actions >= 0) & (actions < NUM_ACTIONS)).all()
    for b, (key, s) in enumerate(zip(keys, starts.tolist())):
        assert key in originals, f"window of unknown clip {key!r}"
        assert 0 <= s and s + k * g < CLIP_FRAMES, (key, s)
        if key not in intact:
            continue
        # an undamaged clip: exactly its frames, its action, its episode
        assert [frame_time(f.numpy()) for f in frames[b]] == [s + j * g for j in range(k + 1)]
        clip = ds.clips[key]
        t = s + (k - 1) * g
        assert bool(has_action[b]) and int(actions[b]) == int(clip["actions"][t])
        assert len(set(clip["episodes"][s : s + k * g + 1].tolist())) == 1
    return n


@pytest.mark.filterwarnings("ignore::lapo.windows.BadDataWarning")
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="LAPO_FUZZ_EXAMPLES" not in os.environ,  # reproducible in CI
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    plan=damage_plan(),
    context=st.sampled_from([1, 2, 3]),
    gap=st.sampled_from([1, 2]),
    train=st.booleans(),
    batched=st.booleans(),
    workers=st.sampled_from([0, 0, 1]),
)
def test_damaged_shards_never_hang_crash_or_corrupt(base, plan, context, gap, train, batched, workers):  # fmt: skip
    ds, originals = base
    with tempfile.TemporaryDirectory(prefix="lapo-fuzz-") as tmp:
        path = Path(tmp) / "ds"
        touched = apply_damage(ds.path, path, plan)
        intact = intact_keys(path, originals)
        cfg = DataConfig(path=str(path), context=context, frame_gap=gap, batch_size=3,
                         num_workers=workers, shuffle_buffer=8, batches_per_epoch=4,
                         val_shards=0, val_batches=0, seed=1)  # fmt: skip
        loader = make_loader(str(path), cfg, train=train, batched=batched)
        out = run_in_thread(lambda: list(loader), TIMEOUT_S)
    untouched = {k for k, c in ds.clips.items() if c["shard"] not in touched}
    if "error" in out:
        # the one error allowed: training on data that has no usable window at all
        err = out["error"]
        assert train and isinstance(err, DatasetError) and "usable window" in str(err), repr(err)
        assert not untouched, f"training gave up although clips {sorted(untouched)} are intact"
        return
    items = out["items"]
    windows = [
        (key, int(s))
        for item in items
        for key, s in zip(
            item["key"] if batched else [item["key"]],
            item["start"].reshape(-1).tolist(),
        )
    ]
    count = sum(check_item(it, cfg, batched, ds, originals, intact) for it in items)
    assert count == len(windows)
    if train:
        assert len(items) == cfg.batches_per_epoch * (1 if batched else cfg.batch_size)
    else:  # a finite pass: every window of an untouched shard, each once
        assert len(windows) == len(set(windows))
        span = context * gap
        for key in untouched:
            ep = ds.clips[key]["episodes"]
            want = {s for s in range(CLIP_FRAMES - span) if ep[s] == ep[s + span]}
            assert {s for k, s in windows if k == key} == want, key
