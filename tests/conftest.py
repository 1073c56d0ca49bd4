"""Shared fixtures: real Fashion-MNIST slices and tiny models (trained once per session)."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import train_plain

os.environ.setdefault("ROBKD_NO_PROGRESS", "1")
os.environ.setdefault("ROBKD_NO_CACHE", "1")  # audits compute every model (tests of the result cache pass cache=DIR)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state, so a model a test builds without seeding
    (its initial weights come from the global generator) is the same in every run and every order."""
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fmnist_test():
    """The bundled real Fashion-MNIST test slice (1000 images, uint8)."""
    from robkd.data import load_dataset

    return load_dataset("fashion-mnist-slice", "test")


@pytest.fixture(scope="session")
def fmnist_train():
    """The bundled real Fashion-MNIST train slice (2000 images, uint8)."""
    from robkd.data import load_dataset

    return load_dataset("fashion-mnist-slice", "train")


@pytest.fixture(scope="session")
def slice_split(fmnist_train):
    """Seeded train (256) and validation (64) subsets of the slice, split as the trainer does (10% validation)."""
    from robkd.data import eval_subset, train_val_split

    tr, va = train_val_split(fmnist_train, 0.1, seed=0)
    return eval_subset(tr, 256, seed=0), eval_subset(va, 64, seed=0)


@pytest.fixture(scope="session")
def slice_teacher(slice_split):
    """A small MLP teacher trained (plain CE, 2 epochs) on ``slice_split``'s train part."""
    from helpers import mlp

    from robkd.distill import TrainConfig, Trainer

    t = mlp(5, hidden=(48,))
    cfg = TrainConfig(method="st", epochs=2, batch_size=64, lr=0.05, val_n=0, select="last")
    Trainer(t, cfg, slice_split[0], None, show_progress=False).fit()
    return t


@pytest.fixture(scope="session")
def trained_cnn(fmnist_train):
    """A non-robust ``robkd:cnn_small`` trained on the Fashion-MNIST slice (~75-80% clean)."""
    from robkd.models import build_model

    torch.manual_seed(0)  # the initial weights too: the fixture is the same model in every run
    m = build_model("robkd:cnn_small", input_shape=(1, 28, 28), num_classes=10, mean=(0.286,), std=(0.353,), dataset="fashion-mnist")
    return train_plain(m, fmnist_train, epochs=4, seed=0)


@pytest.fixture(scope="session")
def trained_mlp(fmnist_train):
    """A small non-robust ``robkd:mlp`` (784-64-32-10) trained on the slice."""
    from robkd.models import build_model

    torch.manual_seed(1)
    m = build_model("robkd:mlp", input_shape=(1, 28, 28), num_classes=10, dataset="fashion-mnist", arch_kwargs={"hidden": [64, 32]})
    return train_plain(m, fmnist_train, epochs=4, seed=1)


@pytest.fixture(scope="session")
def st_pair_fmnist():
    """Two standard-trained (non-robust) models on the FULL real Fashion-MNIST train set.

    ``robkd:cnn_small`` and ``robkd:mlp`` (784-100-10), 2 epochs each (~84-89% clean). Skipped
    where Debian's dataset-fashion-mnist is not installed.
    """
    from pathlib import Path

    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    from robkd.data import load_dataset
    from robkd.models import build_model

    train = load_dataset("fashion-mnist", "train")
    torch.manual_seed(0)
    cnn = build_model("robkd:cnn_small", input_shape=(1, 28, 28), num_classes=10, mean=(0.286,), std=(0.353,), dataset="fashion-mnist")
    torch.manual_seed(1)
    mlp = build_model("robkd:mlp", input_shape=(1, 28, 28), num_classes=10, mean=(0.286,), std=(0.353,), dataset="fashion-mnist", arch_kwargs={"hidden": [100]})
    return train_plain(cnn, train, epochs=2, seed=0), train_plain(mlp, train, epochs=2, seed=1)
