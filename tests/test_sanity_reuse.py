"""The attack-based sanity checks started from the suite's outcomes: they attack only the samples the suite
leaves open, and a gradient-masked model is still flagged (also when Square in the suite broke samples)."""

from __future__ import annotations

import pytest
import torch

from robkd.analysis.sanity import (
    attack_rows,
    blackbox_from_suite,
    large_radius_from_suite,
    more_steps_from_suite,
    plan_checks,
    run_sanity_checks,
    sanity_subset,
)
from robkd.attacks import CLEAN_WRONG, ROBUST, Suite, SuiteResult
from robkd.types import Norm
from helpers import Quantised


@pytest.fixture(scope="module")
def data(fmnist_test):
    idx = torch.arange(64)
    return fmnist_test.float_x(idx), fmnist_test.y[idx]


@pytest.fixture
def attacked(monkeypatch):
    """Records (attack name, eps, rows) of every attack run."""
    import robkd.attacks.base as base

    calls: list[tuple[str, float, int]] = []
    real = base.Attack.run

    def run(self, model, x, y, **kw):
        calls.append((self.name, float(self.eps), int(x.shape[0])))
        return real(self, model, x, y, **kw)

    monkeypatch.setattr(base.Attack, "run", run)
    return calls


def _codes(flags):
    return {f.code for f in flags}


def test_masked_model_is_flagged_even_when_square_in_the_suite_broke_samples(trained_cnn, data):
    """Square breaks many samples of the quantised model at a small radius; those breaks are not counted as
    gradient-attack breaks, so the large-radius check attacks them and still flags the model."""
    x, y = data
    masked = Quantised(trained_cnn)
    suite = Suite(["pgd-5", "square"], "Linf", progress=False, attack_options={"square": {"n_queries": 150}})
    res = suite.run(masked, x[:32], y[:32], [0.1, 0.15])
    assert res.broken_count("square")[-1] >= 3  # the premise: the suite's breaks come from Square
    codes = _codes(run_sanity_checks(masked, x[:32], y[:32], result=res, n=32))
    assert {"large-radius-not-broken", "blackbox-beats-whitebox", "zero-gradients"} <= codes
    # the plain model: no flag at all (its gradient attacks work)
    plain = Suite(["pgd-5"], "Linf", progress=False).run(trained_cnn, x[:32], y[:32], [0.02, 0.05])
    assert run_sanity_checks(trained_cnn, x[:32], y[:32], result=plain, n=32) == []


def test_the_checks_attack_only_what_the_suite_left_open(trained_cnn, data, attacked):
    x, y = data
    res = Suite(["pgd-5"], "Linf", progress=False).run(trained_cnn, x, y, [0.02, 0.05])
    sub = sanity_subset(res, 24, seed=0)
    assert sub.numel() == 24 and bool(res.clean_correct[sub].all())
    attacked.clear()
    # large radius: only the samples no gradient attack broke at the largest radius
    large_radius_from_suite(trained_cnn, x, y, res, sub, "Linf")
    open_large = int((res.broken_by[-1][sub] == ROBUST).sum())
    assert attacked == ([("pgd-20", 1.0, open_large)] if open_large else [])
    attacked.clear()
    # more steps: pgd-20 on what the suite left robust at the radius, pgd-200 on what pgd-20 left
    more_steps_from_suite(trained_cnn, x, y, res, sub, "Linf", 0.05)
    open_mid = int((res.broken_by[1][sub] == ROBUST).sum())
    assert attacked[0] == ("pgd-20", 0.05, open_mid) and len(attacked) <= 2
    if len(attacked) == 2:
        assert attacked[1][2] <= open_mid
    assert open_mid < 24  # the reuse saved work here: the suite broke some of the subset


def test_attacking_part_of_the_subset_gives_each_row_its_whole_subset_result(trained_cnn, data):
    """A row's sample id is its position in the subset, so its random start does not depend on which other
    rows are attacked (the reuse attacks a part and takes the rest from the suite)."""
    x, y = data
    with torch.no_grad():
        ok = trained_cnn(x).argmax(1) == y
    xs, ys = x[ok], y[ok]
    every = torch.arange(xs.shape[0])
    part = every[::3]
    kw = dict(seed=0, check="t", report=lambda kind, info: None)
    whole = attack_rows(trained_cnn, xs, ys, every, "pgd-5", Norm.LINF, 0.03, **kw)
    some = attack_rows(trained_cnn, xs, ys, part, "pgd-5", Norm.LINF, 0.03, **kw)
    assert not some[~torch.isin(every, part)].any()  # rows not attacked are never counted broken
    agree = float((some[part] == whole[part]).float().mean())
    assert agree >= 0.9  # exact in exact arithmetic; float kernels may flip a borderline sample


def _synthetic(x, y, model, attribution):
    """A SuiteResult for attacks [pgd-5, autoattack] at one radius with a given attribution per sample."""
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    by = torch.tensor(attribution, dtype=torch.long)
    by[~clean] = CLEAN_WRONG
    return SuiteResult(attacks=["pgd-5", "autoattack"], order=["pgd-5", "autoattack"], radii=[0.15], norm=Norm.LINF,
                       clean_correct=clean, broken_by=by.unsqueeze(0), x_adv=x.clone(),
                       adv_radius=torch.full((x.shape[0],), float("nan")))


def test_blackbox_check_attacks_only_samples_square_may_have_broken(trained_cnn, data, attacked):
    """With Square hidden inside AutoAttack, a sample the suite's gradient attack broke or the whole suite left
    robust is not attacked again; the masked model is flagged from the AutoAttack-attributed samples alone."""
    x, y = data
    x, y = x[:24], y[:24]
    masked = Quantised(trained_cnn)
    attribution = [0 if i % 6 == 0 else ROBUST if i % 6 == 1 else 1 for i in range(24)]  # pgd-5 / robust / autoattack
    res = _synthetic(x, y, masked, attribution)
    sub = sanity_subset(res, None, 0)
    hidden = int((res.broken_by[0][sub] == 1).sum())
    attacked.clear()
    flags = blackbox_from_suite(masked, x, y, res, sub, "Linf", 0.15, white=("apgd-ce",), n_queries=150, name="s")
    assert _codes(flags) == {"blackbox-beats-whitebox"} and flags[0].model == "s" and flags[0].value > 0.002
    assert attacked[0] == ("apgd-ce", 0.15, hidden) and attacked[-1][0] == "square" and attacked[-1][2] <= hidden
    # the plain model, every clean-correct sample attributed to AutoAttack: APGD-CE leaves nothing to Square
    plain = _synthetic(x, y, trained_cnn, [1] * 24)
    assert blackbox_from_suite(trained_cnn, x, y, plain, sanity_subset(plain, None, 0), "Linf", 0.15, white=("apgd-ce",),
                               n_queries=150) == []


def test_more_steps_still_fires_on_an_unconverged_attack(trained_cnn, data):
    """As the stand-alone test: one PGD step is far from converged at 0.1, ten steps break much more, also
    when counted only on the samples the suite (FGSM) left robust; at 0.02 they do not."""
    x, y = data
    res = Suite(["fgsm"], "Linf", progress=False).run(trained_cnn, x, y, [0.02, 0.1])
    sub = sanity_subset(res, None, 0)
    flags = more_steps_from_suite(trained_cnn, x, y, res, sub, "Linf", 0.1, steps=1, factor=10)
    assert _codes(flags) == {"more-steps-help"} and flags[0].value > 0.03
    assert "(the suite and pgd-1)" in flags[0].message
    assert more_steps_from_suite(trained_cnn, x, y, res, sub, "Linf", 0.02, steps=10, factor=10) == []


def test_plan_names_and_keys(trained_cnn, data):
    x, y = data
    res = Suite(["pgd-5"], "Linf", progress=False).run(trained_cnn, x, y, [0.02, 0.05])
    names = [c.name for c in plan_checks(trained_cnn, x, y, result=res, n=8, attacks=["pgd-5", "autoattack"])]
    assert names == ["suite result", "clean accuracy", "cheap checks", "large radius", "more steps", "monotonicity",
                     "black box"]
    a = {c.name: c for c in plan_checks(trained_cnn, x, y, result=res, n=8)}
    b = {c.name: c for c in plan_checks(trained_cnn, x, y, result=res, n=9)}
    assert all(a[k].params != b[k].params for k in ("cheap checks", "large radius", "more steps", "monotonicity"))
    assert not a["suite result"].saved and not a["clean accuracy"].saved and a["more steps"].saved
    # the suite's outcomes are part of the key of the checks that read them
    other = Suite(["pgd-5"], "Linf", progress=False).run(trained_cnn, x[:63], y[:63], [0.02, 0.05])
    c = {ch.name: ch for ch in plan_checks(trained_cnn, x[:63], y[:63], result=other, n=8)}
    assert c["more steps"].params["suite"] != a["more steps"].params["suite"]
