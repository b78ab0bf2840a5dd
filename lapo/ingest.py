"""Turn a folder of videos (plus optional per-frame actions) into a sharded dataset.

The work has three steps:

1. **Probe** every video's header (frame rate, estimated frame count). A file
   that cannot be opened is skipped here.
2. **Plan**: assign whole videos, in sorted order, to shards so that each shard's
   estimated encoded size stays near the target. The plan is a pure function of
   the sorted file list, the files' headers and the options, and it is saved in
   ``OUT/_ingest/plan.json``.
3. **Build**: worker processes decode, resample, resize, cut and encode one video
   each; the parent writes shards in plan order (tmp + rename) and a small
   sidecar ``OUT/_ingest/shard-NNNNNN.json`` after each. A rerun of the same
   command skips every shard with a sidecar, so a killed run resumes where it
   stopped and ends with the same bytes as an uninterrupted run.

Steps 1 and 2, and the options, are in :mod:`lapo.ingest_plan`; how one video
becomes clips (frame-rate change, which action rows are kept) is in
:mod:`lapo.source_video`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lapo import __version__
from lapo.ingest_plan import (
    VIDEO_EXTS,
    WORK_DIR,
    IngestError,
    IngestOptions,
    check_action_files,
    find_videos,
    plan_id,
    plan_shards,
    probe_job,
    unique_stems,
)
from lapo.io import atomic_write_json, remove_stale_temporaries
from lapo.shards import merge_action_spaces, shard_name, write_manifest, write_shard
from lapo.source_video import build_video

PAUSE_ENV = "LAPO_INGEST_PAUSE_S"  # testing aid: sleep this long after each shard is written


def _worker_init() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


class _Mapper:
    """Ordered map over jobs: in-process for one worker, a spawn pool otherwise."""

    def __init__(self, workers: int):
        self.pool = None
        if workers > 1:
            # spawn: the parent has opened files with FFmpeg, whose state must not be forked
            self.pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init)

    def imap(self, fn: Callable, jobs: list) -> Iterator:
        return self.pool.imap(fn, jobs, chunksize=1) if self.pool else map(fn, jobs)

    def close(self, failed: bool = False) -> None:
        if self.pool:
            if failed:
                self.pool.terminate()  # do not wait for videos nobody will collect
            else:
                self.pool.close()
            self.pool.join()


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_json(path, obj, indent=1, sort_keys=True)


def _lock(work: Path):
    fd = os.open(work / "lock", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise IngestError(f"{work.parent}: another shard_videos run is writing here") from None
    return fd


def _clear(out: Path, work: Path) -> None:
    for p in list(out.glob("shard-*.tar")) + list(out.glob("*.tmp")) + [out / "manifest.json"]:
        p.unlink(missing_ok=True)
    for p in work.glob("*.json"):
        p.unlink()


def ingest(
    src: str | Path,
    out: str | Path,
    opts: IngestOptions,
    *,
    workers: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    command: str = "",
    log: Callable[[str], None] = print,
) -> dict:
    """Shard the videos under ``src`` into ``out``; resume an interrupted run. Returns a summary."""
    from tqdm import tqdm

    t0 = time.time()
    src, out = Path(src).resolve(), Path(out)
    rels = find_videos(src)
    if not rels:
        raise IngestError(f"{src}: no videos ({', '.join(VIDEO_EXTS)}) found")
    check_action_files(src, rels)  # at start-up, not after every video has been encoded
    work = out / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    lock = _lock(work)
    mapper = _Mapper(min(workers, len(rels)))
    try:
        probes = list(mapper.imap(probe_job, [(str(src), r) for r in rels]))
        skipped = [{"video": p["rel"], "reason": p["error"]} for p in probes if "error" in p]
        good = [p for p in probes if "error" not in p]
        plan = plan_shards(good, opts)
        pid = plan_id(src, plan, opts)
        old = work / "plan.json"
        if overwrite:
            _clear(out, work)
        elif old.is_file() and json.loads(old.read_text()).get("plan_id") != pid:
            raise IngestError(
                f"{out} holds shards of a different plan (other files or options); "
                "use a new OUT directory or pass --overwrite"
            )
        elif not old.is_file() and any(out.glob("shard-*.tar")):
            raise IngestError(f"{out} already holds shards not made by this tool; pass --overwrite")
        for d in (out, work):  # an interrupted write; the lock says no one else is writing
            remove_stale_temporaries(d)
        _write_json(old, {"plan_id": pid, "options": dataclasses.asdict(opts), "shards": plan})

        stems = unique_stems(rels)
        done: dict[int, dict] = {}
        for i in range(len(plan)):
            side = work / f"shard-{i:06d}.json"
            if side.is_file():
                info = json.loads(side.read_text())
                tar_ok = info["samples"] == 0 or (out / info["name"]).is_file()
                if info.get("plan_id") == pid and tar_ok:
                    done[i] = info
        todo = [i for i in range(len(plan)) if i not in done]
        jobs = [(str(src), rel, stems[rel], opts) for i in todo for rel in plan[i]]
        n_videos = sum(len(plan[i]) for i in done)
        log(
            f"{len(rels)} videos, {len(skipped)} unreadable, {len(plan)} shards planned, "
            f"{len(done)} already written; {len(jobs)} videos to process with {workers} workers"
        )
        results = mapper.imap(build_video, jobs)
        bar = tqdm(total=len(jobs), unit="video", disable=not progress, dynamic_ncols=True)
        pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
        clips_now = 0
        for i in todo:
            got = [next(results) for _ in plan[i]]
            bar.update(len(got))
            samples = [s for g in got for s in g.get("samples", [])]
            clips_now += len(samples)
            bar.set_postfix(clips=clips_now)
            info = {"name": shard_name(i), "samples": 0, "frames": 0, "bytes": 0}
            if samples:
                info = write_shard(out / shard_name(i), samples)
            info["plan_id"] = pid
            info["skipped"] = [
                {"video": g["rel"], "reason": g["error"]} for g in got if "error" in g
            ]
            info["videos"] = {g["rel"]: g["action_space"] for g in got if "error" not in g}
            _write_json(work / f"shard-{i:06d}.json", info)
            done[i] = info
            if pause:
                time.sleep(pause)
        bar.close()
    except BaseException:
        mapper.close(failed=True)
        raise
    else:
        mapper.close()
    finally:
        os.close(lock)

    infos = [done[i] for i in range(len(plan))]
    skipped += [s for info in infos for s in info["skipped"]]
    skipped.sort(key=lambda s: s["video"])
    space = None
    spaces: dict[str, dict | None] = {k: v for info in infos for k, v in info["videos"].items()}
    for rel, sp in sorted(spaces.items()):
        try:
            space = merge_action_spaces(space, sp)
        except ValueError as e:
            raise IngestError(f"{rel}: its actions do not match the other videos': {e}") from e
    if space and space["type"] == "discrete" and opts.num_actions:
        if opts.num_actions < space["n"]:
            raise IngestError(
                f"--num-actions {opts.num_actions} but actions up to {space['n'] - 1} seen"
            )
        space = {"type": "discrete", "n": opts.num_actions}
    written = [info for info in infos if info["samples"] > 0]
    if not written:
        raise IngestError(f"{src}: no clips made; every video was skipped: {skipped}")
    made_by = {
        "tool": "data_prep.shard_videos",
        "lapo_version": __version__,
        "command": command,
        "source": str(src),
        "options": dataclasses.asdict(opts),
        "plan_id": pid,
        "videos": len(spaces),
        "labelled_videos": sum(sp is not None for sp in spaces.values()),
        "skipped": skipped,
    }
    manifest = write_manifest(
        out,
        written,
        height=opts.size,
        width=opts.size,
        fps=opts.fps,
        action_space=space,
        made_by=made_by,
    )
    seconds = time.time() - t0
    return {
        "videos": len(rels),
        "good_videos": len(spaces),
        "skipped_videos": len(skipped),
        "skipped": skipped,
        "clips": manifest["num_samples"],
        "frames": manifest["num_frames"],
        "shards": len(written),
        "shards_written_now": len(todo),
        "videos_processed_now": len(jobs),
        "clips_made_now": clips_now,
        "bytes": sum(s["bytes"] for s in written),
        "seconds": seconds,
        "action_space": space,
        "resumed_shards": len(plan) - len(todo),
        "reused_videos": n_videos,
    }
