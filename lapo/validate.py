"""Check a dataset directory against the shard format and its own manifest.

`validate_dataset` reads every shard, not just the manifest, and lists each
problem in one line naming the shard and sample (``python -m data_prep.inspect``,
and the tests of every tool that writes datasets).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lapo.shards import META_KEYS, load_npy, read_manifest
from lapo.tars import iter_tar_samples
from lapo.video import VideoDecodeError, decode_video_bytes


def _check_sample(sample: dict, manifest: dict, where: str) -> list[str]:
    """Problems with one sample against the format and the manifest's frame size / actions."""
    problems = []
    key = sample["__key__"]
    for ext in ("mp4", "json"):
        if ext not in sample:
            problems.append(f"{where}: sample {key} has no {ext}")
    if "json" not in sample:
        return problems
    try:
        meta = json.loads(sample["json"])
    except ValueError as e:
        return problems + [f"{where}: sample {key}: json does not parse: {e}"]
    if not isinstance(meta, dict):
        return problems + [f"{where}: sample {key}: json is a {type(meta).__name__}, not an object"]
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        return problems + [f"{where}: sample {key}: json lacks {missing}"]
    t = meta["num_frames"]
    if not isinstance(t, int):
        return problems + [f"{where}: sample {key}: num_frames {t!r} is not an integer"]
    if t < 1:
        problems.append(f"{where}: sample {key}: num_frames {t} < 1")
    if (meta["height"], meta["width"]) != (manifest["height"], manifest["width"]):
        problems.append(
            f"{where}: sample {key}: frame size {meta['height']}x{meta['width']} differs from the "
            f"manifest's {manifest['height']}x{manifest['width']}"
        )
    space = manifest.get("action_space")
    for ext in ("actions.npy", "rewards.npy", "dones.npy"):
        if ext not in sample:
            continue
        try:
            arr = load_npy(sample[ext])
        except Exception as e:
            problems.append(f"{where}: sample {key}: {ext} does not load: {e}")
            continue
        if len(arr) != t:
            problems.append(
                f"{where}: sample {key}: {ext} has {len(arr)} rows, clip has {t} frames"
            )
        if ext != "actions.npy":
            continue
        if space is None:
            problems.append(
                f"{where}: sample {key} has actions but the manifest's action_space is null"
            )
        elif space["type"] == "discrete" and (
            arr.dtype != np.int64
            or arr.ndim != 1
            or (arr.size and (arr.min() < 0 or arr.max() >= space["n"]))
        ):
            problems.append(
                f"{where}: sample {key}: actions {arr.dtype} {arr.shape} are not int64 (T,) in [0, {space['n']})"
            )
        elif space["type"] == "continuous" and (
            arr.dtype != np.float32 or arr.ndim != 2 or arr.shape[1] != space["dim"]
        ):
            problems.append(
                f"{where}: sample {key}: actions {arr.dtype} {arr.shape} are not float32 (T, {space['dim']})"
            )
    return problems


def validate_dataset(
    path: str | Path,
    *,
    decode: bool = False,
    visit: Callable[[str, dict], None] | None = None,
) -> list[str]:
    """Check a dataset directory against its manifest; return the problems found (empty: valid).

    Reads every shard (not just the manifest): missing or extra shard files,
    leftover ``.tmp`` files, unreadable tars, sample / frame / byte counts, sample
    keys and metadata, per-frame arrays. ``decode=True`` also decodes every clip and
    checks its frame count and size (slow). ``visit(shard_name, sample)`` is called
    for every sample read, so callers can gather statistics in the same pass.
    """
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    problems: list[str] = []
    listed = [s.get("name", "?") for s in manifest["shards"]]
    seen_keys: set[str] = set()
    for entry in manifest["shards"]:
        name = entry.get("name", "?")
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: listed in the manifest but missing")
            continue
        if file.stat().st_size != entry.get("bytes"):
            problems.append(
                f"{name}: {file.stat().st_size} bytes, manifest says {entry.get('bytes')}"
            )
        count = frames = 0
        try:
            for sample in iter_tar_samples(file):
                key = sample["__key__"]
                count += 1
                if key in seen_keys:
                    problems.append(f"{name}: duplicate sample key {key}")
                seen_keys.add(key)
                if "." in key or "/" in key:
                    problems.append(f"{name}: sample key {key!r} holds a dot or slash")
                if visit is not None:
                    visit(name, sample)
                sample_problems = _check_sample(sample, manifest, name)
                problems += sample_problems
                if "json" in sample and not sample_problems:
                    frames += int(json.loads(sample["json"])["num_frames"])
                if decode and "mp4" in sample and not sample_problems:
                    try:
                        clip = decode_video_bytes(sample["mp4"])
                    except VideoDecodeError as e:
                        problems.append(f"{name}: sample {key}: {e}")
                        continue
                    meta = json.loads(sample["json"])
                    want = (meta["num_frames"], meta["height"], meta["width"])
                    if clip.shape[:3] != want:
                        problems.append(
                            f"{name}: sample {key}: decodes to {clip.shape[:3]}, json says {want}"
                        )
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.append(f"{name}: unreadable tar: {e}")
            continue
        if count != entry.get("samples"):
            problems.append(f"{name}: {count} samples, manifest says {entry.get('samples')}")
        if frames != entry.get("frames"):
            problems.append(f"{name}: {frames} frames, manifest says {entry.get('frames')}")
    for key, field in (("num_samples", "samples"), ("num_frames", "frames")):
        total = sum(int(s.get(field, 0)) for s in manifest["shards"])
        if manifest.get(key) != total:
            problems.append(f"manifest: {key} is {manifest.get(key)} but its shards sum to {total}")
    for extra in sorted(set(p.name for p in path.glob("shard-*.tar")) - set(listed)):
        problems.append(f"{extra}: shard file not listed in the manifest")
    for tmp in sorted(path.glob("*.tmp")):
        problems.append(f"{tmp.name}: leftover temporary file (an interrupted write)")
    return problems
