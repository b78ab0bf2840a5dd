"""Which data validates: whole shards, or whole source videos when shards are too few.

Stages 1 and 2 hold out the last ``data.val_shards`` shards of their dataset.
``record`` and ``shard_videos`` never spread an episode or a video over two
shards, so those shards hold whole sources. A dataset with too few shards for
that (600 videos in one 22 MB shard, a handful of recorded episodes) holds out
whole sources instead: the source of a clip is the stem of its key
(``<source-stem>__c00007``, one stem per video or recorded episode), and
`held_out` picks ``data.val_fraction`` of the sources by a seeded hash of their
names, never none and never all. Every clip of a source then either trains or
validates.

A dataset of one source (one long video, one episode) can only be split in
time: its last clips validate, the rest train, and a warning says that training
and validation come from the same video.

The split is read from the shard headers (tar member names, no clip is
decoded), the same on every rank, so ranks need not exchange it.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass

from lapo.tars import iter_shard_keys

_CLIP_SUFFIX = re.compile(r"__c\d{5}$")
SHOWN = 8  # source names listed in the log line


def source_of(key: str) -> str:
    """The source stem of a clip key ``<stem>__c00007``; a key of another form is its own source."""
    return _CLIP_SUFFIX.sub("", key, count=1)


def held_out(names: Iterable[str], fraction: float, seed: int = 0) -> list[str]:
    """``round(fraction * n)`` of `names`, at least 1 and at most n - 1, sorted.

    Names are ranked by a hash of (seed, name), so the choice does not depend on
    their order. Fewer than 2 names: none.
    """
    names = sorted(set(names))
    n_val = min(len(names) - 1, max(1, round(fraction * len(names))))
    ranked = sorted(names, key=lambda name: hashlib.sha256(f"{seed}/{name}".encode()).hexdigest())
    return sorted(ranked[: max(n_val, 0)])


class SplitError(ValueError):
    """No validation data can be held out of the dataset; the message says what to set."""


@dataclass
class SourceSplit:
    """Sample keys per shard URL of each side, and what was held out."""

    train: dict[str, list[str]]
    val: dict[str, list[str]]
    val_sources: list[str]
    num_sources: int
    one_source: bool
    """True when the dataset holds one source, whose last clips validate."""

    def describe(self) -> str:
        """One line for the log: how many sources and clips went where, and which."""
        n_val = sum(map(len, self.val.values()))
        n_train = sum(map(len, self.train.values()))
        if self.one_source:
            return (
                f"one source video ({self.val_sources[0]}): its last {n_val} clip(s) validate, the "
                f"first {n_train} train (training and validation share this video)"
            )
        shown = ", ".join(self.val_sources[:SHOWN])
        more = (
            f", ... ({len(self.val_sources) - SHOWN} more)" if len(self.val_sources) > SHOWN else ""
        )
        return (
            f"holding out {len(self.val_sources)} of {self.num_sources} source videos "
            f"({n_val} clips; {n_train} clips train): {shown}{more}"
        )


def read_keys(urls: list[str]) -> dict[str, list[str]]:
    """Sample keys of each local shard, in file order. A truncated shard gives the keys before
    the damage (the loader skips the rest as it does in training)."""
    keys: dict[str, list[str]] = {}
    for url in urls:
        found: list[str] = []
        try:
            found.extend(iter_shard_keys(url))
        except (tarfile.TarError, EOFError):
            pass
        except OSError as e:
            raise SplitError(f"{url}: cannot read its sample keys: {e}") from e
        keys[url] = found
    return keys


def split_by_source(keys: dict[str, list[str]], fraction: float, seed: int = 0) -> SourceSplit:
    """Training and validation keys per shard: whole sources by `held_out`, or with a
    single source its last clips (see the module docstring)."""
    sources = sorted({source_of(k) for ks in keys.values() for k in ks})
    if len(sources) >= 2:
        val_sources = set(held_out(sources, fraction, seed))

        def is_val(key: str) -> bool:
            return source_of(key) in val_sources

    else:
        clips = sorted(k for ks in keys.values() for k in ks)  # clip indices sort in time
        if len(clips) < 2:
            raise SplitError(
                f"the dataset holds {len(clips)} clip(s) of {len(sources)} source(s), too few to "
                "hold out validation data"
            )
        n_val = min(len(clips) - 1, max(1, round(fraction * len(clips))))
        tail = set(clips[len(clips) - n_val :])
        val_sources = set(sources)

        def is_val(key: str) -> bool:
            return key in tail

    train = {u: [k for k in ks if not is_val(k)] for u, ks in keys.items()}
    val = {u: [k for k in ks if is_val(k)] for u, ks in keys.items()}
    return SourceSplit(
        train={u: ks for u, ks in train.items() if ks},
        val={u: ks for u, ks in val.items() if ks},
        val_sources=sorted(val_sources),
        num_sources=len(sources),
        one_source=len(sources) == 1,
    )
