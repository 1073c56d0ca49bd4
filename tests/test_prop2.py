"""Proposition-2 terms: hand computation of the bound, dual norms, measured LHS and violations."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robkd.analysis.llm import local_linearity
from robkd.analysis.prop2 import prop2_terms
from robkd.errors import UsageError
from robkd.types import Norm


def _net(seed: int, d: int = 6, k: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, 12), nn.Tanh(), nn.Linear(12, k)).double()
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    return net.eval()


class _Bowl(nn.Module):
    """Two classes; logit gap ``m - k * ||x - c||^2``: CE ~ 0 and zero gradient at ``x = c``, large at the ball's edge."""

    def __init__(self, m: float = 10.0, k: float = 1000.0) -> None:
        super().__init__()
        self.m, self.k = m, k
        self.register_buffer("c", torch.full((2,), 0.5, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gap = self.m - self.k * ((x - self.c) ** 2).sum(dim=1)
        return torch.stack([gap, torch.zeros_like(gap)], dim=1)


class _Confident(nn.Module):
    """Constant logits: class 0 by a margin of 10 (zero input gradient, tiny CE)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([10.0, 0.0], dtype=x.dtype).expand(x.shape[0], 2) + 0.0 * x.sum(dim=1, keepdim=True)


def _per_sample_grad(model: nn.Module, x1: torch.Tensor, y1: torch.Tensor) -> tuple[float, torch.Tensor]:
    """CE and input gradient of ONE sample (batch of 1: an independent per-sample computation)."""
    xs = x1.unsqueeze(0).clone().requires_grad_(True)
    ce = F.cross_entropy(model(xs), y1.view(1))
    (g,) = torch.autograd.grad(ce, xs)
    return float(ce.detach()), g[0]


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_bound_equals_hand_computation_of_its_terms(norm):
    t, s = _net(0), _net(1)
    x = torch.rand(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1, 0])
    eps = 0.05
    res = prop2_terms(t, s, x, y, eps, norm=norm, steps=10, seed=3)
    # the LLM terms are local_linearity with the same settings
    assert torch.equal(res.llm_s, local_linearity(s, x, y, eps, norm=norm, steps=10, seed=3))
    assert torch.equal(res.llm_t, local_linearity(t, x, y, eps, norm=norm, steps=10, seed=3))
    for i in range(5):
        ce_s, g_s = _per_sample_grad(s, x[i], y[i])
        ce_t, g_t = _per_sample_grad(t, x[i], y[i])
        dual_ord = 1 if norm is Norm.LINF else 2
        dual = float(torch.linalg.norm(g_s - g_t, ord=dual_ord))
        l2 = float(torch.linalg.norm(g_s - g_t, ord=2))
        assert float(res.ce_s[i]) == pytest.approx(ce_s, rel=1e-12)
        assert float(res.ce_t[i]) == pytest.approx(ce_t, rel=1e-12)
        assert float(res.grad_diff_dual[i]) == pytest.approx(dual, rel=1e-10)
        assert float(res.grad_diff_l2[i]) == pytest.approx(l2, rel=1e-10)
        hand = float(res.llm_s[i]) + float(res.llm_t[i]) + ce_s + ce_t + eps * dual
        assert float(res.bound[i]) == pytest.approx(hand, rel=1e-12)
        hand_l2 = float(res.llm_s[i]) + float(res.llm_t[i]) + ce_s + ce_t + eps * l2
        assert float(res.bound_paper_l2[i]) == pytest.approx(hand_l2, rel=1e-12)
    if norm is Norm.LINF:
        # L1 >= L2, strictly here: the paper's L2 figure under-states the valid bound
        assert bool((res.grad_diff_dual > res.grad_diff_l2).all())
        assert res.summary()["dual_norm"] == "L1"
    else:
        assert torch.equal(res.grad_diff_dual, res.grad_diff_l2)
        assert res.summary()["dual_norm"] == "L2"


def test_valid_bound_holds_and_under_estimated_llm_is_reported():
    x = torch.full((3, 2), 0.5, dtype=torch.float64)
    x[1] = torch.tensor([0.52, 0.49], dtype=torch.float64)
    x[2] = torch.tensor([0.47, 0.5], dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    teacher, student = _Confident(), _Bowl()
    eps = 0.1
    res = prop2_terms(teacher, student, x, y, eps, steps=20, restarts=2, seed=0)
    # the student's CE goes from ~0 to ~10 on the ball: the LHS is large, and the LLM estimate carries it
    assert float(res.lhs_max.min()) > 5.0
    assert not bool(res.violated.any())
    assert bool((res.lhs_max <= res.bound + 1e-9).all())
    assert res.summary()["violation_rate"] == 0.0
    # the clean terms alone are tiny: a hand-set LLM of 0 must produce reported violations
    bad = prop2_terms(teacher, student, x, y, eps, steps=20, seed=0, llm_s=0.0, llm_t=torch.zeros(3, dtype=torch.float64))
    assert bool(bad.violated.all())
    summ = bad.summary()
    assert summ["violations"] == 3 and summ["violation_rate"] == 1.0
    assert bad.settings["llm_s_given"] is True
    # and so does an LLM "estimate" that never leaves x (no steps, while the LHS attack still runs)
    lazy = prop2_terms(teacher, student, x[:1], y[:1], eps, steps=0, lhs_steps=20, lhs_restarts=1, seed=0)
    assert float(lazy.llm_s[0]) < 0.5 * float(lazy.lhs_max[0]) and bool(lazy.violated[0])


def test_lhs_attack_finds_both_signs_and_is_a_real_value():
    # student worse than teacher on one side, better on the other: |CE_s - CE_t| must be tracked in absolute value
    t, s = _net(0, d=2), _net(1, d=2)
    x = torch.rand(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2
    y = torch.tensor([0, 1, 2, 0])
    eps = 0.1
    res = prop2_terms(t, s, x, y, eps, steps=10, lhs_steps=30, lhs_restarts=2)
    lin = torch.linspace(-eps, eps, 201, dtype=torch.float64)
    grid = torch.cartesian_prod(lin, lin)
    for i in range(4):
        pts = (x[i] + grid).clamp(0, 1)
        with torch.no_grad():
            yy = y[i].expand(pts.shape[0])
            d = (F.cross_entropy(s(pts), yy, reduction="none") - F.cross_entropy(t(pts), yy, reduction="none")).abs()
        brute = float(d.max())
        assert float(res.lhs_max[i]) <= brute + 1e-3  # it is a value attained in the ball (from below)
        assert float(res.lhs_max[i]) >= 0.95 * brute


def test_real_models_result_is_serialisable_and_consistent(trained_mlp, trained_cnn, fmnist_test):
    x = fmnist_test.float_x(torch.arange(6))
    y = fmnist_test.y[:6]
    grads = [None if p.grad is None else p.grad.clone() for p in trained_mlp.parameters()]
    res = prop2_terms(trained_cnn, trained_mlp, x, y, 0.05, steps=5, lhs_steps=5)
    d = res.to_dict()
    json.dumps(d)
    assert len(d["per_sample"]["bound"]) == 6 and len(d["per_sample"]["violated"]) == 6
    summ = d["summary"]
    assert summ["llm_estimate"] == "lower"
    assert "estimate from below" in summ["note"] and "L1" in summ["note"]
    assert summ["violations"] == int(((res.lhs_max > res.bound + 1e-5 * (1 + res.bound))).sum())
    assert summ["bound"]["mean"] == pytest.approx(float(res.bound.double().mean()))
    # the LHS is at least its value at e = 0
    assert bool((res.lhs_max >= (res.ce_s - res.ce_t).abs() - 1e-6).all())
    after = [None if p.grad is None else p.grad.clone() for p in trained_mlp.parameters()]
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, after))  # no parameter grads


def test_bad_input_raises_usage_error():
    t, s = _net(0), _net(1)
    x = torch.rand(2, 6, dtype=torch.float64)
    y = torch.tensor([0, 1])
    with pytest.raises(UsageError):
        prop2_terms(t, s, x, y, -0.01)
    with pytest.raises(UsageError):
        prop2_terms(t, s, x, y, 0.1, llm_s=torch.zeros(3))
    with pytest.raises(UsageError):
        prop2_terms(t, s, x, y, 0.1, llm_t=-1.0)
    with pytest.raises(UsageError):
        prop2_terms(t, s, x, y, 0.1, tol=-1.0)
    with pytest.raises(UsageError):
        prop2_terms(t, "student", x, y, 0.1)
    with pytest.raises(UsageError):
        prop2_terms(t, s, x, y, 0.1, lhs_steps=-2)
    with pytest.raises(UsageError):
        prop2_terms(t, s, x + 2.0, y, 0.1)


def test_audit_llm_restarts_reach_the_computation(trained_cnn, trained_mlp, tmp_path, monkeypatch):
    import robkd.analysis.prop2 as prop2_mod
    from safetensors.torch import load_file

    from robkd.cli.main import main
    from robkd.data import eval_subset, load_dataset
    from robkd.models import save_model

    seen: dict[str, list[int]] = {"llm": [], "lhs": []}
    real_llm, real_lhs = prop2_mod.local_linearity, prop2_mod.measure_lhs

    def spy_llm(*a, **kw):
        seen["llm"].append(kw["restarts"])
        return real_llm(*a, **kw)

    def spy_lhs(*a, **kw):
        seen["lhs"].append(kw["restarts"])
        return real_lhs(*a, **kw)

    monkeypatch.setattr(prop2_mod, "local_linearity", spy_llm)
    monkeypatch.setattr(prop2_mod, "measure_lhs", spy_lhs)
    t, s = save_model(trained_cnn, tmp_path / "t.safetensors"), save_model(trained_mlp, tmp_path / "s.safetensors")
    out = tmp_path / "o"
    assert main(["audit", str(t), str(s), "--data", "fashion-mnist-slice", "--n", "6", "--eps", "0.02", "--attacks", "fgsm",
                 "--llm", "--llm-steps", "2", "--llm-restarts", "3", "--sanity-n", "0", "--no-report", "--out", str(out),
                 "--json"]) == 0
    assert seen == {"llm": [3, 3], "lhs": [3]}  # student and teacher LLM, and the LHS attack
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["llm_restarts"] == 3
    # independent recomputation with the same settings gives the stored per-sample terms
    sub = eval_subset(load_dataset("fashion-mnist-slice", "test"), 6, 0)
    direct = prop2_terms(trained_cnn, trained_mlp, sub.float_x(), sub.y, 0.02, steps=2, restarts=3, seed=0, batch_size=256)
    stored = load_file(str(out / "samples.safetensors"))
    assert torch.allclose(stored["prop2.llm_s"][0], direct.llm_s.float(), atol=1e-6)
    assert torch.allclose(stored["prop2.lhs_max"][0], direct.lhs_max.float(), atol=1e-6)
    with pytest.raises(UsageError):
        from robkd.auditing.config import AuditConfig

        AuditConfig.from_spec(None, llm_restarts=0)
