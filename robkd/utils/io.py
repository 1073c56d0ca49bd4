"""Atomic writes (a file is either absent or complete, never half-written) and a guarded JSON reader."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; fsync it and rename it over ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched. Whoever writes the
    temporary file (``torch.save``, safetensors, ...), its bytes reach the disk before the rename, so
    the renamed file is complete after a crash of the machine too, not only of the process.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the usual umask-based permissions
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsync before rename, see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_text(obj: Any, *, indent: int = 2) -> str:
    """``obj`` as strict JSON text (NaN/inf are rejected), the exact bytes :func:`atomic_write_json` writes."""
    return json.dumps(obj, indent=indent, sort_keys=False, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> None:
    """Write ``obj`` as JSON (strict: NaN/inf are rejected) atomically."""
    atomic_write_text(path, json_text(obj, indent=indent))


#: Largest file :func:`read_json` reads (a results.json is well under 1 MiB).
MAX_JSON_BYTES = 64 << 20
#: Deepest nesting of arrays and objects :func:`read_json` accepts (results files nest about 8 deep).
MAX_JSON_DEPTH = 100


def read_json(path: str | os.PathLike[str], *, what: str = "JSON file", error: type[Exception] = ValueError,
              max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON from a regular file, or ``error`` with a one-line message.

    Refused: a missing path, a directory or another non-regular file (a FIFO would block), more than
    ``max_bytes``, bytes that are not UTF-8, invalid JSON, ``NaN``/``Infinity`` or numbers out of the
    float range, and nesting deeper than ``max_depth`` (json itself would raise RecursionError).
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise error(f"{what} not found: {p}") from None
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {p} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {p} is not a regular file")
    too_large = f"{what} {p} is too large (more than {max_bytes} bytes)"
    if st.st_size > max_bytes:
        raise error(too_large)
    try:
        with open(p, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:  # it grew since stat
        raise error(too_large)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {p} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise error(f"{what} {p} is nested too deeply (more than {max_depth} levels)") from None
    except ValueError as exc:
        raise error(f"{what} {p} is not valid JSON: {exc}") from None
    if _depth_exceeds(obj, max_depth):
        raise error(f"{what} {p} is nested too deeply (more than {max_depth} levels)")
    return obj


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not strict JSON (an undefined value is null)")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"number {token[:40]} is out of the float range")
    return value


def _depth_exceeds(obj: Any, limit: int) -> bool:
    """True when arrays/objects nest deeper than ``limit`` (iterative: no recursion limit to hit)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files a killed atomic write of ``path`` left beside it (``.<name>.<random>.tmp``,
    see :func:`robkd.utils.io.atomic_path`); files of other names are never touched. Returns what was removed."""
    import glob
    import logging
    import re

    path = Path(path)
    pattern = re.compile(r"\.%s\.[A-Za-z0-9_]+\.tmp" % re.escape(path.name))
    removed: list[Path] = []
    for cand in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if pattern.fullmatch(cand.name) and cand.is_file() and not cand.is_symlink():
            try:
                cand.unlink()
            except OSError:
                continue
            removed.append(cand)
    if removed:
        logging.getLogger(__name__).info("removed %d temporary file(s) of %s left by an interrupted write", len(removed), path)
    return removed


def remove_stale_temps_in(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete every temporary file a killed atomic write left in ``directory`` (``.<name>.<random>.tmp``);
    used on resume in folders robkd owns whole (an audit's ``state/``). Returns what was removed."""
    import re

    d = Path(directory)
    pattern = re.compile(r"\..+\.[A-Za-z0-9_]+\.tmp")
    removed: list[Path] = []
    if not d.is_dir():
        return removed
    for cand in d.iterdir():
        if pattern.fullmatch(cand.name) and cand.is_file() and not cand.is_symlink():
            with contextlib.suppress(OSError):
                cand.unlink()
                removed.append(cand)
    return removed
