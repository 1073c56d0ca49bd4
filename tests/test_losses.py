"""Loss terms against hand computations with explicit formulas; IGA gradients against finite differences."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robkd.distill import losses as L
from robkd.errors import UsageError

S = torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.9, -1.2]], dtype=torch.float64)
T = torch.tensor([[2.0, 0.1, -0.4], [-0.2, 1.5, 0.0]], dtype=torch.float64)
Y = torch.tensor([0, 2])


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    z = sum(e)
    return [v / z for v in e]


def _kl_hand(target: torch.Tensor, inp: torch.Tensor) -> float:
    total = 0.0
    for t_row, s_row in zip(target.tolist(), inp.tolist()):
        p, q = _softmax(t_row), _softmax(s_row)
        total += sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q))
    return total / target.shape[0]  # batchmean: sum over classes, mean over samples


def test_cross_entropy_by_hand():
    hand = sum(-math.log(_softmax(r)[y]) for r, y in zip(S.tolist(), Y.tolist())) / 2
    assert L.cross_entropy(S, Y).item() == pytest.approx(hand, rel=1e-12)


def test_kl_batchmean_by_hand():
    assert L.kl_divergence(T, S).item() == pytest.approx(_kl_hand(T, S), rel=1e-12)
    per = L.kl_divergence(T, S, reduction="none")
    assert per.shape == (2,) and per.mean().item() == pytest.approx(_kl_hand(T, S), rel=1e-12)
    assert L.kl_divergence(T, T).item() == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_distillation_kl_temperature_and_t2(tau):
    hand = tau * tau * _kl_hand(T / tau, S / tau)
    s = S.clone().requires_grad_(True)
    t = T.clone().requires_grad_(True)
    val = L.distillation_kl(s, t, tau)
    assert val.item() == pytest.approx(hand, rel=1e-12)
    val.backward()
    assert t.grad is None  # the teacher is a constant
    # d/dS of tau^2 * KL(softmax(T/tau)||softmax(S/tau)) batchmean = tau * (q - p) / B
    p = torch.softmax(T / tau, 1)
    q = torch.softmax(S / tau, 1)
    assert torch.allclose(s.grad, tau * (q - p) / 2, atol=1e-12)


def test_trades_kl_target_is_natural():
    assert L.trades_kl(S, T).item() == pytest.approx(_kl_hand(S, T), rel=1e-12)


def _linear(w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    m = nn.Linear(w.shape[1], w.shape[0]).double()
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    return m


def test_iga_on_linear_models_by_hand():
    # For logits W x + b, d CE / d x = W^T (softmax(Wx+b) - onehot(y)) per sample.
    g = torch.Generator().manual_seed(0)
    ws, bs = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    wt, bt = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    x = torch.rand(3, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    student, teacher = _linear(ws, bs), _linear(wt, bt)

    def hand_grad(w, b):
        rows = []
        for i in range(3):
            logits = [sum(w[k, j].item() * x[i, j].item() for j in range(4)) + b[k].item() for k in range(3)]
            p = _softmax(logits)
            r = [p[k] - (1.0 if k == y[i].item() else 0.0) for k in range(3)]
            rows.append([sum(w[k, j].item() * r[k] for k in range(3)) for j in range(4)])
        return rows

    hs, ht = hand_grad(ws, bs), hand_grad(wt, bt)
    diffs = [math.sqrt(sum((a - c) ** 2 for a, c in zip(rs, rt))) for rs, rt in zip(hs, ht)]
    g_s, _ = L.input_gradient(student, x, y, create_graph=True)
    g_t, _ = L.input_gradient(teacher, x, y)
    assert torch.allclose(g_s, torch.tensor(hs, dtype=torch.float64), atol=1e-12)
    assert L.iga_per_sample(g_s, g_t).item() == pytest.approx(sum(diffs) / 3, rel=1e-12)
    # reference code: (gamma/B) * || grad of batch-mean CE (student) - same (teacher) ||_2 over the batch
    ref_hand = (1 / 3) * math.sqrt(sum((d / 3) ** 2 for d in diffs))
    assert L.iga_reference(g_s, g_t).item() == pytest.approx(ref_hand, rel=1e-12)
    assert L.iga_term(g_s, g_t, "reference").item() == pytest.approx(ref_hand, rel=1e-12)


@pytest.mark.parametrize("form", ["per-sample", "reference"])
def test_iga_parameter_gradient_matches_finite_differences(form):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    teacher = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    for p in teacher.parameters():
        p.requires_grad_(False)
    x = torch.rand(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    g_t, _ = L.input_gradient(teacher, x, y)

    def value() -> torch.Tensor:
        g_s, _ = L.input_gradient(student, x, y, create_graph=True)
        return L.iga_term(g_s, g_t, form)

    params = list(student.parameters())
    grads = torch.autograd.grad(value(), params)
    h = 1e-6
    for p, gp in zip(params, grads):
        flat = p.data.view(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // 7)):
            old = flat[i].item()
            flat[i] = old + h
            up = value().item()
            flat[i] = old - h
            down = value().item()
            flat[i] = old
            assert gp.view(-1)[i].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)
    assert all(p.grad is None for p in teacher.parameters())


def test_input_gradient_leaves_parameter_grads_alone():
    m = _linear(torch.ones(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    L.input_gradient(m, torch.rand(2, 4, dtype=torch.float64), torch.tensor([0, 1]))
    assert m.weight.grad is None and m.bias.grad is None


def test_bad_inputs():
    with pytest.raises(UsageError):
        L.iga_term(torch.zeros(2, 3), torch.zeros(2, 3), "squared")
    with pytest.raises(UsageError):
        L.iga_per_sample(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(UsageError):
        L.distillation_kl(S, T, 0.0)
    with pytest.raises(UsageError):
        L.kl_divergence(S, T[:, :2])
    with pytest.raises(UsageError):
        L.kl_divergence(S, T, reduction="mean")
