"""The workers state file: atomic writes, read back, and corrupt files refused by name."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from proxy.control.admin.state import StateError, StateFile
from proxy.control.workers import Worker
from proxy.engines.connectors.lmcache_config import Receiver


def test_round_trip_with_lmcache_receivers(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "w.json")
    assert state.read() is None
    rx = Receiver("10.0.0.2", (7300, 7301), (7400, 7401))
    state.write([Worker("prefill", "p0", "http://a:1"), Worker("decode", "d4", "http://b:2", rx)])
    records = state.read()
    assert records is not None
    assert [(r.id, r.role, r.url) for r in records] == [
        ("p0", "prefill", "http://a:1"),
        ("d4", "decode", "http://b:2"),
    ]
    assert records[0].receiver() is None and records[1].receiver() == rx
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json"]


def test_a_failed_write_leaves_the_old_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = StateFile(tmp_path / "w.json")
    state.write([Worker("decode", "d0", "http://a:1")])
    before = (tmp_path / "w.json").read_bytes()

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        state.write([Worker("decode", "d0", "http://a:1"), Worker("decode", "d1", "http://b:1")])
    assert (tmp_path / "w.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json"]  # the temporary file is gone


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ('{"version": 1, "workers": [', "not JSON"),
        ('{"version": 2, "workers": []}', "version"),
        ('{"version": 1, "workers": [{"id": "p0", "role": "prefill"}]}', "url"),
        ('{"version": 1, "workers": [{"id": "p0", "role": "x", "url": "http://a:1"}]}', "role"),
        (
            '{"version": 1, "workers": [{"id": "p0", "role": "decode", "url": "http://a/v1"}]}',
            "path",
        ),
        (
            '{"version": 1, "workers": [{"id": "d0", "role": "decode", "url": "http://a:1"},'
            ' {"id": "d0", "role": "decode", "url": "http://b:1"}]}',
            "d0 appears twice",
        ),
        (
            '{"version": 1, "workers": [{"id": "d0", "role": "decode", "url": "http://127.0.0.1:82"},'
            ' {"id": "d1", "role": "decode", "url": "http://localhost:82"}]}',
            "names one engine twice: d0 \\(decode http://127.0.0.1:82\\) and d1 \\(decode "
            "http://localhost:82\\), both reach this machine's port 82",
        ),
    ],
)
def test_a_corrupt_file_is_refused_by_name(tmp_path: Path, content: str, why: str) -> None:
    path = tmp_path / "w.json"
    path.write_text(content)
    with pytest.raises(StateError, match=why) as info:
        StateFile(path).read()
    assert str(path) in str(info.value) and "corrupt" in str(info.value)


def test_an_unreadable_file_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    path.mkdir()  # a directory where the file should be
    with pytest.raises(StateError, match=re.escape(f"cannot read workers state file {path}")):
        StateFile(path).read()
