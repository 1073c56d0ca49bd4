"""Named datasets: where their files are looked for and how they are read.

``load_dataset(name, split)`` accepts a dataset name (``fashion-mnist``,
``mnist``, ``cifar10``, ``cifar100``, ``imagefolder``, ``fashion-mnist-slice``)
or a path to an ``.npz``/``.pt`` tensor file or an ImageFolder directory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from robkd.data import formats
from robkd.data.core import ImageData
from robkd.errors import DataError, UsageError

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).parent / "bundled"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a named dataset (shape, classes, usual normalisation, headline radius)."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_eps: float
    reader: Callable[..., ImageData]
    description: str


def _candidate_dirs(data_dir: str | Path | None, subdirs: list[str]) -> list[Path]:
    """Where to look: an explicit ``data_dir`` ONLY (never a silent fallback to another copy), else
    ``$ROBKD_DATA`` and ``~/.cache/robkd/data`` (and, for Fashion-MNIST, Debian's package)."""
    roots: list[Path] = []
    if data_dir:
        roots.append(Path(data_dir))
    else:
        env = os.environ.get("ROBKD_DATA")
        if env:
            roots.append(Path(env))
        roots.append(Path.home() / ".cache" / "robkd" / "data")
    out = []
    for r in roots:
        out.append(r)
        out += [r / s for s in subdirs]
    return out


_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(dirs: list[Path], split: str) -> tuple[Path, Path] | None:
    img, lab = _IDX_NAMES[split]
    for d in dirs:
        for ext in (".gz", ""):
            pi, pl = d / (img + ext), d / (lab + ext)
            if pi.exists() and pl.exists():
                return pi, pl
    return None


def _idx_reader(tv_name: str, name: str, debian: Path | None, classes: list[str] | None) -> Callable[..., ImageData]:
    """Reader of an IDX dataset kept by torchvision under ``tv_name``; the data is named ``name`` (the registry's)."""

    def read(split: str, data_dir=None, download: bool = False, **_: object) -> ImageData:
        dirs = _candidate_dirs(data_dir, [f"{tv_name}/raw", tv_name])
        if debian is not None and not data_dir:
            dirs.append(debian)
        found = _find_idx(dirs, split)
        if found is None and download:
            _download_torchvision(tv_name, data_dir)
            found = _find_idx(dirs, split)
        if found is None:
            hint = " or `apt-get install dataset-fashion-mnist`" if debian is not None else ""
            raise DataError(
                f"{name} {split} IDX files not found (looked in {', '.join(str(d) for d in dirs[:4])}, ...): "
                f"pass --data-dir{hint}, or --download to fetch them through torchvision"
            )
        x, y = formats.read_idx_pair(*found)
        return ImageData(x, y, name=name, classes=classes)

    return read


def _download_torchvision(tv_name: str, data_dir) -> None:
    try:
        import torchvision.datasets as tvd
    except ImportError as exc:  # pragma: no cover
        raise DataError("downloading needs torchvision") from exc
    root = Path(data_dir) if data_dir else Path.home() / ".cache" / "robkd" / "data"
    cls = {"FashionMNIST": tvd.FashionMNIST, "MNIST": tvd.MNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[tv_name]
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:
        raise DataError(f"download of {tv_name} failed (no network?): {exc}") from exc


def _cifar_reader(kind: str) -> Callable[..., ImageData]:
    py_dir, bin_dir = ("cifar-10-batches-py", "cifar-10-batches-bin") if kind == "cifar10" else ("cifar-100-python", "cifar-100-binary")

    def read(split: str, data_dir=None, download: bool = False, **_: object) -> ImageData:
        dirs = _candidate_dirs(data_dir, [py_dir, bin_dir])
        for attempt in range(2):
            for d in dirs:
                got = _read_cifar_dir(kind, d, split)
                if got is not None:
                    return got
            if attempt == 0 and download:
                _download_torchvision(kind, data_dir)
            else:
                break
        raise DataError(
            f"{kind} {split} files not found (looked for {py_dir}/ or {bin_dir}/ under "
            f"{', '.join(str(d) for d in dirs[:3])}, ...): pass --data-dir or --download"
        )

    return read


def _read_cifar_dir(kind: str, d: Path, split: str) -> ImageData | None:
    if kind == "cifar10":
        py = ["data_batch_%d" % i for i in range(1, 6)] if split == "train" else ["test_batch"]
        bn = ["data_batch_%d.bin" % i for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
        if all((d / f).exists() for f in py):
            x, y = formats.read_cifar_python(d, py, "labels")
            names = formats.read_meta_names(d / "batches.meta", "label_names", 10) or CIFAR10_CLASSES
            return ImageData(x, y, name="cifar10", classes=names)
        if all((d / f).exists() for f in bn):
            x, y = formats.read_cifar_binary(d, bn, 1, 0)
            return ImageData(x, y, name="cifar10", classes=CIFAR10_CLASSES)
        return None
    py = [split]
    bn = [f"{split}.bin"]
    if all((d / f).is_file() for f in py):
        x, y = formats.read_cifar_python(d, py, "fine_labels")
        names = formats.read_meta_names(d / "meta", "fine_label_names", 100)
        return ImageData(x, y, name="cifar100", classes=names or [str(i) for i in range(100)])
    if all((d / f).exists() for f in bn):
        # CIFAR-100 binary: <coarse label><fine label><3072 pixels>
        x, y = formats.read_cifar_binary(d, bn, 2, 1)
        return ImageData(x, y, name="cifar100", classes=[str(i) for i in range(100)])
    return None


def _imagefolder_reader(split: str, data_dir=None, img_size: int | None = None, **_: object) -> ImageData:
    if not data_dir:
        raise UsageError("--data imagefolder needs --data-dir ROOT (ROOT/<split>/<class>/<image> or ROOT/<class>/<image>)")
    x, y, classes = formats.read_imagefolder(_imagefolder_root(Path(data_dir), split), img_size=img_size)
    return ImageData(x, y, name="imagefolder", classes=classes)


_SPLIT_DIRS = ("train", "val", "test")


def _imagefolder_root(root: Path, split: str) -> Path:
    """``ROOT/<split>`` when it exists; ``ROOT`` itself only when it is not a tree of split folders (a
    missing ``ROOT/test`` beside ``ROOT/train`` and ``ROOT/val`` must not turn the splits into classes)."""
    if (root / split).is_dir():
        return root / split
    present = [d for d in _SPLIT_DIRS if (root / d).is_dir()]
    if present:
        raise DataError(f"{root} has split folders {present} but no {split!r}: choose one with --split "
                        f"({', '.join(present)})")
    return root


def _slice_reader(split: str, **_: object) -> ImageData:
    path = BUNDLED_DIR / "fashion_mnist_slice.npz"
    if not path.exists():
        raise DataError(f"bundled Fashion-MNIST slice missing from the installation: {path}")
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        if f"x_{split}" not in z:
            raise DataError(f"the bundled Fashion-MNIST slice has no {split} split")
        x = torch.from_numpy(z[f"x_{split}"].copy())
        y = torch.from_numpy(z[f"y_{split}"].astype("int64"))
        idx = torch.from_numpy(z[f"i_{split}"].astype("int64"))
    return ImageData(x, y, name="fashion-mnist-slice", classes=FASHION_CLASSES, indices=idx)


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", (1, 28, 28), 10, (0.2860,), (0.3530,), 0.1, _idx_reader("FashionMNIST", "fashion-mnist", DEBIAN_FASHION,
                                                                                    FASHION_CLASSES),
        "Fashion-MNIST (IDX; Debian's dataset-fashion-mnist, a torchvision root, or --data-dir)",
    ),
    "fashion-mnist-slice": DatasetInfo(
        "fashion-mnist-slice", (1, 28, 28), 10, (0.2860,), (0.3530,), 0.1, _slice_reader,
        "A small real Fashion-MNIST slice bundled with robkd (train/test), for demos and quick tests",
    ),
    "mnist": DatasetInfo(
        "mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), 0.3, _idx_reader("MNIST", "mnist", None, [str(i) for i in range(10)]),
        "MNIST (IDX; a torchvision root or --data-dir)",
    ),
    "cifar10": DatasetInfo(
        "cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), 8 / 255, _cifar_reader("cifar10"),
        "CIFAR-10 (python pickle or binary version)",
    ),
    "cifar100": DatasetInfo(
        "cifar100", (3, 32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 8 / 255, _cifar_reader("cifar100"),
        "CIFAR-100 (python pickle or binary version)",
    ),
    "imagefolder": DatasetInfo(
        "imagefolder", (3, 224, 224), 0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 4 / 255, _imagefolder_reader,
        "An ImageFolder tree (ImageNet layout): ROOT/[train|val]/<class>/<image>",
    ),
}
_ALIASES = {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100", "imagenet": "imagefolder"}


def dataset_info(name: str) -> DatasetInfo | None:
    """Facts about a named dataset, or None for files/custom data."""
    return DATASETS.get(_ALIASES.get(name.lower(), name.lower())) if name else None


def load_dataset(
    name: str,
    split: str = "test",
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    img_size: int | None = None,
) -> ImageData:
    """Load a whole split as :class:`ImageData` (uint8 images kept as uint8)."""
    if split not in ("train", "test", "val"):
        raise UsageError(f"unknown split {split!r}: use train, test (or val for ImageFolder trees)")
    if not name:
        raise UsageError("no dataset given: use --data NAME or a .npz/.pt file")
    if img_size is not None and (not isinstance(img_size, int) or isinstance(img_size, bool) or not 1 <= img_size <= 4096):
        raise UsageError(f"--img-size must be an integer from 1 to 4096, got {img_size!r}")
    path = Path(name)
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except (OSError, ValueError) as exc:  # a name too long for the filesystem, a NUL byte...
        raise DataError(f"cannot use {str(name)[:80]!r} as a dataset: {exc.__class__.__name__}: "
                        f"{getattr(exc, 'strerror', None) or exc}") from exc
    if path.suffix in (".npz", ".pt", ".pth") or is_file:
        if not is_file:
            raise DataError(f"dataset file not found: {path}" if not is_dir else f"dataset file {path} is a directory")
        x, y = formats.read_arrays(path)
        return ImageData(x, y, name=path.name)
    if is_dir and name not in DATASETS:
        x, y, classes = formats.read_imagefolder(_imagefolder_root(path, split), img_size=img_size)
        return ImageData(x, y, name=path.name, classes=classes)
    info = dataset_info(name)
    if info is None:
        raise UsageError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}, a .npz/.pt file, or an ImageFolder directory")
    if split == "val" and info.name != "imagefolder":
        raise UsageError(f"{info.name} has train and test splits; validation data is carved from train (robkd.data.train_val_split)")
    data = info.reader(split, data_dir=data_dir, download=download, img_size=img_size)
    if len(data) == 0:
        raise DataError(f"{info.name} {split}: no samples found")
    if info.name not in ("imagefolder",):
        data.mean, data.std = info.mean, info.std
    return data


def find_data_locations() -> dict[str, str | None]:
    """Where each dataset's files were found (for ``robkd env``); None if not found."""
    found: dict[str, str | None] = {}
    fm = _find_idx(_candidate_dirs(None, ["FashionMNIST/raw"]) + [DEBIAN_FASHION], "test")
    found["fashion-mnist"] = str(fm[0].parent) if fm else None
    mn = _find_idx(_candidate_dirs(None, ["MNIST/raw"]), "test")
    found["mnist"] = str(mn[0].parent) if mn else None
    for kind, subs in (("cifar10", ["cifar-10-batches-py", "cifar-10-batches-bin"]), ("cifar100", ["cifar-100-python", "cifar-100-binary"])):
        found[kind] = next((str(d) for d in _candidate_dirs(None, subs) if _safe_probe(kind, d)), None)
    slice_path = BUNDLED_DIR / "fashion_mnist_slice.npz"
    found["fashion-mnist-slice"] = str(slice_path) if slice_path.exists() else None
    return found


def _safe_probe(kind: str, d: Path) -> bool:
    names = ("test_batch", "test_batch.bin") if kind == "cifar10" else ("test", "test.bin")
    return any((d / n).is_file() for n in names)
