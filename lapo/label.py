"""`lapo label`: pseudo-label an unlabelled dataset with real actions (VPT-style).

A fine-tuned run (RUN_F: IDM + action decoder) labels every transition of every
clip. Each input shard becomes one output shard of the same name holding the
same clips: the mp4 bytes are copied as they are (no re-encode), the json gains
a ``label`` entry, and per-frame arrays are added (a clip that cannot be read or
decoded is left out with a BadDataWarning and counted in the manifest's
``made_by.skipped_clips``):

- ``actions.npy``: the predicted action of row t (o[t] -> o[t+1]), int64 (T,) or float32 (T, D).
- ``latents.npy``: the IDM's latent action z[t], float32 (T, latent_dim) (absent when the
  method has no latent, e.g. ``idm-supervised``).
- ``confidence.npy``: float32 (T,): the decoder's probability of its action (discrete), or
  1 for continuous actions; 0 marks a row that was filled rather than predicted.
- ``true_actions.npy``: the clip's original ``actions.npy`` when it had one.
- ``rewards.npy`` / ``dones.npy``: copied unchanged.

Clip edges. A window needs k context frames and the next frame. Context before
the first frame comes from the previous clip of the same episode when it is the
previous sample of the shard, else the first frame is repeated (the convention
of rollouts at an episode start). The last row's next frame is the first frame
of the next clip of the same episode when that is the next sample; otherwise the
row is filled with the previous row (action and latent) and confidence 0, and
the json says why: ``label.last_row`` is ``"predicted"``, ``"filled_episode_end"``
(dones ends the clip: no action follows a terminal frame) or
``"filled_clip_end"`` (the clip stops mid-episode, or the data has no dones).

Scale: shards are independent jobs. ``--workers`` runs a process pool over
shards, ``--rank/--world-size`` (or RANK/WORLD_SIZE, SLURM_PROCID/SLURM_NTASKS)
give each process every world_size-th shard, and each GPU process uses
``cuda:LOCAL_RANK``. Shards are written atomically, so one that exists under its
final name is complete and a rerun skips it. Rank 0 writes manifest.json once
every shard exists (``--merge`` does only that).
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

from lapo.cli_args import RawHelpFormatter, add_config_arguments, config_from_args
from lapo.config import ConfigError, LabelConfig
from lapo.shards import (
    iter_tar_samples,
    load_npy,
    npy_bytes,
    read_manifest,
    write_manifest,
    write_shard,
)
from lapo.video import VideoDecodeError, decode_video_bytes
from lapo.windows import BadDataWarning, DatasetError

LAST_ROW_DOC = (
    "row t of actions.npy is the action of o[t] -> o[t+1], predicted from a window that never "
    "crosses an episode end; rows with no next frame in the episode (dones, or the clip stops "
    "and no neighbouring clip of the same source follows in the shard) copy the nearest "
    "earlier predicted row with confidence 0; json label.last_row says how the last row was made"
)


@dataclass
class LabelJob:
    """What every worker needs to label one shard (picklable for the process pool)."""

    model: str
    batch_size: int
    device: str
    threads: int
    frame_size: tuple[int, int] | None = None  # (H, W) of the dataset; other clips are skipped


# --------------------------------------------------------------------------- windows


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
    o[p+g]; context before the episode's first frame repeats that frame. Returns
    index (T, k+1) int64 and valid (T,) bool: o[p+g] exists and is in p's episode.
    """
    n = len(dones)
    episode = np.concatenate([[0], np.cumsum(dones[:-1], dtype=np.int64)])  # (L,)
    first = np.searchsorted(episode, episode, side="left")  # (L,) first frame of each episode
    ctx = rows[:, None] + np.arange(-(k - 1), 1)[None, :] * gap  # (T, k)
    ctx = np.maximum(ctx, first[rows][:, None])
    target = rows + gap  # (T,)
    valid = target < n
    valid[valid] &= episode[target[valid]] == episode[rows[valid]]
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


# --------------------------------------------------------------------------- workers


_WORKER: dict = {}


def _load(job: LabelJob):
    from lapo.runs import load_agent

    if job.threads > 0:
        torch.set_num_threads(job.threads)
    agent = load_agent(job.model)
    agent.to(job.device)
    agent.eval()
    if getattr(agent, "method", None) == "bc":
        raise ConfigError(
            f"--model {job.model} is a bc run (a policy only); label needs an IDM "
            "(finetune --method lapo or idm-supervised)"
        )
    return agent


def _init_worker(job: LabelJob) -> None:
    _WORKER["agent"], _WORKER["job"] = _load(job), job


def _work(paths: tuple[str, str]) -> dict:
    job = _WORKER["job"]
    return label_shard(_WORKER["agent"], *paths, batch_size=job.batch_size, device=job.device,
                       frame_size=job.frame_size)  # fmt: skip


def shard_complete(path: Path, expected_samples: int) -> bool:
    """An output shard counts as done when it exists and reads through: writes are atomic, so
    one under its final name is whole. Its clip count may differ from `expected_samples`
    (the input manifest's): unreadable clips are left out, and a manifest may miscount."""
    if not path.is_file():
        return False
    try:
        for _ in _tar_keys(path):  # every header is read: a damaged file raises
            pass
    except Exception:  # truncated or foreign file: label it again
        return False
    return True


def _tar_keys(path: Path):
    import tarfile

    keys = set()
    with tarfile.open(path) as tar:
        for m in tar:
            key = m.name.rsplit("/", 1)[-1].split(".", 1)[0]
            if key not in keys:
                keys.add(key)
                yield key


def dist_env(rank: int | None, world_size: int | None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the arguments, torchrun's or Slurm's variables."""
    env = os.environ
    rank = rank if rank is not None else int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    world = world_size if world_size is not None else int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))  # fmt: skip
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    if not 0 <= rank < world:
        raise ConfigError(
            f"--rank: rank {rank} (from --rank, RANK or SLURM_PROCID) is outside world size {world}"
        )
    return rank, world, local


def pick_device(device: str, local_rank: int) -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return "cpu"


# --------------------------------------------------------------------------- the dataset


def merge(data: str | Path, out: str | Path, *, made_by: dict, action_space: dict) -> dict:
    """Write out/manifest.json from the input manifest once every output shard is complete."""
    src = read_manifest(data)
    out = Path(out)
    entries, missing = [], []
    for e in src["shards"]:
        path = out / e["name"]
        if not shard_complete(path, int(e["samples"])):
            missing.append(e["name"])
            continue
        # same clips as the input: samples and frames carry over, bytes are the new file's
        entry = {**e, "bytes": path.stat().st_size}
        kept = sum(1 for _ in _tar_keys(path))
        if kept != int(e["samples"]):  # unreadable clips left out (warned), or a miscount
            frames = sum(int(json.loads(s["json"])["num_frames"]) for s in iter_tar_samples(path))
            entry.update(samples=kept, frames=frames)
        entries.append(entry)
    if missing:
        raise FileNotFoundError(
            f"{out} lacks {len(missing)} of {len(src['shards'])} labelled shards "
            f"(first: {missing[0]}); run the missing ranks, then `lapo label --merge`"
        )
    skipped = sum(max(int(e["samples"]) - k["samples"], 0) for e, k in zip(src["shards"], entries))
    return write_manifest(
        out, entries, height=src["height"], width=src["width"], fps=src["fps"],
        action_space=action_space, made_by={**made_by, "skipped_clips": skipped},
    )  # fmt: skip


def _made_by(model: str | Path, data: str | Path, data_manifest: dict, method: str) -> dict:
    import lapo

    return {
        "command": "lapo label",
        "lapo_version": lapo.__version__,
        "model": str(Path(model).resolve()),
        "method": method,
        "source": str(Path(data).resolve()),
        "source_made_by": data_manifest.get("made_by"),
        "last_row": LAST_ROW_DOC,
    }


def label_dataset(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    workers: int = 1,
    batch_size: int = 256,
    rank: int | None = None,
    world_size: int | None = None,
    device: str = "auto",
    merge_only: bool = False,
    merge_timeout: float = 3600.0,
    progress: bool = True,
) -> dict | None:
    """Label `data` with the run `model` into `out`; return the manifest (rank 0) or None."""
    data, out = Path(data), Path(out)
    if out.resolve() == data.resolve():
        raise ConfigError(f"--out {out} must differ from --data (a new dataset is written)")
    src = read_manifest(data)
    lost = [e["name"] for e in src["shards"] if not (data / e["name"]).is_file()]
    if lost:  # found now, not when a worker reaches the shard hours later
        raise FileNotFoundError(
            f"{data}: {len(lost)} shard(s) listed in manifest.json do not exist "
            f"(first: {data / lost[0]})"
        )
    if not any(int(e["samples"]) for e in src["shards"]):
        raise DatasetError(f"{data}: manifest.json lists no clips (empty dataset)")
    rank, world, local = dist_env(rank, world_size)
    size = (int(src["height"]), int(src["width"]))
    job = LabelJob(str(model), batch_size, pick_device(device, local), 0, size)
    in_process = workers <= 1 and not merge_only
    agent = _load(job if in_process else LabelJob(str(model), batch_size, "cpu", 0))
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs proved usable
    space = agent.action_space
    made_by = _made_by(model, data, src, agent.method)
    if merge_only:
        return merge(data, out, made_by=made_by, action_space=space)
    mine = src["shards"][rank::world]
    todo = [e for e in mine if not shard_complete(out / e["name"], int(e["samples"]))]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="shard",
               desc=f"label rank {rank}/{world}", disable=not progress)  # fmt: skip
    paths = [(str(data / e["name"]), str(out / e["name"])) for e in todo]
    frames = 0
    if in_process:
        for p in paths:
            entry = label_shard(
                agent, *p, batch_size=batch_size, device=job.device, frame_size=size
            )
            frames += entry["frames"]
            bar.update(1)
            bar.set_postfix(frames=frames)
    else:
        job.threads = max(1, (os.cpu_count() or 1) // workers)  # no oversubscription
        ctx = get_context("spawn")  # fork after torch threads start can deadlock
        with ProcessPoolExecutor(min(workers, len(paths)), ctx, _init_worker, (job,)) as pool:
            for entry in pool.map(_work, paths):
                frames += entry["frames"]
                bar.update(1)
                bar.set_postfix(frames=frames)
    bar.close()
    if rank != 0:
        return None
    deadline = time.monotonic() + merge_timeout
    while True:  # rank 0 merges once the other ranks' shards are all there
        try:
            return merge(data, out, made_by=made_by, action_space=space)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(5.0)


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = LabelConfig
    p.add_argument(
        "--model", required=True, help="fine-tuned run directory (RUN_F from lapo finetune)"
    )
    p.add_argument(
        "--data", required=True, help="dataset directory to label (shards + manifest.json)"
    )
    p.add_argument("--out", required=True, help="new dataset directory for the labelled shards")
    p.add_argument(
        "--workers",
        type=int,
        help=f"worker processes, each labelling whole shards (default: {d.workers})",
    )
    p.add_argument(
        "--batch-size", type=int, help=f"windows per forward pass (default: {d.batch_size})"
    )
    p.add_argument(
        "--device",
        help=f"auto (cuda:LOCAL_RANK if a GPU is there), cpu, cuda:0, ... (default: {d.device})",
    )
    p.add_argument(
        "--rank", type=int, help="this process's rank (default: RANK or SLURM_PROCID, else 0)"
    )
    p.add_argument(
        "--world-size",
        type=int,
        help="processes sharing the shards (default: WORLD_SIZE or SLURM_NTASKS, else 1)",
    )
    p.add_argument(
        "--merge", action="store_true", help="only write manifest.json from finished shards"
    )
    p.add_argument(
        "--merge-timeout",
        type=float,
        help=f"seconds rank 0 waits for the other ranks' shards (default: {d.merge_timeout})",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_config_arguments(p, example_set="batch_size=512 workers=4")
    return p  # fmt: skip


def run(args: argparse.Namespace) -> int:
    flags = {"workers": args.workers, "batch_size": args.batch_size, "device": args.device,
             "rank": args.rank, "world_size": args.world_size, "merge_timeout": args.merge_timeout,
             "progress": False if args.no_progress else None}  # fmt: skip
    cfg = config_from_args(LabelConfig, args, flags)
    manifest = label_dataset(
        args.model, args.data, args.out, workers=cfg.workers, batch_size=cfg.batch_size,
        rank=cfg.rank, world_size=cfg.world_size, device=cfg.device, merge_only=args.merge,
        merge_timeout=cfg.merge_timeout, progress=cfg.progress,
    )  # fmt: skip
    if manifest is not None:
        print(f"labelled {manifest['num_samples']} clips, {manifest['num_frames']} frames "
              f"in {len(manifest['shards'])} shards -> {args.out}")  # fmt: skip
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``lapo label`` parser (lapo.cli's subcommand protocol)."""
    p = sub.add_parser(
        "label",
        help="pseudo-label a dataset with real actions using a fine-tuned run",
        description=__doc__,
        formatter_class=RawHelpFormatter,
    )
    return add_arguments(p)
