"""RSLAD, IAD, AdaAD and the IGDM add-on against independent implementations written here from the formulas.

Values AND student gradients of each objective are recomputed on tiny float64 tanh networks with a
hand-written forward pass, log-softmax and KL (no robkd loss code), at a fixed ``x_adv`` (the attack seam
is stubbed) and non-default weights, so that a swapped KL direction, a missing weight or a wrong input
routing changes the numbers. The inner attacks are checked step by step against a hand-computed first
step (start, direction and projection) and for staying in the ball. A few training steps of every method
on the bundled Fashion-MNIST slice lower the loss and resume bit-identically.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from robkd.data import eval_subset, train_val_split
from robkd.distill import TrainConfig, Trainer
from robkd.distill import objectives as O
from robkd.distill.recent_objectives import objective_for
from robkd.errors import UsageError

from helpers import mlp

D_IN, K, B = 6, 4, 5
W = {"rslad": dict(alpha=0.7), "adaad": dict(alpha=0.6), "iad": dict(alpha=0.8, temperature=3.0, iad_beta=0.5, iad_warmup=0.4),
     "ard": dict(alpha=0.75, temperature=2.0)}


def _net(seed: int, hidden: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(D_IN, hidden), nn.Tanh(), nn.Linear(hidden, K)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net


# ----------------------------------------------------------------------------- the formulas, by hand
def _fwd(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """W2 tanh(W1 x + b1) + b2 with the live parameters (autograd gives the hand loss's parameter gradients)."""
    return torch.tanh(x @ net[0].weight.T + net[0].bias) @ net[2].weight.T + net[2].bias


def _log_softmax(z: torch.Tensor) -> torch.Tensor:
    m = z.max(dim=1, keepdim=True).values.detach()
    return z - m - torch.log(torch.exp(z - m).sum(dim=1, keepdim=True))


def _kl_rows(target: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """Per sample sum_k p_k (log p_k - log q_k), p = softmax(target), q = softmax(inp)."""
    lp, lq = _log_softmax(target), _log_softmax(inp)
    return (torch.exp(lp) * (lp - lq)).sum(dim=1)


def _kl(target, inp) -> torch.Tensor:
    return _kl_rows(target, inp).mean()


def _ce(z, y) -> torch.Tensor:
    return -_log_softmax(z)[torch.arange(len(y)), y].mean()


def _hand(method: str, s, t, x, xa, y, w, *, epoch: int, passes: int, igdm: float | None,
          progress: float = 1.0) -> dict[str, torch.Tensor]:
    """The weighted terms of ``method`` (keys as the objective's ``terms``)."""
    S, Sa = _fwd(s, x), _fwd(s, xa)
    with torch.no_grad():
        T, Ta = _fwd(t, x), _fwd(t, xa)
    a = w["alpha"]
    out: dict[str, torch.Tensor] = {}
    if method == "rslad":  # teacher's CLEAN soft label for both terms
        out["kl_adv"] = a * _kl(T, Sa)
        out["kl_nat"] = (1 - a) * _kl(T, S)
    elif method == "adaad":  # teacher at x_adv for the adversarial term, at x for the natural one
        out["kl_adv"] = a * _kl(Ta, Sa)
        out["kl_nat"] = (1 - a) * _kl(T, S)
    elif method in ("iad", "ard"):
        tau = w["temperature"]
        out["kl_adv"] = a * tau * tau * _kl(T / tau, Sa / tau)
        out["ce"] = (1 - a) * _ce(S, y)
        if method == "iad" and epoch >= round(w["iad_warmup"] * passes):
            p_true = torch.exp(_log_softmax(Ta))[torch.arange(len(y)), y]
            out["introspection"] = a * ((1 - p_true ** w["iad_beta"]) * _kl_rows(S, Sa)).mean()
    if igdm is not None:
        d = xa - x
        with torch.no_grad():
            td = _fwd(t, x + d) - _fwd(t, x - d)
        out["igdm"] = igdm * progress * _kl(td, _fwd(s, x + d) - _fwd(s, x - d))
    return out


def _batch():
    g = torch.Generator().manual_seed(3)
    x = 0.2 + 0.6 * torch.rand(B, D_IN, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 2, 3])
    xa = x + 0.15 * torch.sign(torch.randn(B, D_IN, generator=g, dtype=torch.float64))  # far from x: routing shows
    return x, y, xa


CASES = [("rslad", False, 0, 2), ("adaad", False, 0, 2), ("iad", False, 0, 5), ("iad", False, 2, 5), ("iad", False, 4, 5),
         ("ard", True, 2, 5), ("rslad", True, 1, 4), ("adaad", True, 3, 4)]


@pytest.mark.parametrize("method,igdm,epoch,passes", CASES)
def test_objective_value_and_gradient_match_the_formulas(monkeypatch, method, igdm, epoch, passes):
    x, y, xa = _batch()
    w = W[method]
    lam = 2.5
    cfg = TrainConfig(method=method, eps=0.15, igdm=igdm, lambda_igdm=lam, **w).resolve(0.15, "fashion-mnist")
    student, teacher = _net(1, 7), _net(2, 5)
    progress = (2 * epoch + 1) / (2 * passes)  # half-way through the pass: IGDM's weight ramps per optimizer step
    ctx = O.StepContext(student, teacher, cfg, torch.Generator().manual_seed(0), None, epoch=epoch, passes=passes,
                        progress=progress)
    seen = []
    for seam in ("pgd_ce", "pgd_rslad", "pgd_adaad"):
        monkeypatch.setattr(ctx, seam, lambda xx, *rest, _s=seam: seen.append((_s, xx, rest)) or xa.clone())
    student.train()
    loss, terms = objective_for(cfg)(ctx, x, y, None)
    # each method runs ITS attack once, on the clean batch (RSLAD's target: the teacher's clean logits; ARD/IAD: labels)
    want = {"rslad": "pgd_rslad", "adaad": "pgd_adaad", "iad": "pgd_ce", "ard": "pgd_ce"}[method]
    assert [s for s, _, _ in seen] == [want] and torch.equal(seen[0][1], x)
    if method == "rslad":
        assert torch.allclose(seen[0][2][0], _fwd(teacher, x).detach(), rtol=0, atol=1e-13)
    if method in ("iad", "ard"):
        assert torch.equal(seen[0][2][0], y)
    hand = _hand(method, student, teacher, x, xa, y, w, epoch=epoch, passes=passes, igdm=lam if igdm else None,
                 progress=progress)
    assert terms.keys() == hand.keys()
    for k in hand:
        assert terms[k] == pytest.approx(float(hand[k].detach()), rel=1e-12, abs=1e-14), k
    total = sum(hand.values())
    assert loss.item() == pytest.approx(float(total.detach()), rel=1e-12)
    params = list(student.parameters())
    got = torch.autograd.grad(loss, params)
    ref = torch.autograd.grad(total, params)
    for g1, g2 in zip(got, ref):
        assert torch.allclose(g1, g2, rtol=1e-12, atol=1e-13)
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is a constant


@torch.no_grad()
def test_the_fixture_tells_the_variants_apart():
    """Each guarded mistake (KL direction, teacher at x vs x_adv, the weights, the warm-up) moves the value > 1e-3."""
    x, y, xa = _batch()
    s, t = _net(1, 7), _net(2, 5)
    S, Sa, T, Ta = _fwd(s, x), _fwd(s, xa), _fwd(t, x).detach(), _fwd(t, xa).detach()
    right = float(_kl(T, Sa))
    for wrong in (_kl(Sa, T), _kl(Ta, Sa), _kl(T, S)):
        assert abs(float(wrong) - right) > 1e-3
    d = xa - x
    assert abs(float(_kl(_fwd(t, x + d) - _fwd(t, x - d), _fwd(s, x + d) - _fwd(s, x - d)))
               - float(_kl(_fwd(s, x + d) - _fwd(s, x - d), _fwd(t, x + d) - _fwd(t, x - d)))) > 1e-3
    pre = _hand("iad", s, t, x, xa, y, W["iad"], epoch=0, passes=5, igdm=None)
    post = _hand("iad", s, t, x, xa, y, W["iad"], epoch=2, passes=5, igdm=None)
    assert "introspection" not in pre and float(post["introspection"]) > 1e-3


def _inner_setup(method: str, steps: int):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    x = 0.05 + 0.9 * torch.rand(8, D_IN, generator=g, dtype=torch.float64)
    x[0, :3] = torch.tensor([0.0, 1.0, 0.02], dtype=torch.float64)  # on/near the box edges: the projection acts
    y = torch.randint(0, K, (8,), generator=g)
    cfg = TrainConfig(method=method, eps=0.1, steps=steps, step_size=0.03).resolve(0.1, "fashion-mnist")
    s, t = _net(1, 7), _net(2, 5)
    return x, y, cfg, s, t


@pytest.mark.parametrize("method", ["rslad", "adaad"])
def test_inner_max_first_step_by_hand_and_the_ball(method):
    """One step: x0 = x + 0.001 N(0, I) (the seeded stream), then Proj(x0 + step * sign(grad of the method's KL));
    ten steps stay in the eps-ball and in [0, 1] and raise the KL above its value at x."""
    x, y, cfg, s, t = _inner_setup(method, 1)
    ctx = O.StepContext(s, t, cfg, torch.Generator().manual_seed(11), None)
    T = _fwd(t, x).detach()
    got = ctx.pgd_rslad(x, T) if method == "rslad" else ctx.pgd_adaad(x)
    x0 = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    x0 = torch.min(torch.max(x0, x - 0.1), x + 0.1).clamp(0, 1).requires_grad_(True)
    target = T if method == "rslad" else _fwd(t, x0)  # AdaAD: the teacher moves with the input
    obj = _kl_rows(target, _fwd(s, x0)).sum()
    (gx,) = torch.autograd.grad(obj, x0)
    want = torch.min(torch.max(x0.detach() + 0.03 * gx.sign(), x - 0.1), x + 0.1).clamp(0, 1)
    assert torch.allclose(got, want, rtol=0, atol=1e-15)
    x, y, cfg, s, t = _inner_setup(method, 10)
    ctx = O.StepContext(s, t, cfg, torch.Generator().manual_seed(11), None)
    xa = ctx.pgd_rslad(x, T) if method == "rslad" else ctx.pgd_adaad(x)
    assert float((xa - x).abs().max()) <= 0.1 + 1e-12 and float(xa.min()) >= 0 and float(xa.max()) <= 1
    before = _kl_rows(T if method == "rslad" else _fwd(t, x), _fwd(s, x)).sum()
    after = _kl_rows(T if method == "rslad" else _fwd(t, xa), _fwd(s, xa)).sum()
    assert float(after.detach()) > float(before.detach())


def test_inner_max_runs_the_student_in_eval_mode_and_restores_it():
    torch.manual_seed(0)
    s = nn.Sequential(nn.Linear(D_IN, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, K)).double()
    modes = []
    s.register_forward_pre_hook(lambda m, inp: modes.append(m.training))
    x, y, cfg, _, t = _inner_setup("adaad", 3)
    ctx = O.StepContext(s, t, cfg, torch.Generator().manual_seed(1), None)
    s.train()
    ctx.pgd_adaad(x)
    assert modes == [False] * 3 and s.training


@pytest.mark.parametrize("kw,msg", [
    (dict(method="kdiga", igdm=True), "add-on term"), (dict(method="fast-ard", igdm=True), "add-on term"),
    (dict(method="rslad", temperature=4.0), "no temperature"), (dict(method="iad", iad_warmup=1.5), "iad_warmup"),
    (dict(method="iad", iad_beta=-1.0), "iad_beta"), (dict(method="rslad", alpha=1.2), "alpha"),
    (dict(method="adaad", igdm="yes"), "igdm"), (dict(method="ard", lambda_igdm=-1.0, igdm=True), "lambda_igdm"),
])
def test_bad_options_are_usage_errors(kw, msg):
    with pytest.raises(UsageError, match=msg):
        TrainConfig(**kw).resolve(0.1, "fashion-mnist")


def test_paper_defaults():
    r = {m: TrainConfig(method=m).resolve(0.1, "fashion-mnist") for m in ("rslad", "iad", "adaad", "ard", "kdiga")}
    assert r["rslad"].alpha == pytest.approx(5 / 6) and r["rslad"].temperature == 1.0
    assert (r["iad"].alpha, r["iad"].temperature, r["iad"].iad_beta, r["iad"].iad_warmup) == (1.0, 1.0, 0.1, 0.3)
    assert (r["adaad"].alpha, r["adaad"].temperature) == (1.0, 1.0)
    assert (r["ard"].alpha, r["ard"].temperature, r["ard"].lambda_igdm, r["ard"].igdm) == (1.0, 30.0, 20.0, False)
    assert r["kdiga"].alpha == 1.0  # unchanged for the seed methods


# ----------------------------------------------------------------------------- training on the bundled slice
@pytest.fixture(scope="module")
def split(fmnist_train):
    tr, va = train_val_split(fmnist_train, 0.1, seed=0)
    return eval_subset(tr, 192, seed=0), eval_subset(va, 48, seed=0)


@pytest.fixture(scope="module")
def teacher(split):
    t = mlp(5, hidden=(48,))
    Trainer(t, TrainConfig(method="st", epochs=2, batch_size=64, lr=0.05, val_n=0, select="last"), split[0], None,
            show_progress=False).fit()
    return t


SMALL = dict(epochs=3, batch_size=64, lr=0.05, steps=2, val_n=48, val_steps=2)
RUNS = [("rslad", {}), ("iad", {"iad_warmup": 0.34}), ("adaad", {"alpha": 0.8}), ("ard", {"igdm": True, "temperature": 1.0}),
        ("rslad", {"igdm": True}), ("adaad", {"igdm": True})]


def _fixed_loss(model, teacher, cfg, x, y) -> float:
    """The method's loss on a fixed batch (attack seeded, pass 0 of 1: no warm-up or ramp effects)."""
    c = cfg.resolve(0.1, "fashion-mnist")
    ctx = O.StepContext(model, teacher, c, torch.Generator().manual_seed(7), None, epoch=0, passes=1)
    model.train()
    loss, _ = objective_for(c)(ctx, x, y, None)
    return float(loss.detach())


@pytest.mark.parametrize("method,extra", RUNS)
def test_training_lowers_the_loss_and_resumes_bit_identically(tmp_path, split, teacher, method, extra):
    tr, va = split
    cfg = TrainConfig(method=method, **{**SMALL, **extra})
    x, y = tr.float_x(slice(0, 96)), tr.y[:96]
    a = mlp(1)
    start = _fixed_loss(copy.deepcopy(a), teacher, cfg, x, y)
    kw = dict(dataset="fashion-mnist", default_eps=0.1, show_progress=False)
    log_a = Trainer(a, cfg, tr, va, teacher, state_path=tmp_path / "a.pt", **kw).fit()
    assert _fixed_loss(copy.deepcopy(a), teacher, cfg, x, y) < start
    Trainer(mlp(1), cfg, tr, va, teacher, state_path=tmp_path / "b.pt", **kw).fit(max_steps=2)  # killed mid-pass
    torch.manual_seed(999)  # a new process's global RNG
    part = Trainer(mlp(77), cfg, tr, va, teacher, state_path=tmp_path / "b.pt", **kw).fit(resume=True, max_steps=3)
    assert not part.finished  # killed again, in the next pass (past IAD's warm-up / along IGDM's ramp)
    b = mlp(78)
    log_b = Trainer(b, cfg, tr, va, teacher, state_path=tmp_path / "b.pt", **kw).fit(resume=True)
    assert log_a.finished and log_b.finished
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    keys = [k for k in log_a.records[0] if k not in ("train_seconds", "images_per_s")]
    assert [{k: r[k] for k in keys} for r in log_a.records] == [{k: r[k] for k in keys} for r in log_b.records]
    if method == "iad":  # the introspection term appears from pass round(0.34 * 3) = 1 on
        assert "introspection" not in log_a.records[0] and "introspection" in log_a.records[1]
    if extra.get("igdm"):
        assert all("igdm" in r for r in log_a.records)


def test_igdm_weight_ramps_per_optimizer_step(monkeypatch, split, teacher):
    """lambda_igdm * (k + 1) / K at step k of K: a one-pass run starts near 0 (not at the full weight) and ends at it."""
    from robkd.distill import recent_objectives as R

    seen = []
    real = R.igdm_weight
    monkeypatch.setattr(R, "igdm_weight", lambda ctx: seen.append(real(ctx)) or seen[-1])  # a spy: the real weight is used
    tr, _ = split  # 192 images: 3 batches of 64 per pass
    cfg = TrainConfig(method="rslad", igdm=True, lambda_igdm=6.0, epochs=2, batch_size=64, lr=0.05, steps=1, val_n=0, select="last")
    Trainer(mlp(2), cfg, tr, None, teacher, dataset="fashion-mnist", default_eps=0.1, show_progress=False).fit()
    assert seen == pytest.approx([6.0 * k / 6 for k in range(1, 7)], abs=1e-12)
    seen.clear()
    Trainer(mlp(2), dataclasses.replace(cfg, epochs=1), tr, None, teacher, dataset="fashion-mnist", default_eps=0.1,
            show_progress=False).fit()
    assert seen == pytest.approx([2.0, 4.0, 6.0], abs=1e-12)
