"""Reading shard tars without webdataset: members grouped into samples by key.

A member ``dir/KEY.EXT`` is extension ``EXT`` of sample ``dir/KEY``: the key ends
at the first dot of the name's last part, the rule webdataset groups by, so every
reader here sees the samples the training stream sees. Members that are not
regular files, or whose name has no dot, belong to no sample.

Two ways in: in file order (`iter_tar_samples`, `iter_shard_keys`), or at random
(`index_tar` reads the headers once, `read_member` one member's bytes by offset),
so a reader of a few clips of a large shard reads only those.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

Span = tuple[int, int]  # a member's data inside the tar: (byte offset, size)


def member_key(name: str) -> tuple[str, str] | None:
    """Tar member name -> (sample key, extension); None when the name has no extension."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return None
    key, ext = base.split(".", 1)
    return name[: len(name) - len(base)] + key, ext


def _members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, extension, member) of every member that belongs to a sample, in file order."""
    for member in tar:
        parts = member_key(member.name) if member.isfile() else None
        if parts is not None:
            yield (*parts, member)


def iter_shard_keys(path: str | Path) -> Iterator[str]:
    """Sample keys of a shard in file order, from the tar headers alone (no member is read)."""
    last = None
    with tarfile.open(path, mode="r") as tar:
        for key, _, _ in _members(tar):
            if key != last:
                last = key
                yield key


def iter_tar_samples(path: str | Path) -> Iterator[dict]:
    """Samples of a shard as dicts ``{"__key__": key, ext: bytes, ...}``, in file order.

    Consecutive members of one key make one sample, as in webdataset: a key that comes
    back after another one starts a new sample (`lapo.validate` reports it as a duplicate).
    """
    current: dict | None = None
    with tarfile.open(path, mode="r") as tar:
        for key, ext, member in _members(tar):
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current


def index_tar(path: str | Path) -> dict[str, dict[str, Span]]:
    """key -> {extension: (offset, size)} of a shard, in file order; reads headers only.

    Raises tarfile.TarError, OSError or EOFError on a file that is no readable tar.
    """
    out: dict[str, dict[str, Span]] = {}
    with tarfile.open(path, mode="r") as tar:
        for key, ext, member in _members(tar):
            out.setdefault(key, {})[ext] = (member.offset_data, member.size)
    return out


def read_member(path: str | Path, span: Span) -> bytes:
    """The bytes of one member, from its (offset, size) in `index_tar`."""
    with open(path, "rb") as f:
        f.seek(span[0])
        return f.read(span[1])
