"""The audit result cache: each model's finished outcome stored by content, reused by later audits.

An entry holds what the per-model stages found for one model (:class:`~robkd.auditing.stages.ModelOutcome`:
clean predictions, the attack suite's per-sample outcomes and adversarial examples, certification, timings)
in one safetensors file ``<key>.safetensors`` whose metadata carries a JSON header (format, key, the key
material, creation time, a SHA-256 of every tensor but the adversarial examples, which are streamed
to and from the file and verified row by row by the re-check). Sanity checks of that model are stored beside it as
``<key>.sanity-<role>-<check>.json``.

The key is a SHA-256 over a canonical JSON of everything that determines a model's block
(:func:`key_material`): the model's identity (its weights hash :func:`~robkd.models.identity.model_sha256`,
its module structure and normalisation, which the weights hash does not cover), the exact audited
samples (their content, in order), the norm, radii, attacks, seed and batch size, the certification
settings, the robkd version and a hash of the source code that computes the figures, the torch version
and the device class. An audit whose key matches takes the entry instead of attacking the model again.

Safety: entries are written atomically (temporary file + ``os.replace``), so concurrent writers of one key
leave one valid entry (the last rename wins) and a reader never sees a partial file. An entry that cannot
be read, whose header, key, material or checksum does not match, is ignored (logged) and the model is
computed again; :mod:`robkd.auditing.reuse` also re-checks every stored adversarial example with a forward
pass before it trusts an entry. The cache is bounded: after every write the oldest entries beyond
``ROBKD_CACHE_MAX_MB`` (default 4096 MiB) are removed.

Location: ``--cache DIR`` (``cache=`` in Python and spec files), else ``$ROBKD_CACHE_DIR``, else
``$XDG_CACHE_HOME/robkd/audit`` (``~/.cache/robkd/audit``). ``--no-cache`` (``cache=False``) or the
environment variable ``ROBKD_NO_CACHE=1`` turns it off (an explicit ``--cache DIR`` still wins).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "ROBKD_CACHE_DIR"
NO_CACHE_ENV = "ROBKD_NO_CACHE"
MAX_MB_ENV = "ROBKD_CACHE_MAX_MB"
DEFAULT_MAX_MB = 4096
#: version of the entry layout: a reader ignores entries of another format
FORMAT = 1
#: the safetensors metadata field holding the JSON header
HEADER = "robkd_audit_cache"
ENTRY_SUFFIX = ".safetensors"
#: source files (relative to the package) whose code computes a model's block: part of the key
_CODE = ("attacks", "analysis/sanity.py", "analysis/sanity_checks.py", "analysis/sanity_reuse.py",
         "auditing/stages.py", "auditing/cache.py", "auditing/reuse.py", "utils/logits.py", "models/wrapper.py")


# ----------------------------------------------------------------------------- where
def default_dir() -> Path:
    """``$ROBKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/robkd/audit``, else ``~/.cache/robkd/audit``."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "robkd" / "audit"


def resolve_dir(setting: "bool | str | None") -> Path | None:
    """The cache directory a ``cache`` setting names (None: no cache). ``None``: the default directory unless
    ``ROBKD_NO_CACHE`` is set; ``True``: the default directory; ``False``: off; a string: that directory."""
    if setting is False:
        return None
    if isinstance(setting, str):
        return Path(setting).expanduser()
    if setting is None and os.environ.get(NO_CACHE_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return None
    return default_dir()


def max_bytes() -> int:
    """The size bound of the cache directory (``ROBKD_CACHE_MAX_MB``, default 4096 MiB)."""
    raw = os.environ.get(MAX_MB_ENV, "").strip()
    try:
        mb = float(raw) if raw else float(DEFAULT_MAX_MB)
    except ValueError:
        log.warning("ignoring %s=%r (not a number of MiB)", MAX_MB_ENV, raw)
        mb = float(DEFAULT_MAX_MB)
    return int(max(mb, 0.0) * 2**20)


# ----------------------------------------------------------------------------- the key
def canonical_json(obj: Any) -> str:
    """The one JSON text of ``obj`` (sorted keys, no spaces; floats as Python writes them: exact)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def key_of(material: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the key material's canonical JSON."""
    return hashlib.sha256(canonical_json(material).encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=4)
def code_sha256(certify: bool) -> str:
    """SHA-256 over the source of the code that computes a model's block (the attacks, the sanity checks, the
    stages; with ``certify`` the bounds too): a changed robkd invalidates the cache even without a new version."""
    root = Path(__file__).resolve().parents[1]
    parts = list(_CODE) + (["bounds"] if certify else [])
    h = hashlib.sha256()
    for part in parts:
        p = root / part
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            with contextlib.suppress(OSError):
                h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def data_sha256(x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> str:
    """SHA-256 over the audited samples as attacked (dtype, shape, then the bytes of ``x`` and ``y`` in order),
    read in row chunks (a GPU tensor is copied one chunk at a time)."""
    h = hashlib.sha256(f"{x.dtype}|{tuple(x.shape)}|{y.dtype}|{tuple(y.shape)}|".encode())
    for s in range(0, int(x.shape[0]), chunk):
        h.update(x[s : s + chunk].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(y.detach().to("cpu").long().contiguous().numpy().tobytes())
    return h.hexdigest()


def model_identity(model: torch.nn.Module, weights_sha256: str) -> dict[str, Any]:
    """What makes two models compute the same function, beyond their weights: the module structure (its
    ``repr``: layer types and settings, the normalisation's mean and std) and the normalisation itself
    (not a persistent buffer, so not in the weights hash)."""
    meta = getattr(model, "meta", None)
    norm = getattr(model, "normalize", None)
    return {
        "weights_sha256": weights_sha256,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "structure_sha256": hashlib.sha256(repr(model).encode("utf-8")).hexdigest(),
        "mean": [float(v) for v in norm.mean.flatten().tolist()] if norm is not None else getattr(meta, "mean", None),
        "std": [float(v) for v in norm.std.flatten().tolist()] if norm is not None else getattr(meta, "std", None),
    }


def device_class(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The device class whose kernels compute the figures: the device type and input dtype (and, on CUDA,
    the GPU's name and the TF32 switches, which change matrix products)."""
    out: dict[str, Any] = {"type": device.type, "dtype": str(dtype).replace("torch.", "")}
    if device.type == "cuda":
        with contextlib.suppress(Exception):  # noqa: BLE001 - a missing driver only makes the key coarser
            out["name"] = torch.cuda.get_device_name(device)
        out["tf32"] = [bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)]
    return out


#: the one large tensor of an entry (the adversarial examples): streamed to and from the file, never held
#: whole in memory, and left out of the checksum (the re-check verifies every row of it with a forward pass)
BIG = "suite.x_adv"
_ST_DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16}
#: every safetensors dtype an entry may hold (per-sample codes, counts and flags besides the float tensors)
_ALL_DTYPES = {**_ST_DTYPES, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
               "U8": torch.uint8, "BOOL": torch.bool}
#: the largest entry header read (the header holds the key material and the tensors' layout)
MAX_HEADER_BYTES = 64 * 1024 * 1024


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors but :data:`BIG` (name order; name, dtype, shape and bytes of each)."""
    h = hashlib.sha256()
    for name in sorted(k for k in tensors if k != BIG):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------- the store
class ResultCache:
    """Entries under one directory (created on the first write). Never raises on a broken entry or an
    unwritable directory: the audit then computes the model (and says why in the log)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """The entry file of ``key``."""
        return self.root / f"{key}{ENTRY_SUFFIX}"

    def _side(self, key: str, name: str) -> Path:
        return self.root / f"{key}.{name}.json"

    # ------------------------------------------------------------------ entries
    def load(self, key: str, material: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """The header and tensors stored under ``key`` when the entry is whole and its header names this
        ``key`` and ``material`` and its checksum matches; None (logged) otherwise."""
        p = self.path(key)
        if not p.is_file():
            log.debug("audit cache: no entry %s", p)
            return None
        try:
            header, tensors = _read_entry(p)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is a miss, never an error
            log.info("audit cache: ignoring unreadable entry %s (%s: %s)", p, type(exc).__name__, exc)
            return None
        why = _header_problem(header, key, material)
        if why is None and header.get("tensors_sha256") != tensors_sha256(tensors):
            why = "its tensors do not match their checksum"
        if why is not None:
            log.info("audit cache: ignoring entry %s: %s", p, why)
            return None
        with contextlib.suppress(OSError):
            os.utime(p)  # recently used: pruned last
        return header, tensors

    def store(self, key: str, material: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
              info: Mapping[str, Any]) -> dict[str, Any] | None:
        """Write the entry of ``key`` atomically (``info``: further header fields); returns its header, or
        None when it could not be written (logged as a warning; the audit goes on)."""
        from robkd.utils.spill import write_safetensors

        t = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}  # a spilled x_adv stays in its file
        header = {**info, "format": FORMAT, "key": key, "material": dict(material),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tensors_sha256": tensors_sha256(t)}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            write_safetensors(self.path(key), t, metadata={HEADER: canonical_json(header)})  # atomic, streamed
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("audit cache: could not write %s (%s): the next audit computes this model again",
                        self.path(key), exc)
            return None
        self.prune(max_bytes(), keep=key)
        return header

    # ------------------------------------------------------------------ sanity checks beside an entry
    def load_json(self, key: str, name: str) -> Any:
        """The JSON value saved as ``name`` beside entry ``key`` (None when absent or foreign)."""
        p = self._side(key, name)
        try:
            saved = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT or saved.get("key") != key or saved.get("name") != name:
            log.info("audit cache: ignoring foreign file %s", p)
            return None
        return saved.get("value")

    def save_json(self, key: str, name: str, value: Any) -> None:
        """Save ``value`` as ``name`` beside entry ``key`` (atomically; a failure is logged, not raised)."""
        from robkd.utils.io import atomic_write_json

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self._side(key, name), {"format": FORMAT, "key": key, "name": name, "value": value})
        except (OSError, ValueError) as exc:
            log.warning("audit cache: could not write %s (%s)", self._side(key, name), exc)

    # ------------------------------------------------------------------ housekeeping
    def entries(self) -> list[dict[str, Any]]:
        """One record per entry, oldest use first: ``key``, ``bytes`` (with its sanity files), ``used`` (mtime)."""
        groups: dict[str, dict[str, Any]] = {}
        for f in self._files():
            key = f.name.split(".", 1)[0]
            try:
                st = f.stat()
            except OSError:
                continue
            g = groups.setdefault(key, {"key": key, "bytes": 0, "used": 0.0, "files": []})
            g["bytes"] += st.st_size
            g["files"].append(f)
            if f.name.endswith(ENTRY_SUFFIX):
                g["used"] = st.st_mtime
        return sorted(groups.values(), key=lambda g: g["used"])

    def _files(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for f in self.root.iterdir():
            name = f.name
            if f.is_file() and not name.startswith(".") and len(name) > 64 and all(c in "0123456789abcdef" for c in name[:64]) \
                    and name[64] == ".":
                yield f

    def prune(self, limit: int, *, keep: str | None = None) -> int:
        """Remove the least recently used entries (never ``keep``) until the cache holds at most ``limit``
        bytes, and temporary files older than an hour (left by killed writers); returns the entries removed."""
        with contextlib.suppress(OSError):
            for f in self.root.glob(".*.tmp"):
                if time.time() - f.stat().st_mtime > 3600:
                    f.unlink(missing_ok=True)
        groups = self.entries()
        total = sum(g["bytes"] for g in groups)
        removed = 0
        for g in groups:
            if total <= limit:
                break
            if g["key"] == keep:
                continue
            for f in g["files"]:
                with contextlib.suppress(OSError):
                    f.unlink()
            total -= g["bytes"]
            removed += 1
        if removed:
            log.info("audit cache: removed %d least recently used entr%s (bound %d MiB)", removed,
                     "y" if removed == 1 else "ies", limit // 2**20)
        return removed

    def clear(self) -> int:
        """Remove every entry; returns how many there were."""
        groups = self.entries()
        for g in groups:
            for f in g["files"]:
                with contextlib.suppress(OSError):
                    f.unlink()
        return len(groups)


def _read_entry(path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """The JSON header and tensors of an entry file, all read through ONE open file (an entry replaced by a
    concurrent writer between two opens could otherwise pair one file's header with another's tensors);
    :data:`BIG` is copied row chunk by row chunk into a spilled tensor (:mod:`robkd.utils.spill`; in memory
    where spilling is not supported)."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size <= MAX_HEADER_BYTES:
            raise ValueError(f"safetensors header of {size} bytes")
        layout = json.loads(fh.read(size))
        if not isinstance(layout, dict):
            raise ValueError("safetensors header is not an object")
        header = json.loads((layout.get("__metadata__") or {})[HEADER])
        tensors: dict[str, torch.Tensor] = {}
        for name, spec in layout.items():
            if name == "__metadata__":
                continue
            dtype = _ALL_DTYPES[spec["dtype"]]
            shape = tuple(int(v) for v in spec["shape"])
            begin, end = (int(v) for v in spec["data_offsets"])
            if name == BIG:
                tensors[name] = _read_rows(fh, 8 + size + begin, end - begin, shape, dtype)
                continue
            fh.seek(8 + size + begin)
            buf = bytearray(fh.read(end - begin))
            if len(buf) != end - begin:
                raise ValueError("truncated")
            flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(shape)
    return header, tensors


def _read_rows(fh: Any, offset: int, nbytes: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``nbytes`` at ``offset`` of the open file ``fh`` as a tensor of ``shape``, read in row chunks into a
    spilled tensor."""
    from robkd.utils import spill

    itemsize = torch.empty((), dtype=dtype).element_size()
    row = itemsize
    for v in shape[1:]:
        row *= v
    if not shape or shape[0] * row != nbytes:
        raise ValueError(f"{BIG} holds {nbytes} bytes, not a {list(shape)} {dtype} tensor")
    out = spill.spill_empty(shape, dtype) if spill.spill_supported() else torch.empty(shape, dtype=dtype)
    rows = max(1, spill.CHUNK_BYTES // max(row, 1))
    fh.seek(offset)
    for s in range(0, shape[0], rows):
        e = min(shape[0], s + rows)
        buf = bytearray(fh.read((e - s) * row))
        if len(buf) != (e - s) * row:
            raise ValueError("truncated")
        spill.put_rows(out, torch.arange(s, e), torch.frombuffer(buf, dtype=dtype).view((e - s,) + shape[1:]))
    return out


def _header_problem(header: Any, key: str, material: Mapping[str, Any]) -> str | None:
    """Why a header does not belong to ``key`` (None when it does)."""
    if not isinstance(header, dict):
        return "no header"
    if header.get("format") != FORMAT:
        return f"entry format {header.get('format')!r}, not {FORMAT}"
    if header.get("key") != key:
        return "its header names another key"
    if header.get("material") != json.loads(canonical_json(material)):
        return "its key material differs (a hash collision or an edited header)"
    return None
