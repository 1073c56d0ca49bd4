"""Model formats, strict loading, the [0,1] wrapper, the registry and round trips."""

from __future__ import annotations

import sys
from pathlib import Path
import textwrap
import warnings

import pytest
import torch
from torch import nn

from robkd.errors import ArchitectureError, IncompatibleModelsError, ModelLoadError, UsageError
from robkd.models import (
    RobustModel,
    build_model,
    check_compatible,
    create_model,
    detect_format,
    list_models,
    load_model,
    save_model,
)

from robkd.types import ModelMeta

SHAPE = (1, 28, 28)


@pytest.fixture()
def small():
    torch.manual_seed(0)
    return build_model("robkd:cnn_small", input_shape=SHAPE, num_classes=10, mean=(0.3,), std=(0.4,), dataset="fashion-mnist")


def _x(n=5, seed=1):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_wrapper_normalises_inside_and_is_eval(small):
    x = _x()
    expected = small.net((x - 0.3) / 0.4)
    assert torch.allclose(small(x), expected)
    assert not small.training


def test_robkd_checkpoint_round_trip(small, tmp_path):
    path = save_model(small, tmp_path / "m.pt", provenance={"method": "st", "seed": 3})
    assert detect_format(path) == "robkd"
    loaded = load_model(path)
    x = _x()
    assert torch.equal(loaded(x), small(x))
    assert loaded.meta.arch == "robkd:cnn_small"
    assert loaded.meta.mean == (0.3,) and loaded.meta.std == (0.4,)
    assert loaded.meta.provenance == {"method": "st", "seed": 3}
    assert loaded.meta.dataset == "fashion-mnist"
    assert not loaded.training


def test_round_trip_with_batchnorm_and_kwargs(tmp_path):
    torch.manual_seed(0)
    m = build_model("robkd:cnn_medium", input_shape=SHAPE, num_classes=10)
    m.train()
    m(_x(16))  # move BN running stats away from their init
    m.eval()
    loaded = load_model(save_model(m, tmp_path / "bn.safetensors"))
    assert torch.equal(loaded(_x()), m(_x()))
    mlp = build_model("robkd:mlp", input_shape=SHAPE, num_classes=10, arch_kwargs={"hidden": [7, 5]})
    loaded = load_model(save_model(mlp, tmp_path / "mlp.bin"))
    assert torch.equal(loaded(_x()), mlp(_x()))
    assert loaded.net[1].out_features == 7


def test_plain_state_dict_needs_arch(small, tmp_path):
    p = tmp_path / "sd.pth"
    torch.save(small.net.state_dict(), p)
    with pytest.raises(ModelLoadError, match="--arch"):
        load_model(p, input_shape=SHAPE)
    m = load_model(p, arch="robkd:cnn_small", input_shape=SHAPE, num_classes=10, mean=(0.3,), std=(0.4,))
    assert torch.equal(m(_x()), small(_x()))


def test_state_dict_in_container_with_ddp_prefix(small, tmp_path):
    p = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in small.net.state_dict().items()}}, p)
    m = load_model(p, arch="robkd:cnn_small", input_shape=SHAPE, mean=(0.3,), std=(0.4,))
    assert torch.equal(m(_x()), small(_x()))
    assert m.meta.num_classes == 10  # inferred from a forward pass


def test_plain_safetensors_state_dict(small, tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in small.net.state_dict().items()}, str(p))
    assert detect_format(p) == "safetensors"
    m = load_model(p, arch="robkd:cnn_small", input_shape=SHAPE, mean=(0.3,), std=(0.4,))
    assert torch.equal(m(_x()), small(_x()))


def test_torchscript_file(small, tmp_path):
    p = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(small.net, torch.zeros(1, *SHAPE)), str(p))
    assert detect_format(p) == "torchscript"
    m = load_model(p, mean=(0.3,), std=(0.4,), input_shape=SHAPE)
    assert torch.allclose(m(_x()), small(_x()), atol=1e-6)
    assert m.meta.num_classes == 10


def test_torch_export_program(small, tmp_path):
    p = tmp_path / "prog.pt2"
    ep = torch.export.export(small.net, (torch.zeros(2, *SHAPE),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, str(p))
    assert detect_format(p) == "export"
    m = load_model(p, mean=(0.3,), std=(0.4,))
    assert m.meta.input_shape == SHAPE
    assert torch.allclose(m(_x()), small(_x()), atol=1e-6)


def test_torch_export_program_with_a_fixed_batch_size(small, tmp_path):
    """torch.export fixes the batch size unless told otherwise: such a program runs in chunks of its size."""
    p = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(small.net, (torch.zeros(2, *SHAPE),)), str(p))
    m = load_model(p, mean=(0.3,), std=(0.4,))
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(m(x), small(x), atol=1e-6) and torch.allclose(m(x[:1]), small(x[:1]), atol=1e-6)
    x.requires_grad_(True)  # attacks take input gradients through the chunks
    (g,) = torch.autograd.grad(m(x).sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(small(x2).sum(), x2)
    assert torch.allclose(g, g2, atol=1e-5)


def test_pickled_module_needs_explicit_opt_in(small, tmp_path):
    p = tmp_path / "whole.pt"
    torch.save(small.net, p)
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_model(p)
    m = load_model(p, allow_pickle=True, mean=(0.3,), std=(0.4,), input_shape=SHAPE)
    assert torch.equal(m(_x()), small(_x()))


def test_strict_loading_lists_every_mismatch(small, tmp_path):
    sd = dict(small.net.state_dict())
    sd.pop("0.weight")
    sd["extra.bias"] = torch.zeros(3)
    sd["5.weight"] = torch.zeros(7, 7)
    p = tmp_path / "bad.pt"
    torch.save(sd, p)
    with pytest.raises(ModelLoadError) as exc:
        load_model(p, arch="robkd:cnn_small", input_shape=SHAPE)
    msg = str(exc.value)
    assert "missing keys [0.weight]" in msg and "unexpected keys [extra.bias]" in msg and "5.weight" in msg


def test_bad_files(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope.pt")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load_model(empty)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello, this is not a model at all")
    with pytest.raises(ModelLoadError, match="unknown model format"):
        load_model(junk)
    badzip = tmp_path / "bad.pt"
    badzip.write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(badzip)


def test_truncated_robkd_checkpoint(small, tmp_path):
    p = save_model(small, tmp_path / "m.pt")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(p)


def test_save_is_atomic_on_failure(small, tmp_path, monkeypatch):
    import safetensors.torch as st

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(st, "save", boom)
    with pytest.raises(RuntimeError):
        save_model(small, tmp_path / "out.pt")
    assert list(tmp_path.iterdir()) == []


def test_registry_and_factories():
    names = {e.name for e in list_models()}
    assert {"mlp", "cnn_small", "cnn_medium", "resnet18", "preact_resnet18", "wrn34_10", "mobilenetv2"} <= names
    for name, shape in [("resnet18", (3, 32, 32)), ("preact_resnet18", (3, 32, 32)), ("mobilenetv2", (3, 32, 32)), ("cnn_small", (3, 32, 32)), ("cnn_medium", (1, 28, 28))]:
        net = create_model(f"robkd:{name}", num_classes=7, in_chans=shape[0], img_size=shape[1]).eval()
        assert net(torch.rand(2, *shape)).shape == (2, 7)
    with pytest.raises(ArchitectureError, match="unknown architecture 'robkd:nope'"):
        create_model("robkd:nope")


def test_wrn34_10_size():
    net = create_model("robkd:wrn34_10", num_classes=10)
    assert 46e6 < sum(p.numel() for p in net.parameters()) < 46.3e6


def test_timm_architecture_adapted(tmp_path):
    net = create_model("timm:test_resnet", num_classes=10, in_chans=1, img_size=28).eval()
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    p = tmp_path / "t.pth"
    torch.save(net.state_dict(), p)
    m = load_model(p, arch="timm:test_resnet", input_shape=(1, 28, 28), num_classes=10)
    assert torch.equal(m(torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))),
                       net(torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))))
    with pytest.raises(ArchitectureError, match="timm:not_a_model"):
        create_model("timm:not_a_model")


def test_user_factory_imported_only_when_named(tmp_path, monkeypatch):
    mod = tmp_path / "my_user_models.py"
    mod.write_text(textwrap.dedent(
        """
        from torch import nn
        IMPORTED = True
        def Tiny(num_classes=10, in_chans=1):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * 28 * 28, num_classes))
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "my_user_models" not in sys.modules
    net = create_model("my_user_models:Tiny", num_classes=4, in_chans=1, img_size=28)
    assert net(torch.rand(1, 1, 28, 28)).shape == (1, 4)
    with pytest.raises(ArchitectureError, match="no callable"):
        create_model("my_user_models:Missing")
    with pytest.raises(ArchitectureError, match="cannot import"):
        create_model("no_such_module_xyz:Factory")


def test_pair_compatibility():
    a = build_model("robkd:mlp", input_shape=SHAPE, num_classes=10)
    b = build_model("robkd:mlp", input_shape=SHAPE, num_classes=5)
    c = build_model("robkd:mlp", input_shape=(3, 32, 32), num_classes=10)
    check_compatible(a, a)
    with pytest.raises(IncompatibleModelsError, match="10 classes .* 5"):
        check_compatible(a, b)
    with pytest.raises(IncompatibleModelsError, match="shape"):
        check_compatible(a, c)


def test_bad_normalisation_flags():
    with pytest.raises(UsageError):
        build_model("robkd:mlp", input_shape=SHAPE, num_classes=10, mean=(0.1, 0.2), std=(0.3, 0.3))
    with pytest.raises(UsageError, match="std must be > 0"):
        build_model("robkd:mlp", input_shape=SHAPE, num_classes=10, mean=(0.1,), std=(0.0,))
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    assert isinstance(RobustModel(net), RobustModel)


def test_truncated_torch_save_names_a_reason(tmp_path):
    """A torch.save zip whose pickle is cut short: one clear error with a non-empty reason."""
    import io
    import zipfile

    from robkd.errors import ModelLoadError
    from robkd.models import load_model

    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    buf = io.BytesIO()
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(buf, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item, data[:5] if item.filename.endswith("data.pkl") else data)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(buf.getvalue())
    with pytest.raises(ModelLoadError, match=r"corrupt torch.save file .*bad\.pt: \S+") as info:
        load_model(bad, arch="robkd:mlp", input_shape=(1, 28, 28))
    assert "\n" not in str(info.value)


def test_dataset_completes_a_state_dict_but_never_overrides_a_checkpoint(small, tmp_path):
    from robkd.data import load_dataset

    p = tmp_path / "sd.pth"
    torch.save(small.net.state_dict(), p)
    with pytest.raises(ModelLoadError, match="input shape"):
        load_model(p, arch="robkd:cnn_small", mean=(0.3,), std=(0.4,))
    by_name = load_model(p, arch="robkd:cnn_small", mean=(0.3,), std=(0.4,), dataset="fashion-mnist")
    by_data = load_model(p, arch="robkd:cnn_small", mean=(0.3,), std=(0.4,), dataset=load_dataset("fashion-mnist-slice", "test"))
    for m in (by_name, by_data):
        assert m.meta.input_shape == (1, 28, 28) and m.meta.num_classes == 10 and m.meta.mean == (0.3,)
        assert torch.equal(m(_x()), small(_x()))
    with pytest.raises(UsageError, match="unknown dataset"):
        load_model(p, arch="robkd:cnn_small", dataset="imagenet-99k")
    # a 32x32 CIFAR model: its own metadata wins over a 28x28 dataset hint (the mismatch is caught later)
    cifar = build_model("robkd:cnn_small", input_shape=(3, 32, 32), num_classes=10)
    ck = load_model(save_model(cifar, tmp_path / "c.safetensors"), dataset="fashion-mnist")
    assert ck.meta.input_shape == (3, 32, 32)


class _RunsCode:
    """Unpickling this object runs code (writes a marker file): a stand-in for a malicious payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_export_program_with_pickled_payload_is_refused_without_opt_in(small, tmp_path):
    """torch.export.load unpickles sample inputs with weights_only=False: robkd forces the safe loader, so a
    crafted .pt2 cannot run code unless the user passes --allow-pickle."""
    import io
    import zipfile

    good = tmp_path / "prog.pt2"
    ep = torch.export.export(small.net, (torch.zeros(2, *SHAPE),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, str(good))
    marker = tmp_path / "ran"
    payload = io.BytesIO()
    torch.save((_RunsCode(marker),), payload)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as dst:
        names = [i.filename for i in src.infolist()]
        assert any("sample_inputs" in n for n in names), names
        for info in src.infolist():
            dst.writestr(info, payload.getvalue() if "sample_inputs" in info.filename else src.read(info.filename))
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_model(evil, mean=(0.3,), std=(0.4,))
    assert not marker.exists()
    assert torch.allclose(load_model(good, mean=(0.3,), std=(0.4,))(_x()), small(_x()), atol=1e-6)  # plain ones load


def test_checkpoint_naming_user_code_needs_confirmation(small, tmp_path, monkeypatch):
    """A robkd checkpoint's architecture 'module:Factory' imports and calls code: not on the file's word alone."""
    (tmp_path / "robkd_user_arch_mod.py").write_text(
        "from robkd.models import create_model\n"
        "def make(num_classes, in_chans, img_size):\n"
        "    return create_model('robkd:cnn_small', num_classes=num_classes, in_chans=in_chans, img_size=img_size)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = create_model("robkd_user_arch_mod:make", num_classes=10, in_chans=1, img_size=28)
    m = RobustModel(net, ModelMeta(arch="robkd_user_arch_mod:make", input_shape=SHAPE, num_classes=10,
                                   mean=(0.3,), std=(0.4,)))
    p = save_model(m, tmp_path / "user.safetensors")
    with pytest.raises(UsageError, match="--arch robkd_user_arch_mod:make"):
        load_model(p)
    for kw in ({"arch": "robkd_user_arch_mod:make"}, {"allow_pickle": True}):
        assert torch.allclose(load_model(p, **kw)(_x()), m(_x()), atol=1e-6)
