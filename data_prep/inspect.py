"""Summarise and validate a lapo dataset directory.

    python -m data_prep.inspect DATASET [--json] [--decode]

Prints shards, clips, frames, hours, bytes, frame size, the action space with a
histogram of discrete actions (or per-dimension mean/std of continuous ones) and
the labelled fraction. Every shard is read and checked against manifest.json;
the exit status is 1 when problems are found (they are listed), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from lapo.shards import load_npy, read_manifest
from lapo.validate import validate_dataset


class _Stats:
    """Counts gathered from every sample while the shards are validated."""

    def __init__(self) -> None:
        self.clips = self.frames = self.labelled_clips = self.labelled_frames = 0
        self.episodes: set[str] = set()
        self.hist = np.zeros(0, dtype=np.int64)
        self.sum: np.ndarray | None = None
        self.sumsq: np.ndarray | None = None
        self.rows = 0

    def visit(self, shard: str, sample: dict) -> None:
        try:
            meta = json.loads(sample["json"])
            t = int(meta["num_frames"])
        except Exception:
            return  # validate_dataset reports it
        self.clips += 1
        self.frames += t
        self.episodes.add(str(meta.get("episode")))
        if "actions.npy" not in sample:
            return
        try:
            a = load_npy(sample["actions.npy"])
        except Exception:
            return
        self.labelled_clips += 1
        self.labelled_frames += t
        if a.dtype.kind in "iu" and a.ndim == 1:
            counts = np.bincount(a.clip(min=0))
            if len(counts) > len(self.hist):
                self.hist = np.pad(self.hist, (0, len(counts) - len(self.hist)))
            self.hist[: len(counts)] += counts
        elif a.dtype.kind == "f" and a.ndim == 2:
            a64 = a.astype(np.float64)
            if self.sum is None or self.sum.shape != a64.shape[1:]:
                self.sum, self.sumsq = np.zeros(a64.shape[1]), np.zeros(a64.shape[1])
            self.sum += a64.sum(0)
            self.sumsq += (a64**2).sum(0)
            self.rows += len(a64)


def inspect_dataset(path: str | Path, *, decode: bool = False) -> dict:
    """Statistics and validation problems of the dataset at ``path`` as a JSON-able dict."""
    path = Path(path)
    stats = _Stats()
    problems = validate_dataset(path, decode=decode, visit=stats.visit)
    try:
        manifest = read_manifest(path)
    except (FileNotFoundError, ValueError):
        return {"dataset": str(path), "problems": problems}
    fps = float(manifest["fps"])
    space = manifest.get("action_space")
    report: dict = {
        "dataset": str(path),
        "shards": len(manifest["shards"]),
        "clips": stats.clips,
        "episodes": len(stats.episodes),
        "frames": stats.frames,
        "fps": fps,
        "hours": stats.frames / fps / 3600 if fps > 0 else None,
        "bytes": sum(int(s.get("bytes", 0)) for s in manifest["shards"]),
        "height": manifest["height"],
        "width": manifest["width"],
        "action_space": space,
        "labelled_clips": stats.labelled_clips,
        "labelled_fraction": stats.labelled_frames / stats.frames if stats.frames else 0.0,
        "made_by": manifest.get("made_by"),
        "problems": problems,
    }
    if stats.hist.sum():
        n = max(len(stats.hist), space["n"] if space and space.get("type") == "discrete" else 0)
        report["action_histogram"] = np.pad(stats.hist, (0, n - len(stats.hist))).tolist()
    if stats.rows:
        mean = stats.sum / stats.rows
        std = np.sqrt(np.maximum(stats.sumsq / stats.rows - mean**2, 0.0))
        report["action_mean"], report["action_std"] = mean.tolist(), std.tolist()
    return report


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def format_report(r: dict, max_problems: int = 50) -> str:
    lines = [f"dataset     {r['dataset']}"]
    if "clips" in r:
        per_shard = r["bytes"] / r["shards"] if r["shards"] else 0
        lines += [
            f"shards      {r['shards']}  ({_fmt_bytes(r['bytes'])}, {_fmt_bytes(per_shard)} per shard)",
            f"clips       {r['clips']}  from {r['episodes']} episodes/videos",
            f"frames      {r['frames']}  ({r['hours']:.3f} h at {r['fps']:g} fps)",
            f"frame size  {r['height']}x{r['width']}",
            f"actions     {json.dumps(r['action_space'])}",
            f"labelled    {r['labelled_clips']}/{r['clips']} clips, "
            f"{100 * r['labelled_fraction']:.1f}% of frames",
        ]
        hist = r.get("action_histogram")
        if hist:
            total, top = sum(hist), max(hist)
            lines.append("action histogram")
            for a, c in enumerate(hist):
                bar = "#" * round(30 * c / top) if top else ""
                lines.append(f"  {a:>4}  {c:>9}  {100 * c / total:5.1f}%  {bar}")
        if "action_mean" in r:
            lines.append("action mean/std per dim")
            for d, (m, s) in enumerate(zip(r["action_mean"], r["action_std"])):
                lines.append(f"  {d:>4}  {m:+.4f}  {s:.4f}")
        if r.get("made_by"):
            mb = r["made_by"]
            lines.append(f"made by     {mb.get('command') or mb.get('tool') or mb}")
            if mb.get("skipped"):
                lines.append(f"            {len(mb['skipped'])} source videos were skipped")
    problems = r["problems"]
    if problems:
        lines.append(f"INVALID: {len(problems)} problem(s)")
        lines += [f"  - {p}" for p in problems[:max_problems]]
        if len(problems) > max_problems:
            lines.append(f"  ... and {len(problems) - max_problems} more (see --json)")
    else:
        lines.append("valid: manifest matches the shards")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.inspect",
        description="Summarise a lapo dataset (shards, clips, frames, hours, sizes, actions) and "
        "check every shard against manifest.json. Exit status 1 when problems are found.",
    )
    p.add_argument("dataset", metavar="DATASET", help="dataset directory holding manifest.json")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    p.add_argument(
        "--decode",
        action="store_true",
        help="also decode every clip and check its frame count and size (slow)",
    )
    p.add_argument(
        "--max-problems",
        type=int,
        default=50,
        help="problems listed in the text report (default 50)",
    )
    args = p.parse_args(argv)
    report = inspect_dataset(args.dataset, decode=args.decode)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report, args.max_problems))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
