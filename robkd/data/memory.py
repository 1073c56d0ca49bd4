"""In-memory evaluation data: ``(x, y)`` tensors or arrays, a ``torch.utils.data.Dataset``, a ``DataLoader``
or any iterable of ``(x, y)`` pairs or batches, read as :class:`~robkd.data.core.ImageData`.

The subset rule is the file-based one (:func:`~robkd.data.core.subset_positions`): the same ``(n, seed)``
picks the same positions whether the samples come from a file or from memory, and a map-style dataset
is read only at those positions. A ``DataLoader`` over a map-style dataset contributes its dataset (its
batch size, order and sampler are not used: the audit batches the seeded subset itself); an iterable
without random access is read to its end, in its own order, before the subset is taken. The samples
are named in results files by a content hash (:func:`content_sha256`), since they have no file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import numbers
import os
from typing import Any, Iterable

import torch

from robkd.data.core import ImageData, subset_positions
from robkd.errors import DataError

IN_MEMORY = "in-memory"
"""The dataset name (and the recorded ``data`` setting) of in-memory data."""


@dataclasses.dataclass(frozen=True)
class MemoryData:
    """In-memory data after the seeded subset: ``data`` (``indices``: positions in the source), the size of
    the source, what kind of object it was and the content hash of the subset."""

    data: ImageData
    n_available: int
    kind: str  # "tensors", "dataset", "dataloader" or "iterable"
    sha256: str


def is_in_memory(data: Any) -> bool:
    """Whether ``data`` is in-memory data rather than a dataset name or path (or None)."""
    return data is not None and not isinstance(data, (str, os.PathLike))


def from_memory(data: Any, n: int | None = None, seed: int = 0, *, name: str = IN_MEMORY) -> MemoryData:
    """Read in-memory ``data`` and take the seeded subset of ``n`` samples (all with None); :class:`DataError`
    (one line, shapes and types only: never a tensor's values) for anything that is not images in [0,1]
    (or uint8) shaped ``(N, C, H, W)`` with ``(N,)`` integer labels."""
    if _is_pair_of_arrays(data):
        x, y = (_as_tensor(v, what, name) for v, what in zip(data, ("images", "labels")))
        if x.dim() >= 1 and y.dim() >= 1 and x.shape[0] != y.shape[0]:
            raise DataError(f"{name}: {x.shape[0]} images but {y.shape[0]} labels")
        full = ImageData(x, y, name=name)
        idx = subset_positions(len(full), n, seed)
        sub = full if idx is None else full.select(idx)
        return _done(sub, len(full), "tensors")
    from torch.utils.data import DataLoader, IterableDataset

    kind = "dataset"
    if isinstance(data, DataLoader):
        kind = "dataloader"
        if not isinstance(data.dataset, IterableDataset) and _has_len(data.dataset):
            return _from_indexable(data.dataset, n, seed, name, kind)
        return _from_iterable(data, n, seed, name, kind)
    if not isinstance(data, IterableDataset) and _has_len(data) and hasattr(data, "__getitem__"):
        return _from_indexable(data, n, seed, name, kind)
    if isinstance(data, Iterable) and not isinstance(data, (bytes, dict)):
        return _from_iterable(data, n, seed, name, "iterable")
    raise DataError(f"data must be a dataset name or path, an (x, y) pair of tensors, a torch Dataset or a DataLoader; "
                    f"got {type(data).__name__}")


def content_sha256(data: ImageData) -> str:
    """SHA-256 of the samples in order: their shape, the images as little-endian float32 in [0,1] and the labels
    as little-endian int64 (a uint8 image and the same image as float hash alike)."""
    h = hashlib.sha256(b"robkd-samples-v1")
    h.update(repr(tuple(int(v) for v in data.x.shape)).encode())
    h.update(data.float_x().contiguous().numpy().astype("<f4").tobytes())
    h.update(data.y.to(torch.int64).contiguous().numpy().astype("<i8").tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- readers
def _done(sub: ImageData, n_available: int, kind: str) -> MemoryData:
    return MemoryData(data=sub, n_available=int(n_available), kind=kind, sha256=content_sha256(sub))


def _from_indexable(ds: Any, n: int | None, seed: int, name: str, kind: str) -> MemoryData:
    """A map-style dataset read only at the subset's positions."""
    try:
        length = len(ds)
    except Exception as exc:  # noqa: BLE001 - a user's __len__
        raise DataError(f"{name}: len() of the {type(ds).__name__} failed: {_first_line(exc)}") from exc
    if not isinstance(length, numbers.Integral) or length < 0:
        raise DataError(f"{name}: len() of the {type(ds).__name__} is not a count")
    if length == 0:
        raise DataError(f"{name}: the dataset is empty")
    idx = subset_positions(int(length), n, seed)
    positions = list(range(int(length))) if idx is None else [int(i) for i in idx]
    xs, ys = [], []
    for i in positions:
        try:
            item = ds[i]
        except Exception as exc:  # noqa: BLE001 - a user's __getitem__
            raise DataError(f"{name}: reading item {i} of the {type(ds).__name__} failed: {_first_line(exc)}") from exc
        x, y = _pair(item, f"item {i}", name)
        xs.append(x)
        ys.append(y)
    x, y = _stack(xs, ys, name)
    sub = ImageData(x, y, name=name, indices=torch.tensor(positions, dtype=torch.int64))
    return _done(sub, int(length), kind)


def _from_iterable(it: Iterable[Any], n: int | None, seed: int, name: str, kind: str) -> MemoryData:
    """An iterable of ``(x, y)`` pairs or batches, read to its end, then the seeded subset."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    try:
        for j, item in enumerate(it):
            x, y = _pair(item, f"element {j}", name, batch_ok=True)
            if x.dim() == 4:  # a batch
                if y.dim() != 1 or x.shape[0] != y.shape[0]:
                    raise DataError(f"{name}: element {j} is a batch of images of shape {list(x.shape)} with labels of "
                                    f"shape {list(y.shape)}; want (B, C, H, W) images and (B,) labels")
                xs.extend(x.unbind(0))
                ys.extend(y.unbind(0))
            else:
                xs.append(x)
                ys.append(y)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's iterator
        raise DataError(f"{name}: iterating the {type(it).__name__} failed: {_first_line(exc)}") from exc
    if not xs:
        raise DataError(f"{name}: the {type(it).__name__} yielded no samples")
    x, y = _stack(xs, ys, name)
    full = ImageData(x, y, name=name)
    idx = subset_positions(len(full), n, seed)
    return _done(full if idx is None else full.select(idx), len(full), kind)


# ----------------------------------------------------------------------------- pieces
def _is_pair_of_arrays(data: Any) -> bool:
    """``(x, y)`` with ``x`` a tensor or array of images (not a list of ``(x, y)`` samples)."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and _is_array(data[0])):
        return False
    y = data[1]
    return getattr(data[0], "ndim", 0) >= 3 or (_is_array(y) and y.ndim <= 1) or isinstance(y, list)


def _is_array(v: Any) -> bool:
    return isinstance(v, torch.Tensor) or type(v).__module__ == "numpy" and hasattr(v, "dtype")


def _has_len(obj: Any) -> bool:
    return hasattr(type(obj), "__len__")


def _as_tensor(v: Any, what: str, name: str) -> torch.Tensor:
    """A CPU tensor (detached) from a tensor, a numpy array, a number or a list of numbers."""
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    if isinstance(v, (bool, numbers.Number)) or _is_array(v) or isinstance(v, (list, tuple)):
        try:
            return torch.as_tensor(v).detach().cpu() if not _is_array(v) else torch.from_numpy(_np(v)).cpu()
        except Exception as exc:  # noqa: BLE001 - ragged lists, object arrays, ...
            raise DataError(f"{name}: {what} cannot be read as a tensor ({type(v).__name__}: {_first_line(exc)})") from exc
    raise DataError(f"{name}: {what} must be a tensor or an array, got {type(v).__name__}")


def _np(v: Any) -> Any:
    import numpy as np

    a = np.ascontiguousarray(v)
    if a.dtype == object:
        raise TypeError("an array of Python objects")
    return a


def _pair(item: Any, where: str, name: str, *, batch_ok: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """An ``(image, label)`` pair of tensors; a clear line for anything else (a PIL image: add ToTensor)."""
    if isinstance(item, dict) or not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DataError(f"{name}: {where} is a {type(item).__name__}, not an (image, label) pair")
    x_raw, y_raw = item[0], item[1]
    if not (_is_array(x_raw) or isinstance(x_raw, (list, tuple))):
        tip = ": add torchvision.transforms.ToTensor() to the dataset" if "PIL" in type(x_raw).__module__ else ""
        raise DataError(f"{name}: the image of {where} is a {type(x_raw).__module__}.{type(x_raw).__name__}, not a "
                        f"tensor{tip}")
    x = _as_tensor(x_raw, f"the image of {where}", name)
    y = _as_tensor(y_raw, f"the label of {where}", name)
    if batch_ok and x.dim() == 4:  # a batch: (B,) labels
        return x, y.reshape(-1) if y.dim() == 0 else y
    if x.dim() not in (2, 3):
        want = "(C, H, W) or a (B, C, H, W) batch" if batch_ok else "(C, H, W)"
        raise DataError(f"{name}: the image of {where} has shape {list(x.shape)}; want {want}")
    if y.numel() != 1:
        raise DataError(f"{name}: the label of {where} has shape {list(y.shape)}; want one class index per image")
    return x, y.reshape(())


def _stack(xs: list[torch.Tensor], ys: list[torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples stacked into ``(N, C, H, W)`` images and ``(N,)`` labels (one dtype, one shape)."""
    xs = [x.unsqueeze(0) if x.dim() == 2 else x for x in xs]  # H,W grayscale
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1:
        raise DataError(f"{name}: images have different shapes {[list(s) for s in sorted(shapes)[:4]]}: resize them "
                        "to one size")
    dtypes = {x.dtype for x in xs}
    if len(dtypes) != 1:
        raise DataError(f"{name}: images have different dtypes {sorted(str(d) for d in dtypes)}")
    ydtypes = {y.dtype for y in ys}
    y = torch.stack([y.to(torch.float64) for y in ys]) if len(ydtypes) > 1 else torch.stack(ys)
    return torch.stack(xs), y


def _first_line(exc: BaseException, limit: int = 200) -> str:
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return line if len(line) <= limit else line[: limit - 3] + "..."
