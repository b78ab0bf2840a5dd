"""How `lapo label` labels one shard: read its clips, window every row, run the agent, write.

The rules for rows at clip edges and episode ends are those of `lapo label --help`
(the docstring of `lapo.label`): context before an episode's first frame repeats it
(`lapo.windows.padded_context`); context and the next frame may come from the
neighbouring clips of the same recording in the shard; a row with no next frame in
its episode copies the nearest earlier predicted row with confidence 0.
"""

from __future__ import annotations

import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from lapo.shards import load_npy, npy_bytes, write_shard
from lapo.tars import iter_tar_samples
from lapo.video import VideoDecodeError, decode_video_bytes
from lapo.windows import BadDataWarning, episode_first, padded_context


def _source(meta: dict) -> str:
    return str(meta.get("source", meta.get("episode", "")))


def _overlaps(prev_meta: dict, meta: dict) -> bool:
    """True when clip `meta` carries on the recording of `prev_meta` with no frame missing.

    Clips may overlap (lapo.record shares one frame between neighbours by default),
    so the next clip may start at or before the frame after the previous one ends.
    Episode ends inside the recording are found from dones, not from here.
    """
    if _source(prev_meta) != _source(meta):
        return False
    start, prev_start = int(meta["start"]), int(prev_meta["start"])
    return prev_start < start <= prev_start + int(prev_meta["num_frames"])


def window_index(
    dones: np.ndarray, rows: np.ndarray, k: int, gap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices of the window of each row, and whether the row is a real transition.

    dones (L,) bool over a run of consecutive frames (True at row j: o[j+1] starts a new
    episode); rows (T,) positions to label. The window of row p is o[p-(k-1)g], ..., o[p],
    o[p+g], its context padded at the episode start (`padded_context`). Returns
    index (T, k+1) int64 and valid (T,) bool: o[p+g] exists and is in p's episode.
    """
    n = len(dones)
    first = episode_first(dones)  # (L,) first frame of each frame's episode
    ctx = padded_context(rows, first[rows], k, gap)  # (T, k)
    target = rows + gap  # (T,)
    valid = target < n
    valid[valid] &= first[target[valid]] == first[rows[valid]]
    index = np.concatenate([ctx, np.minimum(target, n - 1)[:, None]], axis=1)  # (T, k+1)
    return index, valid


@torch.no_grad()
def label_windows(agent, windows: torch.Tensor, batch_size: int, device: str) -> dict:
    """agent.label over (N, k+1, 3, H, W) uint8 in batches -> numpy arrays of N rows."""
    acts, confs, lats = [], [], []
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)  # (B, k+1, 3, H, W)
        out = agent.label(batch)
        acts.append(out["action"].cpu())
        confs.append(out["confidence"].float().cpu())
        if out.get("latent") is not None:
            lats.append(out["latent"].float().cpu())
    res = {"action": torch.cat(acts).numpy(), "confidence": torch.cat(confs).numpy()}
    res["latent"] = torch.cat(lats).numpy() if lats else None
    return res


def fill_rows(values: np.ndarray, valid: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Rows (T, ...) from the predicted `values` of the valid rows; others copy the nearest
    earlier valid row (the first valid row before any), zeros when no row is valid."""
    out = np.zeros((len(valid), *template.shape[1:]), template.dtype)
    if not valid.any():
        return out
    pos = np.flatnonzero(valid)
    out[pos] = values
    src = np.maximum.accumulate(np.where(valid, np.arange(len(valid)), -1))  # last valid <= t
    src[src < 0] = pos[0]
    return out[src]


# --------------------------------------------------------------------------- one shard


def _decode(sample: dict) -> torch.Tensor:
    # frames stay at the dataset's size: the models resize (lapo.models.common.prepare_frames)
    frames = decode_video_bytes(sample["mp4"])  # (T, H, W, 3) uint8
    return rearrange(torch.from_numpy(frames), "t h w c -> t c h w")


def _dones(sample: dict | None, t: int) -> np.ndarray:
    if sample is None or "dones.npy" not in sample:
        return np.zeros(t, dtype=bool)
    return load_npy(sample["dones.npy"]).astype(bool)


def _skip(src: str | Path, what: str, why: str) -> None:
    warnings.warn(f"lapo label: skipping {what} of {src}: {why}", BadDataWarning, stacklevel=3)


def _readable(src: str | Path) -> tuple[list[dict], list[dict]]:
    """The samples of shard `src` that can be labelled, and their json; the rest are warned about.

    A clip without mp4 or json, whose json lacks an integer start and num_frames, or
    whose dones.npy does not hold num_frames rows is left out; a tar that breaks off
    keeps the clips before the break. (Clips whose mp4 does not decode are left out
    by `label_shard`.) The manifest's skipped_clips counts them all.
    """
    samples, metas = [], []
    try:
        for sample in iter_tar_samples(src):
            try:
                meta = json.loads(sample["json"])
                n, _ = int(meta["num_frames"]), int(meta["start"])
                if "mp4" not in sample:
                    raise KeyError("mp4")
                if "dones.npy" in sample and load_npy(sample["dones.npy"]).shape != (n,):
                    raise ValueError(f"dones.npy does not hold {n} rows")
            except (KeyError, ValueError, TypeError) as e:
                _skip(src, f"clip {sample['__key__']}", f"{type(e).__name__}: {e}")
                continue
            samples.append(sample)
            metas.append(meta)
    except (tarfile.TarError, EOFError) as e:
        _skip(src, "the rest", f"unreadable tar: {e}")
    return samples, metas


def label_shard(
    agent,
    src: str | Path,
    dst: str | Path,
    *,
    batch_size: int,
    device: str,
    frame_size: tuple[int, int] | None = None,
) -> dict:
    """Label every clip of shard `src` into shard `dst` (atomic); return write_shard's entry.

    Each clip is extended with the (k-1)*g frames before it and the g after it from
    its neighbours in the shard when they continue the same recording. Windows of
    consecutive clips are pooled so that forward passes hold `batch_size` windows
    whatever the clip length; about one batch plus one clip is held at a time.
    """
    k, gap = int(agent.context), int(getattr(agent, "frame_gap", 1))
    samples, metas = _readable(src)  # raw bytes only: a shard of clips fits in memory
    bad: set[int] = set()  # samples whose mp4 does not decode to num_frames frames

    def decoded(j: int) -> torch.Tensor | None:
        if j in bad:
            return None
        try:
            frames = _decode(samples[j])  # (T, 3, H, W)
        except VideoDecodeError as e:
            why = str(e)
        else:
            size = tuple(frames.shape[-2:])  # (H, W)
            if len(frames) == int(metas[j]["num_frames"]) and size == (frame_size or size):
                return frames
            why = f"decodes to {len(frames)} frames of {size}; json says {metas[j]['num_frames']}"
            why += f" frames, the manifest {frame_size}" if frame_size else " frames"
        bad.add(j)
        _skip(src, f"clip {samples[j]['__key__']}", why)
        return None

    out_samples: list[dict] = []
    # (sample index, valid rows (T,), windows of the valid rows) of clips waiting for a batch
    pending: list[tuple[int, np.ndarray, torch.Tensor]] = []

    def flush() -> None:
        counts = [len(w) for _, _, w in pending]
        res = None
        if sum(counts):
            res = label_windows(agent, torch.cat([w for _, _, w in pending]), batch_size, device)
        offset = 0
        for (i, valid, _), n in zip(pending, counts):
            part = {
                key: (None if v is None else v[offset : offset + n])
                for key, v in (res or {}).items()
            }
            offset += n
            out_samples.append(_labelled_sample(samples[i], metas[i], part, valid, agent))
        pending.clear()

    prev = nxt = None  # decoded (frames, dones) of the previous / next clip
    for i, sample in enumerate(samples):
        frames = nxt[0] if nxt is not None else decoded(i)  # (T, 3, H, W)
        nxt = None
        if frames is None:  # left out of the output (warned); its neighbours lose the overlap
            prev = None
            continue
        start, t = int(metas[i]["start"]), len(frames)
        dones = _dones(sample, t)
        parts, part_dones = [frames], [dones]
        lead = 0
        if prev is not None and _overlaps(metas[i - 1], metas[i]):
            cut = start - int(metas[i - 1]["start"])  # prev frames before o[start]
            lo = max(cut - (k - 1) * gap, 0)
            parts.insert(0, prev[0][lo:cut])
            part_dones.insert(0, prev[1][lo:cut])
            lead = cut - lo
        after = None
        if i + 1 < len(samples) and _overlaps(metas[i], metas[i + 1]):
            after = decoded(i + 1)
        if after is not None:
            t_next = int(metas[i + 1]["num_frames"])
            nxt = (after, _dones(samples[i + 1], t_next))
            j = start + t - int(metas[i + 1]["start"])  # o[start + T] in the next clip
            parts.append(nxt[0][j : j + gap])
            part_dones.append(nxt[1][j : j + gap])
        seq = torch.cat(parts)  # (lead + T + after, 3, H, W)
        index, valid = window_index(np.concatenate(part_dones), lead + np.arange(t), k, gap)
        windows = seq[torch.from_numpy(index[valid])]  # (n_valid, k+1, 3, H, W)
        pending.append((i, valid, windows))
        if sum(len(w) for _, _, w in pending) >= batch_size:
            flush()
        prev = (frames, dones)
    flush()
    return write_shard(dst, out_samples)


def _labelled_sample(sample: dict, meta: dict, res: dict, valid: np.ndarray, agent) -> dict:
    t = len(valid)
    space = agent.action_space
    discrete = space["type"] == "discrete"
    template = np.zeros(
        (0,) if discrete else (0, space["dim"]), np.int64 if discrete else np.float32
    )
    actions = fill_rows(res.get("action", template), valid, template)
    confidence = fill_rows(
        res.get("confidence", np.zeros(0, np.float32)), valid, np.zeros(0, np.float32)
    )
    confidence[~valid] = 0.0  # filled, not predicted
    latents = None
    if res.get("latent") is not None:
        latents = fill_rows(res["latent"], valid, res["latent"][:0])
    dones = _dones(sample, t)
    if valid[-1]:
        last_row = "predicted"
    elif dones[-1]:
        last_row = "filled_episode_end"
    else:
        last_row = "filled_clip_end"
    out = {"__key__": sample["__key__"], "mp4": sample["mp4"]}  # bytes as they were
    meta = dict(meta)
    meta["label"] = {
        "method": agent.method,
        "last_row": last_row,
        "filled_rows": int((~valid).sum()),
    }
    out["json"] = json.dumps(meta, sort_keys=True).encode()
    out["actions.npy"] = npy_bytes(actions)
    out["confidence.npy"] = npy_bytes(confidence)
    if latents is not None:
        out["latents.npy"] = npy_bytes(latents.astype(np.float32))
    if "actions.npy" in sample:
        out["true_actions.npy"] = sample["actions.npy"]
    for ext in ("rewards.npy", "dones.npy"):
        if ext in sample:
            out[ext] = sample[ext]
    return out
