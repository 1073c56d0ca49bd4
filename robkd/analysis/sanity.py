"""Evaluation sanity checks: signs that an adversarial evaluation is unreliable (gradient masking...).

The entry point of the checks. The checks themselves live in :mod:`robkd.analysis.sanity_checks` (every
one stand-alone) and :mod:`robkd.analysis.sanity_reuse` (the attack-based ones started from an attack
suite's per-sample outcomes, as an audit runs them); everything is re-exported here.

:func:`plan_checks` lists the checks that apply to one model's evaluation as named
:class:`SanityCheck` units, each with the parameters its result depends on (the audit saves every
finished unit for ``--resume`` under a key made of them and reports its progress);
:func:`run_sanity_checks` runs them all.

The checks (each returns a list of :class:`SanityFlag`, empty when nothing is wrong):

- from a suite result alone: black-box beating white-box and robust accuracy rising with the radius
  (:func:`check_result`), clean accuracy near chance (:func:`check_clean_accuracy`);
- cheap, on ``n`` samples: randomness, probability outputs, zero/NaN gradients (:func:`pre_checks`);
- attack-based, on ``n`` clean-correct samples: large radius, 10x more PGD steps at the middle radius,
  per-radius monotonicity and (for suites with ``autoattack``/``autoattack-plus``, whose Square is hidden
  inside pyautoattack's cascade) Square against APGD-CE/APGD-T at the middle radius.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from robkd.analysis.sanity_checks import (
    BLACK_BOX,
    HIDDEN_BLACK_BOX,
    NEAR_CHANCE_CONFIDENCE,
    NEAR_CHANCE_SHARE,
    SanityFlag,
    _logits,
    check_blackbox_subset,
    check_clean_accuracy,
    check_gradients,
    check_large_radius,
    check_monotone,
    check_more_steps,
    check_probability_outputs,
    check_radius_monotonicity,
    check_randomness,
    check_result,
    near_chance_level,
    pre_checks,
)
from robkd.analysis.sanity_reuse import (
    Report,
    attack_rows,
    blackbox_from_suite,
    large_radius_from_suite,
    monotonicity_on_subset,
    more_steps_from_suite,
    no_report,
    sanity_subset,
    suite_digest,
)
from robkd.errors import UsageError
from robkd.types import Norm
from robkd.utils.logits import correct

__all__ = [
    "BLACK_BOX", "HIDDEN_BLACK_BOX", "NEAR_CHANCE_CONFIDENCE", "NEAR_CHANCE_SHARE", "SANITY_VERSION", "Report",
    "SanityCheck", "SanityFlag", "attack_rows", "blackbox_from_suite", "check_blackbox_subset",
    "check_clean_accuracy", "check_gradients", "check_large_radius", "check_monotone", "check_more_steps",
    "check_probability_outputs", "check_radius_monotonicity", "check_randomness", "check_result",
    "large_radius_from_suite", "monotonicity_on_subset", "more_steps_from_suite", "near_chance_level", "no_report",
    "plan_checks", "pre_checks", "run_sanity_checks", "sanity_subset", "suite_digest",
]

#: part of every saved check's key: a change to what the checks compute makes a resumed audit recompute them
SANITY_VERSION = 2


@dataclasses.dataclass(frozen=True)
class SanityCheck:
    """One named check of one model's evaluation.

    ``params``: JSON-safe, everything its result depends on besides the model and the data (with the
    suite's outcomes as a digest when it reads them); ``run(report)`` computes its flags and reports
    progress through ``report`` (:data:`~robkd.analysis.sanity_reuse.Report`); ``saved``: worth saving
    for resume (False for the checks read off the suite result, which cost nothing).
    """

    name: str
    params: Mapping[str, Any]
    run: Callable[[Report], list[SanityFlag]]
    saved: bool = True


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    meta = getattr(model, "meta", None)
    k = getattr(meta, "num_classes", None)
    if isinstance(k, int) and k > 0:
        return k
    return int(_logits(model, x[:1]).shape[1])


def _clean_subset(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Positions of ``n`` samples the model classifies correctly, chosen with ``seed`` (without a suite)."""
    ok = correct(_logits(model, x), y.cpu()).nonzero().flatten()
    if n < ok.numel():
        ok = ok[torch.randperm(ok.numel(), generator=torch.Generator().manual_seed(seed))[:n].sort().values]
    return ok


def _cheap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str | None, n: int, seed: int,
           report: Report) -> list[SanityFlag]:
    m = min(n, int(x.shape[0]))
    report("start", {"stage": "sanity: cheap checks", "check": "cheap checks", "total": m})
    try:
        flags = pre_checks(model, x, y, name=name, n=n, seed=seed)
        report("advance", {"n": m})
    finally:
        report("done", {})
    return flags


def _standalone(report: Report, check: str, total: int, fn: Callable[[], list[SanityFlag]]) -> list[SanityFlag]:
    """A stand-alone check as one reported phase."""
    report("start", {"stage": f"sanity: {check}", "check": check, "total": total})
    try:
        flags = fn()
        report("advance", {"n": total})
    finally:
        report("done", {})
    return flags


def plan_checks(
    model: nn.Module | None = None,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    *,
    result: Any = None,
    norm: "Norm | str | None" = None,
    radii: Sequence[float] | None = None,
    name: str | None = None,
    extra: bool = True,
    n: int = 64,
    seed: int = 0,
    attacks: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> list[SanityCheck]:
    """The checks that apply, in order (arguments as in :func:`run_sanity_checks`).

    With a suite ``result`` over the same samples as ``x`` the attack-based checks start from its
    per-sample outcomes (:mod:`robkd.analysis.sanity_reuse`); without one they attack from scratch.
    """
    if model is None and result is None:
        raise UsageError("run_sanity_checks needs a model (with x, y) or a suite result")
    if model is not None and (x is None or y is None):
        raise UsageError("model checks need x and y")
    checks: list[SanityCheck] = []
    if result is not None:
        checks.append(SanityCheck("suite result", {}, lambda report: check_result(result, name=name), saved=False))
        norm = norm if norm is not None else result.norm
        radii = radii if radii is not None else result.radii
        if num_classes is None and model is not None:
            num_classes = _num_classes(model, x)
        if num_classes is not None:
            k = int(num_classes)
            checks.append(SanityCheck("clean accuracy", {"num_classes": k},
                                      lambda report: check_clean_accuracy(result.clean_correct, k, name=name), saved=False))
    if model is None:
        return checks
    checks.append(SanityCheck("cheap checks", {"version": SANITY_VERSION, "n": n, "seed": seed},
                              lambda report: _cheap(model, x, y, name, n, seed, report)))
    if not extra:
        return checks
    if norm is None:
        raise UsageError("the attack checks need a norm")
    norm = Norm.parse(norm)
    positive = sorted(float(r) for r in (radii or []) if r > 0)
    mid = positive[len(positive) // 2] if positive else None
    common = {"version": SANITY_VERSION, "n": n, "seed": seed, "norm": norm.value}
    hidden = any(str(a).strip().lower() in HIDDEN_BLACK_BOX for a in (attacks or []))
    if result is not None and result.n == int(x.shape[0]):
        res = result
        sub = sanity_subset(res, n, seed)
        common["suite"] = suite_digest(res)
        large = 1.0 if norm is Norm.LINF else float(x[0].numel()) ** 0.5
        checks.append(SanityCheck("large radius", {**common, "eps": large, "attack": "pgd-20", "max_accuracy": 0.05},
                                  lambda report: large_radius_from_suite(model, x, y, res, sub, norm, name=name, seed=seed,
                                                                         report=report) if sub.numel() else []))
        if mid is not None:
            checks.append(SanityCheck("more steps", {**common, "eps": mid, "steps": 20, "factor": 10, "tol": 0.03},
                                      lambda report: more_steps_from_suite(model, x, y, res, sub, norm, mid, name=name,
                                                                           seed=seed, report=report) if sub.numel() else []))
        if len(positive) > 1:
            checks.append(SanityCheck("monotonicity", {**common, "radii": positive, "attack": "pgd-20"},
                                      lambda report: monotonicity_on_subset(model, x, y, sub, norm, positive, name=name,
                                                                            seed=seed, report=report) if sub.numel() else []))
        if hidden and mid is not None:
            checks.append(SanityCheck("black box", {**common, "eps": mid, "white": ["apgd-ce", "apgd-t"], "n_queries": 1000,
                                                    "tol": 0.002},
                                      lambda report: blackbox_from_suite(model, x, y, res, sub, norm, mid, name=name,
                                                                         seed=seed, report=report) if sub.numel() else []))
        return checks

    # without a suite result: the stand-alone checks on a subset of clean-correct samples
    memo: dict[str, torch.Tensor] = {}

    def subset() -> tuple[torch.Tensor, torch.Tensor]:
        if "s" not in memo:
            memo["s"] = _clean_subset(model, x, y, n, seed)
        s = memo["s"]
        return x[s.to(x.device)], y[s.to(y.device)]

    def attack_check(check: str, fn: Callable[[torch.Tensor, torch.Tensor], list[SanityFlag]]) -> SanityCheck:
        def run(report: Report) -> list[SanityFlag]:
            xs, ys = subset()
            return _standalone(report, check, int(xs.shape[0]), lambda: fn(xs, ys)) if xs.shape[0] else []
        return SanityCheck(check, dict(common), run)

    checks.append(attack_check("large radius", lambda xs, ys: check_large_radius(model, xs, ys, norm, name=name, seed=seed)))
    if mid is not None:
        checks.append(attack_check("more steps", lambda xs, ys: check_more_steps(model, xs, ys, norm, mid, name=name,
                                                                                 seed=seed)))
        if len(positive) > 1:
            checks.append(attack_check("monotonicity", lambda xs, ys: check_radius_monotonicity(
                model, xs, ys, norm, positive, name=name, seed=seed)))
        if hidden:
            checks.append(attack_check("black box", lambda xs, ys: check_blackbox_subset(model, xs, ys, norm, mid,
                                                                                         name=name, seed=seed)))
    return checks


def run_sanity_checks(
    model: nn.Module | None = None,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    *,
    result: Any = None,
    norm: "Norm | str | None" = None,
    radii: Sequence[float] | None = None,
    name: str | None = None,
    extra: bool = True,
    n: int = 64,
    seed: int = 0,
    attacks: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> list[SanityFlag]:
    """Run every applicable check; returns the flags (empty list: nothing suspicious).

    With ``model, x, y``: the cheap checks on ``n`` samples; with ``result`` (a SuiteResult): the result
    checks, and the near-chance clean-accuracy check when the number of classes is known
    (``num_classes``, else read from the model); with ``extra=True`` and a model: the checks that run extra
    attacks on ``n`` clean-correct samples (large radius, 10x more PGD steps at the middle radius,
    per-radius monotonicity; and, when the suite's ``attacks`` include ``autoattack``/``autoattack-plus``,
    Square against APGD-CE/APGD-T at the middle radius), started from ``result``'s per-sample outcomes
    when it covers the samples ``x``. ``norm``/``radii`` default to the result's.
    """
    checks = plan_checks(model, x, y, result=result, norm=norm, radii=radii, name=name, extra=extra, n=n, seed=seed,
                         attacks=attacks, num_classes=num_classes)
    return [f for c in checks for f in c.run(no_report)]

