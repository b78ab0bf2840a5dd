"""Streaming loader: webdataset shards of clips -> batches of training windows.

Per DataLoader worker the pipeline is webdataset's: a shard list (resampled for
training, in order for validation), ``tarfile_to_samples``, then
``lapo.windows`` (check, decode each clip once, cut many windows), ``shuffle``
in a bounded buffer, ``batched``. Batches are made inside the workers
(``DataLoader(batch_size=None)``).

Splitting is explicit: shards go to ranks (``shards[rank::world]``) and then to
workers, so in a finite pass no two ranks or workers read the same shard. With
fewer shards than that needs, the readers that share shards split their clips
by a hash of the sample key instead (with a warning): every sample is still read
by exactly one of them.

Training is an endless resampled stream cut to exactly ``batches_per_epoch``
batches per rank, shared out over the workers, so no DDP rank waits on another.
Epoch e of rank r, worker w is a pure function of (seed, e, r, w); the loader's
``state_dict`` (epoch, batches served) resumes mid-epoch exactly.
"""

from __future__ import annotations

import logging
import random
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lapo.config import DataConfig
from lapo.shards import MANIFEST, read_manifest
from lapo.windows import (
    BadSample,
    LoaderStats,
    collate_windows,
    cut_windows,
    empty_action,
    load_clip,
    pick_starts,
    warn_bad,
    window_starts,
    window_to_tensors,
)

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """The dataset cannot be used as configured. The message names the path and the fault."""


# --------------------------------------------------------------------------- what a dataset holds


@dataclass
class DatasetInfo:
    """Shard URLs plus what the manifest says about them (None where there is no manifest)."""

    urls: list[str]
    root: str | None = None
    action_space: dict | None = None
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    clip_frames: float | None = None
    """Mean frames per clip of the shard with the longest clips."""
    num_samples: int | None = None
    shards: list[dict] = field(default_factory=list)

    @property
    def frame_size(self) -> tuple[int, int] | None:
        return None if self.height is None else (self.height, self.width)

    def subset(self, urls: list[str]) -> DatasetInfo:
        names = {Path(u).name for u in urls}
        shards = [s for s in self.shards if s["name"] in names]
        out = DatasetInfo(**{**self.__dict__, "urls": list(urls), "shards": shards})
        out.num_samples = sum(int(s["samples"]) for s in shards) if shards else None
        return out


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _from_manifest(root: Path, urls: list[str] | None) -> DatasetInfo:
    try:
        m = read_manifest(root)
    except (OSError, ValueError) as e:
        raise DatasetError(f"dataset {root}: {e}") from e
    shards = [s for s in m["shards"] if int(s.get("samples", 0)) > 0]
    if not shards:
        raise DatasetError(
            f"dataset {root}: {MANIFEST} lists no shard with samples (empty dataset)"
        )
    if urls is None:
        urls = [str(root / s["name"]) for s in shards]
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise DatasetError(
                f"dataset {root}: {len(missing)} shard(s) in {MANIFEST} are missing, e.g. {missing[0]}"
            )
    lengths = [int(s["frames"]) / int(s["samples"]) for s in shards]
    return DatasetInfo(
        urls=urls,
        root=str(root),
        action_space=m.get("action_space"),
        height=int(m["height"]),
        width=int(m["width"]),
        fps=float(m["fps"]),
        clip_frames=max(lengths),
        num_samples=sum(int(s["samples"]) for s in shards),
        shards=shards,
    )


def dataset_info(path: str | Path | Sequence[str]) -> DatasetInfo:
    """Resolve a dataset: a directory with manifest.json, a .tar, a brace/URL pattern or a URL list.

    For patterns and lists of local shards, a manifest.json beside the first
    shard supplies the action space and frame size.
    """
    if isinstance(path, (list, tuple)):
        urls = [str(u) for u in path]
    else:
        spec = str(path)
        local = Path(spec)
        if not _is_remote(spec) and "{" not in spec and "::" not in spec:
            if not local.exists():
                raise DatasetError(f"dataset path {spec} does not exist")
            if local.is_dir():
                if (local / MANIFEST).is_file():
                    return _from_manifest(local, None)
                tars = sorted(str(p) for p in local.glob("*.tar"))
                if not tars:
                    raise DatasetError(
                        f"dataset {spec}: no {MANIFEST} and no .tar shards in the directory"
                    )
                warnings.warn(
                    f"dataset {spec}: no {MANIFEST}; using its {len(tars)} .tar files", stacklevel=2
                )
                return DatasetInfo(urls=tars, root=spec)
        urls = wds.shardlists.expand_urls(spec)
    if not urls:
        raise DatasetError(f"dataset {path}: the pattern names no shards")
    missing = [u for u in urls if not _is_remote(u) and not Path(u).is_file()]
    if missing:
        raise DatasetError(
            f"dataset {path}: shard {missing[0]} does not exist ({len(missing)} missing)"
        )
    first = urls[0]
    if not _is_remote(first) and (Path(first).parent / MANIFEST).is_file():
        info = _from_manifest(Path(first).parent, urls)
        return info.subset(urls)
    return DatasetInfo(urls=urls)


def list_shards(path: str | Path | Sequence[str]) -> list[str]:
    """Shard URLs of a dataset directory (from its manifest), a brace/URL pattern or a list."""
    return dataset_info(path).urls


def check_context(info: DatasetInfo, cfg: DataConfig, where: str = "data.path") -> None:
    """Fail at start-up when a window is longer than the dataset's clips."""
    span = cfg.context * cfg.frame_gap + 1
    if info.clip_frames is not None and span > info.clip_frames:
        raise DatasetError(
            f"{where}: data.context={cfg.context} with data.frame_gap={cfg.frame_gap} needs windows of "
            f"{span} frames, but clips in {info.root} hold {info.clip_frames:.1f} frames on average "
            f"({MANIFEST}); lower context/frame_gap or re-shard with longer clips"
        )


# --------------------------------------------------------------------------- who reads what


def share(total: int, worker: int, num_workers: int) -> int:
    """Worker's part of ``total`` items dealt round-robin (what DataLoader does with workers)."""
    return total // num_workers + (worker < total % num_workers)


def split_plan(
    num_shards: int, rank: int, world_size: int, worker: int, num_workers: int
) -> tuple[list[int], int, int]:
    """Which shards a (rank, worker) reads, and its clip slot: (shard ids, slots, slot).

    Clips are kept when ``crc32(key) % slots == slot``; slots is 1 when the shards
    themselves are disjoint. Whatever the counts, every sample has exactly one reader.
    """
    if num_shards >= world_size:
        mine = list(range(0, num_shards))
        if len(mine) >= num_workers:
            return mine[worker::num_workers], 1, 0
        return mine, num_workers, worker  # this rank's workers share its shards
    return list(range(num_shards)), world_size * num_workers, rank * num_workers + worker


def split_note(num_shards: int, world_size: int, num_workers: int) -> str | None:
    """A warning when shards are too few to give every rank and worker its own."""
    if num_shards >= world_size * num_workers:
        return None
    if num_shards >= world_size:
        return (
            f"{num_shards} shards for {world_size} rank(s) x {num_workers} worker(s): "
            "workers of a rank share shards and split their clips by key (each reads whole shards)"
        )
    return (
        f"only {num_shards} shards for {world_size} ranks: every rank reads every shard and "
        "keeps its own clips by key; write more shards (at least ranks x workers)"
    )


def _in_slot(samples: Iterator[dict], slots: int, slot: int) -> Iterator[dict]:
    for sample in samples:
        if zlib.crc32(sample["__key__"].encode()) % slots == slot:
            yield sample


# --------------------------------------------------------------------------- the dataset


class WindowDataset(IterableDataset):
    """Windows of k+1 frames from shards, for one rank; see the module docstring.

    ``batch_size`` None yields single windows (frames uint8 (k+1, 3, H, W)); an
    integer yields batches (frames uint8 (B, k+1, 3, H, W), actions (B,) or
    (B, D), has_action (B,), key list, start (B,)). Training yields exactly
    ``batches_per_epoch`` items per rank (batches, or windows when unbatched);
    validation ends with the data or at ``val_batches`` (0: no cap).
    """

    def __init__(
        self,
        urls: list[str],
        cfg: DataConfig,
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        action_space: dict | None = None,
        frame_size: tuple[int, int] | None = None,
        batch_size: int | None = None,
        stats: LoaderStats | None = None,
    ):
        super().__init__()
        if not urls:
            raise DatasetError("WindowDataset: no shards to read")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.urls, self.cfg, self.train = list(urls), cfg, train
        self.rank, self.world_size = rank, world_size
        self.action_space, self.frame_size, self.batch_size = action_space, frame_size, batch_size
        self.stats = stats or LoaderStats(max(cfg.num_workers, 1))
        self.epoch = 0
        self.skip = 0  # items of this epoch already served (mid-epoch resume)

    def limit(self) -> int | None:
        """Items per rank per epoch (None: until the data ends)."""
        per_batch = 1 if self.batch_size else self.cfg.batch_size
        if self.train:
            return self.cfg.batches_per_epoch * per_batch
        return self.cfg.val_batches * per_batch if self.cfg.val_batches else None

    def __len__(self) -> int:
        if not self.train:
            raise TypeError("a validation pass has no length known in advance")
        return self.limit()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader asks workers round-robin from worker 0; after serving `skip`
        # items, the next item is worker skip % workers's, so roles are rotated.
        worker = (physical + self.skip) % workers
        limit = self.limit()
        stop = None if limit is None else share(limit, worker, workers)
        start = share(self.skip, worker, workers)
        if stop is not None and stop <= start:
            return
        ids, slots, slot = split_plan(len(self.urls), self.rank, self.world_size, worker, workers)
        urls = [self.urls[i] for i in ids]
        seq = np.random.SeedSequence(
            [self.cfg.seed, self.epoch, self.rank, worker, int(self.train)]
        )
        shard_seed, window_seed, shuffle_seed = (int(s) for s in seq.generate_state(3))
        row = worker % self.stats.table.shape[0]
        idle = {"shards": 0}  # shards opened since the last window (training guard)

        def on_tar_error(exn: Exception) -> bool:
            self.stats.add(row, "tar_error")
            warn_bad(f"shard data ({type(exn).__name__}: {exn})")
            return True

        def watch(src: Iterator[dict]) -> Iterator[dict]:
            for item in src:
                idle["shards"] += 1
                if idle["shards"] > 4 * len(urls) + 16:
                    raise DatasetError(
                        f"rank {self.rank} worker {worker}: {idle['shards']} shards opened without one "
                        f"usable window (all corrupt, or clips shorter than the window?): {urls[:3]} "
                        f"... ; {self.stats.summary()}"
                    )
                yield item

        if self.train:
            source = wds.ResampledShards(
                urls, seed=shard_seed, worker_seed=_zero, deterministic=True
            )
        else:
            source = wds.SimpleShardList(urls)
        stages: list = [source, watch, wds.tarfile_to_samples(handler=on_tar_error)]
        if slots > 1:
            stages.append(lambda src: _in_slot(src, slots, slot))
        rng = np.random.default_rng(window_seed) if self.train else None
        stages.append(lambda src: self._windows(src, row, rng, idle))
        if self.train:
            buf = self.cfg.shuffle_buffer
            stages.append(wds.shuffle(buf, initial=buf, rng=random.Random(shuffle_seed)))
        if self.batch_size:
            stages.append(
                wds.batched(self.batch_size, collation_fn=collate_windows, partial=not self.train)
            )
        else:
            stages.append(wds.map(window_to_tensors))
        for item in islice(wds.DataPipeline(*stages), start, stop):
            if self.batch_size:
                self.stats.add(row, "batches")
            yield item

    def _windows(self, samples: Iterator[dict], row: int, rng, idle: dict) -> Iterator[dict]:
        cfg = self.cfg
        fill = empty_action(self.action_space)
        for sample in samples:
            try:
                clip = load_clip(sample, action_space=self.action_space, frame_size=self.frame_size)
            except BadSample as e:
                self.stats.add(row, e.reason)
                warn_bad(f"{sample.get('__key__')} in {sample.get('__url__')}: {e.reason}: {e}")
                continue
            self.stats.add(row, "clips")
            starts = window_starts(len(clip.frames), clip.dones, cfg.context, cfg.frame_gap)
            if len(starts) == 0:
                self.stats.add(row, "short_clips")
                continue
            starts = pick_starts(starts, cfg.windows_per_clip, rng)
            self.stats.add(row, "windows", len(starts))
            idle["shards"] = 0
            yield from cut_windows(clip, starts, cfg.context, cfg.frame_gap, fill)


def _zero() -> int:
    return 0


# --------------------------------------------------------------------------- loaders


class WindowLoader(DataLoader):
    """DataLoader over a ``WindowDataset`` that knows its epoch and can resume mid-epoch.

    The epoch of each pass is, in order: the one restored by ``load_state_dict``,
    one set with ``set_epoch``, ``epoch_fn()`` (Lightning's current epoch), or
    one more than the previous pass. Workers are started afresh every pass
    (no persistent workers) so that each sees the epoch.
    """

    def __init__(
        self,
        dataset: WindowDataset,
        *,
        num_workers: int,
        pin_memory: bool = False,
        epoch_fn: Callable[[], int] | None = None,
    ):
        super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
        self.epoch_fn = epoch_fn
        self.epoch = 0
        self.served = 0
        self._next: int | None = None
        self._resume: tuple[int, int] | None = None
        self._passes = 0

    @property
    def stats(self) -> LoaderStats:
        return self.dataset.stats

    def set_epoch(self, epoch: int) -> None:
        self._next = epoch

    def __iter__(self) -> Iterator[dict]:
        if self._resume is not None:
            epoch, skip = self._resume
        elif self._next is not None:
            epoch, skip = self._next, 0
        elif self.epoch_fn is not None:
            epoch, skip = int(self.epoch_fn()), 0
        else:
            epoch, skip = self._passes, 0
        self._resume = self._next = None
        self._passes = epoch + 1
        self.epoch, self.served = epoch, skip
        self.dataset.epoch, self.dataset.skip = epoch, skip
        return self._serve(super().__iter__())

    def _serve(self, it: Iterator[dict]) -> Iterator[dict]:
        for batch in it:
            self.served += 1
            yield batch
        stats = self.stats
        report = log.warning if stats.bad else log.info
        report(
            "lapo.data: %s pass (epoch %d): %s",
            "train" if self.dataset.train else "val",
            self.epoch,
            stats.summary(),
        )

    def state_dict(self) -> dict:
        """Where the stream stands: ``{"epoch", "batches"}`` served in that epoch."""
        return {"epoch": self.epoch, "batches": self.served}

    def load_state_dict(self, state: dict) -> None:
        """The next pass continues epoch ``state["epoch"]`` after ``state["batches"]`` items."""
        epoch, served = int(state["epoch"]), int(state["batches"])
        limit = self.dataset.limit()
        if limit is not None and served >= limit:
            epoch, served = epoch + 1, 0
        self._resume = (epoch, served)


def make_loader(
    paths: str | Path | Sequence[str],
    cfg: DataConfig,
    *,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    info: DatasetInfo | None = None,
    batched: bool = True,
    epoch_fn: Callable[[], int] | None = None,
    pin_memory: bool = False,
) -> WindowLoader:
    """A loader of windows for one rank, without Lightning (Accelerate, labelling, evaluation).

    ``paths``: a dataset directory, a brace/URL pattern or a list of shard URLs.
    ``train``: endless resampled stream cut to ``cfg.batches_per_epoch`` batches,
    shuffled; otherwise one deterministic pass in order, capped at ``cfg.val_batches``
    (0: the whole split). ``info`` skips reading the manifest again.
    """
    info = info or dataset_info(paths)
    check_context(info, cfg)
    workers = max(cfg.num_workers, 1)
    note = split_note(len(info.urls), world_size, workers)
    if note:
        warnings.warn(f"lapo.data ({'train' if train else 'val'}): {note}", stacklevel=2)
    dataset = WindowDataset(
        info.urls,
        cfg,
        train=train,
        rank=rank,
        world_size=world_size,
        action_space=info.action_space,
        frame_size=info.frame_size,
        batch_size=cfg.batch_size if batched else None,
        stats=LoaderStats(workers),
    )
    return WindowLoader(
        dataset, num_workers=cfg.num_workers, pin_memory=pin_memory, epoch_fn=epoch_fn
    )


def split_train_val(cfg: DataConfig) -> tuple[DatasetInfo, DatasetInfo | None]:
    """Training and validation shards: ``val_path``, else the last ``val_shards`` of ``path``."""
    if not cfg.path:
        raise DatasetError("data.path: no dataset given")
    info = dataset_info(cfg.path)
    if cfg.val_path:
        val = dataset_info(cfg.val_path)
        check_context(val, cfg, "data.val_path")
        return info, val
    if cfg.val_shards == 0:
        return info, None
    n = len(info.urls)
    if cfg.val_shards >= n:
        raise DatasetError(
            f"data.val_shards={cfg.val_shards} would hold out all {n} shard(s) of {cfg.path}; "
            "lower it, or give data.val_path"
        )
    return info.subset(info.urls[: n - cfg.val_shards]), info.subset(
        info.urls[n - cfg.val_shards :]
    )


# --------------------------------------------------------------------------- Lightning


class VideoDataModule(pl.LightningDataModule):
    """Training and validation windows for Lightning, one loader per rank.

    ``setup`` reads the manifest (action space, frame size) and splits the shards;
    rank and world size come from the trainer. The training loader follows the
    trainer's epoch and is resumable mid-epoch (Lightning saves its state_dict).
    """

    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.cfg = cfg
        self.train_info: DatasetInfo | None = None
        self.val_info: DatasetInfo | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_info is None:
            self.train_info, self.val_info = split_train_val(self.cfg)
            check_context(self.train_info, self.cfg)

    @property
    def info(self) -> DatasetInfo:
        self.setup()
        return self.train_info

    @property
    def action_space(self) -> dict | None:
        """``{"type": "discrete", "n": N}``, ``{"type": "continuous", "dim": D}`` or None."""
        return self.info.action_space

    @property
    def num_actions(self) -> int:
        space = self.action_space
        return int(space["n"]) if space and space["type"] == "discrete" else 0

    @property
    def frame_size(self) -> tuple[int, int] | None:
        return self.info.frame_size

    @property
    def image_size(self) -> int | None:
        """Side of the (square) frames; the height if they are not square."""
        return self.info.height

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self) -> WindowLoader:
        rank, world = self._rank()
        return make_loader(
            self.info.urls,
            self.cfg,
            train=True,
            rank=rank,
            world_size=world,
            info=self.info,
            epoch_fn=self._epoch,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> WindowLoader | list:
        self.setup()
        if self.val_info is None:
            return []
        rank, world = self._rank()
        return make_loader(
            self.val_info.urls,
            self.cfg,
            train=False,
            rank=rank,
            world_size=world,
            info=self.val_info,
            pin_memory=torch.cuda.is_available(),
        )
