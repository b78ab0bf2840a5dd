"""Tiny real datasets for tests: shards of H.264 clips whose frames say what they are.

Each frame (uint8, size x size) carries three readable parts:

- top quarter: its index t within the clip, in binary: 8 cells, black or white
  (``frame_time``), which survive H.264 where gray levels do not;
- second quarter: its episode modulo 256, the same way (``frame_episode``);
- bottom half: a white square that the action moves (0 stay, 1 up, 2 down, 3 left,
  4 right, wrapping around), so o[t+1] shows what actions[t] did.

Every shard is one recording: consecutive clips cut from a stream in which
episodes follow each other (auto-reset, as Procgen records), so clips hold
episode ends mid-clip and ``dones[t]`` is True where o[t+1] starts a new episode.
With ``sources_per_shard`` > 1 the recording is cut into that many source videos
(key stems ``rec000-v0``, ``rec000-v1``, ...), as one shard of many videos is.

Usable from any test (``from tests.datagen import make_dataset``) and from
``benchmarks/loader.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lapo.shards import clip_key, clip_sample, shard_name, write_manifest, write_shard

NUM_ACTIONS = 5
_MOVES = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]])  # (dy, dx) per discrete action


@dataclass
class TinyDataset:
    path: Path
    action_space: dict | None
    size: int
    clips: dict[str, dict] = field(default_factory=dict)
    """key -> {"shard", "source", "num_frames", "actions" (or None), "dones", "episodes"} as written."""

    @property
    def num_clips(self) -> int:
        return len(self.clips)


def _hwc(frame: np.ndarray) -> np.ndarray:
    f = np.asarray(frame)
    return f if f.shape[-1] == 3 else np.moveaxis(f, 0, -1)  # (H, W, 3)


def _read_bits(stripe: np.ndarray) -> int:
    """8 cells across a stripe (rows, W, 3), most significant first, white = 1."""
    cell = stripe.shape[1] // 8
    pad = 1 if cell >= 4 else 0
    value = 0
    for i in range(8):
        c = stripe[pad : stripe.shape[0] - pad, i * cell + pad : (i + 1) * cell - pad]
        value = 2 * value + int(c.astype(np.float64).mean() > 127)
    return value


def _write_bits(stripe: np.ndarray, value: int) -> None:
    cell = stripe.shape[1] // 8
    for i in range(8):
        stripe[:, i * cell : (i + 1) * cell] = 255 * ((value >> (7 - i)) & 1)


def frame_time(frame: np.ndarray) -> int:
    """Index within its clip encoded in a frame, (3, H, W) or (H, W, 3)."""
    f = _hwc(frame)
    return _read_bits(f[: f.shape[0] // 4])


def frame_episode(frame: np.ndarray) -> int:
    """Episode id modulo 256 encoded in a frame, (3, H, W) or (H, W, 3)."""
    f = _hwc(frame)
    q = f.shape[0] // 4
    return _read_bits(f[q : 2 * q])


def _render(size: int, t: int, episode: int, pos: np.ndarray) -> np.ndarray:
    q, side = size // 4, max(size // 8, 2)
    img = np.zeros((size, size, 3), dtype=np.uint8)
    _write_bits(img[:q], t)
    _write_bits(img[q : 2 * q], episode % 256)
    y, x = 2 * q + int(pos[0]), int(pos[1])
    img[y : y + side, x : x + side] = 255
    return img


def _stream(
    num_frames: int, size: int, episode_len: tuple[int, int], first_episode: int, rng, kind
):
    """One recording: frames (T, H, W, 3) for layout only (time stripe filled per clip), actions, dones, episodes."""
    arena = np.array([size // 2 - max(size // 8, 2), size - max(size // 8, 2)])
    step = max(size // 16, 1)
    episodes = np.zeros(num_frames, dtype=np.int64)
    dones = np.zeros(num_frames, dtype=bool)
    positions = np.zeros((num_frames, 2), dtype=np.int64)
    if kind == "continuous":
        actions = rng.uniform(-1, 1, size=(num_frames, 2)).astype(np.float32)
        moves = np.rint(actions * step).astype(np.int64)
    else:
        actions = rng.integers(0, NUM_ACTIONS, size=num_frames).astype(np.int64)
        moves = _MOVES[actions] * step
    episode, left, pos = first_episode, int(rng.integers(*episode_len, endpoint=True)), arena // 2
    for t in range(num_frames):
        episodes[t], positions[t] = episode, pos
        left -= 1
        if left == 0:  # the step after frame t resets the environment
            dones[t] = True
            episode, left, pos = (
                episode + 1,
                int(rng.integers(*episode_len, endpoint=True)),
                arena // 2,
            )
        else:
            pos = (pos + moves[t]) % arena
    return actions, dones, episodes, positions


def make_dataset(
    out: str | Path,
    *,
    shards: int = 4,
    clips_per_shard: int = 3,
    clip_frames: int = 16,
    size: int = 32,
    episode_len: tuple[int, int] = (6, 12),
    actions: str | None = "discrete",
    seed: int = 0,
    fps: float = 10.0,
    mutate: Callable[[dict], dict | None] | None = None,
    sources_per_shard: int = 1,
) -> TinyDataset:
    """Write ``shards`` shards of ``clips_per_shard`` clips into ``out`` plus manifest.json.

    ``actions``: "discrete" (int64, 5 actions), "continuous" (float32 (T, 2)),
    "mixed" (discrete, but every second clip has no actions.npy) or None.
    ``mutate(sample)`` may change a sample before it is written (e.g. spoil its
    mp4) and returns it, or None to drop it. Clips hold at most 256 frames (the
    time code's range).
    """
    if clip_frames > 256 or size % 8 or size < 16:
        raise ValueError("clip_frames <= 256 and size a multiple of 8, >= 16")
    per_source = -(-clips_per_shard // sources_per_shard)  # clips of each source video
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    kind = "discrete" if actions == "mixed" else actions
    space = {
        "continuous": {"type": "continuous", "dim": 2},
        "discrete": {"type": "discrete", "n": NUM_ACTIONS},
    }
    ds = TinyDataset(path=out, action_space=space.get(kind), size=size)
    first_episode, entries = 0, []
    for s in range(shards):
        n = clips_per_shard * clip_frames
        acts, dones, episodes, positions = _stream(n, size, episode_len, first_episode, rng, kind)
        first_episode = int(episodes[-1]) + 1
        samples = []
        for c in range(clips_per_shard):
            lo, hi = c * clip_frames, (c + 1) * clip_frames
            source, index = f"rec{s:03d}", c
            if sources_per_shard > 1:
                source, index = f"{source}-v{c // per_source}", c % per_source
            key = clip_key(source, index)
            frames = np.stack(
                [_render(size, t - lo, episodes[t], positions[t]) for t in range(lo, hi)]
            )
            with_actions = kind is not None and not (actions == "mixed" and c % 2 == 1)
            sample = clip_sample(
                key,
                frames,
                fps=fps,
                source=source,
                episode=str(episodes[lo]),
                start=index * clip_frames,
                actions=acts[lo:hi] if with_actions else None,
                dones=dones[lo:hi],
            )
            if mutate is not None:
                sample = mutate(sample)
                if sample is None:
                    continue
            samples.append(sample)
            ds.clips[key] = {
                "shard": s,
                "source": source,
                "num_frames": clip_frames,
                "actions": acts[lo:hi] if with_actions else None,
                "dones": dones[lo:hi],
                "episodes": episodes[lo:hi],
            }
        entries.append(write_shard(out / shard_name(s), samples))
    write_manifest(
        out,
        entries,
        height=size,
        width=size,
        fps=fps,
        action_space=ds.action_space,
        made_by={"tool": "tests.datagen", "seed": seed, "clip_frames": clip_frames},
    )
    return ds


# --------------------------------------------------------------------------- comparing shards
#
# x264 is run single-threaded, yet two encodes of the same frames have (rarely, in CI and
# once here) come out with different bytes. So "the same dataset" means: the same clips,
# every non-video member byte for byte, and videos that decode to the same frames (within
# codec noise). What a kill can break (a torn tar, a missing or duplicated clip, wrong
# actions) still fails these checks.

# mean |a - b| per pixel allowed between two clips of the same frames: the bound the record
# tests allow between raw and decoded frames. A resumed shard_videos run once gave a clip
# 2.9 off the uninterrupted run's (cause not found: encoder or decoder seeking); frames,
# actions and metadata that are wrong are caught by the exact checks of the other members.
VIDEO_TOL = 8.0


def assert_same_sample(a: dict, b: dict, where: str = "") -> None:
    from lapo.video import decode_video_bytes

    assert set(a) == set(b), (where, sorted(a), sorted(b))
    for member in a:
        if member == "mp4":
            fa, fb = decode_video_bytes(a[member]), decode_video_bytes(b[member])
            assert fa.shape == fb.shape, (where, fa.shape, fb.shape)
            err = np.abs(fa.astype(np.int16) - fb.astype(np.int16)).mean()
            assert err < VIDEO_TOL, (where, err)
        else:
            assert a[member] == b[member], (where, member)


def assert_same_shard(a: Path, b: Path) -> None:
    """Two shard files hold the same clips in the same order (videos by decoded frames)."""
    from lapo.tars import iter_tar_samples

    sa, sb = list(iter_tar_samples(a)), list(iter_tar_samples(b))
    assert [s["__key__"] for s in sa] == [s["__key__"] for s in sb], (a, b)
    for x, y in zip(sa, sb):
        assert_same_sample(x, y, f"{a.name}:{x['__key__']}")


def assert_same_manifest(a: Path, b: Path) -> None:
    """Manifests equal but for each shard's byte size (the video bytes may differ)."""
    import json

    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        for s in m["shards"]:
            s.pop("bytes", None)
    assert ma == mb
