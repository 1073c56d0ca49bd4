"""Composed objectives against hand-written formulas (methods.md) on tiny float64 networks, x_adv fixed.

The training attack is replaced by a stub returning a fixed ``x_adv`` (the objective's
``ctx.pgd_ce`` / ``ctx.pgd_trades`` seam), so the loss is a deterministic function whose
value is recomputed here from explicit formulas: softmax by hand, the CE input gradient
of a one-hidden-layer tanh network by the chain rule (no autograd), non-default weights
(lambda_ce, lambda_kl, lambda_iga, alpha, beta) and tau = 3 so that a swapped weight,
a missing tau^2 or a wrong input routing (x vs x_adv, teacher vs student) changes the value.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robkd.distill import TrainConfig
from robkd.distill import objectives as O

D_IN, K, B = 6, 4, 5
TAU = 3.0
W = dict(lambda_ce=0.3, lambda_kl=0.9, lambda_iga=2.5, alpha=0.6, beta=4.0, temperature=TAU)


def _net(seed: int, hidden: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(D_IN, hidden), nn.Tanh(), nn.Linear(hidden, K)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net


# ----------------------------------------------------------------------------- hand formulas
def _fwd(net: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits = W2 tanh(W1 x + b1) + b2, and the hidden activations."""
    w1, b1, w2, b2 = (p.detach() for p in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
    h = torch.tanh(x @ w1.T + b1)
    return h @ w2.T + b2, h


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def _ce(z: torch.Tensor, y: torch.Tensor) -> float:
    """mean_i -log softmax(z_i)[y_i]."""
    p = _softmax(z)
    return float(-torch.log(p[torch.arange(len(y)), y]).mean())


def _kl(target: torch.Tensor, inp: torch.Tensor, tau: float = 1.0) -> float:
    """tau^2 * mean_i sum_k p_k (log p_k - log q_k), p = softmax(target/tau), q = softmax(inp/tau)."""
    p, q = _softmax(target / tau), _softmax(inp / tau)
    return tau * tau * float((p * (torch.log(p) - torch.log(q))).sum(dim=1).mean())


def _grad(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample d CE(f(x_i), y_i) / d x_i = W1^T [(1 - h^2) * W2^T (p - onehot(y))] (chain rule)."""
    z, h = _fwd(net, x)
    r = _softmax(z) - torch.nn.functional.one_hot(y, K).double()
    return ((r @ net[2].weight.detach()) * (1 - h * h)) @ net[0].weight.detach()


def _iga(s: nn.Sequential, t: nn.Sequential, x: torch.Tensor, y: torch.Tensor, form: str) -> float:
    d = _grad(s, x, y) - _grad(t, x, y)
    if form == "per-sample":
        return float(d.norm(dim=1).mean())  # (1/B) sum_i ||g_s,i - g_t,i||_2
    return float(d.pow(2).sum().sqrt()) / B**2  # (1/B^2) sqrt(sum_i ||.||^2)


def _hand(method: str, s, t, x, xa, y, form: str, w: dict) -> dict[str, float]:
    """The weighted terms of ``method`` from methods.md, keyed as the objective's ``terms``."""
    S, Sa = _fwd(s, x)[0], _fwd(s, xa)[0]
    T, Ta = _fwd(t, x)[0], _fwd(t, xa)[0]
    lce, lkl, lig, a, tau = w["lambda_ce"], w["lambda_kl"], w["lambda_iga"], w["alpha"], w["temperature"]
    if method == "at":
        return {"ce_adv": _ce(Sa, y)}
    if method == "trades":  # CE(S(x)) + beta KL(S(x) || S(x_adv)), no temperature
        return {"ce": _ce(S, y), "kl_rob": w["beta"] * _kl(S, Sa)}
    if method == "kd":
        return {"ce": lce * _ce(S, y), "kl": lkl * _kl(T, S, tau)}
    if method in ("ard", "fast-ard"):  # teacher on CLEAN x, student on x_adv
        out = {"kl_adv": a * _kl(T, Sa, tau)}
        if a < 1:
            out["ce"] = (1 - a) * _ce(S, y)
        return out
    if method == "kdiga":
        return {"ce": lce * _ce(S, y), "kl": lkl * _kl(T, S, tau), "iga": lig * _iga(s, t, x, y, form)}
    if method == "kdiga-ardc":  # KL(T(x) || S(x_adv)), IGA on clean x
        return {"ce": lce * _ce(S, y), "kl_adv": lkl * _kl(T, Sa, tau), "iga": lig * _iga(s, t, x, y, form)}
    if method == "kdiga-arda":  # KL(T(x_adv) || S(x_adv)), IGA on x_adv
        return {"ce": lce * _ce(S, y), "kl_adv": lkl * _kl(Ta, Sa, tau), "iga_adv": lig * _iga(s, t, xa, y, form)}
    raise AssertionError(method)


# ----------------------------------------------------------------------------- the test
CASES = [
    ("at", "per-sample", {}), ("trades", "per-sample", {}), ("kd", "per-sample", {}),
    ("ard", "per-sample", {}), ("ard", "per-sample", {"alpha": 1.0}),
    ("kdiga", "per-sample", {}), ("kdiga", "reference", {"lambda_iga": 700.0}),
    ("kdiga-ardc", "per-sample", {}), ("kdiga-ardc", "reference", {"lambda_iga": 700.0}),
    ("kdiga-arda", "per-sample", {}), ("kdiga-arda", "reference", {"lambda_iga": 700.0}),
    ("fast-ard", "per-sample", {}), ("fast-ard", "per-sample", {"alpha": 1.0}),
]


@pytest.mark.parametrize("method,form,override", CASES)
def test_objective_matches_hand_formula(monkeypatch, method, form, override):
    g = torch.Generator().manual_seed(3)
    x = 0.2 + 0.6 * torch.rand(B, D_IN, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 2, 3])
    delta = 0.15 * torch.sign(torch.randn(B, D_IN, generator=g, dtype=torch.float64))  # far from 0: routing shows
    xa = x + delta
    w = {**W, **override}
    cfg = TrainConfig(method=method, iga_form=form, eps=0.15, **w).resolve(0.15, "fashion-mnist")
    assert (cfg.lambda_iga, cfg.temperature, cfg.alpha) == (w["lambda_iga"], TAU, w["alpha"])
    student, teacher = _net(1, 7), _net(2, 5)
    uses_t = cfg.uses_teacher
    ctx = O.StepContext(student, teacher if uses_t else None, cfg, torch.Generator().manual_seed(0), None)
    calls: list[tuple[torch.Tensor, ...]] = []

    def fixed_ce(xx, yy):
        calls.append((xx, yy))
        return xa.clone()

    def fixed_trades(xx):
        calls.append((xx,))
        return xa.clone()

    monkeypatch.setattr(ctx, "pgd_ce", fixed_ce)
    monkeypatch.setattr(ctx, "pgd_trades", fixed_trades)
    student.train()
    if method == "fast-ard":  # the seam is the carried delta itself
        loss, terms, x_in = O.fast_ard_replay(ctx, x, y, None, delta)
        assert torch.equal(x_in.detach(), xa.clamp(0, 1))
    else:
        loss, terms = O.get_objective(method)(ctx, x, y, None)
        adversarial = method != "kd" and method != "kdiga"
        assert len(calls) == (1 if adversarial else 0)
        if adversarial:  # the attack saw the clean batch (and the true labels)
            assert torch.equal(calls[0][0], x) and (len(calls[0]) == 1 or torch.equal(calls[0][1], y))
    hand = _hand(method, student, teacher, x, xa, y, form, w)
    assert terms.keys() == hand.keys()
    for k in hand:
        assert terms[k] == pytest.approx(hand[k], rel=1e-10, abs=1e-13), k
    assert loss.item() == pytest.approx(sum(hand.values()), rel=1e-10)
    assert loss.requires_grad  # the objective is trainable
    if uses_t:
        assert all(p.grad is None for p in teacher.parameters())


def test_routing_and_weights_are_distinguishable():
    """The fixture is sensitive: every swap the test guards against changes the hand value well beyond 1e-10."""
    g = torch.Generator().manual_seed(3)
    x = 0.2 + 0.6 * torch.rand(B, D_IN, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 2, 3])
    xa = x + 0.15 * torch.sign(torch.randn(B, D_IN, generator=g, dtype=torch.float64))
    s, t = _net(1, 7), _net(2, 5)
    S, Sa, T, Ta = _fwd(s, x)[0], _fwd(s, xa)[0], _fwd(t, x)[0], _fwd(t, xa)[0]
    right = _kl(Ta, Sa, TAU)
    for wrong in (_kl(T, Sa, TAU), _kl(Ta, S, TAU), _kl(Ta, Sa, 1.0), _kl(Ta, Sa, TAU) / TAU**2, _kl(Sa, Ta, TAU)):
        assert abs(wrong - right) > 1e-3 * abs(right)
    assert abs(_iga(s, t, x, y, "per-sample") - _iga(s, t, xa, y, "per-sample")) > 1e-3
    assert abs(_kl(S, Sa) - _kl(Sa, S)) > 1e-6  # TRADES' KL direction matters
    # swapping lambda_ce <-> lambda_kl, or alpha <-> 1-alpha, changes the total
    kd = W["lambda_ce"] * _ce(S, y) + W["lambda_kl"] * _kl(T, S, TAU)
    assert abs(kd - (W["lambda_kl"] * _ce(S, y) + W["lambda_ce"] * _kl(T, S, TAU))) > 1e-3
    ard = W["alpha"] * _kl(T, Sa, TAU) + (1 - W["alpha"]) * _ce(S, y)
    assert abs(ard - ((1 - W["alpha"]) * _kl(T, Sa, TAU) + W["alpha"] * _ce(S, y))) > 1e-3


def test_hand_gradient_is_the_autograd_gradient():
    """The chain-rule input gradient used above agrees with autograd (so the IGA reference is right)."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(B, D_IN, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.tensor([1, 0, 3, 2, 2])
    net = _net(1, 7)
    loss = torch.nn.functional.cross_entropy(net(x), y, reduction="sum")
    (gx,) = torch.autograd.grad(loss, x)
    assert torch.allclose(_grad(net, x.detach(), y), gx, atol=1e-12)


def test_trades_inner_max_runs_in_eval_mode_from_small_gaussian_start():
    """TRADES: the inner max runs with the student in eval mode and starts at x + 0.001 N(0, 1)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, K)).double()
    seen: list[tuple[bool, bool, torch.Tensor]] = []
    net.register_forward_pre_hook(lambda m, inp: seen.append((m.training, torch.is_grad_enabled(), inp[0].detach().clone())))
    g = torch.Generator().manual_seed(5)
    x = 0.1 + 0.8 * torch.rand(16, 40, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (16,), generator=g)
    cfg = TrainConfig(method="trades", steps=3, eps=0.1).resolve(0.1, "fashion-mnist")
    ctx = O.StepContext(net, None, cfg, torch.Generator().manual_seed(11), None)
    expected_noise = 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    net.train()
    loss, terms = O.obj_trades(ctx, x, y, None)
    assert net.training  # restored for the outer step
    # calls: natural prediction (no grad), 3 attack steps, then the outer S(x) and S(x_adv) in train mode
    assert len(seen) == 1 + 3 + 2
    assert [s[0] for s in seen] == [False, False, False, False, True, True]
    assert torch.equal(seen[0][2], x) and not seen[0][1]
    first = seen[1][2] - x  # the first attack input's distance from x
    assert torch.allclose(first, expected_noise, atol=1e-15)
    assert 0.0008 < float(first.std()) < 0.0012 and float(first.abs().max()) < 0.006
    assert seen[1][1]  # the attack takes input gradients
    assert set(terms) == {"ce", "kl_rob"}
