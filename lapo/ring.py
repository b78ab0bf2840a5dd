"""Handing batch frames from DataLoader workers to the main process through reused shared memory.

A DataLoader worker normally returns each tensor by moving it to a fresh
shared-memory segment and passing its file descriptor over a socket. For the
loader's batches (about 1 MB of frames each) that costs more CPU than decoding
the clips behind them. Here every worker owns a few slots of one shared tensor
made before the workers start: it writes a batch's frames into a free slot and
sends only the slot number; the main process copies the frames out (into pinned
memory when asked) and frees the slot.

Flow control is a flag per slot. DataLoader keeps at most ``prefetch_factor``
requests outstanding per worker and the main process frees a slot as soon as
it receives it, so ``prefetch_factor + 2`` slots never run out; a worker that
finds none free waits, and gives up with an error rather than hang if the main
process stops taking batches. The loader makes a new ring for every pass, so
workers of an abandoned pass never write into the slots of the next.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

WAIT_LIMIT_S = 600.0


class BatchRing:
    """Per-worker slots of shared memory for frames of shape ``batch_shape`` (B, k+1, 3, H, W)."""

    def __init__(self, num_workers: int, slots: int, batch_shape: tuple[int, ...]):
        self.frames = torch.zeros((num_workers, slots, *batch_shape), dtype=torch.uint8)
        self.frames.share_memory_()
        self.full = torch.zeros((num_workers, slots), dtype=torch.int32)  # 1: written, not taken
        self.full.share_memory_()
        self._next = [0] * num_workers  # worker side: the slot to write next (round-robin)

    def put(self, worker: int, windows: list[np.ndarray]) -> tuple[int, int, int]:
        """Worker: stack window frames (k+1, 3, H, W) into a free slot; return its address."""
        slot = self._next[worker]
        self._next[worker] = (slot + 1) % self.full.shape[1]
        flags = self.full.numpy()
        waited, parent = 0.0, os.getppid()
        while flags[worker, slot]:  # the main process has not copied this slot out yet
            time.sleep(0.0005)
            waited += 0.0005
            if waited > WAIT_LIMIT_S or os.getppid() != parent:
                raise RuntimeError(
                    f"lapo.ring: worker {worker} waited {waited:.0f} s for a free slot"
                )
        out = self.frames.numpy()[worker, slot, : len(windows)]  # (n, k+1, 3, H, W)
        np.stack(windows, out=out)
        flags[worker, slot] = 1
        return worker, slot, len(windows)

    def take(self, address: tuple[int, int, int], *, pin_memory: bool = False) -> torch.Tensor:
        """Main process: copy a batch's frames out of its slot and free the slot."""
        worker, slot, n = address
        src = self.frames[worker, slot, :n]  # (n, k+1, 3, H, W)
        out = torch.empty(src.shape, dtype=torch.uint8, pin_memory=pin_memory)
        out.copy_(src)
        self.full[worker, slot] = 0
        return out
