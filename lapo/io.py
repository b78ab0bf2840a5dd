"""Files written whole or not at all, and what a killed writer leaves behind.

`atomic_write` writes to a new temporary ``.NAME.<random>.tmp`` in the target's directory,
fsyncs it and renames it over ``NAME``. The rename is atomic on POSIX file systems, so a
reader sees the old file or the new one, never half of the new one; a process killed
mid-write leaves only the temporary, which `remove_stale_temporaries` deletes on the next
start. Standard library only: data preparation, labelling and evaluation import it
without torch or Lightning.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a new temporary file beside `path`, fsync it, rename it over `path`.

    The file gets the mode a plain ``open(path, "w")`` gives (0o666 less the umask). On any
    failure the temporary is removed, and an OSError that names no file (ENOSPC from
    write()) is raised again naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # ours alone from here
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None and not e.filename:
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(
    path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False
) -> Path:
    """`obj` as JSON and a final newline."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def remove_stale_temporaries(directory: str | Path, name: str | None = None) -> list[Path]:
    """Delete the ``*.tmp`` files in `directory` (with `name`: only those `atomic_write` began
    for that file) that a process killed mid-write left behind; return them.

    Call only where no other process writes those files at the same time.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = f".{glob.escape(name)}.*.tmp" if name else "*.tmp"
    stale = [p for p in directory.glob(pattern) if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
