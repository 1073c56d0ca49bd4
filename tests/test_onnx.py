"""ONNX models (onnx2torch): detection, metadata, the same audit figures and certify verdicts as the
PyTorch model they were exported from."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from robkd.errors import ModelLoadError, UsageError
from robkd.models import load_model
from robkd.models.formats import detect_format
from robkd.models.wrapper import RobustModel
from robkd.types import ModelMeta

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx2torch")

MEAN, STD = (0.3,), (0.4,)


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def export_onnx(net: nn.Module, path, props: dict[str, str] | None = None, batch: int = 1) -> None:
    """torch.onnx.export (TorchScript-based exporter: fast, opset 17), with optional metadata_props."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.rand(batch, 1, 8, 8),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"])
    if props:
        proto = onnx.load(str(path))
        for k, v in props.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, str(path))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    net = _net()
    export_onnx(net, d / "plain.onnx")
    export_onnx(net, d / "meta.onnx", {"mean": "[0.3]", "std": "0.4", "num_classes": "3"})
    return net, d


def test_detected_loaded_and_equal_to_the_pytorch_model(files):
    net, d = files
    assert detect_format(d / "plain.onnx") == "onnx"
    m = load_model(d / "plain.onnx")
    assert m.meta.input_shape == (1, 8, 8) and m.meta.num_classes == 3 and m.meta.mean is None
    x = torch.rand(5, 1, 8, 8)  # exported at batch 1: other batch sizes run in chunks
    with torch.no_grad():
        assert torch.allclose(m(x), net(x), atol=1e-5)
    # normalisation from the file's metadata_props, or from the flags (same [0,1]-input rule as .pt2)
    ref = RobustModel(net, ModelMeta(input_shape=(1, 8, 8), mean=MEAN, std=STD)).eval()
    for mm in (load_model(d / "meta.onnx"), load_model(d / "plain.onnx", mean=MEAN, std=STD)):
        assert mm.meta.mean == MEAN and mm.meta.std == STD
        with torch.no_grad():
            assert torch.allclose(mm(x), ref(x), atol=1e-5)
    with pytest.raises(UsageError):
        load_model(d / "meta.onnx", mean=(0.5,), std=STD)  # contradicts the file


def test_bad_onnx_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is no protobuf" * 3)
    with pytest.raises(ModelLoadError):
        load_model(bad)


def test_certify_verdicts_identical_to_pytorch(files):
    from robkd.bounds import certify

    net, d = files
    m = load_model(d / "meta.onnx")
    ref = RobustModel(net, ModelMeta(input_shape=(1, 8, 8), mean=MEAN, std=STD)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = ref(x).argmax(1)
    y[0] = (y[0] + 1) % 3  # one misclassified sample
    for method in ("ibp", "crown", "alpha-crown"):
        a = certify(m, x, y, 0.01, method=method, alpha_steps=5)
        b = certify(ref, x, y, 0.01, method=method, alpha_steps=5)
        assert a.status == b.status, method
        assert torch.allclose(a.margin_lb, b.margin_lb, atol=1e-4)


def test_audit_of_onnx_file_equals_audit_of_pytorch_model(files, tmp_path):
    from robkd import audit

    net, d = files
    ref = RobustModel(net, ModelMeta(input_shape=(1, 8, 8), mean=MEAN, std=STD)).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(12, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = ref(x).argmax(1)
    y[:3] = (y[:3] + 1) % 3
    kw = dict(data=(x, y), n=12, seed=0, eps=[0.02], attacks="pgd", certify="crown")
    a = audit(str(d / "meta.onnx"), str(d / "meta.onnx"), out_dir=tmp_path / "a", **kw).to_dict()
    b = audit(ref, ref, out_dir=tmp_path / "b", **kw).to_dict()
    for who in ("teacher", "student"):
        fa, fb = a[who], b[who]
        for key in ("clean", "per_radius", "per_class", "non_finite"):
            assert fa[key] == fb[key], (who, key)
        assert _figures(fa["certification"]) == _figures(fb["certification"])
    assert _figures(a["transfer"]) == _figures(b["transfer"])


def _figures(d):
    """``d`` without timings (the only figures allowed to differ)."""
    if isinstance(d, dict):
        return {k: _figures(v) for k, v in d.items() if "second" not in k and "timing" not in k and k != "seconds"}
    if isinstance(d, list):
        return [_figures(v) for v in d]
    return d
