"""The per-rank stream of windows: who reads which shard, and the webdataset pipeline.

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

A split may also name the sample keys it reads (``keys``: the clips of some
source videos, ``lapo.split``); other samples are dropped before decoding.

Training is an endless resampled stream cut to exactly ``batches_per_epoch``
batches per rank, shared out over the workers, so no DDP rank waits on another.
Epoch e of rank r, worker w is a pure function of (seed, e, r, w); the
``state_dict`` of `lapo.loader.WindowLoader` (epoch, batches served) resumes
mid-epoch exactly. A training reader whose share of the clips (by key) holds
no usable window, as happens with a few clips in one shard, reads its rank's
portion instead, or failing that every shard: in a resampled stream, repeats
cost nothing, but an idle worker would stop the run.

Validation is one deterministic, finite pass in shard order, and no rank is left
without batches (a rank that has none never joins the all-reduce of metrics
logged with ``sync_dist``, and the others wait for it). With ``val_batches`` > 0
every rank yields exactly that many: each worker repeats its part of the rank's
portion in the same order until it has served its share, cycling over the rank's
whole portion if its own part is empty, or over the whole validation set if the
rank's portion is empty too (fewer shards than ranks, or too few clips). With
``val_batches`` = 0 each rank reads its portion once, and a rank whose portion is
empty gets the first (possibly partial) batch of the whole set. Last batches are
partial, so a validation set smaller than one batch still gives every rank one.
"""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from lapo.config import DataConfig
from lapo.ring import BatchRing
from lapo.windows import (
    BadSample,
    DatasetError,
    LoaderStats,
    as_tensors,
    collate_fields,
    collate_windows,
    cut_windows,
    empty_action,
    load_clip,
    pick_starts,
    single_window,
    still_windows,
    warn_bad,
    window_starts,
)

log = logging.getLogger(__name__)


class NoWindows(DatasetError):
    """A reader opened many shards without finding one usable window."""


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
        mine = list(range(rank, num_shards, world_size))
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


def rank_portion(
    num_shards: int, rank: int, world_size: int, num_workers: int
) -> tuple[list[int], int, range]:
    """All that a rank's workers read together: (shard ids, slots, slots kept).

    The union of ``split_plan`` over the rank's workers; with fewer shards than
    ranks the rank keeps the clips of its workers' slots ``rank * workers + w``.
    """
    if num_shards >= world_size:
        return list(range(rank, num_shards, world_size)), 1, range(1)
    first = rank * num_workers
    return list(range(num_shards)), world_size * num_workers, range(first, first + num_workers)


def _in_slot(samples: Iterator[dict], slots: int, keep: range) -> Iterator[dict]:
    for sample in samples:
        if zlib.crc32(sample["__key__"].encode()) % slots in keep:
            yield sample


# --------------------------------------------------------------------------- the dataset


class WindowDataset(IterableDataset):
    """Windows of k+1 frames from shards, for one rank; see the module docstring.

    ``batch_size`` None yields single windows (frames uint8 (k+1, 3, H, W)); an
    integer yields batches (frames uint8 (B, k+1, 3, H, W), actions (B,) or
    (B, D), has_action (B,), key list, start (B,)). Training yields exactly
    ``batches_per_epoch`` items per rank (batches, or windows when unbatched);
    validation exactly ``val_batches`` (repeating data if it has fewer), or with
    ``val_batches`` 0 one pass, at least one item per rank (see the module docstring).
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
        keys: frozenset[str] | None = None,
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
        self.keys = keys  # the only sample keys read (None: every sample of the shards)
        self.epoch = 0
        self.skip = 0  # items of this epoch already served (mid-epoch resume)
        # True: small fields leave as numpy and the consumer calls as_tensors (WindowLoader
        # does, in the main process: cheaper to pass between processes than small tensors).
        self.numpy_fields = False
        self.ring: BatchRing | None = None  # set by WindowLoader when it has worker processes

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
        plan = (ids, slots, range(slot, slot + 1))
        seq = np.random.SeedSequence(
            [self.cfg.seed, self.epoch, self.rank, worker, int(self.train)]
        )
        shard_seed, window_seed, shuffle_seed = (int(s) for s in seq.generate_state(3))
        row = worker % self.stats.table.shape[0]

        def on_tar_error(exn: Exception) -> bool:
            self.stats.add(row, "tar_error")
            warn_bad(f"shard data ({type(exn).__name__}: {exn})")
            return True

        def pipeline(plan: tuple[list[int], int, range], batched: bool = True) -> Iterator[dict]:
            """Items of one pass over (shard ids, slots, slots kept); windows when not batched."""
            ids, slots, keep = plan
            urls = [self.urls[i] for i in ids]
            idle = {"shards": 0}  # shards opened since the last window (training guard)

            def watch(src: Iterator[dict]) -> Iterator[dict]:
                for item in src:
                    idle["shards"] += 1
                    if idle["shards"] > 4 * len(urls) + 16:
                        raise NoWindows(
                            f"rank {self.rank} worker {worker}: {idle['shards']} shards opened without "
                            f"one usable window (all corrupt, or clips shorter than the window?): "
                            f"{urls[:3]} ... ; {self.stats.summary()}"
                        )
                    yield item

            if self.train:
                source = wds.ResampledShards(
                    urls, seed=shard_seed, worker_seed=_zero, deterministic=True
                )
            else:
                source = wds.SimpleShardList(urls)
            stages: list = [source, watch, wds.tarfile_to_samples(handler=on_tar_error)]
            if self.keys is not None:
                stages.append(lambda src: (x for x in src if x["__key__"] in self.keys))
            if slots > 1:
                stages.append(lambda src: _in_slot(src, slots, keep))
            rng = np.random.default_rng(window_seed) if self.train else None
            stages.append(lambda src: self._windows(src, row, rng, idle))
            if self.train:
                buf = self.cfg.shuffle_buffer
                stages.append(wds.shuffle(buf, initial=buf, rng=random.Random(shuffle_seed)))
            if batched and self.batch_size:  # lists of windows, collated once past the skip
                stages.append(
                    wds.batched(self.batch_size, collation_fn=list, partial=not self.train)
                )
            elif batched:
                stages.append(wds.map(single_window))
            return iter(wds.DataPipeline(*stages))

        if self.train:
            items = self._training(pipeline, plan, worker, workers)
        else:
            items = self._validation(pipeline, plan, worker, workers, stop)
        if self.ring is not None and info is not None:
            collate = partial(self._collate_to_ring, physical)
        else:
            collate = partial(collate_windows, shared=info is not None)
        # Collating only what is served keeps the batches skipped on resume out of the ring,
        # whose slots only the main process frees (a skipped batch would hold one forever).
        for item in islice(items, start, stop):
            if self.batch_size:
                item = collate(item)
                self.stats.add(row, "batches")
            yield item if self.numpy_fields else as_tensors(item)

    def _training(
        self, pipeline: Callable, own: tuple[list[int], int, range], worker: int, workers: int
    ) -> Iterator[dict]:
        """One worker's endless training items, from a wider plan when its own gives no window."""
        n = len(self.urls)
        rank_part = rank_portion(n, self.rank, self.world_size, workers)
        whole = (list(range(n)), 1, range(1))
        plans = [own] + [p for p in (rank_part, whole) if p != own]
        for i, plan in enumerate(plans):
            try:
                yield from pipeline(plan)
                return  # (resampled: it never ends)
            except NoWindows:
                if i == len(plans) - 1:
                    raise
                log.info(
                    "lapo.data: rank %d worker %d: its share of the clips has no usable window; "
                    "reading %s",
                    self.rank,
                    worker,
                    "the rank's portion" if plans[i + 1] == rank_part else "every shard",
                )

    def _validation(
        self,
        pipeline: Callable,
        own: tuple[list[int], int, range],
        worker: int,
        workers: int,
        stop: int | None,
    ) -> Iterator[dict]:
        """One worker's validation items: ``stop`` of them, cycling (the module docstring
        says from what), or with no cap one pass, plus one batch where the rank has none."""
        n = len(self.urls)
        rank_part = rank_portion(n, self.rank, self.world_size, workers)
        whole = (list(range(n)), 1, range(1))
        if stop is None:
            served = 0
            for item in pipeline(own):
                served += 1
                yield item
            if served or worker != 0:
                return
            if rank_part != own and next(pipeline(rank_part, batched=False), None) is not None:
                return  # another worker of this rank has windows
            if whole != rank_part:
                yield from islice(pipeline(whole), 1)
            return
        served = 0
        for plan in [own] + [p for p in (rank_part, whole) if p != own]:
            while served < stop:
                before = served
                for item in pipeline(plan):
                    served += 1
                    yield item
                    if served == stop:
                        return
                if served == before:
                    break  # no window in this pass
            if served:
                return  # (a pass that gave nothing after one that did: unreadable now; stop)

    def _collate_to_ring(self, physical: int, windows: list[dict]) -> dict:
        address = self.ring.put(physical, [w["frames"] for w in windows])
        return {"ring": address, **collate_fields(windows)}

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
            except Exception as e:  # one odd sample must not end a training run
                self.stats.add(row, "bad_other")
                warn_bad(f"{sample.get('__key__')} in {sample.get('__url__')}: {e!r}")
                continue
            self.stats.add(row, "clips")
            starts = window_starts(len(clip.frames), clip.dones, cfg.context, cfg.frame_gap)
            if len(starts) == 0:
                self.stats.add(row, "short_clips")
                continue
            if rng is not None and cfg.still_keep < 1.0:  # training only
                still = still_windows(
                    clip.frames, starts, cfg.context, cfg.frame_gap, cfg.still_threshold
                )
                drop = still & (rng.random(len(starts)) >= cfg.still_keep)  # (N,)
                if drop.any():
                    self.stats.add(row, "still_skipped", int(drop.sum()))
                    starts = starts[~drop]
                    if len(starts) == 0:
                        continue
            starts = pick_starts(starts, cfg.windows_per_clip, rng)
            self.stats.add(row, "windows", len(starts))
            idle["shards"] = 0
            yield from cut_windows(clip, starts, cfg.context, cfg.frame_gap, fill)


def _zero() -> int:
    return 0
