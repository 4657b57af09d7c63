"""core/cache.py: keys, atomic entries built once, sidecar records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facegender.core.cache import cache_folder, cache_key, cached_file


def test_keys_depend_on_every_part_and_its_kind():
    assert cache_key(b"ab", {"x": 1}) == cache_key(b"ab", {"x": 1})
    assert cache_key(b"ab", {"x": 1}) != cache_key(b"ab", {"x": 2})
    assert cache_key(b"a", b"b") != cache_key(b"ab") != cache_key("ab")
    assert cache_key({"a": 1, "b": (1, 2)}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key(np.float32(0.5), np.arange(3)) == cache_key(0.5, [0, 1, 2])
    assert len(cache_key()) == 64


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEGENDER_CACHE", str(tmp_path / "mine"))
    assert cache_folder(None, "aligned") == tmp_path / "mine" / "aligned"
    assert cache_folder(tmp_path / "other", "aligned") == tmp_path / "other"


def test_an_entry_is_built_once_atomically_and_a_failed_build_leaves_nothing(tmp_path):
    calls = []
    build = lambda tmp: calls.append(tmp) or tmp.write_text("x")  # noqa: E731
    path = cached_file(tmp_path / "c", "k", ".txt", build)
    assert path == tmp_path / "c" / "k.txt" and path.read_text() == "x"
    assert cached_file(tmp_path / "c", "k", ".txt", build) == path and len(calls) == 1
    assert calls[0] != path and not calls[0].exists()

    def fail(tmp):
        tmp.write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cached_file(tmp_path / "new", "k", ".txt", fail)
    assert not (tmp_path / "new").exists()
    assert cached_file(tmp_path / "c", "k", ".txt", build, valid=lambda p: False) == path and len(calls) == 2


def test_a_record_guards_the_entry(tmp_path):
    calls = []
    build = lambda tmp: calls.append(1) or tmp.write_bytes(b"data")  # noqa: E731
    path = cached_file(tmp_path, "k", ".bin", build, record={"v": 1})
    record = json.loads((tmp_path / "k.bin.json").read_text())
    assert record["v"] == 1 and len(record["bin_sha256"]) == 64
    cached_file(tmp_path, "k", ".bin", build, record={"v": 1})
    assert len(calls) == 1
    path.write_bytes(b"dat4")
    with pytest.warns(UserWarning, match="damaged or stale cache"):
        cached_file(tmp_path, "k", ".bin", build, record={"v": 1})
    assert len(calls) == 2 and path.read_bytes() == b"data"
    with pytest.warns(UserWarning, match="damaged or stale cache"):
        cached_file(tmp_path, "k", ".bin", build, record={"v": 2})
    assert len(calls) == 3
