"""First errors that name their cause (issue 14, items 6 and 7): a CIFAR model audited without ``--data``, a
weights-only file without ``--arch``, one spelling of the dataset names, output paths without ``//``."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from badinput import expect_failure, run_cli

COMMON = ["--n", "8", "--attacks", "fgsm"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Fashion-MNIST (IDX, 20 test images) as the default dataset's files, and a CIFAR-shaped
    ``robkd:cnn_small`` as a robkd checkpoint, a plain state_dict (torch.save and safetensors) and TorchScript."""
    from safetensors.torch import save_file

    from robkd.models import build_model, save_model

    root = tmp_path_factory.mktemp("first")
    raw = root / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    g = np.random.default_rng(0)

    def idx(path, arr):
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
        with gzip.open(path, "wb") as fh:
            fh.write(header + arr.tobytes())

    idx(raw / "t10k-images-idx3-ubyte.gz", g.integers(0, 256, size=(20, 28, 28), dtype=np.uint8))
    idx(raw / "t10k-labels-idx1-ubyte.gz", (np.arange(20) % 10).astype(np.uint8))
    torch.manual_seed(0)
    m = build_model("robkd:cnn_small", input_shape=(3, 32, 32), num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
    out = {"root": root, "data": root / "data", "ckpt": root / "cifar.safetensors", "sd_pt": root / "cifar_sd.pt",
           "sd_st": root / "cifar_sd.safetensors", "ts": root / "cifar_ts.pt", "gray": root / "gray.npz"}
    save_model(m, out["ckpt"])
    torch.save(m.net.state_dict(), out["sd_pt"])
    save_file({k: v.contiguous() for k, v in m.net.state_dict().items()}, str(out["sd_st"]))
    with _quiet():
        torch.jit.trace(m.eval(), torch.zeros(1, 3, 32, 32)).save(str(out["ts"]))
    np.savez(out["gray"], x=g.integers(0, 256, size=(10, 1, 28, 28), dtype=np.uint8), y=np.arange(10) % 10)
    return out


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


@pytest.fixture
def default_data(files, monkeypatch):
    """The default dataset's files are the tiny ones (found first under $ROBKD_DATA)."""
    monkeypatch.setenv("ROBKD_DATA", str(files["data"]))


@pytest.mark.parametrize("kind", ["ckpt", "sd_pt", "sd_st"])
def test_cifar_model_without_data_names_the_default_dataset(kind, files, default_data, capsys):
    argv = ["audit", files[kind], files[kind], *COMMON]
    if kind != "ckpt":
        argv += ["--arch", "robkd:cnn_small"]
    res = expect_failure(argv, capsys, code=2, watch=[files["root"]],
                         contains=["no --data given, so the default dataset fashion-mnist (1x28x28) was used",
                                   "this model expects 3x32x32", "pass --data cifar10"])
    if kind != "ckpt":
        assert files[kind].name in res.err  # the weights mismatch names the file


def test_torchscript_model_without_data_names_the_default_dataset(files, default_data, capsys):
    with _quiet():
        res = expect_failure(["audit", files["ts"], files["ts"], *COMMON], capsys, code=2, watch=[files["root"]],
                             contains=["no --data given, so the default dataset fashion-mnist (1x28x28) was used",
                                       "--data"])
    assert "mat1 and mat2" in res.err  # the cause, not TorchScript's "the following operation failed" banner


def test_explicit_data_of_another_shape_is_named(files, capsys):
    expect_failure(["audit", files["ckpt"], files["ckpt"], "--data", files["gray"], *COMMON, "--eps", "0.05"], capsys,
                   code=2, watch=[files["root"]], contains=["the data gray.npz is 1x28x28", "this model expects 3x32x32"])


def test_weights_only_file_without_arch_names_the_file(files, default_data, capsys):
    for kind in ("sd_pt", "sd_st"):
        res = expect_failure(["audit", files[kind], files["ckpt"], *COMMON], capsys, code=2, watch=[files["root"]],
                             contains=[str(files[kind]), "holds only weights", "--arch"])
        assert "this file" not in res.err
    from robkd.errors import ModelLoadError
    from robkd.models import load_model

    with pytest.raises(ModelLoadError, match="cifar_sd.pt holds only weights"):
        load_model(files["sd_pt"])


def test_dataset_names_are_spelled_one_way(files, default_data):
    from robkd.data import dataset_info, load_dataset

    for alias in ("fashion-mnist", "fashionmnist", "fashion_mnist", "FMNIST"):
        assert dataset_info(alias).name == "fashion-mnist"
        assert load_dataset(alias, "test").name == "fashion-mnist"  # the registry's name, not torchvision's


def test_output_paths_are_shown_without_double_slashes(files, default_data, capsys, tmp_path):
    from helpers import mlp

    from robkd.models import save_model

    path = tmp_path / "m.safetensors"
    save_model(mlp(0, (8,)), path)
    out = f"{tmp_path}/runs//a/"
    res = run_cli(["audit", path, path, *COMMON, "--eps", "0.05", "--out", out, "--no-report"], capsys)
    assert res.code == 0, res.err
    text = " ".join(res.out.split())  # rich may wrap long lines
    assert "//" not in text.replace("://", "")
    assert f"{tmp_path}/runs/a/results.json".replace(" ", "") in text.replace(" ", "")
