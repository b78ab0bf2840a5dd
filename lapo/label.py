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
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm import tqdm

from lapo.cli_args import RawHelpFormatter, add_config_arguments, config_from_args
from lapo.config import ConfigError, LabelConfig
from lapo.label_shard import label_shard
from lapo.shards import read_manifest, write_manifest
from lapo.tars import iter_shard_keys, iter_tar_samples
from lapo.windows import DatasetError

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
        for _ in iter_shard_keys(path):  # every header is read: a damaged file raises
            pass
    except Exception:  # truncated or foreign file: label it again
        return False
    return True


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
        kept = sum(1 for _ in iter_shard_keys(path))
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
