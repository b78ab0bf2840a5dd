"""Pipeline stages run as commands, each with a stamp of what made its output.

A stage is one command (``python -m ARGV``) plus a marker file that exists once the
command has finished. Beside the marker, ``MARKER.stamp.json`` records what made it:

- ``command``: the argument list, exactly as run;
- ``files``: a digest of every file the command line names that is not another
  stage's output (its YAML config, say), so an edited config counts as a new setting;
  a YAML file by the settings it holds (comments and layout do not count), any other
  file by its bytes (SHA-256);
- ``inputs``: for every earlier stage whose output the command line names, a digest
  of that stage's stamp, so a stage that ran again makes everything reading it stale;
- ``wall_seconds`` and ``finished``: how long it ran, and when.

`run_step` reuses a finished stage only when the first three equal what would run now.
Otherwise it says why, deletes the stage's ``--out`` and runs the command again. Used by
`lapo demo` and by ``experiments/label_efficiency.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

from lapo.io import atomic_write_json, file_sha256

STAMP_SUFFIX = ".stamp.json"
COMPARED = ("command", "files", "inputs")  # what must match for a stage to be reused


def stamp_path(marker: str | Path) -> Path:
    """Where the stamp of the stage whose marker is `marker` lives: ``MARKER.stamp.json``."""
    marker = Path(marker)
    return marker.with_name(marker.name + STAMP_SUFFIX)


def read_stamp(marker: str | Path) -> dict | None:
    """The stamp beside `marker`, or None when there is none (or it cannot be read)."""
    try:
        return json.loads(stamp_path(marker).read_text())
    except (OSError, ValueError):
        return None


def _out_of(argv: list[str]) -> Path | None:
    """The path after ``--out`` (what the command writes), if it names one."""
    for flag, value in zip(argv, argv[1:]):
        if flag == "--out":
            return Path(value)
    return None


def _stamps_of(path: Path) -> list[Path]:
    """Stamps that mark `path` as another stage's output: in it (a directory) or beside it."""
    if path.is_dir():
        return sorted(path.glob("*" + STAMP_SUFFIX))
    own = stamp_path(path)
    return [own] if own.is_file() else []


def file_digest(path: Path) -> str:
    """What a stamp records of a file the command names: a YAML file's parsed settings
    (``yaml:`` + 16 hex digits), or the first 16 hex digits of any other file's SHA-256."""
    if path.suffix in (".yaml", ".yml"):
        try:
            settings = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            pass  # not YAML after all: its bytes stand for it
        else:
            text = json.dumps(settings, sort_keys=True, default=str)
            return "yaml:" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return file_sha256(path)[:16]


def _same_file(name: str, old: str | None, new: str) -> bool:
    """Whether a file recorded as `old` is unchanged now (digest `new`); stamps written
    before YAML was digested by its settings hold its bytes' digest, which also counts."""
    return old == new or (
        old is not None and new.startswith("yaml:") and old == file_sha256(Path(name))[:16]
    )


def stage_settings(argv: list[str]) -> dict:
    """What `run_step` compares: the command, the files it names, the stages it reads."""
    out = _out_of(argv)
    files: dict[str, str] = {}
    inputs: dict[str, str] = {}
    for arg in argv[1:]:
        path = Path(arg)
        if (out is not None and path == out) or not path.exists():
            continue
        stamps = _stamps_of(path)
        for s in stamps:
            inputs[str(s)] = file_sha256(s)[:16]
        if not stamps and path.is_file():
            files[arg] = file_digest(path)
    return {"command": list(argv), "files": files, "inputs": inputs}


def _command_change(old: list[str], new: list[str]) -> str:
    """The arguments that differ, as ``--flag: old -> new`` or ``key: old -> new``."""
    if len(old) != len(new):
        gone = [a for a in old if a not in new]
        added = [a for a in new if a not in old]
        return f"the command now has {added or 'nothing new'} and not {gone or 'nothing'}"
    parts = []
    for i, (o, n) in enumerate(zip(old, new)):
        if o == n:
            continue
        ok, _, ov = o.partition("=")
        nk, _, nv = n.partition("=")
        if ov and nv and ok == nk:  # --set key=value
            parts.append(f"{nk}: {ov} -> {nv}")
        elif i > 0 and old[i - 1].startswith("--"):
            parts.append(f"{old[i - 1]}: {o} -> {n}")
        else:
            parts.append(f"{o} -> {n}")
    return ", ".join(parts)


def why_rerun(old: dict | None, new: dict) -> str | None:
    """Why a finished stage stamped `old` cannot stand for one with settings `new` (None: it can)."""
    if old is None:
        return "no stamp records what made its output"
    if old.get("command") != new["command"]:
        return "its output was made with other settings: " + _command_change(
            old["command"], new["command"]
        )
    changed = [
        f for f in new["files"] if not _same_file(f, old.get("files", {}).get(f), new["files"][f])
    ]
    changed += [f for f in old.get("files", {}) if f not in new["files"]]
    if changed:
        return f"{', '.join(changed)} changed since its output was made"
    old_inputs = old.get("inputs", {})
    remade = [s for s in new["inputs"] if old_inputs.get(s) != new["inputs"][s]]
    remade += [s for s in old_inputs if s not in new["inputs"]]
    if remade:
        names = ", ".join(s.removesuffix(STAMP_SUFFIX) for s in remade)
        return f"an input was made again since its output was made: {names}"
    return None


def _clear(output: Path | None, marker: Path) -> None:
    """Delete a finished stage's output, so that its rerun starts clean and leaves nothing stale.

    Only a `--out` that holds `marker` (or is it) is deleted; otherwise only the marker goes.
    """
    stamp_path(marker).unlink(missing_ok=True)
    m = marker.resolve()
    if output is not None and output.exists() and m.is_relative_to(output.resolve()):
        if output.is_dir():
            shutil.rmtree(output)
        else:
            output.unlink()
    marker.unlink(missing_ok=True)


def run_step(
    argv: list, marker: str | Path, *, fresh: bool = False, label: str = "", banner: str = ""
) -> bool:
    """Run ``python -m *argv`` unless `marker` exists and its stamp matches; True if it ran.

    A finished stage whose stamp differs from what would run now (or `fresh`) is deleted and
    run again, with a line saying why. A failure, or a run that ends without writing
    `marker`, exits naming `label`. On success the stamp is written beside `marker`.
    """
    argv, marker = [str(a) for a in argv], Path(marker)
    settings = stage_settings(argv)
    reason = None
    if marker.exists():
        reason = "--fresh redoes every stage" if fresh else why_rerun(read_stamp(marker), settings)
        if reason is None:
            return False
    if banner:
        print(f"\n{banner}", flush=True)
    if reason is not None:
        who = "" if banner else f"{label or ' '.join(argv)}: "  # the banner already names it
        print(f"{who}running again, as {reason}", flush=True)
        _clear(_out_of(argv), marker)
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", *argv], env=env)
    seconds = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed (exit {proc.returncode})")
    if not marker.exists():
        raise SystemExit(f"{label} finished but wrote no {marker}")
    stamp = {
        **settings,
        "wall_seconds": round(seconds, 1),
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_json(stamp_path(marker), stamp)
    return True
