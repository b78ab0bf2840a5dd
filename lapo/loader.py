"""The DataLoader over a `WindowDataset`: epochs, mid-epoch resume, batches through a ring.

Batches are made inside the workers (``batch_size=None``); with worker processes
their frames come back through a `lapo.ring.BatchRing` of shared memory rather than
one pickled tensor each. Workers start afresh every pass, so each sees its epoch,
and ``state_dict`` / ``load_state_dict`` resume a pass after the batches served.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from torch.utils.data import DataLoader

from lapo.ring import BatchRing
from lapo.stream import WindowDataset
from lapo.windows import LoaderStats, as_tensors

log = logging.getLogger(__name__)

PREFETCH = 2  # batches requested ahead from each worker (DataLoader's prefetch_factor)


class WindowLoader(DataLoader):
    """DataLoader over a ``WindowDataset`` that knows its epoch and can resume mid-epoch.

    The epoch of each pass is, in order: the one restored by ``load_state_dict``,
    one set with ``set_epoch``, ``epoch_fn()`` (Lightning's current epoch, but never
    an epoch this loader has already passed), or one more than the previous pass. Workers are started afresh every pass
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
        self.ring_shape = None  # frames of a batch, when workers hand them over through a ring
        if num_workers > 0 and dataset.batch_size and dataset.frame_size:
            self.ring_shape = (dataset.batch_size, dataset.cfg.context + 1, 3, *dataset.frame_size)
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            prefetch_factor=PREFETCH if num_workers > 0 else None,
            pin_memory=pin_memory and self.ring_shape is None,  # else take() pins as it copies
            collate_fn=_as_is,  # batches are made in the workers; skip default_convert's walk
        )
        dataset.numpy_fields = True  # converted to tensors in _serve
        self.pin = pin_memory
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
            # never below the pass after the last one: a run resumed at an epoch's very end
            # continues the stream at the next epoch while Lightning still counts the old one
            epoch, skip = max(int(self.epoch_fn()), self._passes), 0
        else:
            epoch, skip = self._passes, 0
        self._resume = self._next = None
        self._passes = epoch + 1
        self.epoch, self.served = epoch, skip
        self.dataset.epoch, self.dataset.skip = epoch, skip
        # A fresh ring per pass: workers of an abandoned pass may still be writing to theirs.
        ring = None
        if self.ring_shape is not None:
            ring = BatchRing(self.num_workers, PREFETCH + 2, self.ring_shape)
        self.dataset.ring = ring
        return self._serve(super().__iter__(), ring)

    def _serve(self, it: Iterator[dict], ring: BatchRing | None) -> Iterator[dict]:
        for batch in it:
            self.served += 1
            if "ring" in batch:
                batch["frames"] = ring.take(batch.pop("ring"), pin_memory=self.pin)
            yield as_tensors(batch)
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


def _as_is(item: dict) -> dict:
    return item
