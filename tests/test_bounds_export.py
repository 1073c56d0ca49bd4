"""Bounds over the torch.export ATen graph: the same operators and bounds as the fx path, loaded .pt2 /
TorchScript / ONNX files certified with identical verdicts, one-line reports of unsupported operators,
float64 models."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from robkd.bounds import certify, compute_bounds
from robkd.bounds.export_trace import trace_network_export
from robkd.bounds.graph import BoundedModel
from robkd.bounds.trace import trace_model
from robkd.errors import UnsupportedModelError
from robkd.models import load_model
from robkd.models.wrapper import RobustModel
from robkd.types import ModelMeta

METHODS = ("ibp", "crown", "alpha-crown")


def pool_net() -> nn.Module:
    """The done-when net: a small conv net with max pooling (architecture factory for the state_dict file)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()


class Branchy(nn.Module):
    """Residual add, concatenation, BatchNorm, overlapping max pooling, x.mean((2, 3)), by-constant arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x * 2.0 - 0.5)))
        h = nn.functional.max_pool2d(h, 3, 2, 1)
        r = torch.relu(self.c2(h) + h)
        h = torch.cat([r, h], dim=1)
        return self.fc(torch.relu(self.c3(h)).mean((2, 3)) / 2)


def test_export_graph_computes_the_model_and_gives_the_fx_bounds():
    torch.manual_seed(1)
    m = RobustModel(Branchy(), ModelMeta(input_shape=(2, 8, 8), mean=(0.5, 0.4), std=(0.2, 0.3))).eval()
    ex = trace_network_export(m, (2, 8, 8), torch.float32)
    assert ex.front_end == "export" and not ex.unsupported
    kinds = {type(o).__name__ for o in ex.ops}
    assert {"Conv2d", "ElementwiseAffine", "ReLU", "MaxPool2d", "Add", "Concat", "Linear"} <= kinds
    x = torch.rand(3, 2, 8, 8)
    vals = {ex.input_name: x}
    for op in ex.ops:
        vals[op.name] = op.forward(*(vals[i] for i in op.inputs))
    with torch.no_grad():
        assert torch.allclose(vals[ex.output_name], m(x), atol=1e-5)
    fx = trace_model(m, (2, 8, 8))
    assert fx.unsupported  # fx does not cover torch.cat / functional max pooling / mean: the export path does
    assert BoundedModel(m, (2, 8, 8)).front_end == "export"
    for meth in METHODS:
        lb, ub = compute_bounds(m, x, 0.01, method=meth, alpha_steps=5)
        pts = (x + (torch.rand((200,) + x.shape) * 2 - 1) * 0.01).clamp(0, 1)
        with torch.no_grad():
            out = m(pts.reshape(-1, 2, 8, 8)).reshape(200, 3, 3)
        assert (out >= lb - 1e-5).all() and (out <= ub + 1e-5).all(), meth


def test_export_and_fx_paths_give_identical_bounds():
    m = RobustModel(pool_net(), ModelMeta(input_shape=(1, 8, 8), mean=(0.3,), std=(0.4,))).eval()
    x = torch.rand(4, 1, 8, 8)
    fx = BoundedModel(m, (1, 8, 8))
    assert fx.front_end == "fx"
    ex = BoundedModel(m, (1, 8, 8))
    traced = trace_network_export(m, (1, 8, 8), torch.float32)
    ex.ops, ex.input_name, ex.output_name = traced.ops, traced.input_name, traced.output_name
    ex.index = {op.name: i for i, op in enumerate(ex.ops)}
    ex.relu_ops = [op for op in ex.ops if type(op).__name__ == "ReLU"]
    ex.relu_inputs = {op.inputs[0] for op in ex.relu_ops}
    ex.relax_ops = [op for op in ex.ops if type(op).__name__ in ("ReLU", "MaxPool2d")]
    for meth in METHODS:
        a = fx.bounds(x, 0.02, method=meth, alpha_steps=5)
        b = ex.bounds(x, 0.02, method=meth, alpha_steps=5)
        assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5), meth


def test_unsupported_operators_one_line_with_aten_names(tmp_path):
    class Gelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 2, 3, padding=1)
            self.a1, self.a2 = nn.GELU(), nn.GELU()
            self.fc = nn.Linear(2 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(self.a2(self.a1(self.c(x))).flatten(1))

    path = tmp_path / "gelu.pt2"
    torch.export.save(torch.export.export(Gelu().eval(), (torch.rand(2, 1, 8, 8),)), str(path))
    m = load_model(path)
    with pytest.raises(UnsupportedModelError) as ei:
        compute_bounds(m, torch.rand(2, 1, 8, 8), 0.01, method="ibp")
    msg = str(ei.value)
    assert "\n" not in msg and msg.count("aten.gelu") == 1 and "replace GELU by ReLU" in msg, msg
    assert "aten.conv2d" not in msg and "a1" not in msg and "torch.export" in msg, msg


@pytest.fixture(scope="module")
def four_files(tmp_path_factory):
    """The same net as state_dict (+ arch), .pt2, ONNX and TorchScript."""
    d = tmp_path_factory.mktemp("formats")
    net = pool_net()
    torch.save(net.state_dict(), d / "net.pt")
    torch.export.save(torch.export.export(net, (torch.rand(1, 1, 8, 8),)), str(d / "net.pt2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(net), str(d / "net.ts"))
    files = {"state_dict": load_model(d / "net.pt", arch="test_bounds_export:pool_net", input_shape=(1, 8, 8), num_classes=3),
             "pt2": load_model(d / "net.pt2"), "torchscript": load_model(d / "net.ts", input_shape=(1, 8, 8))}
    try:
        import onnx  # noqa: F401
        import onnx2torch  # noqa: F401

        from test_onnx import export_onnx

        export_onnx(net, d / "net.onnx")
        files["onnx"] = load_model(d / "net.onnx")
    except ImportError:
        pass
    return files


def test_same_net_in_every_format_gets_identical_verdicts(four_files):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(10, 1, 8, 8, generator=g)
    ref = four_files["state_dict"]
    with torch.no_grad():
        y = ref(x).argmax(1)
    y[0] = (y[0] + 1) % 3
    for method in METHODS:
        verdicts = {}
        for fmt, m in four_files.items():
            res = certify(m, x, y, 0.03, method=method, alpha_steps=5)
            verdicts[fmt] = res.status
        assert len({tuple(v) for v in verdicts.values()}) == 1, (method, verdicts)
        assert {"certified"} < set(verdicts["pt2"]) or method == "ibp"  # a mix: the test decides something


def test_certify_cli_on_pt2_and_torchscript(four_files, tmp_path):
    import json

    from robkd.cli.main import main

    x = torch.rand(6, 1, 8, 8)
    y = four_files["state_dict"](x).argmax(1)
    data = tmp_path / "d.pt"
    torch.save({"x": x, "y": y}, data)
    p = next(iter(four_files.values())).meta.source["path"]
    base = str(p).rsplit(".", 1)[0]
    for ext in ("pt2", "ts"):
        out = tmp_path / ext
        rc = main(["certify", f"{base}.{ext}", "--method", "crown", "--eps", "0.01", "--data", str(data),
                   "--out", str(out)])
        assert rc == 0, ext
        assert json.loads((out / "certify.json").read_text())["results"]


def test_float64_models_certify_in_float64(tmp_path):
    net = pool_net().double()
    path = tmp_path / "f64.pt2"
    torch.export.save(torch.export.export(net, (torch.rand(1, 1, 8, 8, dtype=torch.float64),)), str(path))
    m64 = load_model(path)  # used to fail: "does not accept inputs of shape"
    m32 = RobustModel(pool_net(), ModelMeta(input_shape=(1, 8, 8))).eval()
    x = torch.rand(6, 1, 8, 8)
    y = m32(x).argmax(1)
    for method in METHODS:
        a, b = certify(m64, x, y, 0.02, method=method, alpha_steps=5), certify(m32, x, y, 0.02, method=method, alpha_steps=5)
        assert a.margin_lb.dtype == torch.float64 and a.status == b.status
        assert torch.allclose(a.margin_lb.float(), b.margin_lb, atol=1e-4)


def test_timm_resnet_supports_every_method():
    """timm ResNets used to fail CROWN on their stem MaxPool2d(3, 2, 1) (IBP only)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = RobustModel(timm.create_model("resnet18", num_classes=3).eval(), ModelMeta(input_shape=(3, 16, 16))).eval()
    bm = BoundedModel(m, (3, 16, 16))
    for meth in METHODS:
        bm.check(meth)
    x = torch.rand(1, 3, 16, 16)
    lb_i, ub_i = compute_bounds(m, x, 1e-4, method="ibp")
    lb, ub = compute_bounds(m, x, 1e-4, method="crown", intermediate="ibp")
    pts = (x + (torch.rand((16,) + x.shape[1:]) * 2 - 1) * 1e-4).clamp(0, 1)
    with torch.no_grad():
        out = m(pts)
    assert (out >= lb - 1e-4).all() and (out <= ub + 1e-4).all()
    assert (ub - lb).mean() < (ub_i - lb_i).mean()
