"""``robkd.evaluate`` (one model, RobustBench style) and ``--arch robustbench:<id>`` (issue 14, item 9)."""

from __future__ import annotations

import enum
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robkd
from robkd.data import load_dataset
from robkd.errors import ArchitectureError, ModelLoadError, UsageError
from robkd.types import Norm


def _robustbench_importable() -> bool:
    import sys

    try:
        import robustbench.model_zoo.models  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or installed without its own dependencies
        for name in [m for m in sys.modules if m == "robustbench" or m.startswith("robustbench.")]:
            del sys.modules[name]  # a failed import leaves its finished submodules behind
        return False
    return True


HAVE_ROBUSTBENCH = _robustbench_importable()


@pytest.fixture(scope="module")
def xy():
    d = load_dataset("fashion-mnist-slice", "test")
    return d.float_x(slice(0, 120)), d.y[:120].clone()


@pytest.fixture(scope="module")
def model():
    from helpers import mlp

    return mlp(0, (16,))


def _fgsm_robust(m: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> int:
    """Samples robust to FGSM, computed independently: correct on the clean and on the FGSM point."""
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(m(xr), y, reduction="sum"), xr)
    with torch.no_grad():
        x_adv = (x + eps * g.sign()).clamp(0, 1)
        return int(((m(x).argmax(1) == y) & (m(x_adv).argmax(1) == y)).sum())


def test_evaluate_matches_an_independent_count_and_the_audit(model, xy):
    x, y = xy
    res = robkd.evaluate(model, (x, y), eps=[0.02, 0.05], attacks="fgsm", n=None, sanity=False)
    assert isinstance(res, robkd.EvaluationResult) and res.n == 120
    with torch.no_grad():
        clean_k = int((model(x).argmax(1) == y).sum())
    assert res.clean.k == clean_k and res.clean_accuracy == pytest.approx(clean_k / 120)
    for row, eps in zip(res.per_radius, (0.02, 0.05)):
        assert abs(row.robust.k - _fgsm_robust(model, x, y, eps)) <= 1  # a gradient sign at exactly 0 may differ
        assert row.robust.ci_low <= row.robust.value <= row.robust.ci_high
        assert row.robust.k <= res.clean.k and row.after_attack["fgsm"] == row.robust
    assert res.robust_accuracy == res.per_radius[-1].robust.value and res.at("0.02") is res.per_radius[0]
    # the audit's figures for the same model on the same samples are the same numbers
    aud = robkd.audit(model, model, data=(x, y), n=None, eps=[0.02, 0.05], attacks="fgsm", sanity_n=0).to_dict()
    assert aud["teacher"]["clean"]["k"] == res.clean.k
    assert [r["worst"]["k"] for r in aud["teacher"]["per_radius"]] == [r.robust.k for r in res.per_radius]
    df = res.to_pandas()
    assert list(df.index) == list(range(120)) and (df["label"].to_numpy() == y.numpy()).all()
    assert int(df["robust@0.05"].sum()) == res.per_radius[1].robust.k and "clean_correct" in df
    assert res.to_dict()["data"]["source"] == "in-memory"


def test_evaluate_from_a_file_and_a_dataset_name(model, tmp_path):
    from robkd.models import save_model

    path = tmp_path / "m.safetensors"
    save_model(model, path)
    kw = dict(eps=0.05, attacks=["fgsm"], n=40, seed=2, sanity=False)
    a = robkd.evaluate(path, "fashion-mnist-slice", **kw)
    b = robkd.evaluate(model, "fashion-mnist-slice", **kw)
    assert (a.clean, a.per_radius) == (b.clean, b.per_radius)
    assert a.to_dict()["data"]["dataset"] == "fashion-mnist-slice"


def test_threat_models(model, xy):
    x, y = xy

    class ThreatModel(enum.Enum):  # RobustBench's enum, as far as robkd reads it
        Linf = "Linf"
        L2 = "L2"
        corruptions = "corruptions"

    for tm in ("L2", Norm.L2, ThreatModel.L2):
        assert robkd.evaluate(model, (x, y), threat_model=tm, eps=0.5, attacks="fgsm", n=8, sanity=False).norm is Norm.L2
    with pytest.raises(UsageError, match="'corruptions' is not one robkd evaluates"):
        robkd.evaluate(model, (x, y), threat_model=ThreatModel.corruptions, eps=0.5, n=8)
    with pytest.raises(UsageError, match="unknown keyword"):
        robkd.evaluate(model, (x, y), eps=0.05, gates=["x"])
    with pytest.raises(UsageError, match="in-memory data"):
        robkd.evaluate(model, (x, y))


def test_evaluate_runs_the_sanity_checks(model, xy):
    x, y = xy
    res = robkd.evaluate(model, (x, y), eps=0.05, attacks="fgsm", n=16, sanity_n=8)
    assert res.to_dict()["sanity"]["checked"] is True and isinstance(res.sanity_flags, list)
    assert "evaluate" in robkd.__all__ and "EvaluationResult" in robkd.__all__


# ----------------------------------------------------------------------------- robustbench:<id>
class TinyZooNet(nn.Module):
    """A RobustBench-like architecture: its normalisation constants are buffers (``mu``/``sigma``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 15 * 15, 10)
        self.register_buffer("mu", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        self.register_buffer("sigma", torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.fc(F.relu(self.conv((x - self.mu) / self.sigma)).flatten(1))


class Nested(nn.Module):
    """An architecture whose own submodule is called ``model`` (a ``model.`` prefix is then its own)."""

    def __init__(self):
        super().__init__()
        self.model = TinyZooNet()

    def forward(self, x):
        return self.model(x)


class _DS(enum.Enum):
    cifar_10 = "cifar10"
    cifar_100 = "cifar100"


def _zoo():
    return OrderedDict([
        (_DS.cifar_10, OrderedDict([("Linf", {"Tiny": {"model": TinyZooNet}, "Nested": {"model": Nested}}),
                                    ("L2", {"Tiny": {"model": TinyZooNet}})])),
        (_DS.cifar_100, OrderedDict([("Linf", {"Other": {"model": TinyZooNet}, "Tiny": {"model": TinyZooNet}})])),
    ])


@pytest.fixture
def fake_zoo(monkeypatch):
    import robkd.models.robustbench as rb

    monkeypatch.setattr(rb, "model_dicts", _zoo)
    return rb


def test_zoo_lookup(fake_zoo):
    rb = fake_zoo
    e = rb.find_entry("cifar10/Tiny")
    assert (e.dataset, e.threat_model, e.input_shape, e.num_classes) == ("cifar10", "Linf", (3, 32, 32), 10)
    assert rb.find_entry("cifar10/L2/Tiny").threat_model == "L2"
    assert rb.find_entry("Tiny", num_classes=100).dataset == "cifar100"
    with pytest.raises(ArchitectureError, match="several datasets"):
        rb.find_entry("Tiny")
    with pytest.raises(ArchitectureError, match="no RobustBench model 'Nope'"):
        rb.find_entry("Nope")


@pytest.mark.parametrize("layout", ["bare", "state_dict+module", "model", "module.model", "last", "no-mu-sigma"])
def test_checkpoint_layouts_load_strictly(layout, fake_zoo, tmp_path):
    rb = fake_zoo
    torch.manual_seed(0)
    net = TinyZooNet()
    sd = net.state_dict()
    stored = {
        "bare": sd,
        "state_dict+module": {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": torch.tensor(3)},
        "model": {f"model.{k}": v for k, v in sd.items()},
        "module.model": {"state_dict": {f"module.model.{k}": v for k, v in sd.items()}},
        "last": {"last": sd, "best": sd},
        "no-mu-sigma": {k: v for k, v in sd.items() if k not in ("mu", "sigma")},
    }[layout]
    path = tmp_path / "ck.pt"
    torch.save(stored, path)
    got, meta = rb.load_robustbench(path, "robustbench:cifar10/Linf/Tiny")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(got(x), net(x))
    assert meta.arch == "robustbench:cifar10/Linf/Tiny" and meta.mean is None and meta.input_shape == (3, 32, 32)


def test_prefixes_are_stripped_only_when_that_makes_the_names_exact(fake_zoo, tmp_path):
    rb = fake_zoo
    nested = Nested()
    path = tmp_path / "nested.pt"
    torch.save(nested.state_dict(), path)  # keys "model.conv.weight": the architecture's own names
    got, _ = rb.load_robustbench(path, "robustbench:cifar10/Linf/Nested")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(got(x), nested(x))
    bad = {k: v for k, v in TinyZooNet().state_dict().items() if k != "fc.bias"}
    torch.save({"state_dict": {f"module.{k}": v for k, v in bad.items()}}, path)
    with pytest.raises(ModelLoadError, match=r"missing keys \[fc.bias\]"):
        rb.load_robustbench(path, "robustbench:cifar10/Linf/Tiny")


def test_cli_audit_with_a_robustbench_architecture(fake_zoo, tmp_path, capsys):
    from badinput import expect_failure, run_cli

    torch.manual_seed(0)
    net = TinyZooNet().eval()
    path = tmp_path / "ck.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items() if k not in ("mu", "sigma")}}, path)
    g = np.random.default_rng(0)
    x = g.random((12, 3, 32, 32), dtype=np.float32)
    y = g.integers(0, 10, 12)
    np.savez(tmp_path / "c.npz", x=x, y=y)
    out = tmp_path / "out"
    argv = ["audit", path, path, "--arch", "robustbench:cifar10/Tiny", "--data", tmp_path / "c.npz", "--eps", "8/255",
            "--attacks", "fgsm", "--n", "12", "--sanity-n", "0", "--out", out, "--no-report"]
    res = run_cli(argv, capsys)
    assert res.code == 0, res.err
    import json

    d = json.loads((out / "results.json").read_text())
    want = robkd.evaluate(net, (torch.from_numpy(x), torch.from_numpy(y)), eps=8 / 255, attacks="fgsm", sanity=False)
    assert d["teacher"]["clean"]["k"] == want.clean.k and d["teacher"]["per_radius"][0]["worst"]["k"] == want.per_radius[0].robust.k
    assert d["teacher"]["model"]["meta"]["arch"] == "robustbench:cifar10/Linf/Tiny"
    expect_failure([*argv[:-3], "--mean", "0.5", "--std", "0.5"], capsys, code=2, contains=["drop --mean/--std"])


@pytest.mark.skipif(HAVE_ROBUSTBENCH, reason="robustbench is installed")
def test_without_robustbench_the_cli_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    import sys

    from badinput import expect_failure

    for name in [m for m in sys.modules if m.startswith("robustbench.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "robustbench", None)  # not installed (a None entry makes the import fail)

    path = tmp_path / "ck.pt"
    torch.save(TinyZooNet().state_dict(), path)
    expect_failure(["audit", path, path, "--arch", "robustbench:Standard", "--data", "fashion-mnist-slice", "--n", "4",
                    "--attacks", "fgsm"], capsys, code=2, contains=["pip install 'robkd[robustbench]'"], watch=[tmp_path])


@pytest.mark.skipif(not HAVE_ROBUSTBENCH, reason="the optional robustbench package is not installed")
def test_the_real_zoo_has_the_standard_model():
    from robkd.models.robustbench import create, find_entry

    e = find_entry("cifar10/Linf/Standard")
    assert e.num_classes == 10
    assert isinstance(create(e.qualified), nn.Module)
