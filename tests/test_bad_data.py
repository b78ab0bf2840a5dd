"""Bad data against every reader: the loader, inspect, the labelled-set loader, `lapo label`, the CLI.

Each fault is made on a copy of a tiny real dataset (tests/datagen.py) and must
end in one of two ways (see docs/RELIABILITY.md, which lists every fault):

- a clip or shard fault inside a corpus is skipped, warned and counted, and every
  other clip still gives all of its windows;
- a whole-dataset fault (the manifest, the path) is a clear error at start-up that
  names the file and the fault.

Faults already covered by tests/test_data.py (garbage mp4, wrong-length actions,
missing mp4, unparsable json, NaN actions, truncated tar, all-corrupt training,
missing path, empty manifest, missing shard, context longer than clips) are not
repeated here.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_prep.inspect import inspect_dataset
from lapo.config import DataConfig
from lapo.data import DatasetError, make_loader
from lapo.label import label_dataset
from lapo.labelled import LabelledDataError, load_windows, scan_labelled
from lapo.shards import clip_sample, read_manifest
from lapo.tars import iter_tar_samples
from lapo.validate import validate_dataset
from lapo.windows import BadDataWarning
from tests.datagen import NUM_ACTIONS, make_dataset
from tests.test_data import all_windows

BAD_KEY = "rec000__c00001"  # the clip every per-clip fault damages
SHARD0 = "shard-000000.tar"


# --------------------------------------------------------------------------- making faults


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(
        buf, arr
    )  # allow_pickle defaults to True here: object arrays are written as a reader would meet them
    return buf.getvalue()


def rewrite(shard: Path, change: Callable[[dict], dict | None], extra: list[dict] = ()) -> None:
    """Rewrite a shard with ``change`` applied to each sample (None drops it), then ``extra``."""
    samples = [change(s) for s in iter_tar_samples(shard)] + list(extra)
    with wds.TarWriter(str(shard)) as writer:
        for s in samples:
            if s is not None:
                writer.write(s)


def on_bad(change: Callable[[dict], dict]) -> Callable[[Path], None]:
    """A fault that applies ``change`` to clip BAD_KEY only."""
    return lambda d: rewrite(d / SHARD0, lambda s: change(s) if s["__key__"] == BAD_KEY else s)


def with_member(**members: bytes) -> Callable[[Path], None]:
    return on_bad(lambda s: {**s, **{k.replace("_", "."): v for k, v in members.items()}})


def with_json(**fields) -> Callable[[Path], None]:
    return on_bad(lambda s: {**s, "json": json.dumps({**json.loads(s["json"]), **fields}).encode()})


def add_raw_members(d: Path) -> None:
    """A directory, a member without an extension and a text file among the clips."""
    with tarfile.open(d / SHARD0, "a") as tar:
        for name, data, kind in (
            ("notes", b"", tarfile.DIRTYPE),
            ("README", b"no extension", tarfile.REGTYPE),
            ("README.txt", b"not a clip", tarfile.REGTYPE),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)


def small_clip(d: Path) -> None:
    """Replace BAD_KEY by a real clip at 16x16 in a 32x32 dataset."""
    meta = json.loads(
        next(s for s in iter_tar_samples(d / SHARD0) if s["__key__"] == BAD_KEY)["json"]
    )
    frames = np.zeros((12, 16, 16, 3), np.uint8)
    new = clip_sample(BAD_KEY, frames, fps=10, source=meta["source"], episode=meta["episode"],
                      start=meta["start"], actions=np.zeros(12, np.int64))  # fmt: skip
    rewrite(d / SHARD0, lambda s: new if s["__key__"] == BAD_KEY else s)


def short_clip(d: Path) -> None:
    """Add a 2-frame clip: shorter than a window of context 2 (3 frames)."""
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    extra = clip_sample("short__c00000", frames, fps=10, source="short", episode="s", start=0,
                        actions=np.zeros(2, np.int64))  # fmt: skip
    rewrite(d / SHARD0, lambda s: s, [extra])


def edit_manifest(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        out = change(m)
        (d / "manifest.json").write_text(json.dumps(m if out is None else out))

    return apply


PNG = b"\x89PNG\r\n\x1a\n" + bytes(200)

# name: (fault, loader counter that must count it). Damage is to BAD_KEY unless said otherwise.
CLIP_FAULTS: dict[str, tuple[Callable[[Path], None], str | None]] = {
    "zero_length_mp4": (with_member(mp4=b""), "bad_video"),
    "truncated_mp4": (on_bad(lambda s: {**s, "mp4": s["mp4"][: len(s["mp4"]) // 2]}), "bad_video"),
    "png_as_mp4": (with_member(mp4=PNG), "bad_video"),
    "non_video_members": (add_raw_members, "missing_video"),
    "actions_float_in_discrete": (
        with_member(actions_npy=npy(np.zeros(12, np.float32))),
        "bad_actions",
    ),  # fmt: skip
    "actions_2d_in_discrete": (
        with_member(actions_npy=npy(np.zeros((12, 3), np.int64))),
        "bad_actions",
    ),  # fmt: skip
    "actions_out_of_range": (with_member(actions_npy=npy(np.full(12, NUM_ACTIONS))), "bad_actions"),
    "actions_negative": (with_member(actions_npy=npy(np.full(12, -1))), "bad_actions"),
    "actions_pickled_objects": (with_member(actions_npy=npy(np.array([{}] * 12))), "bad_actions"),
    "actions_not_npy": (with_member(actions_npy=b"\x93NUMPY garbage"), "bad_actions"),
    "dones_wrong_length": (with_member(dones_npy=npy(np.zeros(5, bool))), "bad_dones"),
    "dones_not_npy": (with_member(dones_npy=b"junk"), "bad_dones"),
    "json_not_an_object": (with_member(json=b"[1, 2, 3]"), "bad_json"),
    "json_num_frames_text": (with_json(num_frames="twelve"), "frame_count"),
    "json_num_frames_wrong": (with_json(num_frames=13), "frame_count"),
    "frame_size_differs": (small_clip, "frame_size"),
    "clip_shorter_than_window": (short_clip, "short_clips"),
    "zero_length_shard": (lambda d: (d / SHARD0).write_bytes(b""), "tar_error"),
    "shard_not_a_tar": (lambda d: (d / SHARD0).write_bytes(PNG * 40), "tar_error"),
}
# faults that lose the whole of shard 0 rather than one clip
WHOLE_SHARD = {"zero_length_shard", "shard_not_a_tar"}
# faults that lose nothing the loader needs (extra members, an extra short clip)
NOTHING_LOST = {"non_video_members", "clip_shorter_than_window"}


def drop_height(m: dict) -> None:
    del m["height"]


def list_a_directory(d: Path) -> None:
    (d / "shard-000002.tar").mkdir()
    edit_manifest(lambda m: m["shards"].append({**m["shards"][0], "name": "shard-000002.tar"}))(d)


# name: (fault, words the start-up error must hold besides the dataset path)
MANIFEST_FAULTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "manifest_not_json": (lambda d: (d / "manifest.json").write_text("{oops"), "not valid JSON"),
    "manifest_a_list": (edit_manifest(lambda m: [m]), "not an object"),
    "manifest_lacks_keys": (edit_manifest(drop_height), "missing keys ['height']"),
    "manifest_newer_format": (edit_manifest(lambda m: m.update(format_version=99)), "newer"),
    "manifest_counts_not_numbers": (
        edit_manifest(lambda m: m["shards"][0].update(samples="three")),
        "shards must be a list",
    ),
    "manifest_action_space_junk": (
        edit_manifest(lambda m: m.update(action_space={"type": "joystick"})),
        "action_space",
    ),
    "manifest_lists_a_directory": (list_a_directory, "shard-000002.tar"),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """2 shards x 3 clips of 12 frames (32 px, discrete actions, episode ends inside clips)."""
    return make_dataset(
        tmp_path_factory.mktemp("base"), shards=2, clips_per_shard=3, clip_frames=12
    )


def damaged(base, tmp_path: Path, fault: Callable[[Path], None]) -> Path:
    d = tmp_path / "ds"
    shutil.copytree(base.path, d)
    fault(d)
    return d


def val_pass(path: Path, **kw) -> tuple[set, dict, list]:
    """One finite pass: the (key, start) of every window, the loader's counters, the warnings."""
    cfg = DataConfig(path=str(path), batch_size=4, num_workers=0, val_shards=0, val_batches=0, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = make_loader(cfg.path, cfg, train=False)
        got = [(k, int(s)) for b in loader for k, s in zip(b["key"], b["start"])]
    assert len(got) == len(set(got)), "a window was delivered twice"
    bad = [w for w in caught if issubclass(w.category, BadDataWarning)]
    return set(got), loader.stats.as_dict(), bad


# --------------------------------------------------------------------------- the loader


@pytest.mark.parametrize("name", sorted(CLIP_FAULTS))
def test_loader_skips_counts_and_warns_each_clip_fault(base, tmp_path, name):
    fault, counter = CLIP_FAULTS[name]
    got, stats, warned = val_pass(damaged(base, tmp_path, fault))
    every = all_windows(base, 2, 1)
    if name in WHOLE_SHARD:
        lost = {k for k, c in base.clips.items() if c["shard"] == 0}
    else:
        lost = set() if name in NOTHING_LOST else {BAD_KEY}
    assert got == {w for w in every if w[0] not in lost}  # every other clip gives all its windows
    assert stats[counter] >= 1
    if counter != "short_clips":  # a short clip is valid data, just too short to cut
        assert warned and any(
            BAD_KEY in str(w.message) or "shard" in str(w.message) for w in warned
        )


def test_continuous_actions_of_wrong_width_or_infinite_are_skipped(tmp_path):
    def spoil(sample: dict) -> dict:
        if sample["__key__"] == "rec000__c00000":
            sample["actions.npy"] = npy(np.zeros((12, 3), np.float32))  # the dataset's D is 2
        elif sample["__key__"] == "rec000__c00002":
            sample["actions.npy"] = npy(np.full((12, 2), np.inf, np.float32))
        return sample

    ds = make_dataset(tmp_path, shards=1, clips_per_shard=3, clip_frames=12, actions="continuous",
                      mutate=spoil)  # fmt: skip
    got, stats, warned = val_pass(tmp_path)
    assert {k for k, _ in got} == {"rec000__c00001"} and stats["bad_actions"] == 2 and warned
    assert got == {w for w in all_windows(ds, 2, 1) if w[0] == "rec000__c00001"}


@pytest.mark.parametrize("name", sorted(MANIFEST_FAULTS))
def test_manifest_faults_are_errors_at_start_up_naming_the_file(base, tmp_path, name):
    fault, words = MANIFEST_FAULTS[name]
    d = damaged(base, tmp_path, fault)
    cfg = DataConfig(path=str(d), num_workers=0)
    with pytest.raises(DatasetError) as e:
        make_loader(cfg.path, cfg, train=True)
    assert str(d) in str(e.value) and words in str(e.value)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"action_space": {"type": "continuous", "dim": 2}}, "bad_actions"),
        ({"height": 64, "width": 64}, "frame_size"),
    ],
)
def test_manifest_contradicting_every_clip_stops_training_early(base, tmp_path, change, reason):
    """Nothing usable at all: validation counts every clip, training stops with the reason."""
    d = damaged(base, tmp_path, edit_manifest(lambda m: m.update(change)))
    got, stats, warned = val_pass(d)
    assert got == set() and stats[reason] == base.num_clips and warned
    cfg = DataConfig(path=str(d), batch_size=4, num_workers=0, batches_per_epoch=2)
    with (
        pytest.warns(BadDataWarning),
        pytest.raises(DatasetError, match=rf"usable window.*{reason}=\d+"),
    ):
        list(make_loader(cfg.path, cfg, train=True))


def test_manifest_counts_that_disagree_do_not_change_what_is_read(base, tmp_path):
    d = damaged(
        base, tmp_path, edit_manifest(lambda m: m["shards"][0].update(samples=99, frames=5))
    )
    got, stats, _ = val_pass(d)
    assert got == all_windows(base, 2, 1) and stats["clips"] == base.num_clips
    assert any("99" in p for p in validate_dataset(d))  # ... while inspect reports the mismatch


# --------------------------------------------------------------------------- the other readers


@pytest.mark.parametrize("name", sorted(set(CLIP_FAULTS) - {"clip_shorter_than_window"}))
def test_inspect_reports_every_clip_fault_by_shard(base, tmp_path, name):
    report = inspect_dataset(damaged(base, tmp_path, CLIP_FAULTS[name][0]), decode=True)
    assert any(SHARD0 in p for p in report["problems"]), report["problems"]


@pytest.mark.parametrize("name", sorted(CLIP_FAULTS))
def test_labelled_set_fails_at_start_up_naming_shard_and_clip(base, tmp_path, name):
    """finetune / evaluate load their small labelled set at start: a damaged clip stops them."""
    d = damaged(base, tmp_path, CLIP_FAULTS[name][0])
    index = None
    try:
        index = scan_labelled(d, context=2)
        load_windows(index, {e: ep.rows for e, ep in index.episodes.items()})
    except LabelledDataError as e:
        assert name != "clip_shorter_than_window"  # valid data: it loads (next branch)
        assert f"{SHARD0}: " in str(e)
        if name not in WHOLE_SHARD:
            assert f"clip {'README' if name == 'non_video_members' else BAD_KEY}" in str(e)
    else:
        assert name == "clip_shorter_than_window" and "short" in {
            t.source for t in index.timelines.values()
        }


@pytest.fixture(scope="module")
def agent_run(tmp_path_factory) -> Path:
    """An untrained labelling agent at debug size (RUN_F of lapo finetune)."""
    from tests.test_label import write_agent

    return write_agent(tmp_path_factory.mktemp("run"), {"type": "discrete", "n": NUM_ACTIONS})


def label_keys(out: Path) -> set[str]:
    return {s["__key__"] for p in sorted(out.glob("shard-*.tar")) for s in iter_tar_samples(p)}


@pytest.mark.parametrize("name", sorted(CLIP_FAULTS))
def test_label_survives_each_clip_fault(base, agent_run, tmp_path, name):
    """lapo label over a corpus: a damaged clip is left out (warned), never the end of the run.
    It does not read the input actions (it copies them to true_actions.npy), so action faults
    leave every clip in."""
    d = damaged(base, tmp_path, CLIP_FAULTS[name][0])
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        label_dataset(agent_run, d, out, batch_size=8, device="cpu", progress=False)
    warned = " ".join(str(w.message) for w in caught if w.category is BadDataWarning)
    if name in WHOLE_SHARD:
        lost = {k for k, c in base.clips.items() if c["shard"] == 0}
    elif name.startswith("actions_") or name in NOTHING_LOST:
        lost = set()
    else:
        lost = {BAD_KEY}
    extra = {"short__c00000"} if name == "clip_shorter_than_window" else set()
    assert label_keys(out) == (set(base.clips) | extra) - lost
    assert (f"clip {BAD_KEY}" in warned) == (lost == {BAD_KEY})
    assert validate_dataset(out) == []


def test_label_skips_bad_clips_and_writes_a_valid_dataset(base, agent_run, tmp_path):
    bad = {
        "rec000__c00000": "zero_length_mp4",
        "rec000__c00002": "json_not_parsing",
        "rec001__c00000": "frame_size_differs",
        "rec001__c00001": "png_as_mp4",
    }

    def spoil(d: Path) -> None:
        change = {"rec000__c00000": {"mp4": b""}, "rec000__c00002": {"json": b"{oops"}}
        rewrite(d / SHARD0, lambda s: {**s, **change.get(s["__key__"], {})})
        small = clip_sample("rec001__c00000", np.zeros((12, 16, 16, 3), np.uint8), fps=10,
                            source="rec001", episode="e", start=0)  # fmt: skip
        change = {"rec001__c00000": small, "rec001__c00001": {"mp4": PNG}}
        rewrite(d / "shard-000001.tar", lambda s: {**s, **change.get(s["__key__"], {})})

    d = damaged(base, tmp_path, spoil)
    out = tmp_path / "labelled"
    with pytest.warns(BadDataWarning) as caught:
        manifest = label_dataset(agent_run, d, out, batch_size=8, device="cpu", progress=False)
    named = " ".join(str(w.message) for w in caught)
    assert all(f"clip {k}" in named for k in bad)
    assert validate_dataset(out) == []
    assert label_keys(out) == set(base.clips) - set(bad)
    assert manifest["num_samples"] == 2 and manifest["made_by"]["skipped_clips"] == len(bad)
    assert read_manifest(out) == manifest


def test_label_takes_clip_counts_from_the_shards_not_a_wrong_manifest(base, agent_run, tmp_path):
    """Fewer and more clips than the manifest says: labelled as they are, no wait for the merge."""
    d = damaged(base, tmp_path, short_clip)  # shard 0 holds 4 clips, its manifest entry says 3
    edit_manifest(lambda m: m["shards"][1].update(samples=7))(d)  # shard 1 holds 3, listed as 7
    out = tmp_path / "labelled"
    manifest = label_dataset(agent_run, d, out, device="cpu", progress=False, merge_timeout=0)
    assert [s["samples"] for s in manifest["shards"]] == [4, 3]
    assert label_keys(out) == set(base.clips) | {"short__c00000"}
    assert validate_dataset(out) == []


def test_label_keeps_the_clips_before_a_tar_breaks_off(base, agent_run, tmp_path):
    def cut(d: Path) -> None:
        data = (d / SHARD0).read_bytes()
        (d / SHARD0).write_bytes(data[: len(data) // 2])

    d = damaged(base, tmp_path, cut)
    whole = {s["__key__"] for s in iter_tar_samples(base.path / SHARD0)}
    with pytest.warns(BadDataWarning, match=SHARD0):
        label_dataset(agent_run, d, tmp_path / "out", device="cpu", progress=False)
    kept = label_keys(tmp_path / "out")
    assert {k for k in base.clips if base.clips[k]["shard"] == 1} < kept
    assert 1 <= len(kept & whole) < len(whole) and validate_dataset(tmp_path / "out") == []


def test_label_checks_the_whole_dataset_before_any_work(base, tmp_path):
    """A listed shard that is missing, or no clip at all: an error before a model is loaded."""
    d = damaged(base, tmp_path, lambda d: (d / "shard-000001.tar").unlink())
    with pytest.raises(FileNotFoundError, match=r"1 shard\(s\) listed .*shard-000001.tar"):
        label_dataset(tmp_path / "no-run", d, tmp_path / "out", device="cpu", progress=False)
    empty = damaged(base, tmp_path / "e", edit_manifest(lambda m: m.update(shards=[])))
    with pytest.raises(DatasetError, match="empty dataset"):
        label_dataset(tmp_path / "no-run", empty, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- commands


def test_commands_name_a_missing_dataset_in_one_line(tmp_path, capsys):
    """Each command given a path that does not exist: exit status 2 and one line naming it."""
    from data_prep.inspect import main as inspect_main
    from data_prep.shard_videos import main as shard_main
    from lapo.cli import main as lapo_main

    nowhere = tmp_path / "nowhere"
    runs = {
        "pretrain": lambda: lapo_main(["pretrain", "--config", "configs/lam/debug.yaml",
                                       "--data", str(nowhere), "--out", str(tmp_path / "r")]),
        "finetune": lambda: lapo_main(["finetune", "--method", "bc", "--labeled", str(nowhere),
                                       "--label-budget", "4", "--out", str(tmp_path / "f")]),
        "label": lambda: lapo_main(["label", "--model", str(tmp_path / "run"), "--data",
                                    str(nowhere), "--out", str(tmp_path / "l")]),
        "shard_videos": lambda: shard_main([str(nowhere), str(tmp_path / "o")]),
    }  # fmt: skip
    for name, call in runs.items():
        assert call() == 2, name
        err = capsys.readouterr().err
        assert str(nowhere) in err and "Traceback" not in err, (name, err)
    assert inspect_main([str(nowhere)]) == 1
    assert "no manifest.json" in capsys.readouterr().out


# --------------------------------------------------------------------------- source videos


def test_shard_videos_skips_and_reports_each_bad_source_video(tmp_path):
    """Faults in a video folder not already in tests/test_shard_videos.py (garbage bytes,
    actions of the wrong length, non-video files are)."""
    from lapo.ingest import ingest
    from lapo.ingest_plan import IngestOptions
    from tests.test_shard_videos import write_video

    src = tmp_path / "src"
    for name in ("good", "nan_actions", "text_actions", "wide_actions", "junk_actions"):
        write_video(src / f"{name}.mp4", 20, 32, 32, 15)
    write_video(src / "one_frame.mp4", 1, 32, 32, 15)
    write_video(src / "truncated.mp4", 40, 32, 32, 15)
    cut = src / "truncated.mp4"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (src / "zero_length.mp4").write_bytes(b"")
    (src / "png.mp4").write_bytes(PNG)
    rows = np.arange(20, dtype=np.float32)[:, None].repeat(2, 1)  # continuous, D = 2
    np.save(src / "good.actions.npy", rows)
    np.save(src / "nan_actions.actions.npy", np.where(np.arange(20)[:, None] == 7, np.nan, rows))
    np.save(src / "text_actions.actions.npy", np.array(["left"] * 20))
    np.save(src / "wide_actions.actions.npy", np.zeros((20, 2, 2), np.float32))
    (src / "junk_actions.actions.npy").write_bytes(b"junk")
    out = tmp_path / "out"
    summary = ingest(src, out, IngestOptions(clip_frames=8, size=16), workers=1, progress=False,
                     log=lambda s: None)  # fmt: skip
    reasons = {s["video"]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {f"{n}.mp4" for n in ("nan_actions", "text_actions", "wide_actions",
                            "junk_actions", "one_frame", "truncated", "zero_length", "png")}  # fmt: skip
    assert "NaN" in reasons["nan_actions.mp4"] and "dtype" in reasons["text_actions.mp4"]
    assert "too short" in reasons["one_frame.mp4"]
    m = read_manifest(out)
    assert m["action_space"] == {"type": "continuous", "dim": 2} and m["num_samples"] == 3
    assert {s["video"] for s in m["made_by"]["skipped"]} == set(reasons)
    assert validate_dataset(out, decode=True) == []


def test_shard_videos_with_mixed_action_kinds_stops_before_any_work(tmp_path):
    from lapo.ingest import ingest
    from lapo.ingest_plan import IngestError, IngestOptions
    from tests.test_shard_videos import write_video

    src = tmp_path / "src"
    for name in ("a", "b"):
        write_video(src / f"{name}.mp4", 10, 16, 16, 15)
    np.save(src / "a.actions.npy", np.arange(10) % 3)  # discrete
    np.save(src / "b.actions.npy", np.zeros((10, 2), np.float32))  # continuous
    with pytest.raises(IngestError, match=r"b.actions.npy and a.actions.npy.*mixed action types"):
        ingest(src, tmp_path / "out", IngestOptions(clip_frames=4, size=16), workers=1,
               progress=False, log=lambda s: None)  # fmt: skip
    assert not (tmp_path / "out").exists()
