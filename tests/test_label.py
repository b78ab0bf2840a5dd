"""`lapo label`: pseudo-labelled shards on real BabyAI recordings and tests.datagen streams.

The agent is a real, untrained stage-3 run written with lapo.runs.save_agent (a
LatentActionModel + ActionDecoder + LatentPolicy at debug size), so these tests
need neither Lightning nor Accelerate. Expected labels are recomputed here by
calling agent.label on windows cut independently from the decoded clips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.inspect import inspect_dataset
from lapo.agent import Agent
from lapo.config import DataConfig, ModelConfig, PolicyModelConfig, to_dict
from lapo.data import make_loader
from lapo.label import label_dataset
from lapo.label_shard import window_index
from lapo.labelled import scan_labelled
from lapo.models import ActionDecoder, LatentActionModel, LatentPolicy
from lapo.record import record_dataset
from lapo.runs import load_agent, save_agent
from lapo.shards import load_npy, read_manifest
from lapo.tars import iter_tar_samples
from lapo.validate import validate_dataset
from lapo.video import decode_video_bytes
from tests.datagen import make_dataset

ROOT = Path(__file__).resolve().parents[1]
SPEC = "babyai:BabyAI-GoToLocal-v0"


def write_agent(
    run: Path, action_space: dict, *, context: int = 2, seed: int = 0, bottleneck: str = "vq"
) -> Path:
    """An untrained lapo agent (LAM + decoder + policy) at debug size, saved as RUN_F.

    Untrained, a VQ latent and the decoder's argmax hardly depend on the input; the
    continuous bottleneck's latent does, so tests of which frames a window holds use it.
    """
    torch.manual_seed(seed)
    mcfg = ModelConfig(image_size=32, impala_scale=1, embed_dim=32, latent_dim=16,
                       vq_codebook_size=8, vq_heads=2, fdm_channels=8, bottleneck=bottleneck)  # fmt: skip
    kwargs = {"in_channels": 3, "num_actions": 0, "action_dim": 0, "context": context}
    lam = LatentActionModel(mcfg, **kwargs, sync_codebook=False)
    discrete = action_space["type"] == "discrete"
    decoder = ActionDecoder(
        16,
        num_actions=action_space["n"] if discrete else 0,
        action_dim=0 if discrete else action_space["dim"],
        hidden=32,
    )
    pcfg = PolicyModelConfig(impala_scale=1, hidden=16)
    policy = LatentPolicy(pcfg, context=context, image_size=32, latent_dim=16)
    agent = Agent(method="lapo", action_space=action_space, context=context, lam=lam,
                  decoder=decoder, policy=policy)  # fmt: skip
    save_agent(agent, run, lam_config=to_dict(mcfg), lam_kwargs=kwargs, policy_config=to_dict(pcfg))
    return run


@pytest.fixture(scope="module")
def babyai(tmp_path_factory) -> Path:
    """Six short random BabyAI episodes at 32 px: clips of 8 frames sharing one frame, 3 shards."""
    out = tmp_path_factory.mktemp("babyai")
    record_dataset(SPEC, out, episodes=6, policy="random", size=32, clip_frames=8,
                   episodes_per_shard=2, max_episode_steps=14, progress=False, verbose=False)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, babyai) -> Path:
    space = read_manifest(babyai)["action_space"]
    return write_agent(tmp_path_factory.mktemp("run_f"), space, bottleneck="continuous")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, babyai, run) -> Path:
    out = tmp_path_factory.mktemp("labelled") / "ds"
    label_dataset(run, babyai, out, batch_size=5, device="cpu", progress=False)
    return out


def samples_of(path: Path) -> dict[str, dict]:
    return {
        s["__key__"]: s
        for shard in sorted(path.glob("shard-*.tar"))
        for s in iter_tar_samples(shard)
    }


def frames_of(sample: dict) -> torch.Tensor:
    return torch.from_numpy(decode_video_bytes(sample["mp4"])).permute(0, 3, 1, 2)  # (T, 3, H, W)


def test_output_is_a_valid_dataset_with_the_same_clips(babyai, labelled, run):
    assert validate_dataset(labelled, decode=True) == []
    report = inspect_dataset(labelled, decode=True)  # what `python -m data_prep.inspect` checks
    assert report["problems"] == []
    assert report["labelled_fraction"] == 1.0
    src, out = samples_of(babyai), samples_of(labelled)
    assert list(src) == list(out)  # same keys, same order
    manifest, src_manifest = read_manifest(labelled), read_manifest(babyai)
    assert [s["name"] for s in manifest["shards"]] == [s["name"] for s in src_manifest["shards"]]
    assert manifest["num_frames"] == src_manifest["num_frames"]
    assert manifest["made_by"]["command"] == "lapo label"
    assert manifest["made_by"]["model"] == str(run.resolve())
    assert manifest["action_space"] == src_manifest["action_space"]
    for key, s in out.items():
        t = json.loads(s["json"])["num_frames"]
        assert s["mp4"] == src[key]["mp4"]  # copied, not re-encoded
        assert np.array_equal(load_npy(s["true_actions.npy"]), load_npy(src[key]["actions.npy"]))
        for ext in ("rewards.npy", "dones.npy"):
            assert s[ext] == src[key][ext]
        actions, conf = load_npy(s["actions.npy"]), load_npy(s["confidence.npy"])
        assert actions.dtype == np.int64 and actions.shape == (t,)
        assert conf.dtype == np.float32 and conf.shape == (t,)
        assert ((conf >= 0) & (conf <= 1)).all()
        assert load_npy(s["latents.npy"]).shape == (t, 16)


def test_labels_are_the_agents_on_independently_cut_windows(babyai, labelled, run):
    """Row t == agent.label([o[t-1], o[t], o[t+1]]) with o[-1] := o[0] at an episode start;
    the last row of a clip followed by its episode's next clip uses that clip's frame."""
    agent = load_agent(run)
    src, out = samples_of(babyai), samples_of(labelled)
    keys = list(src)
    checked_cross = 0
    for i, key in enumerate(keys):
        meta = json.loads(src[key]["json"])
        frames = frames_of(src[key])  # (T, 3, H, W)
        dones = load_npy(src[key]["dones.npy"])
        t_len = len(frames)
        nxt = None
        if i + 1 < len(keys):
            m2 = json.loads(src[keys[i + 1]]["json"])
            if m2["episode"] == meta["episode"]:
                nxt = frames_of(src[keys[i + 1]])[meta["start"] + t_len - m2["start"]]
        before0 = frames[0]  # the frame before o[0]: repeated at an episode start
        if i:
            m0 = json.loads(src[keys[i - 1]]["json"])
            if m0["episode"] == meta["episode"]:
                before0 = frames_of(src[keys[i - 1]])[meta["start"] - m0["start"] - 1]
        windows, rows = [], []
        for t in range(t_len):
            if dones[t]:
                continue
            after = frames[t + 1] if t + 1 < t_len else nxt
            if after is None:
                continue
            before = frames[t - 1] if t >= 1 else before0
            windows.append(torch.stack([before, frames[t], after]))
            rows.append(t)
            checked_cross += t + 1 == t_len
        want = agent.label(torch.stack(windows))
        got = load_npy(out[key]["actions.npy"])
        assert np.array_equal(got[rows], want["action"].numpy()), key
        assert np.allclose(
            load_npy(out[key]["latents.npy"])[rows], want["latent"].numpy(), atol=1e-5
        )
        conf = load_npy(out[key]["confidence.npy"])
        assert np.allclose(conf[rows], want["confidence"].numpy(), atol=1e-6)
        filled = sorted(set(range(t_len)) - set(rows))
        assert (conf[filled] == 0).all()  # filled rows are marked
        last = json.loads(out[key]["json"])["label"]["last_row"]
        assert last == ("predicted" if t_len - 1 in rows else "filled_episode_end")
    assert checked_cross > 0  # some clip ends were labelled from the next clip


def test_windows_never_cross_an_episode_end(tmp_path):
    """tests.datagen streams reset mid-clip; the context of every labelled row stays in its episode."""
    ds = make_dataset(tmp_path / "dg", shards=2, clips_per_shard=3, clip_frames=10, size=32)
    run = write_agent(tmp_path / "run", ds.action_space, context=3, seed=1, bottleneck="continuous")
    out = tmp_path / "out"
    label_dataset(run, ds.path, out, batch_size=7, device="cpu", progress=False)
    agent = load_agent(run)
    src = samples_of(ds.path)
    for key, s in samples_of(out).items():
        clip = ds.clips[key]
        shard_keys = [k for k in src if ds.clips[k]["shard"] == clip["shard"]]
        # the shard's recording as one stream: frames and episodes of every clip, in order
        stream = torch.cat([frames_of(src[k]) for k in shard_keys])
        episodes = np.concatenate([ds.clips[k]["episodes"] for k in shard_keys])
        offset = shard_keys.index(key) * 10
        rows, windows = [], []
        for t in range(10):
            p = offset + t
            if p + 1 >= len(stream) or episodes[p + 1] != episodes[p]:
                continue
            first = int(np.flatnonzero(episodes == episodes[p])[0])
            idx = [max(p - 2, first), max(p - 1, first), p, p + 1]
            windows.append(stream[idx])
            rows.append(t)
        want = agent.label(torch.stack(windows))
        # an untrained decoder's argmax barely moves: the (continuous) latents show any wrong frame
        assert np.array_equal(load_npy(s["actions.npy"])[rows], want["action"].numpy()), key
        assert np.allclose(load_npy(s["latents.npy"])[rows], want["latent"].numpy(), atol=1e-5)
        conf = load_npy(s["confidence.npy"])
        assert (conf[sorted(set(range(10)) - set(rows))] == 0).all()


def test_unlabelled_video_gets_the_runs_action_space(tmp_path):
    ds = make_dataset(tmp_path / "dg", shards=1, clips_per_shard=2, size=16, actions=None)
    run = write_agent(tmp_path / "run", {"type": "discrete", "n": 5})
    out = tmp_path / "out"
    manifest = label_dataset(run, ds.path, out, device="cpu", progress=False)
    assert read_manifest(ds.path)["action_space"] is None
    assert manifest["action_space"] == {"type": "discrete", "n": 5}
    assert validate_dataset(out, decode=True) == []
    for s in samples_of(out).values():
        assert "true_actions.npy" not in s and load_npy(s["actions.npy"]).max() < 5


def test_window_index_rules():
    dones = np.array([0, 0, 1, 0, 0], dtype=bool)  # o[3] starts episode 2
    index, valid = window_index(dones, np.arange(5), 3, 1)
    assert valid.tolist() == [True, True, False, True, False]
    assert index[0].tolist() == [0, 0, 0, 1]  # context repeats the first frame
    assert index[3].tolist() == [3, 3, 3, 4]  # ... of its own episode
    assert index[1].tolist() == [0, 0, 1, 2]


def test_loader_reads_the_labelled_dataset(labelled):
    cfg = DataConfig(path=str(labelled), context=2, batch_size=4, num_workers=0, val_batches=0)
    batches = list(make_loader(str(labelled), cfg, train=False))
    assert batches
    b = batches[0]
    assert b["frames"].dtype == torch.uint8 and b["frames"].shape[1:] == (3, 3, 32, 32)
    assert b["has_action"].all() and b["actions"].dtype == torch.int64
    # ... and so does stage 3's labelled-set scan (lapo finetune --labeled)
    index = scan_labelled(labelled, context=2)
    assert (
        index.num_transitions > 0 and index.action_space == read_manifest(labelled)["action_space"]
    )


def test_resume_skips_finished_shards_and_redoes_missing_ones(babyai, run, labelled, tmp_path):
    out = tmp_path / "ds"
    label_dataset(run, babyai, out, batch_size=5, device="cpu", progress=False)
    first = {p.name: p.read_bytes() for p in labelled.glob("shard-*.tar")}
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == first  # deterministic
    mtime = (out / "shard-000000.tar").stat().st_mtime_ns
    (out / "shard-000001.tar").unlink()
    (out / "manifest.json").unlink()
    label_dataset(run, babyai, out, batch_size=5, device="cpu", progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == first
    assert (out / "shard-000000.tar").stat().st_mtime_ns == mtime  # skipped, not rewritten
    assert validate_dataset(out) == [] and read_manifest(out) == read_manifest(labelled)


def test_batch_size_changes_nothing_but_float_rounding(babyai, run, labelled, tmp_path):
    out = tmp_path / "ds"
    label_dataset(run, babyai, out, batch_size=64, device="cpu", progress=False)
    a, b = samples_of(labelled), samples_of(out)
    for key in a:
        assert np.array_equal(load_npy(a[key]["actions.npy"]), load_npy(b[key]["actions.npy"]))
        for ext in ("latents.npy", "confidence.npy"):
            assert np.allclose(load_npy(a[key][ext]), load_npy(b[key][ext]), atol=1e-5)


def test_ranks_split_shards_and_rank_zero_merges(babyai, run, labelled, tmp_path):
    out = tmp_path / "ds"
    assert (
        label_dataset(
            run, babyai, out, rank=1, world_size=2, batch_size=5, device="cpu", progress=False
        )
        is None
    )
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000001.tar"]
    manifest = label_dataset(run, babyai, out, rank=0, world_size=2, batch_size=5, device="cpu",
                             merge_timeout=5, progress=False)  # fmt: skip
    assert manifest == read_manifest(out)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == {
        p.name: p.read_bytes() for p in labelled.glob("*.tar")
    }


def test_merge_reports_missing_shards(babyai, run, tmp_path):
    out = tmp_path / "ds"
    label_dataset(run, babyai, out, rank=1, world_size=3, device="cpu", progress=False)
    with pytest.raises(FileNotFoundError, match="lacks 2 of 3"):
        label_dataset(run, babyai, out, merge_only=True, device="cpu", progress=False)


@pytest.mark.slow  # three processes each import torch and Lightning: ~20-80 s on 2 shared cores
def test_cli_with_two_workers_matches_in_process(babyai, run, labelled, tmp_path):
    out = tmp_path / "ds"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "lapo.cli", "label", "--model", str(run), "--data", str(babyai),
         "--out", str(out), "--workers", "2", "--batch-size", "5", "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "labelled 12 clips" in res.stdout
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == {
        p.name: p.read_bytes() for p in labelled.glob("*.tar")
    }


def test_refuses_to_overwrite_its_input(babyai, run):
    with pytest.raises(ValueError, match="must differ"):
        label_dataset(run, babyai, babyai, device="cpu", progress=False)


def test_a_run_that_cannot_label_fails_before_out_is_created(tmp_path):
    from lapo.agent import AgentError

    data = make_dataset(tmp_path / "data", shards=1, clips_per_shard=1, clip_frames=8).path
    out = tmp_path / "labelled"
    with pytest.raises(AgentError, match="not a finished lapo finetune run"):
        label_dataset(tmp_path / "no-such-run", data, out, device="cpu", progress=False)
    assert not out.exists(), "a failed command left files behind"
