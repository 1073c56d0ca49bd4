"""Per-sample tensors kept on disk instead of in memory ("spilled"), and a streaming safetensors writer.

A spilled tensor is an ordinary CPU tensor whose storage is a shared memory map of a file
(:func:`torch.from_file`): indexing, ``.numpy()`` and pickling work as usual, but its pages live in
the page cache, not in the process. After each read or write of a batch of rows, :func:`release`
drops the pages from the process (``madvise(MADV_DONTNEED)`` on a shared file mapping: the data stays
in the file and the page cache, the next access reads it back), so the resident memory of a
process that holds an ``(N, ...)`` spilled tensor does not grow with ``N``. An anonymous spill file
(no ``path``) is unlinked as soon as it is mapped: nothing is left behind, even after a kill.

Spilling needs Linux (the memory map and ``madvise`` semantics); elsewhere :func:`spill_supported` is
False and callers keep their tensors in memory.

:func:`write_safetensors` writes a ``.safetensors`` file byte-identical to
``safetensors.torch.save`` without building the whole file (and a copy of every tensor) in memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch

log = logging.getLogger(__name__)

_MADV_DONTNEED = 4
#: data_ptr -> file name of every storage this module mapped (only those are ever released)
_SPILLED: dict[int, str] = {}
_LIBC: "ctypes.CDLL | None" = None
#: bytes per chunk when copying or streaming a spilled tensor
CHUNK_BYTES = 8 << 20


def spill_supported() -> bool:
    """Whether tensors can be spilled here (Linux with a usable ``madvise``)."""
    global _LIBC
    if not sys.platform.startswith("linux"):
        return False
    if _LIBC is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.madvise.restype = ctypes.c_int
        except (OSError, AttributeError):
            return False
        _LIBC = libc
    return True


def _map(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= int(s)
    try:
        t = torch.from_file(str(path), shared=True, size=max(numel, 1), dtype=dtype)
    except RuntimeError as exc:  # torch reports a failed open(2) as RuntimeError: it is a filesystem error
        if "unable to open" not in str(exc):
            raise
        raise OSError(errno.ENOENT if not path.parent.is_dir() else errno.EIO,
                      "cannot open the spill file" + ("" if path.parent.is_dir() else " (its folder was removed)"),
                      str(path)) from exc
    st = t.untyped_storage()
    _SPILLED[st.data_ptr()] = st.filename
    return t[:numel].view(shape)


def spill_empty(shape: "tuple[int, ...] | torch.Size", dtype: torch.dtype, path: "str | os.PathLike[str] | None" = None) -> torch.Tensor:
    """A new zero-filled spilled tensor: in the file ``path`` (created or truncated), or in an anonymous
    temporary file (unlinked at once) when ``path`` is None."""
    shape = tuple(int(s) for s in shape)
    if path is None:
        fd, name = tempfile.mkstemp(prefix="robkd-spill-", suffix=".bin")
        os.close(fd)
        p = Path(name)
    else:
        p = Path(path)
        p.unlink(missing_ok=True)  # a fresh file: never share pages with an old mapping of the same name
    try:
        return _map(p, shape, dtype)
    finally:
        if path is None:
            p.unlink(missing_ok=True)


def spill_open(path: "str | os.PathLike[str]", shape: "tuple[int, ...] | torch.Size", dtype: torch.dtype) -> torch.Tensor:
    """Map an existing spill file written by :func:`spill_empty`; ``ValueError`` when its size does not match."""
    p = Path(path)
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    size = p.stat().st_size
    if size != max(numel, 1) * itemsize:
        raise ValueError(f"{p} holds {size} bytes, expected {max(numel, 1) * itemsize}")
    return _map(p, shape, dtype)


def spill_copy(src: torch.Tensor, path: "str | os.PathLike[str] | None" = None) -> torch.Tensor:
    """A spilled copy of ``src`` (copied in chunks, so ``src`` may itself be spilled)."""
    out = spill_empty(src.shape, src.dtype, path)
    rows = _rows_per_chunk(src)
    for s in range(0, src.shape[0], rows):
        out[s : s + rows] = src[s : s + rows]
        release(out)
        release(src)
    return out


def is_spilled(t: object) -> bool:
    """Whether ``t`` is (a view of) a tensor made by this module."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
        return False
    st = t.untyped_storage()
    name = _SPILLED.get(st.data_ptr())
    return name is not None and name == st.filename


def release(t: torch.Tensor) -> None:
    """Drop a spilled tensor's pages from this process (no-op for any other tensor); its data is kept."""
    if not is_spilled(t) or _LIBC is None:
        return
    st = t.untyped_storage()
    if _LIBC.madvise(st.data_ptr(), st.nbytes(), _MADV_DONTNEED) != 0:  # pragma: no cover - kernel refused
        log.debug("madvise failed (errno %d): the spilled pages stay resident", ctypes.get_errno())


def take_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` as an in-memory tensor; a spilled ``t`` gives its pages back afterwards."""
    rows = t[index]
    release(t)
    return rows


def put_rows(t: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """``t[index] = values``; a spilled ``t`` gives its pages back afterwards (the data reaches the file)."""
    t[index] = values
    release(t)


def _rows_per_chunk(t: torch.Tensor) -> int:
    row = max(1, t[0].numel() * t.element_size()) if t.dim() and t.shape[0] else 1
    return max(1, CHUNK_BYTES // row)


# ----------------------------------------------------------------------------- safetensors, streamed
_DTYPES = {  # torch dtype -> (safetensors name, rank in the writer's sort order: higher first)
    torch.bool: ("BOOL", 0), torch.uint8: ("U8", 1), torch.int8: ("I8", 2), torch.float8_e5m2: ("F8_E5M2", 3),
    torch.float8_e4m3fn: ("F8_E4M3", 4), torch.int16: ("I16", 5), torch.float16: ("F16", 7),
    torch.bfloat16: ("BF16", 8), torch.int32: ("I32", 9), torch.float32: ("F32", 11),
    torch.float64: ("F64", 12), torch.int64: ("I64", 13),
}


def _header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    order = sorted(tensors, key=lambda k: (-_DTYPES[tensors[k].dtype][1], k))
    head: dict[str, object] = {}
    if metadata:
        head["__metadata__"] = dict(metadata)
    offset = 0
    for k in order:
        t = tensors[k]
        nbytes = t.numel() * t.element_size()
        head[k] = {"dtype": _DTYPES[t.dtype][0], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def _chunks(t: torch.Tensor) -> Iterator[bytes]:
    flat = t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)
    rows = _rows_per_chunk(t) if t.dim() else 1
    for s in range(0, flat.shape[0], rows):
        part = flat[s : s + rows]
        if part.dtype == torch.bfloat16 or part.dtype in (torch.float8_e5m2, torch.float8_e4m3fn):
            data = part.contiguous().view(torch.uint8).numpy().tobytes()
        else:
            data = part.contiguous().numpy().tobytes()
        release(t)
        yield data


def write_safetensors(path: "str | os.PathLike[str]", tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (CPU, contiguous) as a safetensors file at ``path``, atomically.

    Byte-identical to ``safetensors.torch.save(tensors, metadata)``: when no tensor is spilled that
    function writes it; otherwise the file is streamed tensor by tensor, chunk by chunk (a spilled
    tensor never becomes resident as a whole, and no copy of the whole file is built)."""
    from robkd.utils.io import atomic_path, atomic_write_bytes

    if not any(is_spilled(t) for t in tensors.values()) or any(t.dtype not in _DTYPES for t in tensors.values()):
        from safetensors.torch import save

        atomic_write_bytes(path, save(dict(tensors), metadata=dict(metadata) if metadata else None))
        return
    head, order = _header(tensors, metadata)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(head)
        for k in order:
            if tensors[k].numel():
                for data in _chunks(tensors[k]):
                    fh.write(data)
