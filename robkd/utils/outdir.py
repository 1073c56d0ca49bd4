"""Output directories: checked before any work runs, and locked against a second writer.

:func:`check_out_dir` refuses, before a model runs, a path that cannot become an output directory.
:class:`OutDirLock` holds an advisory ``flock`` on ``DIR/.robkd.lock`` while a command writes into
``DIR``: a second ``robkd`` run on the same ``--out`` (``--overwrite`` included) is refused with one
line instead of deleting the first run's state. The kernel drops the lock when its process dies, so a
``kill -9`` never leaves ``DIR`` locked. The lock is re-entrant within one process.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

from robkd.errors import OutputError

LOCK_FILE = ".robkd.lock"


def shown(path: object) -> str:
    """``path`` as text with control and format characters made visible (for one-line messages)."""
    import unicodedata

    return "".join(ch if ch.isprintable() and unicodedata.category(ch) != "Cf" else f"\\u{ord(ch):04x}"
                   for ch in str(path))


def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Refuse an output directory that cannot be one: an existing non-directory, a path under a regular
    file, a directory that is not writable. Raises :class:`~robkd.errors.OutputError`; creates nothing."""
    out = Path(out_dir)
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError(f"output directory {shown(out)} exists and is not a directory")
    base = out
    while not os.path.lexists(base) and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"cannot create output directory {shown(out)}: {shown(base)} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {shown(out)} is not writable ({shown(base)}: permission denied)")
    return out


_held: dict[str, list] = {}  # real path of a locked directory -> [file object, depth]
_held_guard = threading.Lock()


class OutDirLock:
    """Context manager: exclusive advisory lock on an output directory (created if missing)."""

    def __init__(self, out_dir: str | os.PathLike[str], *, what: str = "--out", lock_name: str = LOCK_FILE) -> None:
        self.dir = Path(out_dir)
        self.what = what
        self.lock_name = lock_name  # one lock per output file in a shared folder: ".NAME.lock"
        self._key = ""

    def __enter__(self) -> "OutDirLock":
        check_out_dir(self.dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {self.what} {shown(self.dir)}: {exc.strerror or exc}") from exc
        self._key = os.path.join(os.path.realpath(self.dir), self.lock_name)
        with _held_guard:
            if self._key in _held:
                _held[self._key][1] += 1
                return self
            fh = self._acquire(Path(self._key))
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            _held[self._key] = [fh, 1]
        return self

    def _acquire(self, path: Path):  # noqa: ANN202 - a text file object
        """Open and lock ``path``; retried when a finishing holder unlinked it between our open and lock."""
        import fcntl

        for _ in range(100):
            try:
                fh = open(path, "a+", encoding="utf-8")
            except OSError as exc:
                raise OutputError(f"cannot lock {self.what} {shown(self.dir)}: {exc.strerror or exc}") from exc
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                fh.seek(0)
                owner = fh.read(64).strip()
                fh.close()
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    pid = f" (pid {owner})" if owner.isdigit() else ""
                    raise OutputError(f"another robkd run{pid} is writing to {self.what} {shown(self.dir)}: "
                                      "wait for it to finish or choose another directory") from exc
                raise OutputError(f"cannot lock {self.what} {shown(self.dir)}: {exc.strerror or exc}") from exc
            try:
                same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fh
            fh.close()  # we locked a file its holder had just unlinked: lock the new one
        raise OutputError(f"cannot lock {self.what} {shown(self.dir)}: the lock file keeps changing")

    def __exit__(self, *exc: object) -> None:
        with _held_guard:
            entry = _held.get(self._key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _held[self._key]
            fh = entry[0]
            try:
                os.unlink(self._key)  # a peer that opened it before checks the inode after locking
            except OSError:
                pass
            fh.close()
