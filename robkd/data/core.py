"""The in-memory dataset type, pixel-range checks, seeded subsets and splits."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from robkd.errors import DataError, UsageError


@dataclasses.dataclass
class ImageData:
    """Images ``x`` (N,C,H,W; uint8 0..255 or float in [0,1]) and labels ``y`` (N,) int64.

    ``indices`` are the positions of the samples in the source dataset, kept
    through subsetting so results can name the exact test images used.
    """

    x: torch.Tensor
    y: torch.Tensor
    name: str = "custom"
    classes: list[str] | None = None
    indices: torch.Tensor | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        """Every dataset passes here: images, labels and class names are checked once (:class:`DataError`)."""
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise DataError(f"{self.name}: images and labels must be tensors, got {type(self.x).__name__} and "
                            f"{type(self.y).__name__}")
        if self.x.dim() == 3:  # N,H,W grayscale
            self.x = self.x.unsqueeze(1)
        if self.x.dim() != 4 or min(self.x.shape[1:]) < 1:
            raise DataError(f"{self.name}: images must be N,C,H,W (or N,H,W), got shape {list(self.x.shape)}")
        if self.y.dim() != 1 or self.y.shape[0] != self.x.shape[0]:
            raise DataError(f"{self.name}: {self.x.shape[0]} images but labels of shape {list(self.y.shape)} "
                            f"(want one class index per image)")
        if self.classes is not None:
            if not isinstance(self.classes, (list, tuple)) or not all(isinstance(c, str) for c in self.classes):
                raise DataError(f"{self.name}: class names must be a list of strings")
            self.classes = list(self.classes)
        self.y = check_labels(self.y, self.name, len(self.classes) if self.classes else None)
        if self.indices is None:
            self.indices = torch.arange(self.x.shape[0])
        check_pixel_range(self.x, self.name)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(int(v) for v in self.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        """Number of classes (from the class names when known, else max label + 1)."""
        if self.classes:
            return len(self.classes)
        return int(self.y.max().item()) + 1 if len(self) else 0

    def float_x(self, idx: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Images as float32 in [0,1] (optionally a slice/index of them)."""
        x = self.x if idx is None else self.x[idx]
        if x.dtype == torch.uint8:
            return x.float().div_(255.0)
        return x.float()

    def select(self, idx: torch.Tensor) -> "ImageData":
        """A new ImageData with the samples at positions ``idx``."""
        return dataclasses.replace(self, x=self.x[idx], y=self.y[idx], indices=self.indices[idx])  # type: ignore[index]

    def batches(self, batch_size: int):
        """Yield ``(x_float, y)`` batches in order."""
        for s in range(0, len(self), batch_size):
            yield self.float_x(slice(s, s + batch_size)), self.y[s : s + batch_size]


def check_labels(y: torch.Tensor, name: str = "data", num_classes: int | None = None) -> torch.Tensor:
    """Labels as int64 class indices in ``[0, num_classes)`` (``num_classes`` when the dataset declares it).

    Integer labels are kept. Float labels are accepted only when every value is a whole number (``3.0``)
    and are then cast; ``2.5``, NaN or infinity is a :class:`DataError`, as are bool or complex labels,
    negative labels and labels past the declared classes.
    """
    if y.dtype == torch.bool or y.dtype.is_complex:
        raise DataError(f"{name}: labels must be integer class indices, got {y.dtype}")
    if y.dtype.is_floating_point:
        bad = ~torch.isfinite(y) | (y != torch.round(y))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise DataError(f"{name}: labels must be integer class indices, got {float(y[i])!r} at index {i}")
        if y.numel() and float(y.abs().max()) > 2**53:
            raise DataError(f"{name}: labels up to {float(y.abs().max()):.3g} are not class indices")
    y = y.long()
    if y.numel() == 0:
        return y
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        i = int((y < 0).nonzero()[0, 0])
        raise DataError(f"{name}: labels must be >= 0, got {int(y[i])} at index {i}")
    if num_classes is not None and hi >= num_classes:
        i = int((y >= num_classes).nonzero()[0, 0])
        raise DataError(f"{name}: label {int(y[i])} at index {i} is out of range: the dataset declares "
                        f"{num_classes} classes (labels 0..{num_classes - 1})")
    return y


def check_pixel_range(x: torch.Tensor, name: str = "data") -> None:
    """Reject float data outside [0,1] (typically already normalised) with the fix, and NaN or infinite pixels."""
    if x.dtype == torch.uint8 or x.numel() == 0:
        return
    if not torch.is_floating_point(x):
        raise DataError(f"{name}: images must be uint8 (0..255) or float in [0,1], got {x.dtype}")
    lo, hi = float(x.min()), float(x.max())  # NaN and infinities show up in these
    if not (math.isfinite(lo) and math.isfinite(hi)):
        n = int((~torch.isfinite(x)).sum())
        raise DataError(f"{name}: images contain {n} NaN or infinite pixel value(s)")
    if lo < 0.0 or hi > 1.0:
        raise DataError(
            f"{name}: pixel values span [{lo:.3g}, {hi:.3g}], outside [0,1]: the data looks normalised already. "
            "Pass raw pixels in [0,1] and give the normalisation to the model instead (--mean/--std)"
        )


def eval_subset(data: ImageData, n: int | None, seed: int = 0) -> ImageData:
    """A deterministic random subset of ``n`` samples (all when ``n`` is None or >= len).

    The same (dataset, n, seed) always gives the same samples in the same order.
    """
    idx = subset_positions(len(data), n, seed)  # checks n first
    if len(data) == 0:
        raise DataError(f"{data.name}: the dataset is empty")
    return data if idx is None else data.select(idx)


def subset_positions(length: int, n: int | None, seed: int = 0) -> torch.Tensor | None:
    """The positions :func:`eval_subset` picks from a dataset of ``length`` samples, in audit order (None: all of
    them, in order). The one subset rule: in-memory datasets are read at exactly these positions."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise UsageError(f"--n must be a positive integer, got {n!r}")
    if n is None or n >= length:
        return None
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(length, generator=g)[:n]


def train_val_split(data: ImageData, val_fraction: float = 0.1, seed: int = 0) -> tuple[ImageData, ImageData]:
    """Seeded split into (train, validation); validation gets ``val_fraction`` of the samples."""
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"validation fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(round(len(data) * val_fraction)))
    if n_val >= len(data):
        raise DataError(f"{data.name}: {len(data)} samples are too few to carve a validation split")
    g = torch.Generator().manual_seed(int(seed) + 7919)
    perm = torch.randperm(len(data), generator=g)
    return data.select(perm[n_val:]), data.select(perm[:n_val])


def stack_uint8(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack HWC/CHW uint8 tensors into N,C,H,W, raising on mixed sizes."""
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) != 1:
        raise DataError(f"images have different sizes {sorted(shapes)[:4]}: pass --img-size to resize them")
    return torch.stack(list(images))
