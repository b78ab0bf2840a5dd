"""lapo.io's atomic writes: a reader sees the old file or the new one, never half of one.
(The import boundary they make possible is held by tests/test_layers.py.)"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from lapo.io import atomic_write, atomic_write_json, atomic_write_text, remove_stale_temporaries


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "x.json"
    atomic_write_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'

    def full_disk(tmp: Path) -> None:
        tmp.write_text("half a file")
        raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no name

    with pytest.raises(OSError, match=r"No space left on device: '.*x\.json'"):
        atomic_write(path, full_disk)

    def killed(tmp: Path) -> None:
        tmp.write_text("half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, killed)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_the_file_gets_the_mode_of_a_plain_write(tmp_path):
    (tmp_path / "plain").write_text("x")
    atomic_write_text(tmp_path / "atomic", "x")
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_stale_temporaries_of_one_file_or_of_a_whole_directory(tmp_path):
    for name in (".a.tar.1f2e.tmp", ".b.tar.9c0d.tmp", "a.tar.tmp", "a.tar"):
        (tmp_path / name).write_text("x")
    assert remove_stale_temporaries(tmp_path, "a.tar") == [tmp_path / ".a.tar.1f2e.tmp"]
    assert sorted(p.name for p in remove_stale_temporaries(tmp_path)) == [
        ".b.tar.9c0d.tmp",
        "a.tar.tmp",
    ]
    assert os.listdir(tmp_path) == ["a.tar"]
