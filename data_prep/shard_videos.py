"""Shard a folder of videos into a lapo dataset (webdataset tars of clips + manifest.json).

    python -m data_prep.shard_videos SRC OUT [--clip-frames 64] [--size 64] [--fps 15]
        [--resize crop|pad] [--shard-bytes 256MB] [--workers 8]

SRC is searched recursively for .mp4 .webm .avi .mkv files. ``NAME.actions.npy``
beside ``NAME.mp4`` holds one action row per *source* frame (row t: the action
taken after frame t). Rerunning the same command after an interruption resumes
it. The library code lives in :mod:`lapo.ingest` and :mod:`lapo.ingest_plan`.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys

from lapo.ingest import ingest
from lapo.ingest_plan import IngestError, IngestOptions

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30})


def parse_bytes(text: str) -> int:
    """``256MB`` -> 256_000_000, ``1GiB`` -> 2**30, ``5000`` -> 5000."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 256MB, 1GiB or 5000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def build_parser() -> argparse.ArgumentParser:
    d = IngestOptions()
    p = argparse.ArgumentParser(
        prog="python -m data_prep.shard_videos",
        description=__doc__.split("\n\n")[0]
        + " Videos are resampled to --fps, resized to --size, cut into clips of --clip-frames "
        "and written as H.264 mp4 samples. Unreadable videos and videos whose actions file "
        "does not have one row per source frame are reported and left out.",
        epilog="Frame-rate changes show, for each output frame, the nearest source frame in time "
        "(ties go to the later one) and keep that source frame's action row; downsampling "
        "therefore drops the actions of skipped frames, upsampling repeats frames and actions. "
        "A rerun with the same SRC and options skips finished shards and gives the same clips "
        "as an uninterrupted run (the same frames and actions).",
    )
    p.add_argument("src", metavar="SRC", help="folder of videos (searched recursively)")
    p.add_argument("out", metavar="OUT", help="dataset directory to write (created if missing)")
    p.add_argument(
        "--clip-frames",
        type=int,
        default=d.clip_frames,
        help=f"frames per clip (default {d.clip_frames}); a video's shorter last clip is kept if it "
        "has at least --min-clip-frames frames",
    )
    p.add_argument(
        "--min-clip-frames",
        type=int,
        default=d.min_clip_frames,
        help=f"shortest tail clip kept (default {d.min_clip_frames}: one transition)",
    )
    p.add_argument(
        "--size",
        type=int,
        default=d.size,
        help=f"output frames are SIZE x SIZE pixels, an even number (default {d.size})",
    )
    p.add_argument(
        "--fps", type=float, default=d.fps, help=f"output frame rate (default {d.fps:g})"
    )
    p.add_argument(
        "--resize",
        choices=("crop", "pad"),
        default=d.resize,
        help="make frames square by a centre crop, or by letterboxing with black (default crop)",
    )
    p.add_argument(
        "--shard-bytes",
        type=parse_bytes,
        default=d.shard_bytes,
        help="target shard size, e.g. 256MB or 1GiB (default 256MB); estimated from video "
        "durations, and a video is never split, so shards may differ from it",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=8,
        help="processes decoding and encoding videos in parallel (default 8; 1: no subprocesses)",
    )
    p.add_argument(
        "--crf", type=int, default=d.crf, help=f"x264 quality, lower is better (default {d.crf})"
    )
    p.add_argument(
        "--gop", type=int, default=d.gop, help=f"keyframe interval of clips (default {d.gop})"
    )
    p.add_argument(
        "--num-actions",
        type=int,
        default=d.num_actions,
        help="size of a discrete action space for the manifest (default 0: largest action + 1)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete shards and manifest already in OUT and start over (default: resume)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        opts = IngestOptions(
            clip_frames=args.clip_frames,
            size=args.size,
            fps=args.fps,
            resize=args.resize,
            shard_bytes=args.shard_bytes,
            min_clip_frames=args.min_clip_frames,
            crf=args.crf,
            gop=args.gop,
            num_actions=args.num_actions,
        )
        if args.workers < 1:
            raise IngestError(f"--workers must be >= 1, got {args.workers}")
        summary = ingest(
            args.src,
            args.out,
            opts,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            command=shlex.join(["python", "-m", "data_prep.shard_videos", *argv]),
        )
    except (IngestError, OSError) as e:  # OSError: full disk, unwritable OUT (names the file)
        print(f"shard_videos: error: {e}", file=sys.stderr)
        return 2
    for s in summary["skipped"]:
        print(f"skipped {s['video']}: {s['reason']}", file=sys.stderr)
    rate = summary["clips_made_now"] / max(summary["seconds"], 1e-9)
    print(
        f"done: {summary['good_videos']} videos ok, {summary['skipped_videos']} skipped; "
        f"{summary['clips']} clips, {summary['frames']} frames, {summary['shards']} shards, "
        f"{summary['bytes'] / 1e6:.1f} MB in {args.out}\n"
        f"this run: {summary['videos_processed_now']} videos, {summary['clips_made_now']} clips "
        f"in {summary['seconds']:.1f} s ({rate:.1f} clips/s); "
        f"{summary['resumed_shards']} shards reused from an earlier run; "
        f"action space {summary['action_space']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
