"""Loader throughput: lapo's loader against the decode limit and a naive per-window reader.

    python benchmarks/loader.py                 # makes 300 clips of 64 frames, 64x64, in /tmp
    python benchmarks/loader.py --data DATASET  # any lapo dataset directory
    python benchmarks/loader.py --workers 8 --batch-size 128 --clips 2000   # a GPU host's loader

Three readers of the same clips, all timed in this run:

(a) limit:  a plain decord loop decoding every clip once from bytes already in memory.
(b) lapo:   lapo.data.make_loader, one worker process (``--workers`` for more; tar
            reading, checks, decode, cutting, shuffling and batching included); a finite
            pass over every clip, and the resampled training stream.
(c) naive:  a map-style reader that opens a decord reader per window and decodes
            only that window's frames (bytes in memory; a sample of the windows).

Frames/s counts frames decoded (for (c): frames returned, k+1 per window); windows/s
counts windows of k+1 frames delivered. (a) and (c) run in this process, (b) in
``--workers`` DataLoader workers (one by default, so that all three are rates per
core). Each rate is given per second of wall clock and per CPU-second of the processes
doing the work (for (b): the workers; the main process's share is printed apart),
which stays meaningful on a machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lapo.config import DataConfig  # noqa: E402
from lapo.data import list_shards, make_loader  # noqa: E402
from lapo.tars import iter_tar_samples  # noqa: E402
from lapo.windows import window_starts  # noqa: E402


class Timer:
    """Wall clock, this process's CPU time, and CPU time of reaped child processes."""

    def __enter__(self) -> Timer:
        self.w0, self.c0, self.k0 = time.perf_counter(), time.process_time(), _children_cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0
        self.child_cpu = _children_cpu() - self.k0


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def load_clips(urls: list[str]) -> list[dict]:
    """mp4 bytes and dones of every clip, read into memory once (not timed)."""
    clips = []
    for url in urls:
        for s in iter_tar_samples(url):
            dones = np.load(io.BytesIO(s["dones.npy"])) if "dones.npy" in s else None
            clips.append({"key": s["__key__"], "mp4": s["mp4"], "dones": dones})
    return clips


def bench_limit(clips: list[dict], context: int) -> dict:
    import decord

    frames = windows = 0
    with Timer() as t:
        for c in clips:
            reader = decord.VideoReader(io.BytesIO(c["mp4"]), num_threads=1)
            arr = reader.get_batch(range(len(reader))).asnumpy()  # (T, H, W, 3)
            frames += len(arr)
            windows += len(window_starts(len(arr), c["dones"], context, 1))
    return {"wall": t.wall, "cpu": t.cpu, "main_cpu": 0.0, "frames": frames, "windows": windows}


def bench_naive(clips: list[dict], context: int, max_windows: int) -> dict:
    import decord

    jobs = []
    for c in clips:
        reader = decord.VideoReader(io.BytesIO(c["mp4"]), num_threads=1)
        jobs += [(c["mp4"], int(s)) for s in window_starts(len(reader), c["dones"], context, 1)]
    step = max(len(jobs) // max_windows, 1)
    jobs = jobs[::step][:max_windows]  # spread over all clips, early and late windows alike
    frames = 0
    with Timer() as t:
        for mp4, s in jobs:
            reader = decord.VideoReader(io.BytesIO(mp4), num_threads=1)
            frames += len(reader.get_batch(list(range(s, s + context + 1))).asnumpy())
    return {"wall": t.wall, "cpu": t.cpu, "main_cpu": 0.0, "frames": frames, "windows": len(jobs)}


def bench_lapo(data: str, cfg: DataConfig, train: bool, frames_per_clip: float) -> dict:
    loader = make_loader(data, cfg, train=train)
    windows = 0
    with Timer() as t:
        for batch in loader:
            windows += len(batch["key"])
    clips = loader.stats.as_dict()["clips"]
    return {
        "wall": t.wall,
        "cpu": t.child_cpu if cfg.num_workers else t.cpu,  # the worker's CPU time
        "main_cpu": t.cpu if cfg.num_workers else 0.0,
        "frames": int(round(clips * frames_per_clip)),
        "windows": windows,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", help="a lapo dataset directory (default: generate one in /tmp)")
    p.add_argument("--clips", type=int, default=300, help="clips to generate")
    p.add_argument("--frames", type=int, default=64, help="frames per generated clip")
    p.add_argument("--size", type=int, default=64, help="side of generated frames")
    p.add_argument("--context", type=int, default=2, help="k: context frames (windows hold k+1)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per batch for lapo's loader")
    p.add_argument(
        "--workers", type=int, default=1, help="DataLoader worker processes for lapo's loader"
    )
    p.add_argument("--json", help="also write each reader's figures to this JSON file")
    p.add_argument(
        "--naive-windows", type=int, default=1500, help="windows the naive reader decodes"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each reader; the best is kept"
    )
    args = p.parse_args()

    data = args.data
    if data is None:
        from tests.datagen import make_dataset

        data = tempfile.mkdtemp(prefix="lapo-bench-", dir="/tmp")
        t0 = time.perf_counter()
        per_shard = 30
        make_dataset(
            data,
            shards=max(args.clips // per_shard, 1),
            clips_per_shard=per_shard,
            clip_frames=args.frames,
            size=args.size,
            episode_len=(1000, 2000),
            seed=0,
        )
        print(
            f"generated {args.clips} clips of {args.frames} frames, {args.size}x{args.size}, "
            f"in {data} ({time.perf_counter() - t0:.1f} s)"
        )
    urls = list_shards(data)
    clips = load_clips(urls)
    k = args.context

    def best(fn, *a):
        runs = [fn(*a) for _ in range(args.repeats)]
        return min(runs, key=lambda r: r["cpu"])

    limit = best(bench_limit, clips, k)
    frames_per_clip = limit["frames"] / len(clips)
    base = dict(
        path=data,
        context=k,
        batch_size=args.batch_size,
        num_workers=args.workers,
        val_batches=0,
        val_shards=0,
    )
    cfg_val = DataConfig(**base)
    per_epoch = max(
        limit["windows"] // args.batch_size, 1
    )  # about one clip's worth of windows each
    cfg_train = DataConfig(**base, batches_per_epoch=per_epoch, shuffle_buffer=2048)
    rows = {
        "(a) decord loop, every clip once": limit,
        "(b) lapo loader, one pass": best(bench_lapo, data, cfg_val, False, frames_per_clip),
        "(b) lapo loader, training stream": best(
            bench_lapo, data, cfg_train, True, frames_per_clip
        ),
        "(c) naive, reader per window": best(bench_naive, clips, k, args.naive_windows),
    }
    print(
        f"\n{len(clips)} clips of {frames_per_clip:.0f} frames, {args.size}x{args.size}, windows of "
        f"{k + 1} frames, batch {args.batch_size}, {args.workers} loader worker(s); best of "
        f"{args.repeats} by CPU time"
    )
    if args.json:
        figures = {
            name: {"windows_per_s": r["windows"] / r["wall"], "frames_per_s": r["frames"] / r["wall"],
                   "windows_per_cpu_s": r["windows"] / r["cpu"]}
            for name, r in rows.items()
        }  # fmt: skip
        figures["workers"], figures["batch_size"] = args.workers, args.batch_size
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    head = f"{'reader':34s} {'wall s':>7s} {'cpu s':>7s} {'main s':>7s}"
    print(f"{head} {'frames/s':>9s} {'frames/cpu-s':>12s} {'windows/s':>9s} {'windows/cpu-s':>13s}")
    for name, r in rows.items():
        print(
            f"{name:34s} {r['wall']:7.2f} {r['cpu']:7.2f} {r['main_cpu']:7.2f} "
            f"{r['frames'] / r['wall']:9.0f} {r['frames'] / r['cpu']:12.0f} "
            f"{r['windows'] / r['wall']:9.0f} {r['windows'] / r['cpu']:13.0f}"
        )
    a, c = rows["(a) decord loop, every clip once"], rows["(c) naive, reader per window"]
    for name in list(rows)[1:3]:
        r = rows[name]
        for clock in ("cpu", "wall"):
            f = (r["frames"] / r[clock]) / (a["frames"] / a[clock])
            w = (r["windows"] / r[clock]) / (c["windows"] / c[clock])
            print(f"{name} [{clock:4s}]: {f:.2f}x (a) in frames/s, {w:.1f}x (c) in windows/s")


if __name__ == "__main__":
    main()
