"""The transfer attack: the other model of the pair as the attacker (``transfer`` in an audit's attack list).

A distilled student imitates its teacher, so the teacher's adversarial examples are the natural black-box
attack on the student (and the student's on the teacher). For a *target* model and a *source* model audited
on the same samples, :func:`transfer_attack` takes, at each radius (ascending), the samples the target's own
suite left robust and

1. re-checks on the target, by a plain forward pass (:func:`~robkd.attacks.base.verify_adversarial`), the
   adversarial example the source's suite kept for that sample when it was found at this radius or a smaller
   one (the suite keeps the example of the smallest radius: it lies in the ball of every larger radius around
   the same clean ``x``, which the re-check verifies again);
2. for the samples where the source's suite found no example at this radius, runs a dedicated PGD on the
   source (``steps`` steps, step size ``2.5 eps / steps``, a uniform random start seeded per sample, the
   iterate of highest source loss kept) and re-checks that point on the target.

A sample broken at radius ``r`` counts as broken at every larger radius (the same point is valid there).
:func:`fold_transfer` adds the outcome to the target's :class:`~robkd.attacks.suite_result.SuiteResult` as one
more attack, last in execution order, so the worst case and the cumulative accuracies count it.

It needs both models' suite outcomes, so it is not a stand-alone attack: :func:`make_attack` refuses the spec
and a :class:`~robkd.attacks.Suite` never runs it; ``robkd audit`` runs it as a stage after both suites.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import torch
from torch import nn

from robkd.attacks.base import attack_mode, check_sample_ids, verify_adversarial
from robkd.attacks.noise import SampleNoise
from robkd.attacks.pgd import projected_gradient_ascent
from robkd.attacks.suite_result import ROBUST, SuiteResult
from robkd.errors import UsageError
from robkd.types import Norm
from robkd.utils.modules import model_device
from robkd.utils.spill import is_spilled, put_rows, spill_copy

__all__ = ["TRANSFER", "TRANSFER_STEPS", "TransferOutcome", "fold_transfer", "own_attacks", "transfer_attack"]

#: the attack spec of the transfer attack
TRANSFER = "transfer"
#: steps of the dedicated PGD on the source model
TRANSFER_STEPS = 20
#: seed offset of the dedicated PGD's random starts (not the suite's PGD streams: another start)
_SEED_OFFSET = 7919


def own_attacks(attacks: Sequence[str]) -> list[str]:
    """The attacks a model's own :class:`~robkd.attacks.Suite` runs: ``attacks`` without ``transfer``."""
    return [a for a in attacks if str(a).strip().lower() != TRANSFER]


@dataclasses.dataclass
class TransferOutcome:
    """What the source model's examples did to the target, per radius and per sample.

    ``broken[r, i]``: sample ``i`` (robust against the target's own suite at ``radii[r]``) is broken by a
    transfer example of radius ``<= radii[r]``; ``adv_radius[i]`` the smallest such radius (NaN: none);
    ``rows``/``x_rows`` the broken samples' indices and their verified examples. ``per_radius``: counts
    (``attacked``: robust before the transfer attack; ``reused``/``reused_broken``: the source's suite
    examples tried / that fool the target; ``pgd``/``pgd_broken``: samples attacked by the dedicated PGD /
    broken by it; ``broken``: broken here, inherited from smaller radii included)."""

    source: str
    target: str
    radii: list[float]
    steps: int
    broken: torch.Tensor
    adv_radius: torch.Tensor
    rows: torch.Tensor
    x_rows: torch.Tensor
    per_radius: list[dict[str, int]]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no per-sample tensors)."""
        return {"source": self.source, "target": self.target, "steps": self.steps, "seconds": self.seconds,
                "per_radius": [{"radius": r, **c} for r, c in zip(self.radii, self.per_radius)]}


def _check_pair(target: SuiteResult, source: SuiteResult, x: torch.Tensor) -> None:
    if target.radii != source.radii or target.norm is not source.norm:
        raise UsageError("the transfer attack needs both suites at the same radii and norm")
    if target.n != source.n or target.n != x.shape[0]:
        raise UsageError(f"the transfer attack needs both suites on the same {x.shape[0]} samples")


def transfer_attack(
    target: nn.Module,
    source: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    target_result: SuiteResult,
    source_result: SuiteResult,
    *,
    steps: int = TRANSFER_STEPS,
    seed: int = 0,
    batch_size: int = 256,
    sample_ids: torch.Tensor | None = None,
    names: tuple[str, str] = ("source", "target"),
) -> TransferOutcome:
    """Attack ``target`` with ``source``'s adversarial examples on the samples ``(x, y)`` both suites ran on
    (see the module docstring); returns the :class:`TransferOutcome`. ``names``: (source, target) labels."""
    _check_pair(target_result, source_result, x)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be an integer >= 1, got {steps!r}")
    t0 = time.perf_counter()
    norm, radii, n = target_result.norm, list(target_result.radii), target_result.n
    ids = check_sample_ids(sample_ids, n)
    src_r = source_result.adv_radius.detach().cpu().double()
    own_robust = target_result.broken_by.cpu() == ROBUST
    broken = torch.zeros(len(radii), n, dtype=torch.bool)
    adv_radius = torch.full((n,), float("nan"))
    found: dict[int, torch.Tensor] = {}
    per_radius: list[dict[str, int]] = []
    dev = x.device
    for ri, eps in enumerate(radii):
        inherited = broken[ri - 1] if ri else torch.zeros(n, dtype=torch.bool)
        broken[ri] = inherited & own_robust[ri]
        alive = own_robust[ri] & ~inherited
        cand = alive & (src_r <= eps * (1 + 1e-6))  # float32 radii; NaN (never broken) compares False
        counts = {"attacked": int(alive.sum()), "reused": int(cand.sum()), "reused_broken": 0, "pgd": 0, "pgd_broken": 0}
        idx = cand.nonzero().flatten()
        for s in range(0, idx.numel(), batch_size):
            part = idx[s : s + batch_size]
            xa = source_result.adv_rows(part).to(dev, x.dtype)
            counts["reused_broken"] += _keep(target, x, y, xa, part, norm, eps, broken[ri], adv_radius, found)
        idx = (alive & ~cand).nonzero().flatten()
        counts["pgd"] = int(idx.numel())
        for s in range(0, idx.numel(), batch_size):
            part = idx[s : s + batch_size]
            xa = _source_pgd(source, x[part.to(dev)], y[part.to(dev)], norm, eps, steps, seed, ids[part])
            counts["pgd_broken"] += _keep(target, x, y, xa, part, norm, eps, broken[ri], adv_radius, found)
        counts["broken"] = int(broken[ri].sum())
        per_radius.append(counts)
    rows = torch.tensor(sorted(found), dtype=torch.long)
    x_rows = torch.stack([found[int(i)] for i in rows]) if rows.numel() else x.new_zeros((0, *x.shape[1:])).cpu()
    return TransferOutcome(source=names[0], target=names[1], radii=radii, steps=steps, broken=broken,
                           adv_radius=adv_radius, rows=rows, x_rows=x_rows, per_radius=per_radius,
                           seconds=time.perf_counter() - t0)


def _keep(target: nn.Module, x: torch.Tensor, y: torch.Tensor, xa: torch.Tensor, part: torch.Tensor, norm: Norm,
          eps: float, broken_row: torch.Tensor, adv_radius: torch.Tensor, found: dict[int, torch.Tensor]) -> int:
    """Re-check the points ``xa`` of the samples ``part`` on the target (forward pass, ball around the same clean
    ``x``, [0,1]); record the ones that fool it; returns their number."""
    pd = part.to(x.device)
    ok = verify_adversarial(target, x[pd], xa, y[pd], norm, eps).cpu()
    hit = part[ok]
    broken_row[hit] = True
    adv_radius[hit] = float(eps)
    for j in ok.nonzero().flatten().tolist():
        found[int(part[j])] = xa[j].detach().cpu()
    return int(ok.sum())


def _source_pgd(source: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Norm, eps: float, steps: int, seed: int,
                ids: torch.Tensor) -> torch.Tensor:
    """PGD on the source model (cross-entropy, uniform random start seeded per sample); the iterate of highest
    source loss, whether or not it fools the source (a point of high loss may still fool the target)."""
    device = model_device(source)
    xd, yd = x.detach().to(device), y.to(device)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(source(z), yd, reduction="none")

    with attack_mode(source):
        out = projected_gradient_ascent(loss, xd, norm=norm, eps=eps, steps=steps, step_size=2.5 * eps / steps,
                                        random_start="uniform",
                                        generator=SampleNoise(int(seed) + _SEED_OFFSET, ids, device=device),
                                        return_best=True)
    return out.detach().to(x.device, x.dtype)


def fold_transfer(result: SuiteResult, outcome: TransferOutcome, position: int) -> SuiteResult:
    """``result`` with the transfer attack added as attack ``position`` of its list (the audit's place of
    ``transfer`` in ``attacks``; codes at or after it move up by one) and last in execution order: its
    broken samples leave the robust ones, and where its example has a smaller radius than the kept one it
    becomes the kept example. ``result`` itself is left unchanged (its ``x_adv`` is copied when written to)."""
    if outcome.radii != result.radii or outcome.broken.shape != result.broken_by.shape:
        raise UsageError("the transfer outcome is for other radii or samples than the suite result")
    if not 0 <= position <= len(result.attacks):
        raise UsageError(f"position {position} is outside the attack list")
    bb = result.broken_by.cpu().clone()
    bb = torch.where(bb >= position, bb + 1, bb)
    new = outcome.broken & (bb == ROBUST)
    bb[new] = position
    adv_r = result.adv_radius.detach().cpu().clone()
    x_adv = result.x_adv
    rows = outcome.rows
    if rows.numel():
        t_r = outcome.adv_radius[rows].to(adv_r.dtype)
        better = ~(adv_r[rows] <= t_r)  # NaN (never broken by the suite) or a larger radius
        take = rows[better]
        if take.numel():
            x_adv = spill_copy(x_adv) if is_spilled(x_adv) else x_adv.detach().cpu().clone()
            put_rows(x_adv, take, outcome.x_rows[better].to(x_adv.dtype))
            adv_r[take] = t_r[better]
    attacks = list(result.attacks)
    attacks.insert(position, TRANSFER)
    seconds = {**result.seconds, TRANSFER: float(outcome.seconds)}
    return dataclasses.replace(result, attacks=attacks, order=[*result.order, TRANSFER], broken_by=bb, x_adv=x_adv,
                               adv_radius=adv_r, done={*result.done, *((TRANSFER, r) for r in result.radii)},
                               rejected=dict(result.rejected), seconds=seconds)
