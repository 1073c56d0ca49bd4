"""Readers for on-disk dataset formats. Each returns uint8 N,C,H,W images and int64 labels."""

from __future__ import annotations

import gzip
import logging
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from robkd.errors import DataError

log = logging.getLogger(__name__)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), as used by MNIST and Fashion-MNIST."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # a corrupt .gz raises zlib.error
        raise DataError(f"cannot read IDX file {p}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{p} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{p}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(f"{p}: IDX payload has {len(raw) - header} bytes, header promises {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def read_idx_pair(images: Path, labels: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N,1,H,W uint8) and labels from an IDX image/label file pair."""
    x = read_idx(images)
    y = read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"IDX files {images.name}/{labels.name} disagree: images {x.shape}, labels {y.shape}")
    return torch.from_numpy(x.astype(np.uint8)).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            # CIFAR's python batches are plain dicts of numpy arrays and lists; restrict globals
            obj = _RestrictedUnpickler(fh, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError, IndexError, TypeError) as exc:
        raise DataError(f"cannot read CIFAR batch {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR batch: it holds a {type(obj).__name__}, not a dict")
    return obj


class _RestrictedUnpickler(pickle.Unpickler):
    """Only numpy array reconstruction is allowed: CIFAR batches need nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a dataset file")


def read_cifar_python(root: Path, files: Sequence[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR python-pickle batches (``cifar-10-batches-py`` / ``cifar-100-python``)."""
    xs, ys = [], []
    for name in files:
        d = _unpickle(root / name)
        data = d.get("data", d.get(b"data"))
        labels = d.get(label_key, d.get(label_key.encode()))
        if data is None or labels is None:
            raise DataError(f"{root / name}: not a CIFAR batch (no 'data'/'{label_key}')")
        arr = np.asarray(data, dtype=np.uint8)
        if arr.ndim != 2 or arr.shape[1] != 3072:
            raise DataError(f"{root / name}: CIFAR data must be N x 3072, got {arr.shape}")
        xs.append(arr.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
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


def read_meta_names(path: Path, key: str) -> list[str] | None:
    """Class names from a CIFAR python ``batches.meta``/``meta`` file, if present."""
    if not path.exists():
        return None
    d = _unpickle(path)
    names = d.get(key, d.get(key.encode()))
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names] if names else None


_IMG_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}


def read_imagefolder(root: Path, img_size: int | None = None, channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """An ImageFolder tree ``root/<class>/<image>``; classes sorted by name.

    Images are converted to RGB (or L when every image is grayscale or ``channels=1``)
    and, with ``img_size``, resized (shorter side) and centre-cropped to a square.
    """
    from PIL import Image

    if not root.is_dir():
        raise DataError(f"ImageFolder root {root} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"ImageFolder root {root} has no class sub-directories")
    files: list[tuple[Path, int]] = []
    for i, c in enumerate(classes):
        files += [(f, i) for f in sorted((root / c).rglob("*")) if f.suffix.lower() in _IMG_EXT]
    if not files:
        raise DataError(f"ImageFolder root {root} contains no images")
    imgs = []
    modes = set()
    opened = []
    for f, _ in files:
        try:
            im = Image.open(f)
            im.load()
        except OSError as exc:
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
    """``.npz`` (arrays ``x``,``y``) or ``.pt`` (dict with ``x``,``y``; loaded weights-only).

    ``x`` is uint8 (0..255) or float in [0,1], N,C,H,W or N,H,W (or N,H,W,C with C in 1,3).
    """
    try:
        head = path.read_bytes()[:4]
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if head[:2] == b"PK" and path.suffix == ".npz" or head[:2] == b"PK" and _is_npz(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                if "x" not in z or "y" not in z:
                    raise DataError(f"{path}: an .npz dataset needs arrays 'x' and 'y', found {list(z.keys())}")
                x, y = torch.from_numpy(z["x"].copy()), torch.from_numpy(z["y"].astype(np.int64))
        except (ValueError, OSError, zipfile.BadZipFile, zlib.error, EOFError) as exc:  # truncated archives
            raise DataError(f"cannot read {path}: {exc}") from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataError(f"cannot read {path} as a tensor file: {str(exc).splitlines()[0]}") from exc
        if not isinstance(obj, dict) or "x" not in obj or "y" not in obj:
            raise DataError(f"{path}: a .pt dataset must be a dict with tensors 'x' and 'y'")
        x, y = torch.as_tensor(obj["x"]), torch.as_tensor(obj["y"]).long()
    if x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2).contiguous()
    if x.dtype not in (torch.uint8,) and not torch.is_floating_point(x):
        raise DataError(f"{path}: x must be uint8 or float, got {x.dtype}")
    return x, y


def _is_npz(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith(".npy") for n in zf.namelist())
    except zipfile.BadZipFile:
        return False
