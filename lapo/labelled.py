"""Labelled transitions for stage 3: a deterministic budget of N, and a held-out split.

Selection (`select_budget`), all of it a pure function of the dataset's episode
ids, clip keys and the seed (never of file order):

1. Held out first: every episode with a labelled transition gets a rank from a
   seeded hash of its id; the first ``val_fraction`` of them are the held-out
   split and are never used for training, whatever the budget.
2. Whole training episodes in a seeded order, until the next one would exceed N.
3. Then whole clips of the episodes not yet taken (seeded order) until the next
   would exceed N, and a seeded subset of that clip's transitions to make
   exactly N.

A transition is row t (the action after o[t], leading to o[t+g], g =
frame_gap), found on the frame axis of its recording (`lapo.timeline`): a row
with dones ends its episode and is never a transition, and a window at an
episode start repeats its first frame, as in `lapo label` and rollouts.

Loading (`load_windows`) decodes each needed clip once and keeps only the
frames some window uses, as one uint8 tensor plus an index of k+1 frame rows
per window, so memory grows with distinct frames, not with k.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from lapo.shards import load_npy, read_manifest
from lapo.split import held_out
from lapo.tars import index_tar, read_member
from lapo.timeline import ClipRef, EpisodeRef, Timeline, build_timeline, split_episodes
from lapo.windows import BadSample, load_clip


class LabelledDataError(ValueError):
    """The labelled dataset cannot give what was asked (too few labels, bad clips)."""


@dataclass
class LabelledIndex:
    """Every labelled transition of a dataset, grouped by episode (see `scan_labelled`)."""

    path: str
    manifest: dict
    action_space: dict
    context: int
    frame_gap: int
    timelines: dict[str, Timeline]
    episodes: dict[str, EpisodeRef]

    @property
    def num_transitions(self) -> int:
        return sum(len(e.rows) for e in self.episodes.values())


# --------------------------------------------------------------------------- scanning


def scan_labelled(path: str | Path, *, context: int, frame_gap: int = 1) -> LabelledIndex:
    """Index the labelled transitions of a dataset directory (json and npy members only)."""
    path = Path(path)
    manifest = read_manifest(path)
    space = manifest.get("action_space")
    if not space:
        raise LabelledDataError(
            f"{path}/manifest.json: action_space is null; the dataset has no action labels"
        )
    by_source: dict[str, list[ClipRef]] = {}
    for entry in manifest["shards"]:
        shard = path / entry["name"]
        if not shard.is_file():
            raise LabelledDataError(f"{shard}: listed in {path}/manifest.json but missing")
        try:
            clips = index_tar(shard)
        except (tarfile.TarError, OSError, EOFError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[-1].strip("- ")
            raise LabelledDataError(f"{shard}: not a readable tar file: {why}") from e
        for key, members in clips.items():
            if "json" not in members or "mp4" not in members:
                raise LabelledDataError(f"{shard}: clip {key}: no json or mp4 member")
            try:  # the labelled set is loaded at start-up: a damaged clip is an error naming it
                meta = json.loads(read_member(shard, members["json"]))
                n, start = int(meta["num_frames"]), int(meta.get("start", 0))
                dones = None
                if "dones.npy" in members:
                    dones = load_npy(read_member(shard, members["dones.npy"])).astype(bool)
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                raise LabelledDataError(
                    f"{shard}: clip {key}: unreadable json or dones.npy: {type(e).__name__}: {e}"
                ) from e
            if dones is not None:
                if dones.shape != (n,):
                    raise LabelledDataError(
                        f"{shard}: clip {key}: dones.npy has shape {dones.shape}, json says {n} frames"
                    )
            source = str(meta.get("source", key))
            clip = ClipRef(
                key, str(shard), start, n, str(meta.get("episode", source)),
                members, "actions.npy" in members, dones,
            )  # fmt: skip
            by_source.setdefault(source, []).append(clip)
    timelines = {s: build_timeline(s, by_source[s]) for s in sorted(by_source)}
    episodes: dict[str, EpisodeRef] = {}
    for tl in timelines.values():
        for ep in split_episodes(tl, frame_gap):
            if ep.id in episodes:  # the same episode name in two sources: make both unique
                ep.id = f"{ep.source}@{ep.rows[0]}"
            episodes[ep.id] = ep
    episodes = {k: episodes[k] for k in sorted(episodes)}
    return LabelledIndex(str(path), manifest, space, context, frame_gap, timelines, episodes)


# --------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """Which transitions train and which evaluate. Rows are episode frame indices."""

    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    heldout_episodes: list[str]
    whole_episodes: list[str]  # training episodes taken entirely
    info: dict

    def summary(self) -> dict:
        """JSON-ready description (written to RUN_F/selection.json)."""
        return {
            **self.info,
            "heldout_episodes": self.heldout_episodes,
            "whole_episodes": self.whole_episodes,
            "train_rows": {e: r.tolist() for e, r in self.train.items()},
        }


def select_budget(
    dataset: LabelledIndex | str | Path,
    budget: int,
    seed: int = 0,
    val_fraction: float = 0.2,
    *,
    val_max: int = 0,
    context: int = 2,
    frame_gap: int = 1,
) -> Selection:
    """Exactly `budget` training transitions plus held-out episodes (see the module docstring).

    `budget` 0 takes every labelled transition outside the held-out episodes (the
    all-labels ceiling).
    `val_max` caps the held-out transitions (seeded subset; 0: all). `context` and
    `frame_gap` are only used when `dataset` is a path.
    """
    index = (
        dataset
        if isinstance(dataset, LabelledIndex)
        else scan_labelled(dataset, context=context, frame_gap=frame_gap)
    )
    ids = list(index.episodes)
    if len(ids) < 2:
        raise LabelledDataError(
            f"{index.path}: {len(ids)} episode(s) with labelled transitions; need at least 2 "
            "(one to hold out for evaluation, one to train on)"
        )
    heldout = held_out(ids, val_fraction, seed)
    n_val = len(heldout)
    pool = sorted(set(ids) - set(heldout))
    available = sum(len(index.episodes[e].rows) for e in pool)
    if budget == 0:
        budget = available
    if budget > available:
        total = index.num_transitions
        raise LabelledDataError(
            f"label budget {budget} exceeds the {available} labelled transitions available for "
            f"training in {index.path} ({total} in {len(ids)} episodes, of which {total - available} "
            f"in the {n_val} held-out episodes); lower --label-budget or finetune.val_fraction"
        )
    rng = np.random.default_rng([seed, 3])
    order = [pool[i] for i in rng.permutation(len(pool))]
    train: dict[str, np.ndarray] = {}
    taken = 0
    while order and taken + len(index.episodes[order[0]].rows) <= budget:
        eid = order.pop(0)
        train[eid] = index.episodes[eid].rows
        taken += len(train[eid])
    whole = sorted(train)
    clips = [(e, int(c)) for e in sorted(order) for c in np.unique(index.episodes[e].owner)]
    for j in rng.permutation(len(clips)):
        if taken == budget:
            break
        eid, c = clips[j]
        ep = index.episodes[eid]
        rows = ep.rows[ep.owner == c]
        if taken + len(rows) > budget:  # the last clip: a seeded subset makes exactly N
            rows = np.sort(rng.choice(rows, size=budget - taken, replace=False))
        if len(rows):
            train[eid] = np.sort(np.concatenate([train.get(eid, rows[:0]), rows]))
            taken += len(rows)
    val = {e: index.episodes[e].rows for e in heldout}
    n_val_rows = sum(len(r) for r in val.values())
    if val_max and n_val_rows > val_max:
        flat = [(e, t) for e in heldout for t in val[e].tolist()]
        keep = np.sort(
            np.random.default_rng([seed, 4]).choice(len(flat), size=val_max, replace=False)
        )
        val = {}
        for i in keep.tolist():
            e, t = flat[i]
            val.setdefault(e, []).append(t)
        val = {e: np.asarray(r, np.int64) for e, r in val.items()}
    info = {
        "dataset": index.path,
        "budget": budget,
        "seed": seed,
        "val_fraction": val_fraction,
        "episodes": len(ids),
        "transitions": index.num_transitions,
        "train_transitions": sum(len(r) for r in train.values()),
        "train_episodes": len(train),
        "val_transitions": sum(len(r) for r in val.values()),
        "val_transitions_available": n_val_rows,
    }
    return Selection({e: train[e] for e in sorted(train)}, val, heldout, whole, info)


# --------------------------------------------------------------------------- loading


class LabelledWindows(Dataset):
    """Labelled windows held in memory: frames uint8 (k+1, 3, H, W) and the true action."""

    def __init__(
        self,
        frames: torch.Tensor,
        index: torch.Tensor,
        actions: torch.Tensor,
        ids: list[tuple[str, int]],
    ):
        self.frames = frames  # (F, 3, H, W) uint8, each distinct frame once
        self.index = index  # (N, k+1) long rows of `frames`
        self.actions = actions  # (N,) int64 or (N, D) float32
        self.ids = ids  # (episode, row t) of each window

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return {"frames": self.frames[self.index[i]], "actions": self.actions[i]}  # (k+1, 3, H, W)


def _decode(clip: ClipRef, space: dict, size: tuple[int, int]):
    sample = {"__key__": clip.key}
    for ext in ("mp4", "json", "actions.npy", "dones.npy"):
        if ext in clip.members:
            sample[ext] = read_member(clip.shard, clip.members[ext])
    try:
        return load_clip(sample, action_space=space, frame_size=size)
    except BadSample as e:
        raise LabelledDataError(f"{clip.shard}: clip {clip.key}: {e} ({e.reason})") from e


def load_windows(
    index: LabelledIndex, rows: dict[str, np.ndarray], *, desc: str = "", progress: bool = False
) -> LabelledWindows:
    """Decode the clips that `rows` (episode id -> rows) need, each once, into memory."""
    k, g, space = index.context, index.frame_gap, index.action_space
    size = (int(index.manifest["height"]), int(index.manifest["width"]))
    discrete = space["type"] == "discrete"
    by_source: dict[str, list[str]] = {}
    for eid in sorted(rows):
        by_source.setdefault(index.episodes[eid].source, []).append(eid)
    chunks, windows, actions, ids = [], [], [], []
    base = 0
    bar = tqdm(total=sum(map(len, rows.values())), desc=desc, unit="win", disable=not progress)
    for source, eids in sorted(by_source.items()):
        tl = index.timelines[source]
        r = np.concatenate([np.asarray(rows[e], np.int64) for e in eids])  # (n,)
        win = tl.windows(r, k, g)  # (n, k+1) frame numbers, the first frame repeated
        need = np.unique(win)  # sorted frame numbers
        buf = torch.empty((len(need), 3, *size), dtype=torch.uint8)  # (F_s, 3, H, W)
        shape = (len(r),) if discrete else (len(r), space["dim"])
        act = np.zeros(shape, np.int64 if discrete else np.float32)
        for c in np.union1d(tl.frame_owner[need], tl.action_owner[r]).tolist():
            clip = tl.clips[c]
            loaded = _decode(clip, space, size)
            mine = need[tl.frame_owner[need] == c]
            frames = torch.from_numpy(loaded.frames[mine - clip.start])  # (m, 3, H, W)
            buf[torch.as_tensor(np.searchsorted(need, mine))] = frames
            sel = tl.action_owner[r] == c
            if sel.any():
                if loaded.actions is None:
                    raise LabelledDataError(
                        f"{clip.shard}: clip {clip.key}: actions.npy is unusable"
                    )
                act[sel] = loaded.actions[r[sel] - clip.start]
        chunks.append(buf)
        windows.append(base + np.searchsorted(need, win))  # (n, k+1) rows of the frame tensor
        actions.append(act)
        ids += [(e, int(t)) for e in eids for t in rows[e]]
        base += len(need)
        bar.update(len(r))
    bar.close()
    empty = np.zeros((0,) if discrete else (0, space["dim"]), np.int64 if discrete else np.float32)
    return LabelledWindows(
        torch.cat(chunks) if chunks else torch.zeros((0, 3, *size), dtype=torch.uint8),
        torch.from_numpy(np.concatenate(windows) if windows else np.zeros((0, k + 1), np.int64)),
        torch.from_numpy(np.concatenate(actions) if actions else empty),
        ids,
    )


@dataclass
class LabelledSplit:
    train: LabelledWindows
    val: LabelledWindows
    selection: Selection
    action_space: dict
    image_shape: tuple[int, int]


def load_selection(
    index: LabelledIndex, sel: Selection, *, progress: bool = False
) -> LabelledSplit:
    """The windows of a selection, training budget and held-out split, in memory."""
    train = load_windows(index, sel.train, desc="labelled train", progress=progress)
    val = load_windows(index, sel.val, desc="labelled held-out", progress=progress)
    shape = (int(index.manifest["height"]), int(index.manifest["width"]))
    return LabelledSplit(train, val, sel, index.action_space, shape)


def load_labelled(
    path: str | Path,
    budget: int,
    *,
    context: int,
    frame_gap: int = 1,
    seed: int = 0,
    val_fraction: float = 0.2,
    val_max: int = 0,
    progress: bool = False,
) -> LabelledSplit:
    """Scan, select and load: the training budget and the held-out windows, in memory."""
    index = scan_labelled(path, context=context, frame_gap=frame_gap)
    sel = select_budget(index, budget, seed, val_fraction, val_max=val_max)
    return load_selection(index, sel, progress=progress)
