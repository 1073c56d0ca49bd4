"""Tests of the evaluation sanity checks: each fires on a model built to trigger it, none on the plain model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robkd.analysis.sanity import (
    SanityFlag,
    check_blackbox_subset,
    check_gradients,
    check_large_radius,
    check_monotone,
    check_more_steps,
    check_probability_outputs,
    check_randomness,
    check_result,
    pre_checks,
    run_sanity_checks,
)
from robkd.attacks import Suite
from robkd.errors import UsageError
from helpers import Quantised


class _Noisy(nn.Module):
    """Random input noise in every forward pass (stochastic even in eval mode)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner((x + 0.05 * torch.randn_like(x)).clamp(0, 1))


class _MCDropout(nn.Module):
    """Dropout that stays active in eval mode (Monte-Carlo dropout)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(nn.functional.dropout(x, p=0.2, training=True))


@pytest.fixture(scope="module")
def data(fmnist_test):
    idx = torch.arange(64)
    return fmnist_test.float_x(idx), fmnist_test.y[idx]


def _codes(flags):
    assert all(isinstance(f, SanityFlag) and f.suggestion and f.message for f in flags)
    return {f.code for f in flags}


def test_plain_model_raises_no_flag(trained_cnn, data):
    x, y = data
    flags = run_sanity_checks(trained_cnn, x, y, norm="Linf", radii=[0.01, 0.03], name="teacher", n=32)
    assert flags == []


def test_stochastic_models_are_flagged(trained_cnn, data):
    x, y = data
    for wrap in (_Noisy, _MCDropout):
        flags = check_randomness(wrap(trained_cnn), x, name="student")
        assert _codes(flags) == {"stochastic-outputs"} and flags[0].model == "student"
    assert check_randomness(trained_cnn, x) == []


def test_softmax_output_is_flagged(trained_cnn, data):
    x, y = data
    soft = nn.Sequential(trained_cnn, nn.Softmax(dim=1))
    assert _codes(check_probability_outputs(soft, x)) == {"probability-outputs"}
    assert check_probability_outputs(trained_cnn, x) == []
    # log-softmax outputs are not probabilities
    assert check_probability_outputs(nn.Sequential(trained_cnn, nn.LogSoftmax(dim=1)), x) == []


def test_zero_and_nan_gradients_are_flagged(trained_cnn, data):
    x, y = data
    flags = check_gradients(Quantised(trained_cnn), x, y)
    assert _codes(flags) == {"zero-gradients"} and flags[0].value == pytest.approx(1.0)

    class SqrtAtZero(nn.Module):
        def forward(self, x):  # d sqrt(u)/du at u = 0 is inf -> inf * 0 = NaN in the chain rule
            return trained_cnn(x) + torch.sqrt((x - x.detach()).flatten(1).sum(1, keepdim=True))

    assert "nan-gradients" in _codes(check_gradients(SqrtAtZero(), x, y))
    assert check_gradients(trained_cnn, x, y) == []
    codes = _codes(pre_checks(Quantised(trained_cnn), x, y))
    assert codes == {"zero-gradients"}


def test_large_radius_check_fires_on_gradient_masking(trained_cnn, data):
    x, y = data
    with torch.no_grad():
        ok = Quantised(trained_cnn)(x).argmax(1) == y
    flags = check_large_radius(Quantised(trained_cnn), x[ok][:32], y[ok][:32], "Linf")
    assert _codes(flags) == {"large-radius-not-broken"}
    with torch.no_grad():
        ok = trained_cnn(x).argmax(1) == y
    assert check_large_radius(trained_cnn, x[ok][:32], y[ok][:32], "Linf") == []
    assert check_large_radius(trained_cnn, x[ok][:32], y[ok][:32], "L2") == []


def test_more_steps_check(trained_cnn, data):
    x, y = data
    with torch.no_grad():
        ok = trained_cnn(x).argmax(1) == y
    # one PGD step is far from converged: ten times more steps lowers accuracy noticeably
    flags = check_more_steps(trained_cnn, x[ok], y[ok], "Linf", 0.1, steps=1, factor=10)
    assert _codes(flags) == {"more-steps-help"} and flags[0].value > 0.03
    # converged (PGD-10 vs PGD-100 at a small radius): not flagged; on 32 samples one sample is 3.1%, above the
    # default tol, and whether one borderline sample flips depends on the CPU's float kernels: allow two samples
    assert check_more_steps(trained_cnn, x[ok][:32], y[ok][:32], "Linf", 0.03, steps=10, factor=10, tol=2.5 / 32) == []


def test_monotonicity_check():
    assert _codes(check_monotone([0.8, 0.5, 0.6], [1 / 255, 2 / 255, 4 / 255])) == {"accuracy-rises-with-radius"}
    assert check_monotone([0.8, 0.5, 0.5, 0.1], [0.0, 0.1, 0.2, 0.3]) == []
    # order of the radii does not matter
    assert check_monotone([0.1, 0.8], [0.3, 0.0]) == []
    with pytest.raises(UsageError):
        check_monotone([0.1], [0.1, 0.2])


def test_blackbox_beating_whitebox_is_flagged_from_a_suite_result(trained_cnn, data):
    x, y = data
    masked = Quantised(trained_cnn)
    suite = Suite(["pgd-5", "square"], "Linf", progress=False, attack_options={"square": {"n_queries": 150}})
    res = suite.run(masked, x[:24], y[:24], [0.15])
    flags = check_result(res, name="student")
    assert _codes(flags) == {"blackbox-beats-whitebox"}
    assert run_sanity_checks(result=res, name="student", extra=False) == flags
    # square alone (no white-box attack before it) is not a comparison
    res_sq = Suite(["square"], "Linf", progress=False, attack_options={"square": {"n_queries": 150}}).run(
        masked, x[:24], y[:24], [0.15])
    assert check_result(res_sq) == []
    # the plain model: the white-box attack leaves nothing for square
    res_plain = Suite(["pgd-20", "square"], "Linf", progress=False, attack_options={"square": {"n_queries": 150}}).run(
        trained_cnn, x[:24], y[:24], [0.15])
    assert check_result(res_plain) == []


def test_blackbox_check_for_suites_with_autoattack(trained_cnn, data, monkeypatch):
    """AutoAttack runs Square inside its own cascade, so its result cannot show Square beating the white-box
    components: the check runs them itself on the subset (masked model flagged, plain model not)."""
    x, y = data
    masked = Quantised(trained_cnn)
    flags = check_blackbox_subset(masked, x[:24], y[:24], "Linf", 0.15, white=("apgd-ce",), n_queries=150, name="s")
    assert _codes(flags) == {"blackbox-beats-whitebox"} and flags[0].model == "s" and flags[0].value > 0.002
    assert check_blackbox_subset(trained_cnn, x[:24], y[:24], "Linf", 0.15, white=("apgd-ce",), n_queries=150) == []
    # run_sanity_checks adds it exactly when the suite hides Square inside pyautoattack
    import robkd.analysis.sanity as S

    calls = []
    monkeypatch.setattr(S, "check_blackbox_subset", lambda *a, **k: calls.append(k) or [])
    for attacks, want in ((["pgd-20", "autoattack"], 1), (["pgd-20", "square"], 0), (["autoattack-rand"], 0)):
        calls.clear()
        run_sanity_checks(trained_cnn, x[:8], y[:8], norm="Linf", radii=[0.01, 0.03, 0.05], n=8, attacks=attacks)
        assert len(calls) == want, attacks


def test_flags_serialise_and_bad_calls_raise(trained_cnn, data):
    x, y = data
    f = check_probability_outputs(nn.Sequential(trained_cnn, nn.Softmax(dim=1)), x, name="t")[0]
    d = f.to_dict()
    assert d["code"] == "probability-outputs" and d["model"] == "t" and set(d) >= {"message", "suggestion"}
    with pytest.raises(UsageError):
        run_sanity_checks()
    with pytest.raises(UsageError):
        run_sanity_checks(trained_cnn, x)
    with pytest.raises(UsageError):
        run_sanity_checks(trained_cnn, x * 2, y, extra=False)


def test_strict_audit_of_a_stochastic_model_and_eot(trained_cnn):
    """--strict exits 3 on a stochastic model evaluated without EOT; with EOT in every gradient attack
    (``-eot<n>`` specs) the flag is recorded as handled and does not fail the audit."""
    import robkd

    noisy = _Noisy(trained_cnn)
    common = dict(data="fashion-mnist-slice", n=32, eps=[0.05], sanity_n=0, strict=True, batch_size=32)
    plain = robkd.audit(trained_cnn, noisy, attacks=["fgsm", "pgd-5"], **common)
    flags = [f for f in plain.sanity_flags if f["code"] == "stochastic-outputs"]
    assert flags and not flags[0].get("handled_by") and plain.exit_code == 3
    eot = robkd.audit(trained_cnn, noisy, attacks=["fgsm-eot4", "pgd-5-eot4"], **common)
    flags = [f for f in eot.sanity_flags if f["code"] == "stochastic-outputs"]
    assert flags and "EOT" in flags[0]["handled_by"]
    assert eot.exit_code == (3 if any(not f.get("handled_by") for f in eot.sanity_flags) else 0)
    assert all(f["code"] != "stochastic-outputs" for f in eot.sanity_flags if not f.get("handled_by"))
    # a suite with one attack without EOT does not count as handled
    mixed = robkd.audit(trained_cnn, noisy, attacks=["fgsm", "pgd-5-eot4"], **common)
    assert [f for f in mixed.sanity_flags if f["code"] == "stochastic-outputs" and not f.get("handled_by")]
