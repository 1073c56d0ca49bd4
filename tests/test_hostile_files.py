"""Hostile model and data files (issue 12, classes 3 and 5): every one is a one-line exit 2, leaves nothing.

The files are written by the tests in the real on-disk formats (safetensors robkd checkpoints, torch.save,
TorchScript, CIFAR python pickles, IDX, .npz, .pt). Each CLI case goes through ``tests/badinput.py``: exit 2,
at most two stderr lines, no traceback, nothing new on disk; every one fails before any attack runs.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

from badinput import expect_failure
from robkd.data import load_dataset
from robkd.data.core import ImageData, check_labels
from robkd.errors import ArchitectureError, DataError, ModelLoadError, RobkdError, UsageError
from robkd.models import build_model, load_model, save_model
from robkd.types import ModelMeta

ZOO = Path(__file__).resolve().parents[1] / "robkd" / "zoo"
TEACHER, STUDENT = str(ZOO / "teacher.safetensors"), str(ZOO / "kd_student.safetensors")
QUICK = ["--n", "8", "--attacks", "fgsm", "--eps", "0.1"]


# ----------------------------------------------------------------------------- file builders
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Any]:
    """A small valid robkd checkpoint: its weights and its ``robkd`` metadata entry (parsed)."""
    from safetensors import safe_open

    torch.manual_seed(0)
    m = build_model("robkd:mlp", input_shape=(1, 28, 28), num_classes=10, mean=(0.286,), std=(0.353,),
                    dataset="fashion-mnist", arch_kwargs={"hidden": [8]})
    path = save_model(m, tmp_path_factory.mktemp("base") / "good.safetensors")
    with safe_open(str(path), "pt") as fh:
        robkd = json.loads(fh.metadata()["robkd"])
    state = {k: v.contiguous() for k, v in m.net.state_dict().items()}
    return {"path": path, "state": state, "robkd": robkd, "model": m}


def _raw_safetensors(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _checkpoint(base: dict[str, Any], path: Path, *, meta: dict[str, Any] | None = None, robkd: str | None = None,
                state: dict[str, torch.Tensor] | None = None) -> Path:
    """``base``'s checkpoint with metadata fields replaced (``meta``), the whole ``robkd`` entry replaced
    (``robkd``), or other tensors (``state``)."""
    from safetensors.torch import save

    if robkd is None:
        info = json.loads(json.dumps(base["robkd"]))
        info["meta"].update(meta or {})
        robkd = json.dumps(info)
    path.write_bytes(save(state if state is not None else base["state"], metadata={"robkd": robkd}))
    return path


def _hostile_models(base: dict[str, Any], d: Path) -> dict[str, tuple[Callable[[], Path], str]]:
    """name -> (writes the file and returns its path, a word the one error line must hold)."""
    st = base["state"]
    ck = lambda name, **kw: _checkpoint(base, d / f"{name}.safetensors", **kw)  # noqa: E731

    def raw(name: str, header: bytes, data: bytes = b"") -> Path:
        p = d / f"{name}.safetensors"
        p.write_bytes(_raw_safetensors(header, data))
        return p

    good_robkd = json.dumps(base["robkd"])
    return {
        "metadata is a number": (lambda: raw("meta5", b'{"__metadata__": 5}'), "corrupt safetensors header"),
        "metadata value not a string": (lambda: raw("metaint", b'{"__metadata__": {"robkd": 5}}'), "corrupt safetensors header"),
        "header nested 200000 deep": (lambda: raw("deep", b'{"__metadata__":{"robkd":"x"},"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
                                      "corrupt safetensors header"),
        "header promises a huge tensor": (lambda: raw("huge", json.dumps({"__metadata__": {"robkd": good_robkd}, "0.weight": {
            "dtype": "F32", "shape": [2**40, 2**30], "data_offsets": [0, 16]}}).encode(), b"\0" * 16), "corrupt safetensors header"),
        "tensor past the end of the file": (lambda: raw("short", json.dumps({"__metadata__": {"robkd": good_robkd}, "0.weight": {
            "dtype": "F32", "shape": [10**6], "data_offsets": [0, 4 * 10**6]}}).encode(), b"\0" * 16), "corrupt safetensors header"),
        "robkd entry nested 200000 deep": (lambda: ck("deeprobkd", robkd="[" * 200_000 + "]" * 200_000), "nested too deeply"),
        "robkd entry not JSON": (lambda: ck("notjson", robkd="{'meta': 1"), "corrupt robkd metadata"),
        "robkd entry a list": (lambda: ck("robkdlist", robkd="[1, 2]"), "corrupt robkd metadata"),
        "meta not a mapping": (lambda: ck("metalist", robkd=json.dumps({"format_version": "1", "meta": [1]})), "corrupt robkd metadata"),
        "negative num_classes": (lambda: ck("negc", meta={"num_classes": -3}), "num_classes"),
        "zero num_classes": (lambda: ck("zeroc", meta={"num_classes": 0}), "num_classes"),
        "absurd num_classes": (lambda: ck("absurdc", meta={"num_classes": 10**15}), "num_classes"),
        "string num_classes": (lambda: ck("strc", meta={"num_classes": "10"}), "num_classes"),
        "num_classes contradicts the weights": (lambda: ck("wrongc", meta={"num_classes": 7}), "shape mismatches"),
        "negative input shape": (lambda: ck("negshape", meta={"input_shape": [1, -28, 28]}), "input_shape"),
        "huge input shape": (lambda: ck("hugeshape", meta={"input_shape": [3, 10**6, 10**6]}), "too large"),
        "two-number input shape": (lambda: ck("shortshape", meta={"input_shape": [28, 28]}), "input_shape"),
        "NaN in mean": (lambda: ck("nanmean", robkd=good_robkd.replace('"mean": [', '"mean": [NaN, ')), "finite"),
        "zero std": (lambda: ck("zerostd", meta={"std": [0.0]}), "std"),
        "arch_kwargs a list": (lambda: ck("kwlist", meta={"arch_kwargs": [1, 2]}), "arch_kwargs"),
        "arch_kwargs sets num_classes": (lambda: ck("kwclasses", meta={"arch_kwargs": {"num_classes": 3}}), "must not set"),
        "layer widths of terabytes": (lambda: ck("tb", meta={"arch_kwargs": {"hidden": [2**20, 2**20]}}), "TB as float32"),
        "a million hidden layers": (lambda: ck("deepmlp", meta={"arch_kwargs": {"hidden": [1] * 10**6}}), "at most 64"),
        "width of the wrong type": (lambda: ck("strwidth", meta={"arch_kwargs": {"hidden": ["wide"]}}), "hidden width"),
        "unknown metadata key": (lambda: ck("unknown", meta={"evil": 1}), "unknown model metadata keys"),
        "provenance nested 500 deep": (lambda: ck("deepprov", meta={"provenance": json.loads('{"a":' * 500 + "1" + "}" * 500)}),
                                       "nested"),
        "class_names of the wrong length": (lambda: ck("names", meta={"class_names": ["a", "b"]}), "class_names"),
        "integer weights": (lambda: ck("intw", state={**st, "1.weight": st["1.weight"].to(torch.int32)}), "dtype mismatches"),
        "boolean weights": (lambda: ck("boolw", state={**st, "1.weight": st["1.weight"] > 0}), "dtype mismatches"),
        "weights of the wrong shape": (lambda: ck("shapew", state={**st, "1.weight": torch.zeros(3, 3)}), "shape mismatches"),
        "unknown format version": (lambda: ck("version", robkd=json.dumps({**base["robkd"], "format_version": "99"})), "format"),
    }


MODEL_CASES = [
    "metadata is a number", "metadata value not a string", "header nested 200000 deep", "header promises a huge tensor",
    "tensor past the end of the file", "robkd entry nested 200000 deep", "robkd entry not JSON", "robkd entry a list",
    "meta not a mapping", "negative num_classes", "zero num_classes", "absurd num_classes", "string num_classes",
    "num_classes contradicts the weights", "negative input shape", "huge input shape", "two-number input shape",
    "NaN in mean", "zero std", "arch_kwargs a list", "arch_kwargs sets num_classes", "layer widths of terabytes",
    "a million hidden layers", "width of the wrong type", "unknown metadata key", "provenance nested 500 deep",
    "class_names of the wrong length", "integer weights", "boolean weights", "weights of the wrong shape",
    "unknown format version",
]


def _idx(code: int, arr: np.ndarray) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _cifar_dir(d: Path, batch: dict | None = None, *, meta: Any = None, raw: bytes | None = None, protocol: int = 4) -> Path:
    """A ``cifar-10-batches-py`` folder under ``d`` holding ``test_batch`` (4 images) and, with ``meta``, ``batches.meta``."""
    root = d / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [1, 2, 3, 4]}
    (root / "test_batch").write_bytes(raw if raw is not None else pickle.dumps({**good, **(batch or {})}, protocol=protocol))
    if meta is not None:
        (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": meta}, protocol=protocol))
    return d


def _hostile_data(d: Path) -> dict[str, tuple[Callable[[], list[str]], str]]:
    """name -> (writes the files and returns the --data flags, a word the one error line must hold)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 1, 28, 28), dtype=np.uint8)
    y = np.arange(8) % 10

    def npz(name: str, **arrays: np.ndarray) -> list[str]:
        p = d / f"{name}.npz"
        np.savez(p, **{"x": x, "y": y, **arrays})
        return ["--data", str(p)]

    def pt(name: str, obj: Any) -> list[str]:
        p = d / f"{name}.pt"
        torch.save(obj, p)
        return ["--data", str(p)]

    def cifar(name: str, *args: Any, **kw: Any) -> list[str]:
        return ["--data", "cifar10", "--data-dir", str(_cifar_dir(d / name, *args, **kw))]

    def idx(name: str, images: bytes, labels: bytes) -> list[str]:
        root = d / name
        root.mkdir()
        (root / "t10k-images-idx3-ubyte").write_bytes(images)
        (root / "t10k-labels-idx1-ubyte").write_bytes(labels)
        return ["--data", "mnist", "--data-dir", str(root)]

    good_images, good_labels = _idx(0x08, x[:, 0]), _idx(0x08, y.astype(np.uint8))
    evil = b"\x80\x04cposix\nsystem\n(S'touch /tmp/robkd-pwned'\ntR."
    return {
        "npz float labels": (lambda: npz("floaty", y=y + 0.5), "integer class indices"),
        "npz NaN label": (lambda: npz("nany", y=np.where(y == 3, np.nan, y)), "integer class indices"),
        "npz negative label": (lambda: npz("negy", y=y - 1), ">= 0"),
        "npz boolean labels": (lambda: npz("booly", y=y > 4), "integer class indices"),
        "npz one-hot labels": (lambda: npz("onehot", y=np.eye(10)[y]), "one class index per image"),
        "npz x and y lengths differ": (lambda: npz("short", y=y[:5]), "8 images"),
        "npz NaN pixels": (lambda: npz("nanx", x=np.full((8, 1, 28, 28), np.nan, np.float32)), "NaN"),
        "npz infinite pixels": (lambda: npz("infx", x=np.full((8, 1, 28, 28), np.inf, np.float32)), "infinite"),
        "npz string images": (lambda: npz("strx", x=np.array(["img"] * 8)), "numeric"),
        "npz int64 images": (lambda: npz("intx", x=x.astype(np.int64)), "uint8 or float"),
        "npz labels past the model's classes": (lambda: npz("bigy", y=y + 5), "labels span"),
        "pt float labels": (lambda: pt("floaty", {"x": torch.from_numpy(x), "y": torch.tensor(y + 0.25)}), "integer class indices"),
        "pt x a list": (lambda: pt("listx", {"x": [[1, 2]], "y": torch.tensor(y)}), "must be a tensor"),
        "cifar data a string": (lambda: cifar("strdata", {b"data": "not pixels"}), "numpy array"),
        "cifar data a list": (lambda: cifar("listdata", {b"data": [[0] * 3072] * 4}), "numpy array"),
        "cifar float pixels": (lambda: cifar("floatdata", {b"data": np.zeros((4, 3072), np.float32)}), "integer pixels"),
        "cifar pixels above 255": (lambda: cifar("bigdata", {b"data": np.full((4, 3072), 300, np.int32)}), "0..255"),
        "cifar wrong pixel count": (lambda: cifar("pixcount", {b"data": np.zeros((4, 100), np.uint8)}), "3072"),
        "cifar string labels": (lambda: cifar("strlabels", {b"labels": ["cat", "dog", "cat", "dog"]}), "list of integers"),
        "cifar label count": (lambda: cifar("fewlabels", {b"labels": [1, 2]}), "4 images but 2 labels"),
        "cifar negative label": (lambda: cifar("neglabel", {b"labels": [1, -2, 3, 4]}), ">= 0"),
        "cifar label past 10 classes": (lambda: cifar("biglabel", {b"labels": [1, 2, 3, 10]}), "10 classes"),
        "cifar label_names a number": (lambda: cifar("namesint", meta=5), "label_names"),
        "cifar three label_names": (lambda: cifar("names3", meta=[b"a", b"b", b"c"]), "3 class names"),
        "cifar pickle runs code": (lambda: cifar("evil", raw=evil), "refusing"),
        "cifar not a pickle": (lambda: cifar("garbage", raw=b"\x80\x05 this is not a pickle"), "cannot read CIFAR batch"),
        "idx bad magic": (lambda: idx("magic", b"\x01\x02\x03\x04" + x.tobytes(), good_labels), "magic"),
        "idx float images": (lambda: idx("floatimg", _idx(0x0D, x[:, 0].astype(">f4")), good_labels), "unsigned bytes"),
        "idx float labels": (lambda: idx("floatlab", good_images, _idx(0x0D, y.astype(">f4"))), "labels must be integers"),
        "idx dims of petabytes": (lambda: idx("hugedims", b"\x00\x00\x08\x03" + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1),
                                      good_labels), "promises"),
        "idx extra bytes": (lambda: idx("extra", good_images + b"!!", good_labels), "payload"),
        "idx label file of images": (lambda: idx("labdims", good_images, good_images), "disagree"),
    }


DATA_CASES = [
    "npz float labels", "npz NaN label", "npz negative label", "npz boolean labels", "npz one-hot labels",
    "npz x and y lengths differ", "npz NaN pixels", "npz infinite pixels", "npz string images", "npz int64 images",
    "npz labels past the model's classes", "pt float labels", "pt x a list", "cifar data a string", "cifar data a list",
    "cifar float pixels", "cifar pixels above 255", "cifar wrong pixel count", "cifar string labels", "cifar label count",
    "cifar negative label", "cifar label past 10 classes", "cifar label_names a number", "cifar three label_names",
    "cifar pickle runs code", "cifar not a pickle", "idx bad magic", "idx float images", "idx float labels",
    "idx dims of petabytes", "idx extra bytes", "idx label file of images",
]


# ----------------------------------------------------------------------------- the CLI matrix
@pytest.mark.parametrize("case", MODEL_CASES)
def test_hostile_checkpoint_through_audit(base, tmp_path, capsys, case):
    make, word = _hostile_models(base, tmp_path)[case]
    path = make()
    out = tmp_path / "out"
    expect_failure(["audit", str(path), STUDENT, "--data", "fashion-mnist-slice", *QUICK, "--out", str(out)], capsys,
                   watch=[tmp_path], contains=word)


@pytest.mark.parametrize("case", ["header nested 200000 deep", "negative num_classes", "layer widths of terabytes",
                                  "integer weights", "huge input shape"])
def test_hostile_checkpoint_through_certify(base, tmp_path, capsys, case):
    make, word = _hostile_models(base, tmp_path)[case]
    path = make()
    expect_failure(["certify", str(path), "--data", "fashion-mnist-slice", "--n", "4", "--eps", "0.01",
                    "--out", str(tmp_path / "out")], capsys, watch=[tmp_path], contains=word)


@pytest.mark.parametrize("case", DATA_CASES)
def test_hostile_dataset_through_audit(tmp_path, capsys, case):
    make, word = _hostile_data(tmp_path)[case]
    flags = make()
    marker = Path("/tmp/robkd-pwned")
    existed = marker.exists()
    expect_failure(["audit", TEACHER, STUDENT, *flags, *QUICK, "--out", str(tmp_path / "out")], capsys,
                   watch=[tmp_path], contains=word)
    assert marker.exists() == existed  # the pickle's code never ran


@pytest.mark.parametrize("case", ["npz float labels", "cifar string labels", "idx bad magic", "pt x a list"])
def test_hostile_dataset_through_certify(tmp_path, capsys, case):
    make, word = _hostile_data(tmp_path)[case]
    flags = make()
    expect_failure(["certify", STUDENT, *flags, "--n", "4", "--eps", "0.01", "--out", str(tmp_path / "out")], capsys,
                   watch=[tmp_path], contains=word)


def test_model_flags_out_of_range_exit_2(tmp_path, capsys):
    for flags, word in ((["--input-shape", "1,100000,100000"], "too large"), (["--num-classes", "0"], "num_classes")):
        expect_failure(["certify", STUDENT, "--data", "fashion-mnist-slice", "--n", "4", "--eps", "0.01", *flags,
                        "--out", str(tmp_path / "out")], capsys, watch=[tmp_path], contains=word)


# ----------------------------------------------------------------------------- loaders, directly
def test_every_hostile_checkpoint_is_a_model_load_error(base, tmp_path):
    """Through the API each file fails in load_model with a RobkdError of one line (ModelLoadError for the file's
    own faults; the architecture's refusal of its arguments is an ArchitectureError, also exit 2)."""
    for name, (make, word) in _hostile_models(base, tmp_path).items():
        with pytest.raises((ModelLoadError, ArchitectureError)) as info:
            load_model(make())
        msg = str(info.value)
        assert "\n" not in msg and len(msg) < 1000 and word.lower() in msg.lower(), (name, msg)


def test_size_is_checked_before_anything_is_allocated(monkeypatch):
    """An architecture of terabytes is refused while being counted on the meta device: no real tensor is made."""
    import robkd.models.build as io

    made = []
    real = io.create_model

    def spy(arch, **kw):
        made.append(torch.empty(0).device.type)  # the default device the factory runs under
        return real(arch, **kw)

    monkeypatch.setattr(io, "create_model", spy)
    with pytest.raises(ModelLoadError, match=r"would hold 1\.1e\+12 values \(4\.4 TB as float32\)"):
        build_model("robkd:mlp", input_shape=(1, 28, 28), num_classes=10, arch_kwargs={"hidden": [2**20, 2**20]})
    assert made == ["meta"]
    build_model("robkd:mlp", input_shape=(1, 28, 28), num_classes=10, arch_kwargs={"hidden": [4]})
    assert made == ["meta", "meta", "cpu"]


def test_meta_build_keeps_the_random_stream():
    """Counting on the meta device draws no random numbers: a seeded build gives the same weights as before."""
    from robkd.models import create_model

    torch.manual_seed(5)
    direct = create_model("robkd:cnn_small", num_classes=10, in_chans=1, img_size=28).state_dict()
    torch.manual_seed(5)
    built = build_model("robkd:cnn_small", input_shape=(1, 28, 28), num_classes=10).net.state_dict()
    assert all(torch.equal(direct[k], built[k]) for k in direct)


def test_state_dict_with_wrong_dtypes_is_refused(base, tmp_path):
    sd = dict(base["state"])
    sd["3.bias"] = sd["3.bias"].to(torch.int64)
    p = tmp_path / "sd.pt"
    torch.save({"state_dict": sd}, p)
    with pytest.raises(ModelLoadError, match=r"dtype mismatches \[3\.bias: file int vs model float\]"):
        load_model(p, arch="robkd:mlp", arch_kwargs={"hidden": [8]}, input_shape=(1, 28, 28))
    sd["3.bias"] = base["state"]["3.bias"].half()  # another float width is fine (cast on load)
    torch.save({"state_dict": sd}, p)
    load_model(p, arch="robkd:mlp", arch_kwargs={"hidden": [8]}, input_shape=(1, 28, 28))


class _IntLogits(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1)[:, :10] * 10).long()


class _OneRow(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:1, :10]


class _Logits(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script and save are deprecated
@pytest.mark.parametrize("net,kw,word", [
    (_IntLogits(), {}, "floating-point logits"),
    (_OneRow(), {}, "batch of 2"),
    (_Logits(), {"num_classes": 7}, "says 7 classes but the model outputs 10"),
])
def test_static_output_metadata_is_checked_at_load(tmp_path, net, kw, word):
    p = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(net), str(p))
    with pytest.raises(ModelLoadError, match=word):
        load_model(p, input_shape=(1, 28, 28), **kw)
    assert load_model(tmp_path / "m.pt") is not None  # without a shape nothing can be probed: the audit probes later


def test_model_meta_from_dict_checks_types():
    good = {"arch": "robkd:mlp", "num_classes": 10, "input_shape": [1, 28, 28], "mean": [0.5], "std": [0.25]}
    assert ModelMeta.from_dict(good).input_shape == (1, 28, 28)
    for bad in ({"num_classes": True}, {"num_classes": 10.0}, {"input_shape": [1, 28.5, 28]}, {"mean": ["a"]},
                {"std": [float("inf")]}, {"arch": ""}, {"dataset": 5}, {"provenance": []}, {"class_names": [1] * 10}):
        with pytest.raises(UsageError):
            ModelMeta.from_dict({**good, **bad})
    with pytest.raises(UsageError, match="mapping"):
        ModelMeta.from_dict([("arch", "x")])  # type: ignore[arg-type]


def test_every_hostile_dataset_is_a_data_error(tmp_path):
    for name, (make, word) in _hostile_data(tmp_path).items():
        if name == "npz labels past the model's classes":
            continue  # a valid dataset: the audit refuses it against the model
        flags = make()
        data = flags[1]
        data_dir = flags[3] if len(flags) > 2 else None
        with pytest.raises(DataError) as info:
            load_dataset(data, "test", data_dir=data_dir)
        msg = str(info.value)
        assert "\n" not in msg and word.lower() in msg.lower(), (name, msg)


def test_cifar_pickle_protocol_5_is_read(tmp_path):
    """numpy arrays pickled with protocol 5 use numpy's _frombuffer: allowed, still without arbitrary globals."""
    d = _cifar_dir(tmp_path, protocol=5, meta=[f"c{i}".encode() for i in range(10)])
    data = load_dataset("cifar10", "test", data_dir=d)
    assert data.x.shape == (4, 3, 32, 32) and data.y.tolist() == [1, 2, 3, 4] and data.classes[3] == "c3"
    assert torch.equal(data.x[0].reshape(-1), torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)[0]))


def test_cifar_pickle_out_of_band_buffers_are_refused(tmp_path):
    arr = np.zeros((4, 3072), np.uint8)
    buffers: list = []
    raw = pickle.dumps({b"data": arr, b"labels": [0, 1, 2, 3]}, protocol=5, buffer_callback=buffers.append)
    assert buffers  # the array went out of band
    with pytest.raises(DataError, match="cannot read CIFAR batch"):
        load_dataset("cifar10", "test", data_dir=_cifar_dir(tmp_path, raw=raw))


def test_integral_float_labels_are_cast_and_others_refused(tmp_path):
    x = np.zeros((4, 1, 8, 8), np.uint8)
    p = tmp_path / "ok.npz"
    np.savez(p, x=x, y=np.array([0.0, 1.0, 2.0, 3.0]))
    data = load_dataset(str(p))
    assert data.y.dtype == torch.int64 and data.y.tolist() == [0, 1, 2, 3]
    assert check_labels(torch.tensor([2.0, 5.0]), "t").tolist() == [2, 5]
    for bad, word in ((torch.tensor([1.0, 2.5]), "2.5"), (torch.tensor([float("inf")]), "inf"),
                      (torch.tensor([1e30]), "not class indices"), (torch.tensor([True]), "bool"),
                      (torch.tensor([-1]), ">= 0")):
        with pytest.raises(DataError, match=word):
            check_labels(bad, "t")
    with pytest.raises(DataError, match="declares 3 classes"):
        check_labels(torch.tensor([0, 3]), "t", 3)


def test_image_data_checks_what_it_is_given():
    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(DataError, match="tensors"):
        ImageData(np.zeros((2, 1, 4, 4)), torch.tensor([0, 1]))  # type: ignore[arg-type]
    with pytest.raises(DataError, match="declares 2 classes"):
        ImageData(x, torch.tensor([0, 2]), classes=["a", "b"])
    with pytest.raises(DataError, match="class names"):
        ImageData(x, torch.tensor([0, 1]), classes=[1, 2])  # type: ignore[list-item]
    assert ImageData(x, torch.tensor([0.0, 1.0])).y.dtype == torch.int64


def test_hostile_errors_are_robkd_errors_with_exit_2(base, tmp_path):
    """The classes above map to exit 2 (errors.py): none is an internal error."""
    errors: list[Callable[[], Any]] = [lambda: load_model(_hostile_models(base, tmp_path)["zero std"][0]()),
                                       lambda: load_dataset(str(tmp_path / "missing.npz"))]
    for call in errors:
        with pytest.raises(RobkdError) as info:
            call()
        assert info.value.exit_code == 2


def test_user_architecture_size_is_guarded(tmp_path, monkeypatch):
    """A confirmed user architecture is sized on the meta device too; one that cannot run there is built
    directly under a guard that stops at the first tensor past the limit, before it is initialised."""
    (tmp_path / "robkd_hostile_arch.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "def wide(num_classes, in_chans, img_size, width=8):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * img_size * img_size, width), nn.Linear(width, num_classes))\n"
        "def picky(num_classes, in_chans, img_size, width=8):\n"
        "    torch.zeros(1).item()  # fails on the meta device\n"
        "    return wide(num_classes, in_chans, img_size, width)\n")
    import robkd.models.build as io

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(io, "MAX_ELEMENTS", 10_000)  # the mechanism, at a size a test can afford
    for factory, word in (("wide", "would hold 6.8e\\+04 values"), ("picky", "would hold more than 1e\\+04 values")):
        arch = f"robkd_hostile_arch:{factory}"
        assert build_model(arch, input_shape=(1, 8, 8), num_classes=3).meta.arch == arch
        with pytest.raises(ModelLoadError, match=word):
            build_model(arch, input_shape=(1, 8, 8), num_classes=3, arch_kwargs={"width": 1000})
