"""Dataset readers on files written in the real on-disk layouts, plus the real Fashion-MNIST."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from robkd.data import eval_subset, load_dataset, train_val_split
from robkd.data.core import ImageData
from robkd.errors import DataError, UsageError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    data = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_torchvision_layout(tmp_path, gz):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=12).astype(np.uint8)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    ext = ".gz" if gz else ""
    _write_idx(raw / f"t10k-images-idx3-ubyte{ext}", x, gz)
    _write_idx(raw / f"t10k-labels-idx1-ubyte{ext}", y, gz)
    d = load_dataset("mnist", "test", data_dir=tmp_path)
    assert d.x.shape == (12, 1, 28, 28) and d.x.dtype == torch.uint8
    assert torch.equal(d.x[:, 0], torch.from_numpy(x))
    assert torch.equal(d.y, torch.from_numpy(y.astype(np.int64)))
    assert torch.allclose(d.float_x()[3], torch.from_numpy(x[3]).float().div(255).unsqueeze(0))


def test_idx_corrupt(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 5, 28, 28) + b"\x00" * 100)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8), False)
    with pytest.raises(DataError, match="payload"):
        load_dataset("mnist", "test", data_dir=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"GARBAGE!")
    with pytest.raises(DataError, match="magic"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_damaged_files_are_one_clear_error(tmp_path):
    """A corrupt .gz IDX file, a truncated .npz and a CIFAR batch that is not a dict are DataErrors, not
    zlib/zip/attribute tracebacks."""
    good = gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x01\x02\x03")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(good[:12] + b"\xff" * 8 + good[20:])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8), True)
    with pytest.raises(DataError, match="cannot read IDX"):
        load_dataset("mnist", "test", data_dir=tmp_path)
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.zeros((4, 1, 8, 8), np.uint8), y=np.zeros(4, np.int64))
    npz.write_bytes(npz.read_bytes()[:-40])
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(str(npz), "test")
    cifar = tmp_path / "c" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    (cifar / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="not a CIFAR batch"):
        load_dataset("cifar10", "test", data_dir=tmp_path / "c")


def test_mnist_missing_names_fix(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("mnist", "test", data_dir=tmp_path)


@pytest.mark.skipif(not DEBIAN.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian_package():
    d = load_dataset("fashion-mnist", "test")
    assert d.x.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(d.y), torch.full((10,), 1000))
    assert d.classes[9] == "Ankle boot"
    train = load_dataset("fashion-mnist", "train")
    assert len(train) == 60000
    # the bundled slice holds exact copies of real test images at the recorded indices
    s = load_dataset("fashion-mnist-slice", "test")
    assert torch.equal(s.x, d.x[s.indices]) and torch.equal(s.y, d.y[s.indices])


def _cifar_arrays(n, classes, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), rng.integers(0, classes, size=n)


def test_cifar10_python_pickle_layout(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    xs, ys = [], []
    for i in range(1, 6):
        x, y = _cifar_arrays(4, 10, i)
        with open(root / f"data_batch_{i}", "wb") as fh:
            pickle.dump({b"batch_label": b"x", b"labels": [int(v) for v in y], b"data": x, b"filenames": [b"a"] * 4}, fh)
        xs.append(x)
        ys.append(y)
    xt, yt = _cifar_arrays(6, 10, 99)
    with open(root / "test_batch", "wb") as fh:
        pickle.dump({b"labels": [int(v) for v in yt], b"data": xt}, fh)
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh)
    tr = load_dataset("cifar10", "train", data_dir=tmp_path)
    te = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert tr.x.shape == (20, 3, 32, 32) and te.x.shape == (6, 3, 32, 32)
    assert torch.equal(tr.x.reshape(20, -1), torch.from_numpy(np.concatenate(xs)))
    assert torch.equal(te.y, torch.from_numpy(yt.astype(np.int64)))
    assert te.classes[3] == "c3"
    # channel layout: first 1024 bytes are the red plane
    assert te.x[0, 0, 0, 1].item() == xt[0, 1] and te.x[0, 1, 0, 0].item() == xt[0, 1024]


def test_cifar_pickle_refuses_code(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in ["test_batch"]:
        with open(root / name, "wb") as fh:
            pickle.dump({b"data": Evil(), b"labels": [0]}, fh)
    with pytest.raises(DataError, match="refusing"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_cifar10_and_100_binary_layout(tmp_path):
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    x, y = _cifar_arrays(5, 10, 3)
    recs = np.concatenate([y.astype(np.uint8)[:, None], x], axis=1)
    (root / "test_batch.bin").write_bytes(recs.tobytes())
    d = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert torch.equal(d.y, torch.from_numpy(y.astype(np.int64)))
    assert torch.equal(d.x.reshape(5, -1), torch.from_numpy(x))

    root = tmp_path / "cifar-100-binary"
    root.mkdir()
    x, fine = _cifar_arrays(7, 100, 4)
    coarse = fine // 5
    recs = np.concatenate([coarse.astype(np.uint8)[:, None], fine.astype(np.uint8)[:, None], x], axis=1)
    (root / "test.bin").write_bytes(recs.tobytes())
    d = load_dataset("cifar100", "test", data_dir=tmp_path)
    assert torch.equal(d.y, torch.from_numpy(fine.astype(np.int64)))  # fine labels, not coarse
    assert d.num_classes == 100
    (root / "test.bin").write_bytes(recs.tobytes()[:-5])
    with pytest.raises(DataError, match="record"):
        load_dataset("cifar100", "test", data_dir=tmp_path)


def test_cifar100_python_layout(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    x, fine = _cifar_arrays(5, 100, 5)
    with open(root / "test", "wb") as fh:
        pickle.dump({b"data": x, b"fine_labels": [int(v) for v in fine], b"coarse_labels": [0] * 5}, fh)
    d = load_dataset("cifar100", "test", data_dir=tmp_path)
    assert torch.equal(d.y, torch.from_numpy(fine.astype(np.int64)))


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = {}
    for c in ["cat", "dog"]:
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(3):
            a = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / "val" / c / f"{i}.png")
            arrays[(c, i)] = a
    d = load_dataset("imagefolder", "val", data_dir=tmp_path)
    assert d.classes == ["cat", "dog"] and d.x.shape == (6, 3, 8, 8)
    assert torch.equal(d.y, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.equal(d.x[4], torch.from_numpy(arrays[("dog", 1)].transpose(2, 0, 1)))
    Image.fromarray(rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)).save(tmp_path / "val" / "dog" / "9.png")
    with pytest.raises(DataError, match="--img-size"):
        load_dataset("imagefolder", "val", data_dir=tmp_path)
    d = load_dataset("imagefolder", "val", data_dir=tmp_path, img_size=6)
    assert d.x.shape == (7, 3, 6, 6)
    # a tree of split folders without the requested split: an error naming the splits, not the split
    # folders read as classes
    for loader in (lambda: load_dataset("imagefolder", "test", data_dir=tmp_path, img_size=6),
                   lambda: load_dataset(str(tmp_path), "test", img_size=6)):
        with pytest.raises(DataError, match="--split"):
            loader()


def test_tensor_files(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(9, 28, 28), dtype=np.uint8)
    y = np.arange(9) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = load_dataset(str(tmp_path / "d.npz"))
    assert d.x.shape == (9, 1, 28, 28) and d.num_classes == 3
    torch.save({"x": torch.rand(4, 3, 8, 8), "y": torch.tensor([0, 1, 2, 3])}, tmp_path / "d.pt")
    d = load_dataset(str(tmp_path / "d.pt"))
    assert d.x.dtype == torch.float32 and d.input_shape == (3, 8, 8)
    np.savez(tmp_path / "hwc.npz", x=np.zeros((2, 8, 8, 3), np.uint8), y=np.zeros(2))
    assert load_dataset(str(tmp_path / "hwc.npz")).input_shape == (3, 8, 8)
    np.savez(tmp_path / "noy.npz", x=x)
    with pytest.raises(DataError, match="'x' and 'y'"):
        load_dataset(str(tmp_path / "noy.npz"))
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "missing.npz"))


def test_normalised_data_rejected_with_fix(tmp_path):
    x = (torch.rand(4, 1, 8, 8) - 0.5) / 0.25
    torch.save({"x": x, "y": torch.zeros(4, dtype=torch.long)}, tmp_path / "norm.pt")
    with pytest.raises(DataError, match="normalised .*--mean/--std"):
        load_dataset(str(tmp_path / "norm.pt"))


def test_unknown_dataset_and_split():
    with pytest.raises(UsageError, match="unknown dataset 'imagenette'"):
        load_dataset("imagenette")
    with pytest.raises(UsageError, match="split"):
        load_dataset("fashion-mnist-slice", "holdout")


def test_subsets_are_seeded_and_deterministic(fmnist_test):
    a = eval_subset(fmnist_test, 50, seed=3)
    b = eval_subset(fmnist_test, 50, seed=3)
    c = eval_subset(fmnist_test, 50, seed=4)
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    assert torch.equal(a.x, fmnist_test.x[torch.searchsorted(fmnist_test.indices, a.indices)])
    assert len(eval_subset(fmnist_test, None)) == len(fmnist_test)
    with pytest.raises(UsageError):
        eval_subset(fmnist_test, 0)
    empty = ImageData(torch.zeros(0, 1, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="empty"):
        eval_subset(empty, 5)


def test_train_val_split_disjoint_and_seeded(fmnist_train):
    tr, va = train_val_split(fmnist_train, 0.1, seed=0)
    assert len(tr) + len(va) == len(fmnist_train) and len(va) == 200
    assert not set(tr.indices.tolist()) & set(va.indices.tolist())
    tr2, va2 = train_val_split(fmnist_train, 0.1, seed=0)
    assert torch.equal(va.indices, va2.indices)
    with pytest.raises(UsageError):
        train_val_split(fmnist_train, 1.5)


def test_explicit_data_dir_is_the_only_place_looked_in(tmp_path, monkeypatch):
    """--data-dir names THE copy to use: a directory without the files is an error, never a silent
    fallback to another copy (the cache, $ROBKD_DATA or Debian's package)."""
    from robkd.data.registry import DEBIAN_FASHION

    other = tmp_path / "elsewhere"
    other.mkdir()
    rng = np.random.default_rng(1)
    _write_idx(other / "t10k-images-idx3-ubyte", rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8), False)
    _write_idx(other / "t10k-labels-idx1-ubyte", rng.integers(0, 10, size=3).astype(np.uint8), False)
    monkeypatch.setenv("ROBKD_DATA", str(other))
    assert len(load_dataset("mnist", "test")) == 3  # found through $ROBKD_DATA without --data-dir
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="not found"):
        load_dataset("mnist", "test", data_dir=empty)
    if DEBIAN_FASHION.is_dir():
        with pytest.raises(DataError, match="not found"):
            load_dataset("fashion-mnist", "test", data_dir=empty)
