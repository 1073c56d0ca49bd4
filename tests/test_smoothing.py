"""Randomized smoothing CERTIFY/PREDICT: exact hand values, abstentions, the CP bound, attack consistency."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binom, binomtest, norm
from torch import nn

from robkd.bounds.smoothing import certify_smoothing, clopper_pearson_lower, predict_smoothing
from robkd.errors import UsageError


class _Constant(nn.Module):
    """Always predicts class ``c`` (by a huge margin) out of ``k``, whatever the (noisy) input."""

    def __init__(self, c: int, k: int = 5) -> None:
        super().__init__()
        self.c, self.k = c, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], self.k, dtype=x.dtype) + 0.0 * x.flatten(1).sum(1, keepdim=True)
        logits[:, self.c] = 1e3
        return logits


class _HalfRandom(nn.Module):
    """Class 3 when the input's mean is > 0.5; otherwise the argmax of a random projection.

    With heavy noise the projection's argmax is close to uniform over 10 classes, so the
    smoothed classifier must abstain on dark inputs and certify class 3 on bright ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(10, 64, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        logits = flat @ self.w.T
        bright = (flat.mean(1) > 0.5).to(x.dtype)
        return logits + 1e4 * bright[:, None] * F.one_hot(torch.tensor(3), 10).to(x.dtype)


def test_constant_model_gets_exact_hand_computed_radius():
    x = torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([2, 2, 0, 2])
    sigma, n, alpha = 0.25, 200, 0.01
    res = certify_smoothing(_Constant(2), x, y, sigma=sigma, n0=10, n=n, alpha=alpha, batch_size=64)
    # all n votes for class 2: the one-sided CP lower bound is the Beta(alpha; n, 1) quantile = alpha^(1/n)
    p_lower = alpha ** (1.0 / n)
    hand = sigma * norm.ppf(p_lower)
    assert res.prediction.tolist() == [2, 2, 2, 2]
    assert res.count.tolist() == [n] * 4
    assert torch.allclose(res.p_lower, torch.full((4,), p_lower, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(res.radius, torch.full((4,), hand, dtype=torch.float64), rtol=0, atol=1e-12)
    assert res.correct.tolist() == [True, True, False, True]
    assert res.abstentions == 0
    assert res.certified_accuracy(0.0) == 0.75
    assert res.certified_accuracy(hand) == 0.75
    assert res.certified_accuracy(hand + 1e-9) == 0.0
    assert predict_smoothing(_Constant(2), x, sigma=sigma, n=50).tolist() == [2, 2, 2, 2]


def test_n0_larger_than_n_is_allowed_and_only_n_counts():
    """Cohen et al.'s CERTIFY draws n0 (selection) and n (estimation) independently: n0 > n is valid."""
    x = torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 1])
    sigma, n, alpha = 0.5, 20, 0.001
    res = certify_smoothing(_Constant(1), x, y, sigma=sigma, n0=500, n=n, alpha=alpha, batch_size=64)
    p_lower = alpha ** (1.0 / n)  # all n votes for class 1: the CP bound uses n, never n0
    assert res.n0 == 500 and res.count.tolist() == [n, n]
    assert torch.allclose(res.p_lower, torch.full((2,), p_lower, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(res.radius, torch.full((2,), sigma * norm.ppf(p_lower), dtype=torch.float64), rtol=0, atol=1e-12)


def test_abstentions_are_counted_on_a_random_predictor():
    g = torch.Generator().manual_seed(1)
    x = torch.empty(6, 1, 8, 8)
    x[:4] = torch.rand(4, 1, 8, 8, generator=g) * 0.2  # dark: random votes -> abstain
    x[4:] = 0.8 + torch.rand(2, 1, 8, 8, generator=g) * 0.2  # bright: class 3
    y = torch.tensor([3, 3, 1, 0, 3, 1])
    model = _HalfRandom()
    res = certify_smoothing(model, x, y, sigma=1.0, n0=20, n=300, alpha=0.001, batch_size=128)
    assert res.abstentions == 4
    assert res.abstained.tolist() == [True] * 4 + [False] * 2
    assert res.prediction.tolist() == [-1] * 4 + [3, 3]
    assert bool((res.radius[:4] == 0).all()) and bool((res.radius[4:] > 0).all())
    assert bool((res.p_lower[:4] <= 0.5).all())
    assert res.correct.tolist() == [False] * 4 + [True, False]
    assert res.certified_accuracy(0.0) == pytest.approx(1 / 6)
    pred = predict_smoothing(model, x, sigma=1.0, n=300, alpha=0.001)
    assert pred.tolist() == [-1] * 4 + [3, 3]
    d = res.to_dict(radii=[0.0, 0.5])
    json.dumps(d)
    assert d["abstentions"] == 4 and len(d["per_sample"]["radius"]) == 6
    assert d["certified_accuracy"]["0.0"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("k,n,alpha", [(1, 10, 0.05), (37, 50, 0.001), (990, 1000, 0.001), (500, 500, 0.01), (3, 7, 0.2)])
def test_clopper_pearson_matches_scipy_binomtest_one_sided(k, n, alpha):
    lo = clopper_pearson_lower(k, n, alpha)
    # the one-sided (1 - alpha) bound is the lower end of the exact two-sided (1 - 2 alpha) interval
    ref = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    assert lo == pytest.approx(ref, rel=1e-9, abs=1e-12)
    # and its defining property: P(Binom(n, lo) >= k) = alpha
    assert binom.sf(k - 1, n, lo) == pytest.approx(alpha, rel=1e-6)


def test_clopper_pearson_edge_cases():
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    with pytest.raises(UsageError):
        clopper_pearson_lower(11, 10, 0.05)


def test_certificates_not_contradicted_by_l2_attack_on_smoothed_classifier(trained_mlp, fmnist_test):
    from robkd.attacks.pgd import projected_gradient_ascent

    x = fmnist_test.float_x(torch.arange(8))
    y = fmnist_test.y[:8]
    sigma = 0.25
    res = certify_smoothing(trained_mlp, x, y, sigma=sigma, n0=32, n=400, alpha=0.001, batch_size=400, seed=0)
    cert = (res.prediction >= 0).nonzero().flatten()
    assert cert.numel() >= 3  # a sane base model certifies some inputs at this sigma
    xc, cls, rad = x[cert], res.prediction[cert], res.radius[cert].float()
    gen = torch.Generator().manual_seed(1)
    m = 16

    def eot_ce(z: torch.Tensor) -> torch.Tensor:
        # CE of the smoothed prediction, averaged over Gaussian noise (expectation over transformation)
        noise = torch.randn((m,) + tuple(z.shape), generator=gen) * sigma
        logits = trained_mlp((z.unsqueeze(0) + noise).flatten(0, 1))
        ce = F.cross_entropy(logits, cls.repeat(m), reduction="none")
        return ce.view(m, -1).mean(0)

    r = 0.5 * rad  # inside the certified radius
    x_adv = projected_gradient_ascent(eot_ce, xc, norm="L2", eps=r, steps=10, step_size=2.5 * r / 10, generator=gen)
    assert bool(((x_adv - xc).flatten(1).norm(dim=1) <= r + 1e-5).all())
    pred_adv = predict_smoothing(trained_mlp, x_adv, sigma=sigma, n=400, alpha=0.001, seed=2)
    # inside the certified ball the smoothed classifier may abstain but never switch class
    assert bool(((pred_adv == cls) | (pred_adv == -1)).all())
    # the check has teeth: the same attack far outside the certified radius does switch classes
    far = projected_gradient_ascent(eot_ce, xc, norm="L2", eps=4 * rad, steps=10, step_size=rad, generator=gen)
    pred_far = predict_smoothing(trained_mlp, far, sigma=sigma, n=400, alpha=0.001, seed=2)
    assert bool(((pred_far != cls) & (pred_far >= 0)).any())


def test_determinism_and_eval_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(9, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    net.train()
    stats = net[2].running_mean.clone()
    x = torch.rand(3, 1, 3, 3, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1, 2])
    a = certify_smoothing(net, x, y, sigma=0.1, n0=10, n=100, seed=5, batch_size=50)
    b = certify_smoothing(net, x, y, sigma=0.1, n0=10, n=100, seed=5, batch_size=50)
    assert torch.equal(a.prediction, b.prediction) and torch.equal(a.radius, b.radius)
    assert net.training and torch.equal(net[2].running_mean, stats)
    net[4].eval()  # mixed modes come back exactly as they were
    modes = [m.training for m in net.modules()]
    predict_smoothing(net, x, sigma=0.1, n=20)
    certify_smoothing(net, x, y, sigma=0.1, n0=5, n=20)
    assert [m.training for m in net.modules()] == modes and torch.equal(net[2].running_mean, stats)


def test_bad_input_raises_usage_error():
    m = _Constant(0)
    x = torch.rand(2, 1, 3, 3)
    y = torch.tensor([0, 0])
    for kw in (
        dict(sigma=-0.1),
        dict(sigma=0.0),
        dict(sigma=0.1, n0=0),
        dict(sigma=0.1, alpha=0.0),
        dict(sigma=0.1, alpha=1.0),
        dict(sigma=0.1, alpha=1.5),
        dict(sigma=0.1, n=0),
        dict(sigma=0.1, batch_size=0),
    ):
        with pytest.raises(UsageError):
            certify_smoothing(m, x, y, **kw)
    with pytest.raises(UsageError):
        certify_smoothing(m, x * 2 + 1, y, sigma=0.1)
    with pytest.raises(UsageError):
        certify_smoothing(m, x, y[:1], sigma=0.1)
    with pytest.raises(UsageError):
        predict_smoothing(m, x, sigma=-1.0)
    res = certify_smoothing(m, x, y, sigma=0.1, n0=5, n=20)
    with pytest.raises(UsageError):
        res.certified_accuracy(-0.5)
