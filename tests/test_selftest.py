"""Attack self-test (binarization test): a working attack finds the planted adversarial example, a
gradient-masked model defeats it, the construction is sound, bad input is rejected."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from robkd.analysis.selftest import (
    SELFTEST_THRESHOLD,
    BinarizedModel,
    _boundary_and_inner,
    _fit_readout,
    attack_self_test,
    features_of,
)
from robkd.attacks.noise import SampleNoise
from robkd.errors import UsageError
from robkd.types import Norm


class _Quantise(nn.Module):
    """Rounds inputs to 4 grey levels: a step function, so every input gradient is exactly zero."""

    def forward(self, x):
        return torch.round(x * 4) / 4


def test_pgd_finds_planted_examples_on_plain_cnn_but_not_through_a_masking_layer(trained_cnn, fmnist_test):
    x, y = fmnist_test.float_x(torch.arange(20)), fmnist_test.y[:20]
    plain = attack_self_test(trained_cnn, x, y, ["pgd-20"], "Linf", 0.1, n=20, seed=0)
    assert plain.valid >= 18
    assert plain.rates["pgd-20"] >= SELFTEST_THRESHOLD and plain.flagged == []
    masked = attack_self_test(nn.Sequential(_Quantise(), trained_cnn), x, y, ["pgd-20", "fgsm"], "Linf", 0.1,
                              n=20, seed=0)
    assert masked.valid >= 15
    assert masked.rates["pgd-20"] <= 0.2 and masked.rates["fgsm"] <= 0.2
    assert masked.flagged == ["pgd-20", "fgsm"]
    d = masked.to_dict()
    json.dumps(d)
    assert d["attacks"]["pgd-20"]["found"] == masked.found["pgd-20"] and d["invalid"] == 20 - masked.valid
    assert sum(v is True for v in d["per_sample"]["pgd-20"]) == masked.found["pgd-20"]


@pytest.mark.parametrize("norm,eps", [(Norm.LINF, 0.1), (Norm.L2, 1.0)])
def test_binarised_model_separates_clean_and_planted_point_inside_the_ball(trained_cnn, fmnist_test, norm, eps):
    x = fmnist_test.float_x(torch.arange(6))
    xb, inner = _boundary_and_inner(x, norm, eps, 16, SampleNoise(0, list(range(6))))
    flat = (xb - x).flatten(1)
    dist = flat.abs().amax(1) if norm is Norm.LINF else flat.norm(dim=1)
    assert bool((dist <= eps + 1e-6).all()) and float(xb.min()) >= 0 and float(xb.max()) <= 1
    f_x, f_b = features_of(trained_cnn, x), features_of(trained_cnn, xb)
    f_in = features_of(trained_cnn, inner.flatten(0, 1)).view(6, 16, -1)
    ws, bs = [], []
    for i in range(6):
        w, b, ok = _fit_readout(torch.cat([f_x[i : i + 1], f_in[i]]), f_b[i])
        assert ok
        ws.append(w)
        bs.append(b)
    model = BinarizedModel(trained_cnn, x, torch.stack(ws), torch.stack(bs), norm)
    with torch.no_grad():
        assert torch.equal(model(x).argmax(1), torch.zeros(6, dtype=torch.long))
        assert torch.equal(model(xb).argmax(1), torch.ones(6, dtype=torch.long))
        for i in range(6):  # every inner point of every sample stays in class 0
            assert bool((model(inner[i]).argmax(1) == 0).all())


def test_bad_input(trained_cnn, fmnist_test):
    x, y = fmnist_test.float_x(torch.arange(4)), fmnist_test.y[:4]
    with pytest.raises(UsageError):
        attack_self_test(trained_cnn, x, y, ["pgd-nope"], "Linf", 0.1)
    with pytest.raises(UsageError):
        attack_self_test(trained_cnn, x, y, [], "Linf", 0.1)
    with pytest.raises(UsageError):
        attack_self_test(trained_cnn, x, y, ["pgd-5"], "Linf", 0.0)
    with pytest.raises(UsageError):
        attack_self_test(trained_cnn, x * 2, y, ["pgd-5"], "Linf", 0.1)
    with pytest.raises(UsageError):
        attack_self_test(nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Softmax(dim=1)), x, y, ["pgd-5"],
                         "Linf", 0.1)
    with pytest.raises(UsageError):
        attack_self_test(nn.Sequential(nn.Flatten()), x, y, ["pgd-5"], "Linf", 0.1)


def test_margin_and_targeted_attacks_run_on_the_binarised_task():
    # DLR losses need 3 classes (targeted: 4): the binarised model carries two never-winning logits
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    res = attack_self_test(mlp, x, None, ["apgd-dlr", "apgd-t"], "Linf", 0.05, n=4)
    assert res.valid == 4 and res.rates == {"apgd-dlr": 1.0, "apgd-t": 1.0}
