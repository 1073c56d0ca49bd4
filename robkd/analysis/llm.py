"""Local linearity measure (LLM, Qin et al. 2019; KDIGA paper, Definition 2).

Per sample::

    LLM(f, x, d) = max_{||e|| <= d, x+e in [0,1]^D} |CE(f(x+e), y) - CE(f(x), y) - e . g|,
    g = grad_x CE(f(x), y)   (taken once, at x)

The paper's definition maximises over the whole ``d``-ball; robkd restricts the
maximisation to valid images (``x + e`` inside the [0,1] box), as attacks do,
so the measure describes the loss surface where an adversary can actually go.

The maximum is *estimated from below*: projected sign ascent (Linf) or
normalised-gradient ascent (L2) on ``|r(e)|`` from uniform random starts, and
each sample keeps the largest value seen at any iterate of any restart (``e = 0``,
where the value is 0, is always a candidate). A better optimiser can only find
a larger value, never a smaller one.

Note: the remainder measures the curvature of the *loss*, not of the network.
A network whose logits are affine on the ball (e.g. a ReLU net inside one linear
region) still has a non-zero LLM in general, because cross-entropy (log-sum-exp
minus a logit) is itself curved; it is ~0 only where the softmax is saturated
(or the logits move uniformly).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robkd.errors import UsageError
from robkd.types import Norm
from robkd.utils.modules import ce_input_gradient, eval_mode
from robkd.utils.validate import check_int

log = logging.getLogger(__name__)

ESTIMATE_NOTE = (
    "LLM is an estimate from below of the maximum in Definition 2 (best value found by projected "
    "ascent over iterates and restarts); the maximum is taken over the ball intersected with the "
    "[0,1] image box."
)

__all__ = [
    "ESTIMATE_NOTE",
    "input_gradient",
    "local_linearity",
    "local_linearity_report",
]


# ---------------------------------------------------------------------------
# validation helpers (shared with prop2)


def check_model(model: Any, name: str = "model") -> nn.Module:
    """The model must be a ``torch.nn.Module`` taking [0,1] inputs."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"{name} must be a torch.nn.Module (a RobustModel taking [0,1] inputs), got {type(model).__name__}")
    return model


def check_eps(eps: Any) -> float:
    """A radius: a finite number >= 0."""
    if isinstance(eps, bool):
        raise UsageError(f"eps must be a number >= 0, got {eps!r}")
    try:
        value = float(eps)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"eps must be a number >= 0, got {eps!r}") from exc
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"eps must be finite and >= 0, got {eps!r}")
    return value


def check_inputs(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` float (N, ...) in [0,1], ``y`` integer labels (N,)."""
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.dim() < 2 or x.shape[0] == 0:
        raise UsageError("x must be a non-empty floating-point tensor (N, ...) in [0,1]")
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise UsageError("x must lie in [0,1] pixel space (normalisation belongs inside the model)")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise UsageError(f"y must be a 1-D label tensor of length {x.shape[0]}")
    if y.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.bool):
        raise UsageError(f"y must hold integer class labels, got dtype {y.dtype}")
    if bool((y < 0).any()):
        raise UsageError("y must hold class labels >= 0")
    return x.detach(), y.detach().long()


def _checked_logits(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise UsageError(f"model must return logits of shape (B, K), got {tuple(logits.shape)}")
    if int(y.max()) >= logits.shape[1]:
        raise UsageError(f"label {int(y.max())} out of range for a model with {logits.shape[1]} classes")
    return logits


def per_sample_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy ``(B,)`` of ``model(x)`` against ``y``."""
    return F.cross_entropy(_checked_logits(model, x, y), y, reduction="none")


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``CE(f(x), y)`` and its input gradient ``grad_x CE`` (same shape as ``x``), detached
    (:func:`robkd.utils.modules.ce_input_gradient`). The caller sets eval mode (BatchNorm then acts per sample).
    """
    ce, g, _ = ce_input_gradient(lambda z: _checked_logits(model, z, y), x, y)
    return ce, g


class BestTracker:
    """Wraps an ascent objective and records, per sample, the best value at feasible points.

    ``fn(z) -> (objective, value)``: the ascent follows ``objective``; ``value``
    (``(B,)``, detached) is recorded whenever ``z`` lies in the ``norm``-ball of
    radius ``eps`` around ``x`` and in [0,1]. Every evaluated point counts, so the
    record is the best over all iterates the optimiser visited.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        x: torch.Tensor,
        norm: Norm,
        eps: float,
        initial: torch.Tensor,
    ) -> None:
        self.fn, self.x, self.norm, self.eps = fn, x, norm, eps
        self.best = initial.detach().clone()
        self.rejected = 0

    def feasible(self, z: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: ``z`` is in the ball (small float tolerance) and in [0,1]."""
        d = (z.detach() - self.x).flatten(1)
        n = d.abs().amax(dim=1) if self.norm is Norm.LINF else d.norm(p=2, dim=1)
        tol = 1e-5 * self.eps + 1e-6
        flat = z.detach().flatten(1)
        in_box = (flat.amin(dim=1) >= 0.0) & (flat.amax(dim=1) <= 1.0)
        return (n <= self.eps + tol) & in_box

    def record(self, z: torch.Tensor, value: torch.Tensor) -> None:
        """Record ``value`` (``(B,)``) of the point ``z`` where it is feasible and finite."""
        feas = self.feasible(z)
        ok = feas & torch.isfinite(value)
        self.rejected += int((~feas).sum())
        self.best = torch.where(ok & (value > self.best), value.detach(), self.best)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        objective, value = self.fn(z)
        self.record(z, value.detach())
        return objective


def ascent(
    tracker: BestTracker,
    x: torch.Tensor,
    *,
    norm: Norm,
    eps: float,
    steps: int,
    step_size: float,
    random_start: "str | None",
    generator: torch.Generator,
) -> None:
    """One ascent run through the attacks team's PGD primitive; the last iterate is recorded too."""
    from robkd.attacks.pgd import projected_gradient_ascent

    x_last = projected_gradient_ascent(
        tracker, x, norm=norm, eps=eps, steps=steps, step_size=step_size,
        random_start=random_start, generator=generator,
    )
    with torch.no_grad():
        tracker(x_last)


def default_step_size(eps: float, steps: int) -> float:
    """``2.5 * eps / steps`` (Madry et al.'s rule; 0 when there are no steps)."""
    return 2.5 * eps / steps if steps > 0 else 0.0


def check_step_size(step_size: Any, eps: float, steps: int) -> float:
    if step_size is None:
        return default_step_size(eps, steps)
    if isinstance(step_size, bool):
        raise UsageError(f"step_size must be a number > 0, got {step_size!r}")
    try:
        value = float(step_size)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"step_size must be a number > 0, got {step_size!r}") from exc
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"step_size must be finite and > 0, got {step_size!r}")
    return value


def local_linearity(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: "Norm | str" = Norm.LINF,
    steps: int = 20,
    restarts: int = 1,
    step_size: "float | None" = None,
    seed: int = 0,
    random_start: "str | None" = "uniform",
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-sample LLM estimate ``(N,)`` (an estimate from below of Definition 2's maximum).

    ``restarts`` runs of ``steps`` steps of projected ascent on
    ``|CE(f(x+e)) - CE(f(x)) - e . grad_x CE(f(x))|`` with step ``step_size``
    (default ``2.5 * eps / steps``) from ``random_start`` (uniform in the
    ball ∩ [0,1] by default), seeded by ``seed``. Each sample keeps the largest
    value found at any iterate of any restart (at least 0, the value at ``e = 0``).
    ``e`` ranges over the ``norm``-ball of radius ``eps`` intersected with the
    [0,1] image box. The model runs in eval mode (restored afterwards); only
    input gradients are taken.
    """
    model = check_model(model)
    norm = Norm.parse(norm)
    eps = check_eps(eps)
    steps = check_int(steps, "steps", 0)
    restarts = check_int(restarts, "restarts", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    alpha = check_step_size(step_size, eps, steps)
    x, y = check_inputs(x, y)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if x.device.type != "cpu":
        gen = torch.Generator(device=x.device).manual_seed(int(seed))
    out = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    if eps == 0.0:
        return out
    rejected = 0
    with eval_mode(model):
        for s in range(0, x.shape[0], batch_size):
            xb, yb = x[s : s + batch_size], y[s : s + batch_size]
            ce0, g = input_gradient(model, xb, yb)

            def objective(z: torch.Tensor, xb=xb, yb=yb, ce0=ce0, g=g) -> tuple[torch.Tensor, torch.Tensor]:
                lin = ((z - xb) * g).flatten(1).sum(dim=1)
                r = (per_sample_ce(model, z, yb) - ce0 - lin).abs()
                return r, r.detach()

            tracker = BestTracker(objective, xb, norm, eps, torch.zeros_like(ce0))
            for _ in range(restarts):
                ascent(tracker, xb, norm=norm, eps=eps, steps=steps, step_size=alpha,
                        random_start=random_start, generator=gen)
            rejected += tracker.rejected
            out[s : s + xb.shape[0]] = tracker.best
    if rejected:
        log.warning("local_linearity: %d iterate(s) outside the ball/box were ignored", rejected)
    return out


def summarize(values: torch.Tensor) -> dict[str, float]:
    """Mean, median, min, max of a per-sample tensor (floats, JSON-safe)."""
    v = values.detach().double().cpu()
    if v.numel() == 0:
        return {"mean": float("nan"), "median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {
        "mean": float(v.mean()),
        "median": float(v.median()),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def local_linearity_report(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    radii: Sequence[float],
    *,
    norm: "Norm | str" = Norm.LINF,
    steps: int = 20,
    restarts: int = 1,
    step_size: "float | None" = None,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """LLM of several models (e.g. ``{"teacher": t, "student": s}``) at each radius, JSON-serialisable.

    Returns ``{"estimate": "lower", "note": ..., "norm", "steps", "restarts", "seed",
    "models": {name: {radius_str: {"eps", "mean", "median", "min", "max", "per_sample": [...]}}}}``.
    ``step_size`` (if given) is used at every radius; by default it is ``2.5 * eps / steps``.
    """
    from robkd.types import format_radius

    norm = Norm.parse(norm)
    if not isinstance(models, Mapping) or not models:
        raise UsageError("models must be a non-empty mapping name -> model")
    if isinstance(radii, (int, float)):
        radii = [radii]
    radii = [check_eps(r) for r in radii]
    if not radii:
        raise UsageError("radii must not be empty")
    report: dict[str, Any] = {
        "estimate": "lower",
        "note": ESTIMATE_NOTE,
        "norm": norm.value,
        "steps": steps,
        "restarts": restarts,
        "seed": seed,
        "models": {},
    }
    for name, model in models.items():
        per_radius: dict[str, Any] = {}
        for r in radii:
            v = local_linearity(model, x, y, r, norm=norm, steps=steps, restarts=restarts,
                                step_size=step_size, seed=seed, batch_size=batch_size)
            entry: dict[str, Any] = {"eps": r}
            entry.update(summarize(v))
            entry["per_sample"] = [float(a) for a in v.detach().cpu().tolist()]
            per_radius[format_radius(r)] = entry
        report["models"][str(name)] = per_radius
    return report
