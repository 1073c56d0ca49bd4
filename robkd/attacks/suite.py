"""The attack suite: a cheap-to-expensive cascade over ascending radii, worst case per sample.

Semantics (AutoAttack-style worst case):

- a sample is robust at a radius only if no attack of the suite broke it there;
- attacks run in ascending :attr:`~robkd.attacks.base.Attack.cost` (ties keep the
  given order), each only on the samples still unbroken at that radius;
- each attack runs over the radii in ascending order; a sample it breaks at
  radius r counts as broken at every larger radius without being attacked again
  (the same perturbation is valid there), and its stored ``x_adv`` is the one
  found at the smallest radius;
- the attack loop is the outer one: an attack runs at every radius before the
  next attack starts. So a sample broken at a small radius only by a *later*
  attack is still attacked by the earlier ones at the larger radii, and the
  robust accuracy after attack A (``robust_after``) is exactly the worst case
  over the attacks up to A at every radius. The last attack sees the same
  samples as in a radius-outer loop, so the cost is the same but for cheap
  attacks re-running on a few samples, and the worst case is unchanged;
- every adversarial example an attack claims is re-checked by a plain forward
  pass (:func:`~robkd.attacks.base.verify_adversarial`); failures are not counted
  and are logged as a warning with their count.

Resume: pass the previous :class:`SuiteResult` (or its :meth:`~SuiteResult.to_tensors`
dict) as ``state``; finished (attack, radius) pairs are skipped, and
``on_checkpoint(result)`` is called after each pair so the caller can persist it.

Memory: attacks that batch through the base class run one batch of the still-robust samples at a
time (the same batches they would cut themselves), so no attack holds a copy of the whole set; with
``spill`` the kept adversarial examples live in a file (:mod:`robkd.utils.spill`), so the run holds
only per-sample flags in memory besides ``x``.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from robkd.attacks.base import Attack, attack_mode, check_inputs, check_sample_ids, verify_adversarial
from robkd.utils.modules import model_device
from robkd.attacks.registry import make_attack
from robkd.utils.logits import correct
from robkd.errors import UsageError
from robkd.attacks.suite_result import CLEAN_WRONG, ROBUST, SuiteResult, data_fingerprint, respill, spilled_copy, spills
from robkd.types import Norm, format_radius
from robkd.utils.spill import put_rows

__all__ = ["CLEAN_WRONG", "ROBUST", "Suite", "SuiteResult"]

logger = logging.getLogger("robkd.attacks")


class Suite:
    """A cascade of attacks evaluated per sample and per radius (see the module docstring).

    ``attacks``: specs for :func:`~robkd.attacks.make_attack` (or :class:`Attack`
    instances, whose ``eps`` is set per radius). ``attack_options`` maps a spec
    to extra keyword options for it. Resuming is robkd's own (the state saved
    after every finished attack and radius), never pyautoattack's state files.
    ``progress``: show a rich progress bar per attack and radius (samples/s).
    """

    def __init__(
        self,
        attacks: Sequence["str | Attack"],
        norm: "Norm | str",
        *,
        seed: int = 0,
        batch_size: int = 256,
        attack_options: dict[str, dict[str, Any]] | None = None,
        progress: bool = True,
    ) -> None:
        if isinstance(attacks, str) or not attacks:
            raise UsageError("attacks must be a non-empty list of attack specs")
        self.norm = Norm.parse(norm)
        self.seed = seed
        self.batch_size = batch_size
        self.attack_options = dict(attack_options or {})
        self.progress = progress
        self._protos: list[Attack] = []
        names: list[str] = []
        for a in attacks:
            if isinstance(a, Attack):
                proto, name = a, a.name
            elif isinstance(a, str):
                proto = self._make(a, 0.0)
                name = a.strip().lower()
            else:
                raise UsageError(f"attacks must be specs or Attack instances, got {a!r}")
            if name in names:
                raise UsageError(f"attack {name!r} is listed twice")
            names.append(name)
            self._protos.append(proto)
        unknown = set(self.attack_options) - set(names)
        if unknown:
            raise UsageError(f"attack_options for attacks not in the suite: {sorted(unknown)}")
        self.attacks = names
        self._specs = list(attacks)
        ranked = sorted(range(len(names)), key=lambda i: (self._protos[i].cost, i))
        self.order = [names[i] for i in ranked]

    def _make(self, spec: str, eps: float, radius_index: int | None = None) -> Attack:
        kw = dict(self.attack_options.get(spec.strip().lower(), {}))
        kw.setdefault("seed", self.seed)
        kw.setdefault("batch_size", self.batch_size)
        return make_attack(spec, self.norm, eps, **kw)

    def _attack_for(self, k: int, eps: float, radius_index: int) -> Attack:
        spec = self._specs[k]
        if isinstance(spec, Attack):
            attack = copy.copy(spec)
            attack.eps = float(eps)
            return attack
        return self._make(spec, eps, radius_index)

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        radii: Sequence[float],
        *,
        state: "SuiteResult | dict[str, torch.Tensor] | None" = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        on_checkpoint: Callable[[SuiteResult], None] | None = None,
        sample_ids: torch.Tensor | None = None,
        spill: "str | os.PathLike[str] | bool | None" = None,
        clean_pred: torch.Tensor | None = None,
    ) -> SuiteResult:
        """Evaluate ``model`` on ``(x, y)`` at every radius; returns the per-sample :class:`SuiteResult`.

        ``on_progress(event)`` receives dicts with ``attack``, ``radius``,
        ``done``, ``total`` and ``seconds`` while an (attack, radius) pair runs.
        ``sample_ids`` (``(N,)`` integers, default ``0..N-1``) identify the rows for
        the per-sample random streams: a sample attacked as row ``j`` of a shard with
        ``sample_ids[j] = i`` gets the random starts it gets as row ``i`` of the whole
        set (pyautoattack components keep their own batch-wise RNG).
        ``spill``: keep ``x_adv`` in a file (a path: that file, kept for resume; True: an anonymous temporary
        file) instead of in memory (only on Linux: elsewhere it stays in memory); the results are the same.
        ``clean_pred``: the model's ``(N,)`` clean predictions when the caller already has them (the suite's
        own clean pass is skipped; ``NON_FINITE`` counts as wrong).
        """
        check_inputs(model, x, y)
        ids = check_sample_ids(sample_ids, x.shape[0])
        radii_l = self._check_radii(radii)
        n = x.shape[0]
        if n == 0:
            raise UsageError("the evaluation set is empty")
        fp = data_fingerprint(x, y)
        if state is not None:
            result = self._restore(state, radii_l, fp)
        else:
            if clean_pred is not None and tuple(clean_pred.shape) != (n,):
                raise UsageError(f"clean_pred must have shape ({n},), got {tuple(clean_pred.shape)}")
            clean = (self._clean_correct(model, x, y) if clean_pred is None
                     else clean_pred.detach().cpu().long() == y.detach().cpu().long())
            broken_by = torch.full((len(radii_l), n), ROBUST, dtype=torch.long)
            broken_by[:, ~clean] = CLEAN_WRONG
            result = SuiteResult(
                attacks=list(self.attacks), order=list(self.order), radii=radii_l, norm=self.norm,
                clean_correct=clean, broken_by=broken_by,
                x_adv=spilled_copy(x, spill) if spills(spill) else x.detach().cpu().clone(),
                adv_radius=torch.full((n,), float("nan")), fingerprint=fp,
            )
        if state is not None and spills(spill):
            respill(result, x, spill)
        from robkd.utils.progress import progress_bar, rate_text

        bar_ctx = progress_bar() if self.progress else _null_progress()
        with bar_ctx as bar:
            for name in self.order:  # attacks outer, radii inner: see the module docstring
                for ri, eps in enumerate(radii_l):
                    if (name, eps) in result.done:
                        continue
                    k = self.attacks.index(name)
                    self._run_pair(model, x, y, ids, result, k, ri, eps, bar, on_progress, rate_text)
                    result.done.add((name, eps))
                    if on_checkpoint is not None:
                        on_checkpoint(result)
        return result

    def _run_pair(self, model, x, y, ids, result, k, ri, eps, bar, on_progress, rate_text) -> None:
        name = self.attacks[k]
        idx = (result.broken_by[ri] == ROBUST).nonzero().flatten()
        total = int(idx.numel())
        task = bar.add_task(f"{name} @ {format_radius(eps)}", total=max(total, 1), rate="") if bar is not None else None
        start = time.perf_counter()
        done = [0]

        def on_batch(m: int) -> None:
            done[0] += m
            secs = time.perf_counter() - start
            if bar is not None:
                bar.update(task, completed=done[0], rate=rate_text(done[0], secs))
            if on_progress is not None:
                on_progress({"attack": name, "radius": eps, "done": done[0], "total": total, "seconds": secs})

        if total == 0:
            on_batch(0)
        else:
            attack = self._attack_for(k, eps, ri)
            # an attack that batches through the base class gets its own batches one at a time (identical
            # results, no copy of the whole set); one that batches itself (pyautoattack) gets them all at once
            step = attack.batch_size if attack.base_batching else total
            bad = 0
            for s in range(0, total, step):
                part = idx[s : s + step]
                idx_dev = part.to(x.device)
                xs, ys = x[idx_dev], y[idx_dev]
                out = attack.run(model, xs, ys, on_batch=on_batch, sample_ids=ids[part])
                ok = verify_adversarial(model, xs, out.x_adv, ys, self.norm, eps).cpu()
                claimed = out.success.cpu()
                bad += int((claimed & ~ok).sum())
                hit = claimed & ok
                hit_idx = part[hit]
                if hit_idx.numel():
                    later = result.broken_by[ri:, hit_idx]
                    result.broken_by[ri:, hit_idx] = torch.where(later == ROBUST, torch.full_like(later, k), later)
                    put_rows(result.x_adv, hit_idx,
                             out.x_adv[hit.to(out.x_adv.device)].detach().cpu().to(result.x_adv.dtype))
                    result.adv_radius[hit_idx] = float(eps)
                del xs, ys, out
            if bad:
                result.rejected[f"{name}@{eps!r}"] = result.rejected.get(f"{name}@{eps!r}", 0) + bad
                logger.warning("%s at radius %s: %d claimed adversarial example(s) failed the re-check "
                               "(outside the ball or [0,1], or correctly classified) and were not counted",
                               name, format_radius(eps), bad)
        result.seconds[name] = result.seconds.get(name, 0.0) + (time.perf_counter() - start)
        if bar is not None:
            bar.update(task, visible=False)

    def _check_radii(self, radii: Sequence[float]) -> list[float]:
        if isinstance(radii, (int, float)):
            radii = [radii]
        try:
            vals = [float(r) for r in radii]
        except (TypeError, ValueError) as exc:
            raise UsageError(f"radii must be numbers, got {radii!r}") from exc
        if not vals:
            raise UsageError("radii must be a non-empty list")
        for r in vals:
            if not (r >= 0) or r == float("inf"):
                raise UsageError(f"radius must be finite and >= 0, got {r!r}")
        return sorted(set(vals))

    def _clean_correct(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        device = model_device(model)
        out = torch.zeros(x.shape[0], dtype=torch.bool)
        with attack_mode(model), torch.no_grad():
            for s in range(0, x.shape[0], self.batch_size):
                logits = model(x[s : s + self.batch_size].to(device))
                out[s : s + self.batch_size] = correct(logits, y[s : s + self.batch_size].to(device)).cpu()
        return out

    def _restore(self, state: "SuiteResult | dict[str, torch.Tensor]", radii: list[float], fp: list[float]) -> SuiteResult:
        result = state if isinstance(state, SuiteResult) else SuiteResult.from_tensors(state)
        if result.attacks != self.attacks or result.norm is not self.norm:
            raise UsageError(f"the saved state is for attacks {result.attacks} ({result.norm.value}), "
                             f"not {self.attacks} ({self.norm.value})")
        if result.radii != radii:
            raise UsageError(f"the saved state is for radii {result.radii}, not {radii}")
        if result.fingerprint and (len(result.fingerprint) != len(fp) or any(
                abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(result.fingerprint, fp))):
            raise UsageError("the saved state was computed on different samples (data fingerprint differs)")
        result.order = list(self.order)
        return result


class _null_progress:
    """Context manager standing in for a progress bar when progress is off."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
