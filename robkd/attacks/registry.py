"""Attack specs (``pgd-20x100``, ``autoattack``...) -> :class:`~robkd.attacks.base.Attack` instances."""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable

from robkd.attacks.autoattack import AUTOATTACK_SPECS, AutoAttackAdapter
from robkd.attacks.base import Attack
from robkd.attacks.deepfool import DeepFool
from robkd.attacks.fgsm import FGSM
from robkd.attacks.mifgsm import MIFGSM
from robkd.attacks.pgd import PGD
from robkd.attacks.transfer import TRANSFER
from robkd.errors import UsageError
from robkd.types import Norm

_PGD = re.compile(r"^pgd(?:-(\d+)(?:x(\d+))?)?$")
_MIFGSM = re.compile(r"^mi-?fgsm(?:-(\d+))?$")
_EOT = re.compile(r"^(.+)-eot(\d+)$")

#: upper limits of the integers in a spec: beyond them a run would never end (``pgd-<20 digits>``)
MAX_STEPS, MAX_RESTARTS, MAX_EOT = 100_000, 10_000, 10_000


def _count(spec: str, text: str | None, what: str, limit: int) -> int | None:
    """The integer ``text`` of ``spec`` (None when absent), checked to lie in [1, limit]."""
    if text is None:
        return None
    value = int(text)
    if not 1 <= value <= limit:
        raise UsageError(f"attack {spec!r}: {what} must be between 1 and {limit:,}, got {text[:24]}")
    return value

#: every spec form, for help texts
ATTACK_SPECS = ["fgsm", "pgd-<steps>", "pgd-<steps>x<restarts>", "mifgsm-<steps>", "deepfool", *AUTOATTACK_SPECS,
                "<fgsm|pgd|mifgsm spec>-eot<n>", TRANSFER]


def _build(cls: Callable[..., Attack], norm: Norm, eps: float, fixed: dict[str, Any], kw: dict[str, Any], spec: str) -> Attack:
    params = inspect.signature(cls).parameters
    unknown = sorted(k for k in kw if k not in params or k in fixed or k in {"norm", "eps", "spec"})
    if unknown:
        allowed = sorted(k for k in params if k not in fixed and k not in {"norm", "eps", "spec"})
        raise UsageError(f"attack {spec!r} does not take option(s) {unknown}; it takes {allowed}")
    return cls(norm=norm, eps=eps, **fixed, **kw)


def make_attack(spec: str, norm: "Norm | str", eps: float, **kw: Any) -> Attack:
    """Build an attack from its spec.

    ``fgsm``; ``pgd-<k>`` / ``pgd-<k>x<r>`` (k steps, r restarts; ``pgd`` = ``pgd-20``);
    ``mifgsm-<k>`` (``mifgsm`` = 20 steps); ``deepfool``; ``apgd-ce``, ``apgd-dlr``,
    ``apgd-t``, ``fab``, ``fab-t``, ``square``, ``autoattack``, ``autoattack-plus``,
    ``autoattack-rand`` (pyautoattack). A ``-eot<n>`` suffix on ``fgsm``/``pgd``/``mifgsm``
    (``pgd-20-eot10``) averages each input gradient over ``n`` passes (EOT, for stochastic
    models; the same as ``eot_iter=n``). Keyword options go to the attack class
    (``seed``, ``batch_size``, ``step_size``, ``random_start``, ``eot_iter``,
    ``n_queries``...); an option the attack does not take is a :class:`UsageError`.
    """
    if not isinstance(spec, str):
        raise UsageError(f"attack spec must be a string, got {spec!r}")
    key = spec.strip().lower()
    norm = Norm.parse(norm)
    m = _EOT.match(key)
    if m:
        base, n = m.group(1), _count(spec, m.group(2), "EOT passes", MAX_EOT)
        if "eot_iter" in kw:
            raise UsageError(f"attack {spec!r} sets EOT twice (the -eot suffix and eot_iter)")
        if not (_PGD.match(base) or _MIFGSM.match(base) or base == "fgsm"):
            raise UsageError(f"attack {spec!r}: the -eot<n> suffix applies to fgsm, pgd and mifgsm specs "
                             "(AutoAttack's EOT version is autoattack-rand)")
        return make_attack(base, norm, eps, eot_iter=n, **kw)
    m = _PGD.match(key)
    if m:
        fixed: dict[str, Any] = {}
        if m.group(1) is not None:
            fixed["steps"] = _count(spec, m.group(1), "steps", MAX_STEPS)
        if m.group(2) is not None:
            fixed["restarts"] = _count(spec, m.group(2), "restarts", MAX_RESTARTS)
        return _build(PGD, norm, eps, fixed, kw, spec)
    m = _MIFGSM.match(key)
    if m:
        fixed = {"steps": _count(spec, m.group(1), "steps", MAX_STEPS)} if m.group(1) is not None else {}
        return _build(MIFGSM, norm, eps, fixed, kw, spec)
    if key == "fgsm":
        return _build(FGSM, norm, eps, {}, kw, spec)
    if key == "deepfool":
        return _build(DeepFool, norm, eps, {}, kw, spec)
    if key in AUTOATTACK_SPECS:
        return _build(AutoAttackAdapter, norm, eps, {"spec": key}, kw, spec)
    if key == TRANSFER:
        raise UsageError(f"attack {spec!r} is not a stand-alone attack: it attacks a model with the adversarial examples "
                         "found on the other model of an audited pair, so robkd audit runs it after both models' suites "
                         "(robkd.attacks.transfer)")
    raise UsageError(f"unknown attack {spec!r}: use one of {', '.join(ATTACK_SPECS)}")


def attack_cost(spec: str, norm: "Norm | str" = Norm.LINF) -> float:
    """Approximate cost rank (forward+backward passes per sample) of a spec; the suite runs cheap first."""
    return make_attack(spec, norm, 0.0).cost
