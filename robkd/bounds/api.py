"""Public bound API: ``compute_bounds``, ``certify`` (certified accuracy, linear regions), ``linear_region_radius``.

Linear regions (Proposition 1 of the KDIGA paper assumes one): if no ReLU's
pre-activation bounds over the ball straddle zero, the network is affine on the
ball. CROWN's backward pass is then the exact affine map, and for the Linf ball
intersected with [0,1] the minimum margin is attained at a box corner and
computed in closed form, so robustness is *decided* (certified or falsified),
not merely bounded.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from robkd.analysis.llm import eval_mode
from robkd.bounds import ops
from robkd.bounds.graph import METHODS, BoundedModel, _Ctx, _concretize, _eps_tensor, _input_box
from robkd.errors import UsageError
from robkd.types import Norm, format_radius
from robkd.utils.logits import correct

log = logging.getLogger(__name__)

BACKENDS = ("robkd", "auto_lirpa")

_F = TypeVar("_F", bound=Callable[..., Any])


def in_eval_mode(fn: _F) -> _F:
    """Decorator: run ``fn(model, ...)`` with ``model`` in eval mode; every module's previous mode is
    restored afterwards (BatchNorm uses, and never updates, its running statistics)."""

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(model, nn.Module):
            raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        with eval_mode(model):
            return fn(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _input_shape(model: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
        raise UsageError(f"x must be a non-empty batch tensor (B, ...), got {getattr(x, 'shape', type(x))}")
    if not torch.is_floating_point(x):
        raise UsageError(f"x must be a float tensor in [0,1], got {x.dtype}")
    lo, hi = float(x.min()), float(x.max())
    if not (0.0 <= lo and hi <= 1.0):
        raise UsageError(f"inputs must lie in [0,1] pixel space, got values in [{lo:.3g}, {hi:.3g}]")
    return tuple(int(s) for s in x.shape[1:])


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")


@in_eval_mode
def compute_bounds(
    model: nn.Module,
    x: torch.Tensor,
    eps: "float | torch.Tensor",
    *,
    norm: "Norm | str" = Norm.LINF,
    method: str = "crown",
    C: torch.Tensor | None = None,
    intermediate: str = "crown",
    alpha_steps: int = 20,
    batch_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sound lower/upper bounds of ``C @ model(x')`` for every ``x'`` in the ball around ``x``.

    The ball is ``{x' : ||x' - x|| <= eps} & [0,1]^n`` (``eps`` a float or a
    per-sample tensor). ``C`` is ``(S, K)`` or ``(B, S, K)``; identity (plain
    logit bounds) when None. Returns ``(lb, ub)`` of shape ``(B, S)``. The model runs in eval mode
    (restored afterwards).
    """
    norm = Norm.parse(norm)
    _check_batch_size(batch_size)
    bm = BoundedModel(model, _input_shape(model, x))
    bm.check(method)
    eps_all = _eps_tensor(eps, x)
    lbs, ubs = [], []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            Cb = C if C is None or C.dim() == 2 else C[s : s + batch_size]
            lb, ub, _ = bm.bounds(
                x[s : s + batch_size], eps_all[s : s + batch_size], norm=norm, method=method, C=Cb,
                intermediate=intermediate, alpha_steps=alpha_steps,
            )
            lbs.append(lb)
            ubs.append(ub)
    return torch.cat(lbs), torch.cat(ubs)


def margin_matrix(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Specification ``(B, K-1, K)``: row j is ``e_y - e_j`` for every ``j != y`` (increasing j)."""
    B = y.shape[0]
    others = torch.arange(num_classes, device=y.device).expand(B, num_classes)
    others = others[others != y.view(B, 1)].view(B, num_classes - 1)
    C = torch.zeros(B, num_classes - 1, num_classes, device=y.device)
    C.scatter_(2, y.view(B, 1, 1).expand(B, num_classes - 1, 1), 1.0)
    C.scatter_(2, others.unsqueeze(-1), -1.0)
    return C


@dataclasses.dataclass
class CertifyResult:
    """Per-sample certification at one radius.

    ``certified``: correctly classified and every margin lower bound > 0.
    ``margin_lb`` (N, K-1): lower bounds of ``logit_y - logit_j`` over the ball
    (exact minima where ``exact``). ``unstable``: unstable ReLUs per sample;
    ``linear_region``: no unstable ReLU (the network is affine on the ball).
    ``status``: ``certified`` / ``falsified`` (misclassified, not robust as
    decided exactly in a linear region, or a counterexample found at a point
    minimising CROWN's linear bound) / ``skipped`` (the caller's ``skip`` mask) /
    ``unknown``. ``decided_by``: the stage that decided each sample (``ibp``,
    ``crown-ibp``, ``counterexample``, ``crown``, ``alpha-crown``).
    """

    eps: float
    norm: Norm
    method: str
    backend: str
    certified: torch.Tensor
    margin_lb: torch.Tensor
    unstable: torch.Tensor
    total_relus: int
    linear_region: torch.Tensor
    clean_correct: torch.Tensor
    exact: torch.Tensor
    status: list[str]
    seconds: float = 0.0
    skipped: torch.Tensor | None = None
    decided_by: list[str] = dataclasses.field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.certified.numel())

    @property
    def certified_accuracy(self) -> float:
        return float(self.certified.float().mean()) if self.n else 0.0

    @property
    def linear_region_fraction(self) -> float:
        return float(self.linear_region.float().mean()) if self.n else 0.0

    def summary(self) -> dict[str, Any]:
        """Aggregate figures (JSON-ready)."""
        return {
            "eps": self.eps,
            "eps_str": format_radius(self.eps),
            "norm": self.norm.value,
            "method": self.method,
            "backend": self.backend,
            "n": self.n,
            "clean_accuracy": float(self.clean_correct.float().mean()) if self.n else 0.0,
            "certified_accuracy": self.certified_accuracy,
            "falsified": sum(s == "falsified" for s in self.status),
            "unknown": sum(s == "unknown" for s in self.status),
            "skipped": sum(s == "skipped" for s in self.status),
            "linear_region_fraction": self.linear_region_fraction,
            "mean_unstable_relus": float(self.unstable.float().mean()) if self.n else 0.0,
            "total_relus": self.total_relus,
            "seconds": self.seconds,
        }

    def to_dict(self) -> dict[str, Any]:
        """Summary plus per-sample lists."""
        worst = self.margin_lb.min(dim=1).values if self.margin_lb.shape[1] else torch.zeros(self.n)
        return {
            **self.summary(),
            "per_sample": {
                "certified": self.certified.tolist(),
                "clean_correct": self.clean_correct.tolist(),
                "status": list(self.status),
                "worst_margin_lb": [_finite(v) for v in worst.tolist()],
                "margin_exact": self.exact.tolist(),
                "unstable_relus": self.unstable.tolist(),
                "linear_region": self.linear_region.tolist(),
                "decided_by": list(self.decided_by),
            },
        }


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


@in_eval_mode
def certify(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: "Norm | str" = Norm.LINF,
    method: str = "crown",
    backend: str = "robkd",
    intermediate: str = "crown",
    alpha_steps: int = 20,
    batch_size: int = 128,
    early_exit: bool = True,
    skip: torch.Tensor | None = None,
    reference: bool = False,
    region_stats: bool = True,
) -> CertifyResult:
    """Certify ``model`` on ``(x, y)`` at radius ``eps``: margins ``y - j`` are bounded directly (spec matrix C).

    ``backend="auto_lirpa"`` uses a working auto_LiRPA installation for the
    margin bounds (unstable-ReLU counts always come from robkd's own pass).

    With ``early_exit`` (default) each sample gets only the bounds needed to decide it: IBP, then
    CROWN on IBP intermediate bounds, then full CROWN (then alpha-CROWN); misclassified samples get
    IBP only. ``certified`` and ``status`` are the same as without early exit; ``margin_lb`` then
    comes from the cheapest bounds that decided the sample (still sound, possibly looser; see
    ``decided_by``). ``unstable`` and ``linear_region`` come from the method's own intermediate bounds
    (CROWN for ``crown``/``alpha-crown`` with ``intermediate="crown"``) for every sample, decided early
    or not (``region_stats=False`` takes them from the deciding bounds instead: cheaper, but then they
    mix IBP and CROWN figures and are only a sound over-count of unstable ReLUs). ``skip`` (N,) bool marks samples the caller
    already knows cannot be certified (e.g. broken by a verified attack): they get IBP bounds only and
    status ``skipped`` (never ``certified``). ``reference=True`` runs the plain, slow intermediate pass.
    The model runs in eval mode (every module's mode restored afterwards).

    ``linear_region`` (and exact answers) need every piecewise-linear operator decided on the ball: no
    unstable ReLU and, for max pooling (IBP only), every window's maximum the same element throughout.
    """
    norm = Norm.parse(norm)
    if backend not in BACKENDS:
        raise UsageError(f"unknown bounds backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if method not in METHODS:
        raise UsageError(f"unknown bound method {method!r}: use one of {', '.join(METHODS)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise UsageError(f"eps must be a finite number >= 0, got {eps!r}")
    _check_batch_size(batch_size)
    shape = _input_shape(model, x)
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise UsageError(f"y must be a (B,) label tensor matching x, got {getattr(y, 'shape', type(y))}")
    skip = _check_skip(skip, x.shape[0])
    t0 = time.perf_counter()
    bm = BoundedModel(model, shape)
    bm.check(method)
    y = y.to(x.device).long()
    with torch.no_grad():
        logits = torch.cat([model(x[s : s + batch_size]) for s in range(0, x.shape[0], batch_size)])
    K = logits.shape[1]
    if y.min() < 0 or y.max() >= K:
        raise UsageError(f"labels must be in 0..{K - 1}")
    clean = correct(logits, y)  # a non-finite output is never certified (robkd.utils.logits)
    margins, unstable, linear, exact, falsified, decided = [], [], [], [], [], []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            xb, yb = x[s : s + batch_size].float(), y[s : s + batch_size]
            skip_b = skip[s : s + batch_size].to(xb.device)
            wanted = ~skip_b & (clean[s : s + batch_size] if early_exit else torch.ones_like(skip_b))
            lb, unst, lin, fals, how = _certify_batch(
                model, bm, xb, yb, float(eps), norm, method, K, wanted, early_exit=early_exit, intermediate=intermediate,
                alpha_steps=alpha_steps, reference=reference, region_stats=region_stats,
            )
            ex = lin.clone()
            if norm is Norm.L2:  # the dual-norm minimum is exact only when the ball lies inside [0,1]
                inside = ((xb - eps >= 0) & (xb + eps <= 1)).reshape(xb.shape[0], -1).all(1)
                ex &= inside
            margins.append(lb)
            falsified.append(fals)
            unstable.append(unst)
            linear.append(lin)
            exact.append(ex)
            decided += how
    margin_lb = torch.cat(margins)
    if backend == "auto_lirpa":
        from robkd.bounds.lirpa import lirpa_bounds

        lirpa_lb = lirpa_bounds(model, x, eps, norm=norm, method=method, C=margin_matrix(y, K), batch_size=batch_size)[0]
        margin_lb = lirpa_lb.to(margin_lb.device)
    unstable_t, linear_t, exact_t = torch.cat(unstable), torch.cat(linear), torch.cat(exact)
    falsified_t = torch.cat(falsified)
    if backend == "auto_lirpa":
        exact_t = torch.zeros_like(exact_t)
    robust = (margin_lb > 0).all(dim=1) if K > 1 else torch.ones_like(clean)
    certified = clean & robust & ~skip.to(clean.device)
    status = []
    for i in range(x.shape[0]):
        if bool(certified[i]):
            status.append("certified")
        elif not bool(clean[i]) or bool(exact_t[i]) or bool(falsified_t[i]):
            status.append("falsified")
        elif bool(skip[i]):
            status.append("skipped")
        else:
            status.append("unknown")
    return CertifyResult(
        eps=float(eps), norm=norm, method=method, backend=backend, certified=certified.cpu(), margin_lb=margin_lb.cpu(),
        unstable=unstable_t.cpu(), total_relus=bm.total_relus, linear_region=linear_t.cpu(), clean_correct=clean.cpu(),
        exact=exact_t.cpu(), status=status, seconds=time.perf_counter() - t0, skipped=skip.cpu(), decided_by=decided,
    )


def certify_radii(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    radii: "list[float] | tuple[float, ...]",
    *,
    skip: torch.Tensor | None = None,
    **kwargs: Any,
) -> list[CertifyResult]:
    """:func:`certify` at several radii (results in the order of ``radii``), largest radius first.

    A sample certified at a radius is certified at every smaller one (the smaller ball lies inside
    the larger one, so the larger ball's margin lower bounds hold for it too): such samples are not
    certified again and keep the larger radius' ``margin_lb`` (``decided_by = "larger-radius"``,
    ``exact`` False). Their ``unstable`` / ``linear_region`` are still those of their own radius
    (intermediate bounds only; with ``region_stats=False`` they are inherited too). The converse does
    not hold (a sample not certified at a radius may be certified at a smaller one), so nothing else
    is skipped. Other keyword arguments go to :func:`certify`.
    """
    if not isinstance(radii, (list, tuple)) or not radii:
        raise UsageError("radii must be a non-empty list of numbers")
    for r in radii:
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not math.isfinite(r) or r < 0:
            raise UsageError(f"every radius must be a finite number >= 0, got {r!r}")
    n = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else 0
    skip = _check_skip(skip, n)
    inherited: CertifyResult | None = None  # certified samples of the largest radius so far (full length)
    out: dict[int, CertifyResult] = {}
    for i in sorted(range(len(radii)), key=lambda k: -float(radii[k])):
        r = float(radii[i])
        known = inherited.certified.clone() if inherited is not None else torch.zeros(n, dtype=torch.bool)
        t0 = time.perf_counter()
        regions = kwargs.get("region_stats", True) and kwargs.get("method", "crown") != "ibp"
        if bool(known.all()):
            res = dataclasses.replace(inherited, eps=r, seconds=0.0, status=list(inherited.status),
                                      decided_by=["larger-radius"] * n, exact=torch.zeros(n, dtype=torch.bool),
                                      unstable=inherited.unstable.clone(), linear_region=inherited.linear_region.clone())
        else:
            rest = (~known).nonzero().squeeze(1)
            part = certify(model, x[rest], y[rest], r, skip=skip[rest], **kwargs)
            res = _merge_inherited(part, rest, inherited, known, r, time.perf_counter() - t0)
        if regions and inherited is not None and bool(known.any()):
            # certificates inherited, region statistics of this radius: the known rows get intermediate
            # bounds only (skipped: no certification stages run for them)
            k_idx = known.nonzero().squeeze(1)
            own = certify(model, x[k_idx], y[k_idx], r, skip=torch.ones(k_idx.shape[0], dtype=torch.bool), **kwargs)
            res.unstable[k_idx] = own.unstable.to(res.unstable.dtype)
            res.linear_region[k_idx] = own.linear_region
            res.seconds = time.perf_counter() - t0
        out[i] = res
        inherited = res
    return [out[i] for i in range(len(radii))]


def _merge_inherited(part: CertifyResult, rest: torch.Tensor, inherited: CertifyResult | None, known: torch.Tensor,
                     eps: float, seconds: float) -> CertifyResult:
    """A full-length result: rows ``rest`` from ``part``, the ``known`` (certified) rows from ``inherited``."""
    if inherited is None:
        part.seconds = seconds
        return part
    n = known.shape[0]

    def merge(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        t = old.clone()
        t[rest] = new.to(t.dtype)
        return t

    status = list(inherited.status)
    decided = ["larger-radius"] * n
    for j, k in enumerate(rest.tolist()):
        status[k] = part.status[j]
        decided[k] = part.decided_by[j]
    exact = torch.zeros(n, dtype=torch.bool)
    exact[rest] = part.exact
    return CertifyResult(
        eps=eps, norm=part.norm, method=part.method, backend=part.backend,
        certified=merge(part.certified, inherited.certified), margin_lb=merge(part.margin_lb, inherited.margin_lb),
        unstable=merge(part.unstable, inherited.unstable), total_relus=part.total_relus,
        linear_region=merge(part.linear_region, inherited.linear_region),
        clean_correct=merge(part.clean_correct, inherited.clean_correct), exact=exact, status=status,
        seconds=seconds, skipped=merge(part.skipped, inherited.skipped), decided_by=decided,
    )


def _check_skip(skip: torch.Tensor | None, n: int) -> torch.Tensor:
    if skip is None:
        return torch.zeros(n, dtype=torch.bool)
    if not isinstance(skip, torch.Tensor) or skip.dtype != torch.bool or skip.shape != (n,):
        raise UsageError(f"skip must be a ({n},) bool tensor, got {getattr(skip, 'shape', type(skip))}")
    return skip.cpu()


def _certify_batch(
    model: nn.Module, bm: BoundedModel, x: torch.Tensor, y: torch.Tensor, eps: float, norm: Norm, method: str, K: int,
    wanted: torch.Tensor, *, early_exit: bool, intermediate: str, alpha_steps: int, reference: bool,
    region_stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Margin lower bounds, unstable counts, linear-region flags, counterexample flags and the deciding
    bound of one batch.

    Samples outside ``wanted`` get IBP only. With ``early_exit``, samples are dropped from the
    costlier stages as soon as a cheaper bound certifies them or a counterexample is found. With
    ``region_stats`` the unstable counts and linear-region flags of every sample come from the
    method's intermediate bounds (CROWN for crown/alpha-crown) whatever stage decided it."""
    B = x.shape[0]
    C = margin_matrix(y, K)
    eps_t = _eps_tensor(eps, x)
    box = _input_box(x, eps_t)
    ctx = _Ctx(x, eps_t, norm, box)
    nb_ibp = bm._intermediate(ctx, False)
    lb, _, _ = bm.bounds(x, eps, norm=norm, method="ibp", C=C, node_bounds=nb_ibp)
    how = ["ibp" if bool(w) else "not-requested" for w in wanted]
    unst = _count_unstable(bm, nb_ibp, B)
    pieces = _pieces_decided(bm, nb_ibp, B)
    todo = wanted.clone()
    if method != "ibp" and early_exit:
        todo &= ~(lb > 0).all(1)
    falsified = torch.zeros(B, dtype=torch.bool, device=x.device)
    if method != "ibp" and bool(todo.any()):
        # CROWN on IBP intermediate bounds (CROWN-IBP): cheap, decides many samples; the input points
        # minimising its linear bounds are checked as counterexamples (a real one rules certification out)
        idx = todo.nonzero().squeeze(1)
        sub = {k: (v[0][idx], v[1][idx]) for k, v in nb_ibp.items()}
        sub_ctx = _Ctx(x[idx], eps_t[idx], norm, (box[0][idx], box[1][idx]))
        spec = C[idx].reshape(idx.shape[0], C.shape[1], *bm.ops[bm.index[bm.output_name]].out_shape)
        A, bias = bm.backward(bm.output_name, spec, sub, relax=bm._relax_all(sub))
        lb_c = torch.maximum(_concretize(A, bias, sub_ctx), lb[idx])
        if intermediate == "ibp" and method == "alpha-crown":
            lb_a, _, _ = bm.bounds(x[idx], eps, norm=norm, method=method, C=C[idx], node_bounds=sub, upper=False,
                                   alpha_steps=alpha_steps)
            lb_c = torch.maximum(lb_c, lb_a)
        cert_c = (lb_c > 0).all(1)
        if A is not None:
            falsified[idx] = _corner_counterexample(model, A, sub_ctx, y[idx], C[idx]) & ~cert_c
        if early_exit or intermediate == "ibp":
            lb[idx] = lb_c
            for i in idx.tolist():
                how[i] = "crown-ibp"
        if early_exit:
            todo[idx] = ~cert_c & ~falsified[idx]
            for i in idx[falsified[idx]].tolist():
                how[i] = "counterexample"
    if method != "ibp" and bool(todo.any()) and intermediate == "crown":
        idx = todo.nonzero().squeeze(1)
        lb_f, _, nb = bm.bounds(x[idx], eps, norm=norm, method="crown", C=C[idx], upper=False, reference=reference)
        lb[idx] = torch.maximum(lb[idx], lb_f)
        unst[idx] = _count_unstable(bm, nb, idx.shape[0])
        pieces[idx] = _pieces_decided(bm, nb, idx.shape[0])
        for i in idx.tolist():
            how[i] = "crown"
        if method == "alpha-crown":
            rest = ~(lb_f > 0).all(1) if early_exit else torch.ones_like(idx, dtype=torch.bool)
            if bool(rest.any()):
                r = rest.nonzero().squeeze(1)
                sub = {k: (v[0][r], v[1][r]) for k, v in nb.items()}
                lb_a, _, _ = bm.bounds(x[idx[r]], eps, norm=norm, method="alpha-crown", C=C[idx[r]], node_bounds=sub,
                                       upper=False, alpha_steps=alpha_steps)
                lb[idx[r]] = torch.maximum(lb[idx[r]], lb_a)
                for i in idx[r].tolist():
                    how[i] = "alpha-crown"
        stages = [(nb, idx)]
    else:
        stages = []
    full_rows = _mask(stages[0][1], B) if stages else torch.zeros(B, dtype=torch.bool, device=x.device)
    if region_stats and method != "ibp" and intermediate == "crown":
        # linear-region statistics with the method's own (CROWN) intermediate bounds for every sample the
        # full-CROWN stage did not reach (decided early, misclassified or skipped), so the unstable counts
        # and the linear-region fraction do not depend on how each sample was certified. A sample with no
        # unstable piece under IBP has none under the tighter bounds either.
        rest = (~full_rows & ((unst > 0) | ~pieces)).nonzero().squeeze(1)
        if rest.numel():
            nb_r = bm._intermediate(_Ctx(x[rest], eps_t[rest], norm, (box[0][rest], box[1][rest])), True,
                                    reference=reference)
            unst[rest] = _count_unstable(bm, nb_r, rest.shape[0])
            pieces[rest] = _pieces_decided(bm, nb_r, rest.shape[0])
            stages.append((nb_r, rest))
    lin = (unst == 0) & pieces
    if bool(lin.any()):
        # the network is affine on these balls: exact minimum, from the intermediate bounds that showed it
        covered = torch.zeros(B, dtype=torch.bool, device=x.device)
        for _, rows in stages:
            covered[rows] = True
        stages.append((nb_ibp, (~covered).nonzero().squeeze(1)))
        for nbs, rows in stages:
            sel = lin[rows]
            if not bool(sel.any()):
                continue
            r = rows[sel]
            sub = {k: (v[0][sel], v[1][sel]) for k, v in nbs.items()} if nbs is not nb_ibp else \
                {k: (v[0][r], v[1][r]) for k, v in nbs.items()}
            lb[r] = torch.maximum(lb[r], _affine_margin(bm, x[r], eps, norm, C[r], sub))
    return lb, unst, lin, falsified, how


def _corner_counterexample(model: nn.Module, A: torch.Tensor, ctx: _Ctx, y: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Per sample, whether a point minimising one of the linear lower bounds ``A x`` over the input set
    (a box corner under Linf; the ball point along ``-A``, clipped to [0,1], under L2) is misclassified."""
    n, S = A.shape[0], A.shape[1]
    A = A.expand(n, *A.shape[1:]) if A.shape[0] != n else A
    lo, hi = (t.unsqueeze(1) for t in ctx.box)
    if ctx.norm is Norm.LINF:
        pts = torch.where(A >= 0, lo, hi)
    else:
        flat = A.reshape(n, S, -1)
        step = flat / flat.norm(dim=-1, keepdim=True).clamp(min=1e-12) * ctx.eps.view(n, 1, 1)
        pts = (ctx.x.reshape(n, 1, -1) - step).clamp(0.0, 1.0).reshape(A.shape)
    logits = model(pts.reshape((n * S,) + tuple(ctx.x.shape[1:]))).reshape(n, S, -1)
    margins = logits @ C.transpose(1, 2)  # (n, S points, S margins)
    return (margins < 0).flatten(1).any(1)


def _mask(idx: torch.Tensor, n: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool, device=idx.device)
    m[idx] = True
    return m


def _count_unstable(bm: BoundedModel, nb, B: int) -> torch.Tensor:
    unst = torch.zeros(B, dtype=torch.long, device=next(iter(nb.values()))[0].device)
    for name in bm.relu_inputs:
        lo, hi = nb[name]
        unst += ((lo < 0) & (hi > 0)).reshape(B, -1).sum(1)
    return unst


def _pieces_decided(bm: BoundedModel, nb, B: int) -> torch.Tensor:
    """``(B,)`` bool: every piecewise-linear operator other than ReLU (max pooling) is decided on the set
    the node bounds ``nb`` enclose (always True for graphs without one; False for unknown kinds)."""
    ok = torch.ones(B, dtype=torch.bool, device=next(iter(nb.values()))[0].device)
    for op in bm.piecewise_ops:
        if isinstance(op, ops.MaxPool2d):
            ok &= op.decided(nb[op.inputs[0]]).to(ok.device)
        else:
            ok &= False
    return ok


def _affine_margin(bm: BoundedModel, x: torch.Tensor, eps: float, norm: Norm, C: torch.Tensor, nb) -> torch.Tensor:
    """Minimum of ``C @ f`` over the ball when ``f`` is affine there (all ReLUs stable, max-pooling windows
    decided): the backward pass is then the exact affine map, minimised in closed form at a box corner."""
    eps_t = _eps_tensor(float(eps), x)
    ctx = _Ctx(x, eps_t, norm, _input_box(x, eps_t))
    spec = C.reshape(C.shape[0], C.shape[1], *bm.ops[bm.index[bm.output_name]].out_shape)
    A, bias = bm.backward(bm.output_name, spec, nb)
    return _concretize(A, bias, ctx)


@in_eval_mode
def affine_map(model: nn.Module, x: torch.Tensor, eps: float = 0.0, *, norm: "Norm | str" = Norm.LINF):
    """Per-sample Jacobian and offset ``(J (B, K, n), c (B, K))`` of the network on the ball around ``x``,
    valid where the ball lies in one linear region (checked: raises UsageError otherwise)."""
    norm = Norm.parse(norm)
    bm = BoundedModel(model, _input_shape(model, x))
    bm.check("crown")
    with torch.no_grad():
        _, _, nb = bm.bounds(x, eps, norm=norm, method="crown")
        for name in bm.relu_inputs:
            lo, hi = nb[name]
            if bool(((lo < 0) & (hi > 0)).any()):
                raise UsageError("the ball is not inside one linear region (some ReLU is unstable)")
        out_shape = bm.ops[bm.index[bm.output_name]].out_shape
        K = math.prod(out_shape)
        spec = torch.eye(K, device=x.device).reshape((1, K) + out_shape)
        A, bias = bm.backward(bm.output_name, spec, nb)
    B = x.shape[0]
    if A is None:
        return torch.zeros(B, K, x[0].numel()), bias.expand(B, K)
    return A.reshape(A.shape[0], K, -1).expand(B, K, -1), bias.expand(B, K)


def default_radius_cap(norm: "Norm | str", n_inputs: int) -> float:
    """Default upper end of the linear-region bisection: the smallest radius whose ball contains the whole
    input cube [0,1]^n from any centre in it (Linf: 1; L2: sqrt(n), the cube's diameter)."""
    norm = Norm.parse(norm)
    if isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs <= 0:
        raise UsageError(f"n_inputs must be a positive integer, got {n_inputs!r}")
    return 1.0 if norm is Norm.LINF else math.sqrt(n_inputs)


def default_radius_tol(hi: float) -> float:
    """Default bisection tolerance: ``1e-4 * hi`` (about 14 bisection steps)."""
    return 1e-4 * float(hi)


@in_eval_mode
def linear_region_radius(
    model: nn.Module,
    x: torch.Tensor,
    *,
    norm: "Norm | str" = Norm.LINF,
    hi: float | None = None,
    tol: float | None = None,
    method: str = "crown",
    batch_size: int = 128,
) -> torch.Tensor:
    """Per sample, the largest radius (up to ``tol``, at most ``hi``) for which the bounds show the ball in
    one linear region (every ReLU stable, every max-pooling window decided), found by bisection.

    ``hi`` defaults to :func:`default_radius_cap` (Linf 1, L2 ``sqrt(n_inputs)``: the ball then covers
    the whole input cube), ``tol`` to ``1e-4 * hi``. A sample whose radius equals ``hi`` hit the cap.
    Each returned radius ``r`` is verified (sound: the bounds at ``r`` show no unstable piece, or
    ``r = 0``); below the cap the bounds at some radius ``<= r + tol`` show an unstable piece. The model
    runs in eval mode (restored afterwards).
    """
    norm = Norm.parse(norm)
    shape = _input_shape(model, x)
    if hi is None:
        hi = default_radius_cap(norm, math.prod(shape))
    if isinstance(hi, bool) or not (isinstance(hi, (int, float)) and math.isfinite(hi) and hi > 0):
        raise UsageError(f"hi must be a finite number > 0, got {hi!r}")
    if tol is None:
        tol = default_radius_tol(hi)
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and 0 < tol < hi):
        raise UsageError(f"tol must be in (0, hi), got {tol!r}")
    _check_batch_size(batch_size)
    if method not in METHODS:
        raise UsageError(f"unknown bound method {method!r}: use one of {', '.join(METHODS)}")
    bm = BoundedModel(model, shape)
    bm.check(method)
    use_crown = method != "ibp"

    def linear_at(xb: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        ctx = _Ctx(xb, e, norm, _input_box(xb, e))
        nb = bm._intermediate(ctx, use_crown)
        return (_count_unstable(bm, nb, xb.shape[0]) == 0) & _pieces_decided(bm, nb, xb.shape[0])

    out = []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size].float()
            n = xb.shape[0]
            lo = torch.zeros(n, device=xb.device)
            up = torch.full((n,), float(hi), device=xb.device)
            at_hi = linear_at(xb, up)
            lo = torch.where(at_hi, up, lo)
            active = ~at_hi
            while bool(active.any()) and float((up - lo)[active].max()) > tol:
                mid = (lo + up) / 2
                ok = linear_at(xb, mid)
                lo = torch.where(active & ok, mid, lo)
                up = torch.where(active & ~ok, mid, up)
            out.append(lo)
    return torch.cat(out).cpu()


def linear_region_radius_summary(
    radii: torch.Tensor, *, hi: float, tol: float, norm: "Norm | str", method: str, per_sample: bool = True,
) -> dict[str, Any]:
    """JSON-ready figures of :func:`linear_region_radius` results: ``mean``, ``median``, ``min``, ``max``,
    the bisection settings, ``capped`` (samples whose radius hit ``hi``) and their positions
    ``capped_samples``; with ``per_sample`` also the list ``per_sample``."""
    if not isinstance(radii, torch.Tensor) or radii.dim() != 1:
        raise UsageError(f"radii must be a 1-D tensor, got {getattr(radii, 'shape', type(radii))}")
    r = radii.detach().double().cpu()
    capped = r >= float(torch.tensor(float(hi), dtype=torch.float32))
    n = int(r.numel())
    out: dict[str, Any] = {
        "norm": Norm.parse(norm).value,
        "method": method,
        "hi": float(hi),
        "tol": float(tol),
        "n": n,
        "mean": float(r.mean()) if n else None,
        "median": float(r.median()) if n else None,
        "min": float(r.min()) if n else None,
        "max": float(r.max()) if n else None,
        "capped": int(capped.sum()),
        "capped_samples": capped.nonzero().flatten().tolist(),
    }
    if per_sample:
        out["per_sample"] = [float(v) for v in r.tolist()]
    return out
