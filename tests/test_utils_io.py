"""Atomic writes: complete or absent, never half-written; normal permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest

from robkd.utils.io import atomic_path, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_and_uses_umask(tmp_path):
    p = tmp_path / "sub" / "r.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask
    assert [f.name for f in p.parent.iterdir()] == ["r.json"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "r.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert p.read_text() == "old" and [f.name for f in tmp_path.iterdir()] == ["r.txt"]
    with pytest.raises(ValueError):
        atomic_write_json(p, {"x": float("nan")})
    assert p.read_text() == "old"
