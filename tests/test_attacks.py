"""Tests of the attack suite: reference comparisons, re-checks, cascade semantics, resume, bad input."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robkd.attacks import (
    CLEAN_WRONG,
    PGD,
    ROBUST,
    Attack,
    AttackOutput,
    Suite,
    SuiteResult,
    make_attack,
    verify_adversarial,
)
from robkd.attacks._geometry import project
from robkd.errors import RobkdError, UsageError
from robkd.types import Norm


@pytest.fixture(scope="module")
def batch(fmnist_test):
    idx = torch.arange(96)
    return fmnist_test.float_x(idx), fmnist_test.y[idx]


def _reference_pgd_robust(model, x, y, norm, eps, steps, seed):
    """An independent, plain PGD (last iterate only) written for the test.

    It starts from the same per-sample random points as robkd's PGD (the first draw of
    each sample's stream, :class:`~robkd.attacks.noise.SampleNoise`), so robkd, which
    keeps any adversarial iterate, can only report fewer robust samples.
    """
    from robkd.attacks.noise import SampleNoise

    alpha = 2.5 * eps / steps
    if norm is Norm.LINF:
        u = SampleNoise(seed, torch.arange(x.shape[0])).rand(x.shape)
        xa = (x + (u * 2 - 1) * eps).clamp(0, 1)
    else:
        xa = x.clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        loss = F.cross_entropy(model(xa), y)
        (grad,) = torch.autograd.grad(loss, xa)
        with torch.no_grad():
            if norm is Norm.LINF:
                xa = xa + alpha * grad.sign()
                xa = torch.min(torch.max(xa, x - eps), x + eps)
            else:
                gn = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                xa = xa + alpha * grad / gn
                d = xa - x
                dn = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                xa = x + d * torch.clamp(eps / dn.clamp_min(1e-12), max=1.0)
            xa = xa.clamp(0, 1)
    with torch.no_grad():  # robust: correct on the clean input AND at the attack's end point
        return (model(x).argmax(1) == y) & (model(xa).argmax(1) == y)


@pytest.mark.parametrize("norm,radii", [(Norm.LINF, [0.01, 0.03, 0.06]), (Norm.L2, [0.3, 0.8])])
def test_pgd_never_reports_higher_robust_accuracy_than_an_independent_pgd(trained_cnn, batch, norm, radii):
    x, y = batch
    res = Suite(["pgd-20"], norm, seed=0, progress=False).run(trained_cnn, x, y, radii)
    for ri, eps in enumerate(radii):
        ref = _reference_pgd_robust(trained_cnn, x, y, norm, eps, 20, seed=0)
        assert res.robust_accuracy()[ri] <= float(ref.float().mean()) + 1e-9
        # and the attack does real work: it breaks something the clean pass did not
        assert res.robust_accuracy()[ri] < res.clean_accuracy()


def test_pgd_is_reproducible_and_restarts_only_help(trained_cnn, batch):
    x, y = batch
    a = make_attack("pgd-10", "Linf", 0.02, seed=3).run(trained_cnn, x, y)
    b = make_attack("pgd-10", "Linf", 0.02, seed=3).run(trained_cnn, x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    r1 = Suite(["pgd-10"], "Linf", progress=False).run(trained_cnn, x, y, [0.02]).robust_accuracy()[0]
    r5 = Suite(["pgd-10x5"], "Linf", progress=False).run(trained_cnn, x, y, [0.02]).robust_accuracy()[0]
    assert r5 <= r1


def test_autoattack_and_apgd_match_pyautoattack_run_directly(trained_mlp, fmnist_test):
    from pyautoattack import AutoAttack

    x, y = fmnist_test.float_x(torch.arange(24)), fmnist_test.y[:24]
    eps = 0.05
    for spec in ("apgd-ce", "autoattack"):
        res = Suite([spec], "Linf", seed=0, progress=False).run(trained_mlp, x, y, [eps])
        aa = AutoAttack(trained_mlp, norm="Linf", eps=eps, seed=0, version="standard", device="cpu")
        if spec != "autoattack":
            aa.attacks_to_run = [spec]
        _, y_adv = aa.run_standard_evaluation(x, y, batch_size=256)
        direct_robust = y_adv == y
        assert torch.equal(res.robust[0], direct_robust), spec
        assert 0 < int(direct_robust.sum()) < int(res.clean_correct.sum())  # non-trivial comparison
    for p in trained_mlp.parameters():
        p.grad = None  # the direct FAB run above calls backward() with the parameters unfrozen


@pytest.mark.parametrize("spec", ["fgsm", "mifgsm-20", "deepfool"])
@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 2.0)])
def test_simple_attacks_break_the_undefended_cnn(trained_cnn, batch, spec, norm, eps):
    x, y = batch
    with torch.no_grad():
        correct = trained_cnn(x).argmax(1) == y
    out = make_attack(spec, norm, eps).run(trained_cnn, x[correct], y[correct])
    ok = verify_adversarial(trained_cnn, x[correct], out.x_adv, y[correct], norm, eps)
    assert torch.equal(ok & out.success, out.success)  # every claim holds up
    assert float(ok.float().mean()) > 0.3


def test_targeted_pgd_hits_the_target(trained_cnn, batch):
    x, y = batch
    target = (y + 1) % 10
    out = make_attack("pgd-20", "Linf", 0.15).run(trained_cnn, x, y, target=target)
    with torch.no_grad():
        pred = trained_cnn(out.x_adv).argmax(1)
    assert torch.equal(out.success, pred == target)
    assert float(out.success.float().mean()) > 0.3
    assert torch.equal(verify_adversarial(trained_cnn, x, out.x_adv, y, "Linf", 0.15, target=target), out.success)


def test_verify_adversarial_rejects_invalid_examples(trained_cnn, batch):
    x, y = batch
    eps = 0.1
    out = make_attack("pgd-20", "Linf", eps).run(trained_cnn, x, y)
    good = out.success.clone()
    assert int(good.sum()) >= 4
    i = good.nonzero().flatten()
    xa = out.x_adv.clone()
    assert torch.equal(verify_adversarial(trained_cnn, x, xa, y, "Linf", eps), good)
    # outside the ball: move the pixel closest to 0.5 of sample i[0] eps + 0.05 away (stays in [0,1])
    j = int(torch.argmin((x[i[0]].flatten() - 0.5).abs()))
    flat = xa[i[0]].flatten().clone()
    flat[j] = x[i[0]].flatten()[j] + eps + 0.05
    xa[i[0]] = flat.view_as(xa[i[0]])
    # outside [0,1]
    xa[i[1]].view(-1)[0] = 1.0 + 1e-3
    # still correctly classified: the clean point itself
    xa[i[2]] = x[i[2]]
    ok = verify_adversarial(trained_cnn, x, xa, y, "Linf", eps)
    assert not ok[i[0]] and not ok[i[1]] and not ok[i[2]]
    assert bool(ok[i[3:]].all())
    # tolerance: float round-off on the boundary is accepted, real excess is not
    edge = x[:1].clone()
    edge.view(-1)[0] = 0.5
    x0 = edge.clone()
    x0.view(-1)[0] = 0.5 - eps * (1 + 1e-7)
    assert bool(verify_adversarial(trained_cnn, x0, edge, trained_cnn(edge).argmax(1).add(1).remainder(10), "Linf", eps)[0])
    x0.view(-1)[0] = 0.5 - eps * 1.01
    assert not bool(verify_adversarial(trained_cnn, x0, edge, trained_cnn(edge).argmax(1).add(1).remainder(10), "Linf", eps)[0])


def test_l2_projection_is_the_exact_euclidean_projection():
    x = torch.full((2, 1, 1, 2), 0.5)
    xa = torch.tensor([[[[0.5 + 0.3, 0.5 + 0.4]]], [[[0.5 + 0.03, 0.5 - 0.04]]]])
    eps = torch.tensor([0.1, 0.1]).view(2, 1, 1, 1)
    out = project(xa, x, Norm.L2, eps)
    # ||(0.3, 0.4)|| = 0.5 -> scaled to 0.1: (0.06, 0.08); the second point (norm 0.05) is inside
    torch.testing.assert_close(out[0].flatten(), torch.tensor([0.56, 0.58]))
    torch.testing.assert_close(out[1].flatten(), torch.tensor([0.53, 0.46]))
    # the projection is the closest point of the ball: compare with a dense search on the circle
    ang = torch.linspace(0, 2 * torch.pi, 20001)
    circle = torch.stack([0.5 + 0.1 * ang.cos(), 0.5 + 0.1 * ang.sin()], 1)
    nearest = circle[(circle - xa[0].flatten()).norm(dim=1).argmin()]
    torch.testing.assert_close(out[0].flatten(), nearest, atol=1e-4, rtol=0)


class _LyingAttack(Attack):
    """Claims success for every sample but returns invalid points (outside the ball / box / not adversarial)."""

    name = "liar"
    cost = 0.5

    def _perturb(self, model, x, y, target, generator):
        xa = x.clone()
        xa[0::3] = (x[0::3] + 3 * self.eps).clamp(0, 1)  # outside the ball
        xa[1::3] = x[1::3] + 2.0  # outside [0,1]
        return AttackOutput(xa, torch.ones(x.shape[0], dtype=torch.bool, device=x.device))


def test_suite_recheck_discards_invalid_claims_and_warns(trained_cnn, batch, caplog):
    x, y = batch
    with caplog.at_level(logging.WARNING, logger="robkd.attacks"):
        res = Suite([_LyingAttack("Linf", 0.0)], "Linf", progress=False).run(trained_cnn, x, y, [0.01])
    n_correct = int(res.clean_correct.sum())
    assert res.robust_accuracy()[0] == pytest.approx(res.clean_accuracy())
    assert res.rejected == {"liar@0.01": n_correct}
    assert any("failed the re-check" in r.getMessage() and str(n_correct) in r.getMessage() for r in caplog.records)


class _Recorder(PGD):
    """A real PGD that records which samples it was given (to check the cascade)."""

    def __init__(self, *a, log, **kw):
        super().__init__(*a, **kw)
        self.log = log

    def run(self, model, x, y, **kw):
        self.log.append((self.name, self.eps, x.clone()))
        return super().run(model, x, y, **kw)


def _rows(sub, x):
    return sorted(int(((x.flatten(1) == r.flatten()).all(1)).nonzero()[0]) for r in sub)


def test_cascade_semantics(trained_cnn, batch):
    x, y = batch
    log: list = []
    cheap = _Recorder("Linf", 0.0, steps=1, log=log)
    cheap.name, cheap.cost = "cheap", 1.0
    strong = _Recorder("Linf", 0.0, steps=20, restarts=2, log=log)
    strong.name, strong.cost = "strong", 40.0
    radii = [0.05, 0.08, 0.12]  # strong breaks samples at the smallest radius that cheap does not
    res = Suite([strong, cheap], "Linf", progress=False).run(trained_cnn, x, y, radii)
    assert res.order == ["cheap", "strong"] and res.attacks == ["strong", "cheap"]
    # attacks outer (cascade order), radii inner (ascending)
    assert [(n, e) for n, e, _ in log] == [(a, r) for a in ("cheap", "strong") for r in radii]
    bb = res.broken_by
    assert bool((bb[:, ~res.clean_correct] == CLEAN_WRONG).all())
    n_r = len(radii)
    for ri, eps in enumerate(radii):
        seen_cheap = _rows(log[ri][2], x)
        seen_strong = _rows(log[n_r + ri][2], x)
        # cheap sees exactly the clean-correct samples it did not break at a smaller radius (a sample that
        # only strong breaks at a smaller radius is still attacked by cheap here)
        prev_cheap = (bb[ri - 1] == 1) if ri else torch.zeros(len(y), dtype=torch.bool)
        assert seen_cheap == sorted((res.clean_correct & ~prev_cheap).nonzero().flatten().tolist())
        # strong sees what cheap left unbroken at this radius and strong did not break at a smaller one
        prev_strong = (bb[ri - 1] >= 0) if ri else torch.zeros(len(y), dtype=torch.bool)
        want = res.clean_correct & (bb[ri] != 1) & ~prev_strong
        assert seen_strong == sorted(want.nonzero().flatten().tolist())
    # not vacuous: strong broke samples at the smallest radius that cheap then attacked at the next one
    assert bool(((bb[0] == 0) & torch.isin(torch.arange(len(y)), torch.tensor(_rows(log[1][2], x)))).any())
    # monotone: broken at r => broken at every r' > r, by the same attack or one earlier in the cascade
    order_pos = {res.attacks.index(a): i for i, a in enumerate(res.order)}
    for ri in range(len(radii) - 1):
        broken = bb[ri] >= 0
        assert bool((bb[ri + 1][broken] >= 0).all())
        assert all(order_pos[int(b)] <= order_pos[int(a)] for a, b in zip(bb[ri][broken], bb[ri + 1][broken]))
    acc = res.robust_accuracy()
    assert acc[0] >= acc[1] >= acc[2] and acc[2] < acc[0]
    # robust_after is cumulative in execution order and ends at the worst case
    ra = res.robust_after
    assert bool((ra["cheap"] >= ra["strong"]).all()) and torch.equal(ra["strong"], res.robust)
    # stored examples are valid at the radius where they were first found
    broken = ~torch.isnan(res.adv_radius)
    assert bool(verify_adversarial(trained_cnn, x[broken], res.x_adv[broken], y[broken], "Linf", res.adv_radius[broken]).all())


def test_cumulative_figures_are_exact_at_every_radius(trained_cnn, batch):
    """robust_after[A] over several radii equals a suite of the attacks up to A alone: a sample that a
    later attack breaks at a small radius is still attacked by the earlier ones at the larger radii."""
    x, y = batch
    radii = [0.01, 0.04, 0.1]
    full = Suite(["fgsm", "pgd-5", "deepfool"], "Linf", progress=False).run(trained_cnn, x, y, radii)
    assert full.order == ["fgsm", "pgd-5", "deepfool"]
    for upto in (["fgsm"], ["fgsm", "pgd-5"]):
        part = Suite(upto, "Linf", progress=False).run(trained_cnn, x, y, radii)
        assert torch.equal(full.robust_after[upto[-1]], part.robust), upto
    # (that the earlier attacks really run on samples a later one broke at a smaller radius is checked
    # on the attacks' inputs in test_cascade_semantics)


def test_suite_resume_skips_finished_pairs_and_matches_a_full_run(trained_cnn, batch):
    x, y = batch
    radii = [0.01, 0.03]
    full = Suite(["fgsm", "pgd-5"], "Linf", progress=False).run(trained_cnn, x, y, radii)
    saved = []

    class Interrupt(Exception):
        pass

    def stop_after_three(res):
        saved.append(res.to_tensors())
        if len(saved) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        Suite(["fgsm", "pgd-5"], "Linf", progress=False).run(trained_cnn, x, y, radii, on_checkpoint=stop_after_three)
    state = SuiteResult.from_tensors(saved[-1])
    assert state.done == {("fgsm", 0.01), ("fgsm", 0.03), ("pgd-5", 0.01)}
    seen = []
    res = Suite(["fgsm", "pgd-5"], "Linf", progress=False).run(
        trained_cnn, x, y, radii, state=saved[-1], on_progress=lambda ev: seen.append((ev["attack"], ev["radius"])))
    assert set(seen) == {("pgd-5", 0.03)}
    assert torch.equal(res.broken_by, full.broken_by) and res.complete
    # a state from other data or other radii is refused
    with pytest.raises(UsageError):
        Suite(["fgsm", "pgd-5"], "Linf", progress=False).run(trained_cnn, x.flip(0), y.flip(0), radii, state=saved[-1])
    with pytest.raises(UsageError):
        Suite(["fgsm", "pgd-5"], "Linf", progress=False).run(trained_cnn, x, y, [0.01], state=saved[-1])
    with pytest.raises(UsageError):
        SuiteResult.from_tensors({"broken_by": torch.zeros(1)})


def test_no_parameter_gradients_and_modes_restored(trained_cnn, trained_mlp, batch):
    x, y = batch
    x, y = x[:24], y[:24]
    for p in trained_cnn.parameters():
        p.grad = None
    trained_cnn.train()
    list(trained_cnn.modules())[-1].eval()  # a mixed-mode model must come back exactly as it was
    modes = [m.training for m in trained_cnn.modules()]
    assert any(modes) and not all(modes)
    for spec in ["fgsm", "pgd-3", "mifgsm-3", "deepfool", "apgd-ce"]:
        make_attack(spec, "Linf", 0.05).run(trained_cnn, x, y)
    Suite(["fgsm", "pgd-2"], "L2", progress=False).run(trained_cnn, x, y, [0.5])
    assert all(p.grad is None for p in trained_cnn.parameters())
    # pyautoattack's FAB calls backward() itself: the frozen parameters still get no gradient
    for p in trained_mlp.parameters():
        p.grad = None
    make_attack("fab-t", "Linf", 0.05).run(trained_mlp, x[:4], y[:4])
    assert all(p.grad is None for p in trained_mlp.parameters())
    assert all(p.requires_grad for p in trained_cnn.parameters())
    assert [m.training for m in trained_cnn.modules()] == modes
    trained_cnn.eval()


def test_attack_runs_in_eval_mode(trained_cnn, batch):
    x, y = batch
    seen = []
    hook = trained_cnn.register_forward_pre_hook(lambda mod, inp: seen.append(mod.training))
    try:
        trained_cnn.train()
        make_attack("pgd-2", "Linf", 0.01).run(trained_cnn, x[:4], y[:4])
    finally:
        hook.remove()
        trained_cnn.eval()
    assert seen and not any(seen)


def test_eps_zero_returns_clean_points(trained_cnn, batch):
    x, y = batch
    res = Suite(["pgd-5", "deepfool"], "Linf", progress=False).run(trained_cnn, x, y, [0.0, 0.02])
    assert res.robust_accuracy()[0] == pytest.approx(res.clean_accuracy())
    assert int((res.broken_by[0] == ROBUST).sum()) == int(res.clean_correct.sum())


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, y: make_attack("pgd-20", "Linf", -0.1),
        lambda m, x, y: make_attack("pgd-20", "Linf", float("nan")),
        lambda m, x, y: make_attack("pgd-0", "Linf", 0.1),
        lambda m, x, y: make_attack("pgd-20", "L7", 0.1),
        lambda m, x, y: make_attack("cw", "Linf", 0.1),
        lambda m, x, y: make_attack("pgd-20", "Linf", 0.1, momentum=0.9),
        lambda m, x, y: make_attack("autoattack", "Linf", 0.1, steps=3),
        lambda m, x, y: make_attack("pgd-20", "Linf", 0.1, random_start="cauchy"),
        lambda m, x, y: make_attack("pgd-20", "Linf", 0.1, batch_size=0),
        lambda m, x, y: make_attack("pgd-2", "Linf", 0.1)(m, x * 255, y),
        lambda m, x, y: make_attack("pgd-2", "Linf", 0.1)(m, (x * 255).to(torch.uint8), y),
        lambda m, x, y: make_attack("pgd-2", "Linf", 0.1)(m, x, y[:-1]),
        lambda m, x, y: make_attack("pgd-2", "Linf", 0.1)(m, x, y + 10),
        lambda m, x, y: make_attack("pgd-2", "Linf", 0.1)(m, x, y.float()),
        lambda m, x, y: make_attack("pgd-2", "Linf", 0.1)(m, x[:, :, :20], y),
        lambda m, x, y: make_attack("deepfool", "Linf", 0.1)(m, x, y, target=y),
        lambda m, x, y: make_attack("pgd-2", "Linf", 0.1)(m, x, y, target=y + 10),
        lambda m, x, y: verify_adversarial(m, x, x[:-1], y, "Linf", 0.1),
        lambda m, x, y: Suite([], "Linf"),
        lambda m, x, y: Suite(["pgd-20", "PGD-20"], "Linf"),
        lambda m, x, y: Suite(["pgd-20"], "Linf", attack_options={"fgsm": {}}),
        lambda m, x, y: Suite(["pgd-2"], "Linf", progress=False).run(m, x, y, [0.1, -0.1]),
        lambda m, x, y: Suite(["pgd-2"], "Linf", progress=False).run(m, x, y, []),
        lambda m, x, y: Suite(["pgd-2"], "Linf", progress=False).run(m, x[:0], y[:0], [0.1]),
    ],
)
def test_bad_input_raises_robkd_errors(trained_cnn, batch, call):
    x, y = batch
    with pytest.raises(RobkdError):
        call(trained_cnn, x[:4], y[:4])


class _Noisy(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner((x + 0.05 * torch.randn_like(x)).clamp(0, 1))


def test_eot_averages_gradients_on_a_stochastic_model(trained_cnn, batch):
    x, y = batch
    noisy = _Noisy(trained_cnn)
    torch.manual_seed(0)
    out = make_attack("pgd-10", "Linf", 0.1, eot_iter=4).run(noisy, x[:32], y[:32])
    assert out.x_adv.shape == x[:32].shape and float(out.success.float().mean()) > 0.3
    assert make_attack("pgd-10", "Linf", 0.1, eot_iter=4).cost == 4 * make_attack("pgd-10", "Linf", 0.1).cost
    with pytest.raises(UsageError):
        make_attack("pgd-10", "Linf", 0.1, eot_iter=0)


def test_autoattack_takes_no_state_path():
    """pyautoattack's state files cannot be restored (0.2 writes its attack set as a string); robkd never uses them."""
    with pytest.raises(UsageError):
        make_attack("apgd-ce", "Linf", 0.05, state_path="x.json")


def test_mifgsm_agrees_with_torchattacks(trained_cnn, batch):
    """torchattacks.MIFGSM (same step, decay, steps; last iterate) breaks a subset of what robkd's MI-FGSM
    breaks: robkd follows the same trajectory and also keeps adversarial iterates found before the last."""
    torchattacks = pytest.importorskip("torchattacks")
    x, y = batch
    eps, steps = 0.05, 10
    ta = torchattacks.MIFGSM(trained_cnn, eps=eps, alpha=eps / steps, steps=steps, decay=1.0)
    x_ta = ta(x, y)
    ours = make_attack(f"mifgsm-{steps}", "Linf", eps).run(trained_cnn, x, y)
    with torch.no_grad():
        ta_broken = trained_cnn(x_ta).argmax(1) != y
    assert bool((ta_broken & ~ours.success).sum() == 0)
    assert int(ours.success.sum()) - int(ta_broken.sum()) <= 0.05 * len(y)
    assert 0 < int(ta_broken.sum()) < len(y)


def test_eot_suffix_equals_the_eot_option(trained_cnn, batch):
    x, y = batch
    noisy = _Noisy(trained_cnn)
    a, b = make_attack("pgd-5-eot3", "Linf", 0.05), make_attack("pgd-5", "Linf", 0.05, eot_iter=3)
    assert a.eot_iter == 3 and a.cost == b.cost == 15
    torch.manual_seed(1)
    ra = a.run(noisy, x[:16], y[:16])
    torch.manual_seed(1)
    rb = b.run(noisy, x[:16], y[:16])
    assert torch.equal(ra.x_adv, rb.x_adv)
    assert make_attack("FGSM-EOT2", "Linf", 0.05).eot_iter == 2 and make_attack("mifgsm-4-eot2", "L2", 0.5).eot_iter == 2
    for bad in ("apgd-ce-eot4", "deepfool-eot2", "pgd-5-eot0"):
        with pytest.raises(UsageError):
            make_attack(bad, "Linf", 0.05)
    with pytest.raises(UsageError, match="twice"):
        make_attack("pgd-5-eot3", "Linf", 0.05, eot_iter=2)


def test_class_count_probe_of_a_plain_module_runs_in_eval_mode():
    """A model without metadata is probed for its class count in eval mode: a BatchNorm model left in
    train mode keeps its running statistics, and a batch of one does not fail in BatchNorm1d."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        net(torch.rand(32, 1, 4, 4))  # non-trivial running statistics
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    make_attack("pgd-3", "Linf", 0.1).run(net, x, y)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training  # the caller's mode is restored


def test_suite_given_clean_predictions_matches_its_own_clean_pass(trained_cnn, fmnist_test):
    """The audit hands the suite the clean predictions it already made: same result as the suite's own pass;
    a NON_FINITE prediction counts as wrong; a wrong shape is refused."""
    from robkd.attacks import Suite
    from robkd.utils.logits import NON_FINITE

    x, y = fmnist_test.float_x()[:24], fmnist_test.y[:24]
    suite = Suite(["fgsm", "pgd-3"], "Linf", batch_size=8, progress=False)
    with torch.no_grad():
        pred = trained_cnn(x).argmax(1)
    ref = suite.run(trained_cnn, x, y, [0.02, 0.05])
    got = suite.run(trained_cnn, x, y, [0.02, 0.05], clean_pred=pred)
    assert torch.equal(ref.clean_correct, pred == y) and torch.equal(got.clean_correct, ref.clean_correct)
    assert torch.equal(got.broken_by, ref.broken_by) and torch.equal(got.x_adv, ref.x_adv)
    right = int((pred == y).nonzero()[0])
    marked = pred.clone()
    marked[right] = NON_FINITE
    one = suite.run(trained_cnn, x, y, [0.02], clean_pred=marked)
    assert not bool(one.clean_correct[right]) and int(one.clean_correct.sum()) == int((pred == y).sum()) - 1
    with pytest.raises(UsageError, match="clean_pred"):
        suite.run(trained_cnn, x, y, [0.02], clean_pred=pred[:5])
