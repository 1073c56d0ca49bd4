"""Smoke tests of the benchmark harness's equality checks (no timing assertions)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bench import naive, peers
from bench.common import judge, param_grad_guard, time_interleaved


@pytest.fixture(scope="module")
def cnn_batch(trained_cnn, fmnist_test):
    x = fmnist_test.float_x(slice(0, 32))
    y = fmnist_test.y[:32]
    return trained_cnn, x, y


def test_judge_targets():
    assert judge(1.04, "<= 1.05") is True
    assert judge(1.06, "<= 1.05") is False
    assert judge(4.0, ">= 4.0") is True
    assert judge(3.9, ">= 4.0") is False
    assert judge(None, "<= 1") is None and judge(1.0, None) is None
    with pytest.raises(ValueError):
        judge(1.0, "== 1")


def test_time_interleaved_rotates_and_counts():
    calls: list[str] = []
    t = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert sorted(t) == ["a", "a#cpu", "b", "b#cpu"]
    assert all(len(v) == 3 and all(s >= 0 for s in v) for v in t.values())
    # warm-up a,b then rounds a,b / b,a / a,b
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]


def test_param_grad_guard_sees_parameter_gradients(cnn_batch):
    model, x, y = cnn_batch
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(True)
    with param_grad_guard(m) as hits:
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(m(xr), y), xr)
    assert hits == []
    with param_grad_guard(m) as hits:
        F.cross_entropy(m(x), y).backward()
    assert len(hits) == len(list(m.parameters()))


def test_minimal_pgd_equals_torchattacks_and_radius_check(cnn_batch):
    model, x, y = cnn_batch
    kw = dict(eps=0.05, alpha=0.0125, steps=5)
    a = naive.minimal_pgd(model, x, y, **kw)
    b = peers.torchattacks_pgd(model, x, y, random_start=False, **kw)
    ra, rb = peers.robust_mask(model, a, y, x, 0.05), peers.robust_mask(model, b, y, x, 0.05)
    assert torch.equal(ra, rb)
    assert int((~ra).sum()) > 0  # the attack does break samples: the check compares something
    with pytest.raises(RuntimeError, match="exceeds eps"):
        peers.robust_mask(model, (x + 0.1).clamp(0, 1), y, x, 0.05)


def test_distill_equality_check_passes_and_can_fail(trained_cnn, fmnist_train):
    from bench import distill
    from robkd.distill import objectives as O
    from robkd.models import build_model

    data = fmnist_train.select(torch.arange(16))
    x, y, idx = data.float_x(), data.y, torch.arange(16)
    teacher = copy.deepcopy(trained_cnn).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(3)
    student = build_model("robkd:cnn_small", input_shape=(1, 28, 28), num_classes=10)
    for method in ("kd", "kdiga"):
        c = distill._cfg(method, 16)
        cache = O.TeacherCache(teacher, data, grads=method == "kdiga")
        ok, txt = distill._equal_check(method, student, teacher, data, x, y, idx, c, cache)
        assert ok, txt
    # a naive loss with another IGA weight must be caught
    c = distill._cfg("kdiga", 16, lambda_iga=3.0)
    wrong = distill._cfg("kdiga", 16, lambda_iga=1.0)
    orig = distill._naive_kwargs
    try:
        distill._naive_kwargs = lambda cfg: orig(wrong)
        ok, txt = distill._equal_check("kdiga", student, teacher, data, x, y, idx, c, None)
    finally:
        distill._naive_kwargs = orig
    assert not ok, txt


def test_naive_ibp_contains_the_network_outputs(cnn_batch):
    model, x, _ = cnn_batch
    lo, hi = naive.naive_ibp(model, x[:4], 0.02)
    assert bool((lo <= hi).all())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(8):
            z = (x[:4] + 0.02 * (torch.rand(x[:4].shape, generator=g) * 2 - 1)).clamp(0, 1)
            out = model(z)
            assert bool((out >= lo - 1e-4).all() and (out <= hi + 1e-4).all())
