"""Readers for on-disk dataset formats. Each returns uint8 N,C,H,W images and int64 labels."""

from __future__ import annotations

import gzip
import logging
import math
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from robkd.errors import DataError
from robkd.types import short_repr as _clip

log = logging.getLogger(__name__)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), as used by MNIST and Fashion-MNIST.

    The header is checked before the payload is read, and exactly the promised number of bytes is
    read (a gzip bomb or a header promising terabytes is refused, not decompressed)."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as fh:
            magic = fh.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES or magic[3] == 0:
                raise DataError(f"{p} is not an IDX file (bad magic number)")
            ndim = magic[3]
            head = fh.read(4 * ndim)
            if len(head) < 4 * ndim:
                raise DataError(f"{p}: truncated IDX header")
            dims = struct.unpack(f">{ndim}I", head)
            dtype = np.dtype(_IDX_DTYPES[magic[2]])
            size = math.prod(dims) * dtype.itemsize
            if size > MAX_IDX_BYTES:
                raise DataError(f"{p}: IDX header promises dimensions {list(dims)} ({size:,} bytes), more than "
                                f"robkd reads ({MAX_IDX_BYTES:,})")
            raw = fh.read(size + 1)
    except (OSError, EOFError, zlib.error) as exc:  # a corrupt .gz raises zlib.error
        raise DataError(f"cannot read IDX file {p}: {exc}") from exc
    if len(raw) != size:
        raise DataError(f"{p}: IDX payload has {len(raw)}{'+' if len(raw) > size else ''} bytes, header promises {size}")
    return np.frombuffer(raw, dtype=dtype).reshape(dims)


MAX_IDX_BYTES = 2**34
"""Largest IDX payload robkd reads (16 GiB)."""


def read_idx_pair(images: Path, labels: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N,1,H,W uint8) and labels from an IDX image/label file pair.

    Images must be unsigned bytes (IDX type 0x08) and labels integers; anything else is a :class:`DataError`
    (converting would silently wrap or truncate values)."""
    x = read_idx(images)
    y = read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"IDX files {images.name}/{labels.name} disagree: images {x.shape}, labels {y.shape}")
    if x.dtype != np.uint8:
        raise DataError(f"{images}: IDX images must be unsigned bytes (type 0x08), got {x.dtype}")
    if y.dtype.kind not in "ui":
        raise DataError(f"{labels}: IDX labels must be integers, got {y.dtype}")
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def _unpickle(path: Path) -> dict:
    """A CIFAR python batch: a dict, unpickled with :class:`_RestrictedUnpickler` (never arbitrary code)."""
    try:
        with open(path, "rb") as fh:
            # CIFAR's python batches are plain dicts of numpy arrays and lists; restrict globals
            obj = _RestrictedUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - a hostile pickle fails in many ways; it never runs code
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read CIFAR batch {path}: {reason}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR batch: it holds a {type(obj).__name__}, not a dict")
    return obj


class _RestrictedUnpickler(pickle.Unpickler):
    """Only numpy array reconstruction is allowed: CIFAR batches need nothing else.

    Protocols 0-5 are read: protocol 5 stores arrays through ``numpy.core.numeric._frombuffer`` (an
    in-band buffer, a dtype and a shape), which cannot build object arrays. Out-of-band buffers and
    persistent ids are refused by the unpickler itself (none are given)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {str(module)[:60]}.{str(name)[:60]} from a dataset file")
        try:
            return super().find_class(module, name)
        except ImportError:  # written by numpy 2 (numpy._core) and read by numpy 1, or the reverse
            other = module.replace("numpy._core", "numpy.core") if "._core" in module else module.replace("numpy.core", "numpy._core")
            return super().find_class(other, name)


def _cifar_images(data: object, where: Path) -> np.ndarray:
    """A batch's ``data`` as uint8 N x 3 x 32 x 32; :class:`DataError` unless it is an N x 3072 integer array in 0..255."""
    if not isinstance(data, np.ndarray):
        raise DataError(f"{where}: CIFAR 'data' must be a numpy array, got {type(data).__name__}")
    if data.dtype.kind not in "ui":
        raise DataError(f"{where}: CIFAR 'data' must hold integer pixels, got {data.dtype}")
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{where}: CIFAR data must be N x 3072, got {data.shape}")
    if data.size and (int(data.min()) < 0 or int(data.max()) > 255):
        raise DataError(f"{where}: CIFAR pixels must lie in 0..255, got {int(data.min())}..{int(data.max())}")
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32)


def _cifar_labels(labels: object, n: int, where: Path) -> np.ndarray:
    """A batch's labels as int64; :class:`DataError` unless they are ``n`` integers (a list or a 1-D array)."""
    if isinstance(labels, np.ndarray):
        arr = labels
    elif isinstance(labels, (list, tuple)) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        try:
            arr = np.asarray(labels, dtype=np.int64)
        except OverflowError as exc:
            raise DataError(f"{where}: CIFAR labels must be class indices, got a value out of range") from exc
    else:
        bad = next((v for v in labels if not isinstance(v, (int, np.integer)) or isinstance(v, bool)), labels) \
            if isinstance(labels, (list, tuple)) else labels
        raise DataError(f"{where}: CIFAR labels must be a list of integers, got {type(bad).__name__} {_clip(bad)}")
    if arr.dtype.kind not in "ui" or arr.ndim != 1:
        raise DataError(f"{where}: CIFAR labels must be a 1-D list of integers, got {arr.dtype} of shape {arr.shape}")
    if arr.shape[0] != n:
        raise DataError(f"{where}: {n} images but {arr.shape[0]} labels")
    return arr.astype(np.int64)


def read_cifar_python(root: Path, files: Sequence[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR python-pickle batches (``cifar-10-batches-py`` / ``cifar-100-python``), any pickle protocol."""
    xs, ys = [], []
    for name in files:
        d = _unpickle(root / name)
        data = d.get("data", d.get(b"data"))
        labels = d.get(label_key, d.get(label_key.encode()))
        if data is None or labels is None:
            raise DataError(f"{root / name}: not a CIFAR batch (no 'data'/'{label_key}')")
        x = _cifar_images(data, root / name)
        xs.append(x)
        ys.append(_cifar_labels(labels, x.shape[0], root / name))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def read_cifar_binary(root: Path, files: Sequence[str], label_bytes: int, label_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR binary records: ``label_bytes`` label bytes then 3072 pixel bytes (CHW)."""
    rec = label_bytes + 3072
    xs, ys = [], []
    for name in files:
        p = root / name
        try:
            raw = np.fromfile(p, dtype=np.uint8)
        except OSError as exc:
            raise DataError(f"cannot read CIFAR binary {p}: {exc}") from exc
        if raw.size == 0 or raw.size % rec:
            raise DataError(f"{p}: size {raw.size} is not a multiple of the {rec}-byte CIFAR record")
        raw = raw.reshape(-1, rec)
        ys.append(raw[:, label_index].astype(np.int64))
        xs.append(raw[:, label_bytes:].reshape(-1, 3, 32, 32))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def read_meta_names(path: Path, key: str, expected: int | None = None) -> list[str] | None:
    """Class names from a CIFAR python ``batches.meta``/``meta`` file, if present (``None`` when the file
    or the key is absent). They must be a list of ``expected`` strings (or bytes, decoded)."""
    if not path.exists():
        return None
    d = _unpickle(path)
    names = d.get(key, d.get(key.encode()))
    if names is None:
        return None
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (str, bytes)) for n in names):
        raise DataError(f"{path}: '{key}' must be a list of class names (strings), got {type(names).__name__} {_clip(names)}")
    if expected is not None and len(names) != expected:
        raise DataError(f"{path}: '{key}' has {len(names)} class names, the dataset has {expected} classes")
    return [n.decode("utf-8", errors="replace") if isinstance(n, bytes) else n for n in names]


_IMG_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}


def read_imagefolder(root: Path, img_size: int | None = None, channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """An ImageFolder tree ``root/<class>/<image>``; classes sorted by name.

    Images are converted to RGB (or L when every image is grayscale or ``channels=1``)
    and, with ``img_size``, resized (shorter side) and centre-cropped to a square.
    """
    from PIL import Image

    if not root.is_dir():
        raise DataError(f"ImageFolder root {root} is not a directory")
    try:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError as exc:
        raise DataError(f"cannot list ImageFolder root {root}: {exc}") from exc
    if not classes:
        raise DataError(f"ImageFolder root {root} has no class sub-directories")
    files: list[tuple[Path, int]] = []
    try:
        for i, c in enumerate(classes):
            files += [(f, i) for f in sorted((root / c).rglob("*")) if f.suffix.lower() in _IMG_EXT]
    except OSError as exc:
        raise DataError(f"cannot list ImageFolder root {root}: {exc}") from exc
    if not files:
        raise DataError(f"ImageFolder root {root} contains no images")
    imgs = []
    modes = set()
    opened = []
    for f, _ in files:
        try:
            im = Image.open(f)
            im.load()
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot read image {f}: {exc}") from exc
        modes.add("L" if im.mode in ("L", "1", "I;16", "I") else "RGB")
        opened.append(im)
    mode = "L" if channels == 1 or (channels is None and modes == {"L"}) else "RGB"
    for im in opened:
        im = im.convert(mode)
        if img_size:
            w, h = im.size
            s = img_size / min(w, h)
            im = im.resize((max(img_size, round(w * s)), max(img_size, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - img_size) // 2, (h - img_size) // 2
            im = im.crop((left, top, left + img_size, top + img_size))
        arr = np.asarray(im, dtype=np.uint8)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        imgs.append(torch.from_numpy(arr.copy()))
    from robkd.data.core import stack_uint8

    return stack_uint8(imgs), torch.tensor([i for _, i in files], dtype=torch.int64), classes


def read_arrays(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``.npz`` (arrays ``x``,``y``) or ``.pt`` (dict with tensors ``x``,``y``; loaded weights-only).

    ``x`` is uint8 (0..255) or float in [0,1], N,C,H,W or N,H,W (or N,H,W,C with C in 1,3). ``y`` holds
    integer class indices; float labels are accepted only when every value is whole (``3.0``) and are
    then cast to int64 (see :func:`robkd.data.core.check_labels`, which :class:`ImageData` applies).
    """
    try:
        head = path.read_bytes()[:4]
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if head[:2] == b"PK" and path.suffix == ".npz" or head[:2] == b"PK" and _is_npz(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                if "x" not in z or "y" not in z:
                    raise DataError(f"{path}: an .npz dataset needs arrays 'x' and 'y', found {list(z.keys())[:10]}")
                x, y = _numeric(z["x"], "x", path), _numeric(z["y"], "y", path)
        except (ValueError, OSError, zipfile.BadZipFile, zlib.error, EOFError) as exc:  # truncated archives
            raise DataError(f"cannot read {path}: {exc}") from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            why = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"cannot read {path} as a dataset file (.npz, or a torch.save dict of 'x' and 'y'): {why}") from exc
        if not isinstance(obj, dict) or "x" not in obj or "y" not in obj:
            raise DataError(f"{path}: a .pt dataset must be a dict with tensors 'x' and 'y'")
        x, y = obj["x"], obj["y"]
        for what, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor):
                raise DataError(f"{path}: '{what}' must be a tensor, got {type(t).__name__}")
    if x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2).contiguous()
    if x.dtype not in (torch.uint8,) and not torch.is_floating_point(x):
        raise DataError(f"{path}: x must be uint8 or float, got {x.dtype}")
    return x, y


def _numeric(arr: np.ndarray, what: str, path: Path) -> torch.Tensor:
    """A numeric (bool, integer or float) array as a tensor in native byte order; :class:`DataError` otherwise."""
    if arr.dtype.kind not in "buif":
        raise DataError(f"{path}: '{what}' must be a numeric array, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:  # torch lacks most unsigned types
        arr = arr.astype(np.int64) if arr.size == 0 or int(arr.max()) < 2**63 else arr.astype(np.float64)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("=")))


def _is_npz(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith(".npy") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
