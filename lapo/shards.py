"""The dataset format on disk: webdataset shards of clips plus manifest.json.

A sample is one clip: ``mp4`` (H.264, every frame), ``json`` (where it came
from), and optionally ``actions.npy`` / ``rewards.npy`` / ``dones.npy`` with one
row per frame. Row t of each is about the transition o[t] -> o[t+1]: the
action taken after frame t, the reward it earned, and whether the episode
ended after it. Keys are ``<source-stem>__c<5-digit clip index>``.

Everything here writes atomically (`lapo.io.atomic_write`: a temporary file, then
``os.replace``), so a shard or manifest that exists under its final name is complete.
Reading shards back is `lapo.tars`; checking a dataset against this format, `lapo.validate`.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lapo.io import atomic_write, atomic_write_json, remove_stale_temporaries
from lapo.video import encode_video

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
META_KEYS = ("source", "episode", "start", "num_frames", "fps", "height", "width")
TAR_MTIME = 1_700_000_000  # fixed member mtime: the same samples give byte-identical shards
MIN_CLIP_FRAMES = 2  # one transition; a shorter tail clip carries nothing to learn from

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class ManifestError(ValueError):
    """manifest.json is unreadable or malformed. The message names the file."""


def shard_name(i: int) -> str:
    """Name of shard number i: ``shard-000042.tar``."""
    return f"shard-{i:06d}.tar"


def sanitize_stem(name: str) -> str:
    """Make a key-safe stem: only letters, digits, ``_`` and ``-``; never ``__`` (the key separator)."""
    stem = _UNSAFE.sub("_", name)
    stem = re.sub(r"_{2,}", "_", stem).strip("_")
    return stem or "video"


def clip_key(stem: str, clip_index: int) -> str:
    """``<stem>__c00007``: the webdataset key of clip 7 of a source."""
    if not 0 <= clip_index <= 99_999:
        raise ValueError(f"clip index {clip_index} of {stem!r} does not fit in 5 digits")
    return f"{sanitize_stem(stem)}__c{clip_index:05d}"


def clip_spans(
    num_frames: int, clip_frames: int, min_frames: int = MIN_CLIP_FRAMES
) -> list[tuple[int, int]]:
    """Cut ``num_frames`` consecutive frames into [start, end) clips of ``clip_frames``.

    Clips do not overlap. The short remainder at the end is kept as a last clip
    when it holds at least ``min_frames`` frames, otherwise dropped.
    """
    if clip_frames < 1:
        raise ValueError(f"clip_frames must be >= 1, got {clip_frames}")
    spans = []
    for start in range(0, max(num_frames, 0), clip_frames):
        end = min(start + clip_frames, num_frames)
        if end - start == clip_frames or end - start >= min_frames:
            spans.append((start, end))
    return spans


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def normalize_actions(actions: np.ndarray) -> np.ndarray:
    """Discrete -> int64 (T,); continuous -> float32 (T, D). A (T,) float array is D = 1."""
    actions = np.asarray(actions)
    if actions.dtype.kind in "biu":
        if actions.ndim == 2 and actions.shape[1] == 1:
            actions = actions[:, 0]
        if actions.ndim != 1:
            raise ValueError(f"discrete actions must have shape (T,), got {actions.shape}")
        if actions.size and actions.min() < 0:
            raise ValueError(f"discrete actions must be >= 0, got minimum {actions.min()}")
        return actions.astype(np.int64)
    if actions.dtype.kind == "f":
        if actions.ndim == 1:
            actions = actions[:, None]
        if actions.ndim != 2:
            raise ValueError(f"continuous actions must have shape (T, D), got {actions.shape}")
        if not np.isfinite(actions).all():
            raise ValueError("continuous actions hold NaN or inf (the loader would skip the clip)")
        return actions.astype(np.float32)
    raise ValueError(f"actions must be integer or float, got dtype {actions.dtype}")


def action_space_of(actions: np.ndarray | None) -> dict | None:
    """The manifest's action space implied by one (normalised) actions array."""
    if actions is None:
        return None
    if actions.dtype == np.int64:
        return {"type": "discrete", "n": int(actions.max()) + 1 if actions.size else 0}
    return {"type": "continuous", "dim": int(actions.shape[1])}


def merge_action_spaces(a: dict | None, b: dict | None) -> dict | None:
    """Union of two action spaces (discrete n is the max); raises if they disagree."""
    if a is None or b is None:
        return a or b
    if a["type"] != b["type"]:
        raise ValueError(f"mixed action types: {a} and {b}")
    if a["type"] == "discrete":
        return {"type": "discrete", "n": max(a["n"], b["n"])}
    if a["dim"] != b["dim"]:
        raise ValueError(f"continuous actions of different sizes: {a['dim']} and {b['dim']}")
    return dict(a)


def clip_sample(
    key: str,
    frames: np.ndarray,
    *,
    fps: float,
    source: str,
    episode: str,
    start: int,
    actions: np.ndarray | None = None,
    rewards: np.ndarray | None = None,
    dones: np.ndarray | None = None,
    extra: dict | None = None,
    gop: int = 16,
    crf: int = 20,
) -> dict:
    """One webdataset sample (all values bytes) for a clip of uint8 frames (T, H, W, 3)."""
    if not key or any(c in key for c in "./\\"):
        raise ValueError(f"sample key {key!r} must be non-empty without dots or slashes")
    frames = np.asarray(frames)
    t, h, w = frames.shape[:3]
    sample = {"__key__": key, "mp4": encode_video(frames, fps, gop=gop, crf=crf)}
    meta = {
        "source": str(source),
        "episode": str(episode),
        "start": int(start),
        "num_frames": int(t),
        "fps": float(fps),
        "height": int(h),
        "width": int(w),
    }
    clash = set(extra or {}) & set(meta)
    if clash:
        raise ValueError(f"{key}: extra metadata may not replace {sorted(clash)}")
    meta.update(extra or {})
    sample["json"] = json.dumps(meta, sort_keys=True).encode()
    rows = {
        "actions.npy": None if actions is None else normalize_actions(actions),
        "rewards.npy": None if rewards is None else np.asarray(rewards, dtype=np.float32),
        "dones.npy": None if dones is None else np.asarray(dones, dtype=bool),
    }
    for name, arr in rows.items():
        if arr is None:
            continue
        if len(arr) != t:
            raise ValueError(f"{key}: {name} has {len(arr)} rows but the clip has {t} frames")
        if name != "actions.npy" and arr.ndim != 1:
            raise ValueError(f"{key}: {name} must have shape (T,), got {arr.shape}")
        sample[name] = npy_bytes(arr)
    return sample


def _num_frames(sample: dict) -> int:
    meta = sample.get("json")
    if isinstance(meta, (bytes, bytearray, str)):
        meta = json.loads(meta)
    if not isinstance(meta, dict) or "num_frames" not in meta:
        raise ValueError(f"sample {sample.get('__key__')!r} has no json with num_frames")
    return int(meta["num_frames"])


def write_shard(path: str | Path, samples: Iterable[dict]) -> dict:
    """Write samples to a tar shard atomically; return ``{"name", "samples", "frames", "bytes"}``.

    One process writes a shard: what an earlier, killed writer of it left is removed first.
    """
    import webdataset as wds  # lazy: it imports torch, which video workers never need

    path = Path(path)
    counts = {"samples": 0, "frames": 0}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f, wds.TarWriter(f, mtime=TAR_MTIME) as writer:
            for sample in samples:
                counts["frames"] += _num_frames(sample)
                writer.write(sample)
                counts["samples"] += 1

    remove_stale_temporaries(path.parent, path.name)
    atomic_write(path, write)
    return {"name": path.name, **counts, "bytes": path.stat().st_size}


def write_manifest(
    out_dir: str | Path,
    shards: list[dict],
    *,
    height: int,
    width: int,
    fps: float,
    action_space: dict | None,
    made_by: dict,
) -> dict:
    """Write ``manifest.json`` (atomically) describing the shards; return it."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "shards": [{k: s[k] for k in ("name", "samples", "frames", "bytes")} for s in shards],
        "num_samples": sum(int(s["samples"]) for s in shards),
        "num_frames": sum(int(s["frames"]) for s in shards),
        "height": int(height),
        "width": int(width),
        "fps": float(fps),
        "action_space": action_space,
        "made_by": made_by,
    }
    out_dir = Path(out_dir)
    remove_stale_temporaries(out_dir, MANIFEST)
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def read_manifest(path: str | Path) -> dict:
    """Read ``manifest.json`` from a dataset directory (or the file itself)."""
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no manifest.json (is {path} a lapo dataset directory?)")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{file}: not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise ManifestError(f"{file}: top level is a {type(manifest).__name__}, not an object")
    missing = [
        k for k in ("format_version", "shards", "height", "width", "fps") if k not in manifest
    ]
    if missing:
        raise ManifestError(f"{file}: missing keys {missing}")
    if not isinstance(manifest["shards"], list) or not all(
        isinstance(s, dict)
        and isinstance(s.get("name"), str)
        and all(isinstance(s.get(k), int) and s[k] >= 0 for k in ("samples", "frames"))
        for s in manifest["shards"]
    ):
        raise ManifestError(f"{file}: shards must be a list of {{name, samples, frames, bytes}}")
    space = manifest.get("action_space")
    kind = space.get("type") if isinstance(space, dict) else None
    size_key = {"discrete": "n", "continuous": "dim"}.get(kind)
    size = space.get(size_key) if size_key else None
    if space is not None and not (type(size) is int and size >= 1):
        raise ManifestError(
            f"{file}: action_space {space!r} is not null, "
            '{"type": "discrete", "n": N} or {"type": "continuous", "dim": D}'
        )
    if not all(type(manifest[k]) is int for k in ("format_version", "height", "width")):
        raise ManifestError(f"{file}: format_version, height and width must be integers")
    if manifest["format_version"] > FORMAT_VERSION:
        raise ManifestError(
            f"{file}: format_version {manifest['format_version']} is newer than this lapo "
            f"understands ({FORMAT_VERSION})"
        )
    return manifest


def recorded_env_kwargs(dataset: str | Path) -> dict:
    """How `lapo.record` rendered `dataset` (e.g. BabyAI's view), so rollouts can match it.

    Empty for a dataset another tool made, or whose manifest cannot be read.
    """
    try:
        made_by = read_manifest(dataset).get("made_by") or {}
    except (OSError, ValueError):
        return {}
    kwargs = made_by.get("env_kwargs") if made_by.get("tool") == "lapo.record" else None
    return dict(kwargs) if isinstance(kwargs, dict) else {}
