"""In-memory data for ``robkd.audit`` (tensors, Datasets, DataLoaders, iterables) and ``mean``/``std`` for
in-memory modules (issue 14, items 9 and 3)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import robkd
from robkd.data import content_sha256, eval_subset, from_memory, load_dataset
from robkd.errors import DataError, RobkdError, UsageError

SETTINGS = dict(n=24, seed=3, eps=[0.05], attacks=["fgsm"], batch_size=64, sanity_n=0)


@pytest.fixture(scope="module")
def slice_xy():
    """The first 200 images of the bundled slice as float tensors in [0,1] and int64 labels."""
    d = load_dataset("fashion-mnist-slice", "test")
    return d.float_x(slice(0, 200)), d.y[:200].clone()


@pytest.fixture(scope="module")
def pair():
    from helpers import mlp

    return mlp(0, (16,)), mlp(1, (8,))


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "tensor(" not in text and len(text) < 400, text
    return text


class _CountingDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], int(self.y[i])


# ----------------------------------------------------------------------------- the subset rule and the hash
def test_tensors_dataset_loader_and_iterable_give_the_file_paths_subset(slice_xy, tmp_path):
    x, y = slice_xy
    import numpy as np

    npz = tmp_path / "d.npz"
    np.savez(npz, x=(x * 255).round().to(torch.uint8).numpy(), y=y.numpy())
    from_file = eval_subset(load_dataset(str(npz)), 24, 3)
    want_idx = from_file.indices.tolist()
    ds = _CountingDataset(x, y)
    got = {
        "tensors": from_memory((x, y), 24, 3),
        "numpy": from_memory((x.numpy(), y.numpy()), 24, 3),
        "dataset": from_memory(ds, 24, 3),
        "loader": from_memory(DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True), 24, 3),
        "iterable": from_memory(iter([(x[s:s + 50], y[s:s + 50]) for s in range(0, 200, 50)]), 24, 3),
    }
    assert ds.reads == 24  # a map-style dataset is read only at the subset's positions
    hashes = {m.sha256 for m in got.values()}
    assert len(hashes) == 1  # same samples, same order, same hash whatever the container
    for kind, m in got.items():
        assert m.data.indices.tolist() == want_idx, kind
        assert m.n_available == 200
        torch.testing.assert_close(m.data.float_x(), from_file.float_x(), atol=1 / 255, rtol=0)
        assert torch.equal(m.data.y, from_file.y)
    assert got["loader"].kind == "dataloader" and got["iterable"].kind == "iterable"
    # the hash is the content's: uint8 images equal to the floats hash alike; one changed pixel does not
    u8 = (x * 255).round().to(torch.uint8)
    assert from_memory((u8, y), 24, 3).sha256 == from_memory((u8.float() / 255, y), 24, 3).sha256
    x2 = x.clone()
    x2[want_idx[0], 0, 0, 0] = 1.0 - x2[want_idx[0], 0, 0, 0]
    assert from_memory((x2, y), 24, 3).sha256 != got["tensors"].sha256
    assert content_sha256(got["tensors"].data) == got["tensors"].sha256


def test_audit_accepts_in_memory_data_with_the_file_paths_figures(slice_xy, pair, tmp_path):
    x, y = slice_xy
    import numpy as np

    npz = tmp_path / "d.npz"
    np.savez(npz, x=x.numpy(), y=y.numpy())
    t, s = pair
    ref = robkd.audit(t, s, data=str(npz), **SETTINGS).to_dict()
    out = tmp_path / "mem"
    res = robkd.audit(t, s, data=TensorDataset(x, y), out_dir=out, **SETTINGS)
    got = res.to_dict()
    for role in ("teacher", "student"):
        assert got[role]["clean"] == ref[role]["clean"]
        assert got[role]["per_radius"] == ref[role]["per_radius"]
    assert got["transfer"] == ref["transfer"]
    assert got["data"]["indices_sha256"] == ref["data"]["indices_sha256"]
    written = json.loads((out / "results.json").read_text())
    d = written["data"]
    assert d["dataset"] == "in-memory" and d["source"] == "in-memory" and d["in_memory_kind"] == "dataset"
    assert d["content_sha256"] == from_memory((x, y), 24, 3).sha256 and d["n_available"] == 200
    assert written["config"]["data"] == "in-memory"
    # the committed-report renderer reads it
    from robkd.report import render

    render(written, out)
    assert (out / "report.html").exists()


@pytest.mark.parametrize("case", ["normalised", "flat", "lengths", "float-labels", "pil-item", "dict", "ragged",
                                  "huge-eps", "channels"])
def test_bad_in_memory_data_is_one_line_without_tensor_dumps(case, slice_xy, pair):
    x, y = slice_xy
    t, s = pair
    data, kw = (x, y), {}
    if case == "normalised":
        data = ((x - 0.5) / 0.25, y)
    elif case == "flat":
        data = (x.reshape(200, 1, -1).squeeze(1), y)  # (N, 784): not images
    elif case == "lengths":
        data = (x, y[:150])
    elif case == "float-labels":
        data = (x, y.float() + 0.5)
    elif case == "pil-item":
        from PIL import Image

        data = [(Image.new("L", (28, 28)), 1)] * 4
    elif case == "dict":
        data = [{"image": x[0], "label": 1}] * 4
    elif case == "ragged":
        data = [(x[0], 1), (torch.zeros(1, 14, 14), 2)]
    elif case == "huge-eps":
        kw = {"eps": torch.full((1000,), 0.01)}
    elif case == "channels":
        data = (x.expand(-1, 3, -1, -1).contiguous(), y)
    with pytest.raises(RobkdError) as err:
        robkd.audit(t, s, data=data, **{**SETTINGS, **kw})
    text = _one_line(err.value)
    expected = {"normalised": "outside [0,1]", "flat": "N,C,H,W", "lengths": "150 labels", "float-labels": "integer",
                "pil-item": "ToTensor", "dict": "(image, label) pair", "ragged": "different shapes",
                "huge-eps": "shape [1000]", "channels": "[1, 28, 28]"}[case]
    assert expected in text, text


def test_settings_given_as_tensors_are_read_as_numbers(slice_xy, pair):
    x, y = slice_xy
    t, s = pair
    a = robkd.audit(t, s, data=(x, y), **SETTINGS).to_dict()
    b = robkd.audit(t, s, data=(x, y), **{**SETTINGS, "eps": torch.tensor([0.05], dtype=torch.float64), "n": torch.tensor(24)}).to_dict()
    assert a["radii"] == b["radii"] and a["student"]["per_radius"] == b["student"]["per_radius"]


def test_in_memory_data_needs_a_radius(slice_xy, pair):
    x, y = slice_xy
    with pytest.raises(UsageError, match="in-memory data"):
        robkd.audit(*pair, data=(x, y), n=8, attacks="fgsm")


# ----------------------------------------------------------------------------- mean/std for in-memory modules
def test_plain_module_with_mean_std_scores_as_the_saved_model(trained_cnn, tmp_path):
    from robkd.models import save_model

    mean, std = trained_cnn.meta.mean, trained_cnn.meta.std
    path = tmp_path / "cnn.safetensors"
    save_model(trained_cnn, path)
    settings = dict(data="fashion-mnist-slice", n=32, seed=1, eps=[0.02, 0.05], attacks=["fgsm"], batch_size=32,
                    sanity_n=0)
    file_result = robkd.audit(path, path, **settings)
    from_file = file_result.to_dict()
    plain = trained_cnn.net  # the bare network: takes normalised inputs
    given = robkd.audit(plain, plain, mean=list(mean), std=list(std), **settings).to_dict()
    for role in ("teacher", "student"):
        assert given[role]["clean"] == from_file[role]["clean"]
        assert given[role]["per_radius"] == from_file[role]["per_radius"]
        assert given[role]["model"]["meta"]["mean"] == pytest.approx(list(mean))
    # without them the same network sees raw pixels: the figures differ (the guard is not vacuous)
    # (per-sample predictions at the adversarial points: a count of correct samples can coincide by chance)
    raw = robkd.audit(plain, plain, **settings)
    assert raw.tensors["teacher.adv_pred"].shape == file_result.tensors["teacher.adv_pred"].shape
    assert not torch.equal(raw.tensors["teacher.adv_pred"], file_result.tensors["teacher.adv_pred"])


def test_robkd_model_with_other_mean_std_is_refused(trained_cnn, trained_mlp):
    settings = dict(data="fashion-mnist-slice", n=8, eps=[0.05], attacks=["fgsm"], sanity_n=0)
    with pytest.raises(UsageError) as err:
        robkd.audit(trained_cnn, trained_cnn, mean=[0.5], std=[0.5], **settings)
    text = _one_line(err.value)
    assert "teacher" in text and "mean = 0.286" in text and "drop mean=" in text
    # the same values are accepted; a robkd model without a normalisation gets the one given
    robkd.audit(trained_cnn, trained_cnn, mean=list(trained_cnn.meta.mean), std=list(trained_cnn.meta.std), **settings)
    from robkd.models import in_memory_model

    wrapped = in_memory_model(trained_mlp, mean=[0.5], std=[0.25])
    assert wrapped.net is trained_mlp.net and trained_mlp.meta.mean is None
    xb = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(wrapped(xb), trained_mlp.net((xb - 0.5) / 0.25))


def test_cli_refuses_a_mean_that_contradicts_the_checkpoint(trained_cnn, tmp_path, capsys):
    from badinput import expect_failure
    from robkd.models import save_model

    path = tmp_path / "cnn.safetensors"
    save_model(trained_cnn, path)
    expect_failure(["audit", path, path, "--data", "fashion-mnist-slice", "--n", "8", "--attacks", "fgsm",
                    "--eps", "0.05", "--mean", "0.5", "--std", "0.5"], capsys,
                   code=2, contains=["--mean 0.5 applies to neither model", "0.286"], watch=[tmp_path])
