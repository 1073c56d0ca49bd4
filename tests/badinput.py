"""Harness of the bad-input matrix: run a ``robkd`` command in-process and check how it fails.

Every case asserts the documented exit code (see ``robkd.errors``), at most two lines on stderr,
no Python traceback, and that nothing new was left on disk in the watched folders.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterable, Sequence


@dataclasses.dataclass
class Outcome:
    code: int
    out: str
    err: str


def snapshot(*roots: str | os.PathLike[str]) -> set[str]:
    """Every path (files and folders) under ``roots``."""
    seen: set[str] = set()
    for root in roots:
        r = Path(root)
        if not r.exists():
            continue
        seen.add(str(r))
        for dirpath, dirnames, filenames in os.walk(r):
            for name in dirnames + filenames:
                seen.add(os.path.join(dirpath, name))
    return seen


def run_cli(argv: Sequence[str], capsys) -> Outcome:
    """``robkd.cli.main.main(argv)`` with stdout/stderr captured."""
    from robkd.cli.main import main

    capsys.readouterr()  # drop whatever an earlier step printed
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return Outcome(int(code), cap.out, cap.err)


def expect_failure(argv: Sequence[str], capsys, *, code: int = 2, watch: Iterable[str | os.PathLike[str]] = (),
                   contains: str | Sequence[str] = ()) -> Outcome:
    """Run ``argv``; assert exit ``code``, <= 2 stderr lines, no traceback, no new files under ``watch``,
    and that the stderr names every string of ``contains`` (case-insensitive)."""
    watch = list(watch)
    before = snapshot(*watch)
    res = run_cli(argv, capsys)
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert res.code == code, f"exit {res.code} (want {code}); stderr:\n{res.err}"
    assert "Traceback" not in res.err and "Traceback" not in res.out, res.err
    assert 1 <= len(lines) <= 2, f"{len(lines)} stderr lines:\n{res.err}"
    after = snapshot(*watch)
    assert after <= before, f"left on disk: {sorted(after - before)}"
    for word in [contains] if isinstance(contains, str) else contains:
        assert word.lower() in res.err.lower(), f"{word!r} not in {res.err!r}"
    return res
