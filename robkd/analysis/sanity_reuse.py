"""The audit's attack-based sanity checks, started from the attack suite's per-sample outcomes.

The stand-alone checks of :mod:`robkd.analysis.sanity_checks` attack a subset from scratch. An audit has
already attacked every sample with its suite; the versions here attack only the samples whose outcome
the suite leaves open and take the rest from the suite's :class:`~robkd.attacks.SuiteResult`. Each keeps
its flag's code, meaning and threshold; its docstring says why reusing the suite cannot hide what the
stand-alone check catches (in short: a sample is only ever skipped when the suite already holds the
evidence the check's own attack would have produced: a verified adversarial example found by a gradient
attack, or a failure of a Square at least as strong as the check's).

Subsampling is the stand-alone one (:func:`sanity_subset`: ``n`` clean-correct samples chosen with the
seed), and every row keeps its position in that subset as its sample id, so an attack run on part of the
subset gives each row the random start it gets in a run on the whole subset.

Progress: every attack run reports through ``report(kind, info)`` (``kind`` "start", "advance", "done";
start info: ``stage`` ("sanity: <check> (<attack>)"), ``check``, ``attack``, ``radius``, ``total`` (rows
to attack); advance info: ``n`` (rows just finished)).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from robkd.analysis.sanity_checks import BLACK_BOX, HIDDEN_BLACK_BOX, SanityFlag, check_monotone, large_radius_flags
from robkd.attacks.suite import ROBUST
from robkd.types import Norm, format_radius

#: ``report(kind, info)``: the progress callback of the checks here
Report = Callable[[str, dict[str, Any]], None]


def no_report(kind: str, info: dict[str, Any]) -> None:
    """A :data:`Report` that ignores everything."""


# ----------------------------------------------------------------------------- reading the suite
def sanity_subset(result: Any, n: int | None, seed: int) -> torch.Tensor:
    """Positions of ``n`` clean-correct samples of the suite's set, chosen with ``seed`` (all when fewer)."""
    ok = result.clean_correct.cpu().nonzero().flatten()
    if n is not None and n < ok.numel():
        pick = torch.randperm(ok.numel(), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        ok = ok[pick]
    return ok


def _gradient_codes(result: Any) -> torch.Tensor:
    """``broken_by`` codes of the suite's gradient attacks (no Square, not even inside pyautoattack's cascade)."""
    return torch.tensor([k for k, a in enumerate(result.attacks) if a not in BLACK_BOX and a not in HIDDEN_BLACK_BOX],
                        dtype=torch.long)


def _radius_index(result: Any, eps: float) -> int | None:
    """The index of ``eps`` among the suite's radii (None when the suite did not run it)."""
    for i, r in enumerate(result.radii):
        if math.isclose(float(r), float(eps), rel_tol=1e-9, abs_tol=1e-12):
            return i
    return None


def broken_by_gradient(result: Any, ri: int) -> torch.Tensor:
    """``(N,)`` bool: a gradient attack of the suite found a verified adversarial example within ``radii[ri]``."""
    return torch.isin(result.broken_by[ri].cpu(), _gradient_codes(result))


def suite_digest(result: Any) -> str:
    """A short hash of the suite's per-sample outcomes (part of a saved check's key)."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps([list(result.attacks), [float(r) for r in result.radii]]).encode())
    h.update(result.clean_correct.cpu().to(torch.uint8).numpy().tobytes())
    h.update(result.broken_by.cpu().to(torch.int64).numpy().astype("<i8").tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- one attack on some rows
def attack_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, spec: str, norm: Norm,
                eps: float, *, seed: int, check: str, report: Report, **kw: Any) -> torch.Tensor:
    """``(len(x),)`` bool: ``spec`` at ``eps`` found a verified adversarial example for the row (only ``rows``
    are attacked; a row's sample id is its position in ``x``)."""
    from robkd.attacks import make_attack, verify_adversarial

    out = torch.zeros(x.shape[0], dtype=torch.bool)
    rows = rows.cpu().long()
    if rows.numel() == 0:
        return out
    report("start", {"stage": f"sanity: {check} ({spec})", "check": check, "attack": spec, "radius": float(eps),
                     "total": int(rows.numel())})
    try:
        r = rows.to(x.device)
        res = make_attack(spec, norm, eps, seed=seed, **kw).run(
            model, x[r], y[r], sample_ids=rows, on_batch=lambda m: report("advance", {"n": int(m)}))
        ok = verify_adversarial(model, x[r], res.x_adv, y[r], norm, eps) & res.success
        out[rows] = ok.cpu()
    finally:
        report("done", {})
    return out


# ----------------------------------------------------------------------------- the checks
def large_radius_from_suite(model: nn.Module, x: torch.Tensor, y: torch.Tensor, result: Any, subset: torch.Tensor,
                            norm: "Norm | str", *, eps: float | None = None, attack: str = "pgd-20",
                            max_accuracy: float = 0.05, name: str | None = None, seed: int = 0,
                            report: Report = no_report) -> list[SanityFlag]:
    """``large-radius-not-broken`` (as :func:`~robkd.analysis.sanity_checks.check_large_radius`) on the
    ``subset`` positions, attacking only the samples no gradient attack of the suite broke.

    Why nothing is missed: a sample a gradient attack of the suite broke has a verified adversarial example
    inside a ball of at most the suite's largest radius, hence inside the large ball (which covers the
    whole [0,1] box): a gradient attack does break it there, which is all the check asks. Every other
    sample is attacked exactly as in the stand-alone check (same attack, radius, seed and sample id). A
    gradient-masked model gives its gradient attacks nothing (breaks found only by Square are not
    counted), so it is attacked on the whole subset and flagged exactly as before.
    """
    norm = Norm.parse(norm)
    if eps is None:
        eps = 1.0 if norm is Norm.LINF else math.sqrt(x[0].numel())
    xs, ys = x[subset.to(x.device)], y[subset.to(y.device)]
    inside = [i for i, r in enumerate(result.radii) if r <= eps]
    known = (broken_by_gradient(result, inside[-1])[subset] if inside
             else torch.zeros(subset.numel(), dtype=torch.bool))
    broken = attack_rows(model, xs, ys, (~known).nonzero().flatten(), attack, norm, eps, seed=seed,
                         check="large radius", report=report)
    acc = float((~known & ~broken).float().mean()) if subset.numel() else 0.0
    return large_radius_flags(acc, attack, norm, eps, name, max_accuracy)


def more_steps_from_suite(model: nn.Module, x: torch.Tensor, y: torch.Tensor, result: Any, subset: torch.Tensor,
                          norm: "Norm | str", eps: float, *, steps: int = 20, factor: int = 10, tol: float = 0.03,
                          name: str | None = None, seed: int = 0, report: Report = no_report) -> list[SanityFlag]:
    """``more-steps-help`` on the ``subset`` positions: PGD with ``factor``x more steps against the samples the
    suite and ``pgd-<steps>`` both left robust at ``eps``.

    The flag fires when the longer PGD lowers that robust accuracy (the suite's, with ``pgd-<steps>``
    added) by more than ``tol`` of the subset. Why nothing that matters is missed: the stand-alone
    check's drop is at most the share of samples ``pgd-<steps>`` left robust and the long PGD broke;
    every such sample the suite reports robust is counted here too (same attacks, radius, seed and sample
    ids). The only ones left out are samples the suite already broke, which do not inflate the reported
    figure (a broken sample cannot become robust). The long PGD runs only on the survivors of the short
    one (a sample the short one broke is broken, whatever the long one does).
    """
    norm = Norm.parse(norm)
    xs, ys = x[subset.to(x.device)], y[subset.to(y.device)]
    ri = _radius_index(result, eps)
    open_ = ((result.broken_by[ri].cpu() == ROBUST)[subset] if ri is not None
             else torch.ones(subset.numel(), dtype=torch.bool))
    short = f"pgd-{steps}"
    long = f"pgd-{steps * factor}"
    left = open_ & ~attack_rows(model, xs, ys, open_.nonzero().flatten(), short, norm, eps, seed=seed,
                                check="more steps", report=report)
    still = left & ~attack_rows(model, xs, ys, left.nonzero().flatten(), long, norm, eps, seed=seed,
                                check="more steps", report=report)
    m = max(1, subset.numel())
    a, b = float(left.sum()) / m, float(still.sum()) / m
    if a - b > tol:
        return [SanityFlag(
            "more-steps-help",
            f"{long} lowers robust accuracy from {a:.2%} (the suite and {short}) to {b:.2%} at {format_radius(eps)}",
            "the attack has not converged: use more steps / restarts or AutoAttack before trusting the figure",
            name, a - b)]
    return []


def blackbox_from_suite(model: nn.Module, x: torch.Tensor, y: torch.Tensor, result: Any, subset: torch.Tensor,
                        norm: "Norm | str", eps: float, *, white: Sequence[str] = ("apgd-ce", "apgd-t"),
                        n_queries: int = 1000, tol: float = 0.002, name: str | None = None, seed: int = 0,
                        report: Report = no_report) -> list[SanityFlag]:
    """``blackbox-beats-whitebox`` (as :func:`~robkd.analysis.sanity_checks.check_blackbox_subset`) on the
    ``subset`` positions, for suites whose Square runs hidden inside pyautoattack's cascade.

    Only the samples the suite broke at ``eps`` with an attack that may hold a Square (``square``,
    ``autoattack``, ``autoattack-plus``) are attacked: the white-box attacks in turn, then Square
    (``n_queries``) on what they left; the flag fires when Square breaks more than ``tol`` of the subset.
    Why nothing is missed: a sample a gradient attack of the suite broke was not missed by the white-box
    attacks, so it can never count as Square beating them; a sample the suite left robust survived the
    suite's own Square (5000 queries, at least the check's budget) at this radius. So a gradient-masked
    model, whose breaks all come from Square, is attacked on every sample Square broke and flagged as
    before.
    """
    norm = Norm.parse(norm)
    xs, ys = x[subset.to(x.device)], y[subset.to(y.device)]
    ri = _radius_index(result, eps)
    if ri is None:
        left = torch.ones(subset.numel(), dtype=torch.bool)
    else:
        by = result.broken_by[ri].cpu()[subset]
        left = (by >= 0) & ~torch.isin(by, _gradient_codes(result))
    for spec in white:
        left &= ~attack_rows(model, xs, ys, left.nonzero().flatten(), spec, norm, eps, seed=seed,
                             check="black box", report=report)
    k = int(attack_rows(model, xs, ys, left.nonzero().flatten(), "square", norm, eps, seed=seed, check="black box",
                        report=report, n_queries=n_queries).sum())
    frac = k / max(1, subset.numel())
    if frac > tol:
        return [SanityFlag(
            "blackbox-beats-whitebox",
            f"square ({n_queries} queries) broke {k} of {subset.numel()} samples ({frac:.2%}) at radius "
            f"{format_radius(eps)} that the white-box attacks (the suite's and {', '.join(white)}) missed",
            "gradient masking: the gradients mislead the white-box attacks; the robust accuracy is "
            "overestimated, use stronger / adaptive attacks", name, frac)]
    return []


def monotonicity_on_subset(model: nn.Module, x: torch.Tensor, y: torch.Tensor, subset: torch.Tensor,
                           norm: "Norm | str", radii: Sequence[float], *, attack: str = "pgd-20",
                           name: str | None = None, seed: int = 0, report: Report = no_report) -> list[SanityFlag]:
    """``accuracy-rises-with-radius``: ``attack`` run independently at each radius on the ``subset`` positions.

    This one cannot start from the suite: the suite counts a sample broken at a small radius as broken at
    every larger one without attacking it again, so its per-radius outcomes are monotone by construction
    (:func:`~robkd.analysis.sanity_checks.check_result` checks them anyway). Only independent runs test
    whether the attack itself finds, in a larger ball, the examples it finds in a smaller one.
    """
    norm = Norm.parse(norm)
    xs, ys = x[subset.to(x.device)], y[subset.to(y.device)]
    every = torch.arange(subset.numel())
    m = max(1, subset.numel())
    accs = [1.0 - float(attack_rows(model, xs, ys, every, attack, norm, r, seed=seed, check="monotonicity",
                                    report=report).sum()) / m for r in radii]
    return check_monotone(accs, list(radii), name=name)
