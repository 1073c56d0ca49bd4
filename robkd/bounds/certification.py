"""Certification: ``certify`` (certified accuracy at one radius) and ``certify_radii`` (several radii).

Every margin ``logit_y - logit_j`` is bounded directly (specification matrix
:func:`~robkd.bounds.compute.margin_matrix`) by a cascade of ever costlier bounds (IBP, CROWN on IBP
intermediate bounds with a counterexample check, full CROWN, alpha-CROWN); samples whose ball lies in
one linear region get the exact minimum margin (:mod:`robkd.bounds.regions`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from torch import nn

from robkd.bounds.checks import batch_input_shape, check_batch_size, in_eval_mode
from robkd.bounds.compute import margin_matrix
from robkd.bounds.graph import METHODS, BoundedModel
from robkd.bounds.inputset import InputSet, concretize
from robkd.bounds.regions import affine_margin, count_unstable, pieces_decided
from robkd.errors import UsageError
from robkd.types import Norm
from robkd.utils.logits import correct

BACKENDS = ("robkd", "auto_lirpa")


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
    ``crown-ibp``, ``counterexample``, ``crown``, ``alpha-crown``; ``misclassified`` / ``skipped`` for
    samples no bound was needed for).
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
    fallbacks: list[str] = dataclasses.field(default_factory=list)  # per sample: stages skipped (budget), "" if none
    sample_seconds: list[float] = dataclasses.field(default_factory=list)  # per sample (budget), else empty

    @property
    def n(self) -> int:
        return int(self.certified.numel())

    @property
    def certified_accuracy(self) -> float:
        """``k / n`` from the integer count (not a float32 mean)."""
        return int(self.certified.sum()) / self.n if self.n else 0.0

    @property
    def linear_region_fraction(self) -> float:
        return int(self.linear_region.sum()) / self.n if self.n else 0.0

    def summary(self) -> dict[str, Any]:
        """Aggregate figures (JSON-ready): the result entry of :mod:`robkd.bounds.records` without per-sample lists."""
        d = self.to_dict()
        d.pop("per_sample")
        return d

    def to_dict(self) -> dict[str, Any]:
        """The ``certify.json`` result entry (docs/certify-schema.md): counts, exact fractions with intervals,
        per-sample lists."""
        from robkd.bounds.records import bound_entry

        return bound_entry(self)


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
    region_stats: bool = True,
    bounded: BoundedModel | None = None,
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
    status ``skipped`` (never ``certified``).
    The model runs in eval mode (every module's mode restored afterwards).

    ``bounded``: a :class:`BoundedModel` of ``model`` already built for this input shape (saves tracing again).

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
    check_batch_size(batch_size)
    shape = batch_input_shape(x)
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise UsageError(f"y must be a (B,) label tensor matching x, got {getattr(y, 'shape', type(y))}")
    skip = _check_skip(skip, x.shape[0])
    t0 = time.perf_counter()
    bm = bounded if bounded is not None and bounded.model is model and bounded.input_shape == shape else BoundedModel(model, shape)
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
            xb, yb = x[s : s + batch_size].to(bm.dtype), y[s : s + batch_size]
            skip_b = skip[s : s + batch_size].to(xb.device)
            wanted = ~skip_b & (clean[s : s + batch_size] if early_exit else torch.ones_like(skip_b))
            lb, unst, lin, fals, how = _certify_batch(
                model, bm, xb, yb, float(eps), norm, method, K, wanted, early_exit=early_exit, intermediate=intermediate,
                alpha_steps=alpha_steps, region_stats=region_stats,
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
            if not bool(clean[i]):
                decided[i] = "misclassified"
        elif bool(skip[i]):
            status.append("skipped")
            decided[i] = "skipped"
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
    wanted: torch.Tensor, *, early_exit: bool, intermediate: str, alpha_steps: int, region_stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Margin lower bounds, unstable counts, linear-region flags, counterexample flags and the deciding
    bound of one batch.

    Samples outside ``wanted`` get IBP only. With ``early_exit``, samples are dropped from the
    costlier stages as soon as a cheaper bound certifies them or a counterexample is found. With
    ``region_stats`` the unstable counts and linear-region flags of every sample come from the
    method's intermediate bounds (CROWN for crown/alpha-crown) whatever stage decided it."""
    B = x.shape[0]
    C = margin_matrix(y, K).to(x.dtype)
    inputs = InputSet.around(x, eps, norm)
    nb_ibp = bm.intermediate_bounds(inputs, False)
    lb, _, _ = bm.bounds(x, eps, norm=norm, method="ibp", C=C, node_bounds=nb_ibp)
    how = ["ibp" if bool(w) else "not-requested" for w in wanted]
    unst = count_unstable(bm, nb_ibp, B)
    pieces = pieces_decided(bm, nb_ibp, B)
    todo = wanted.clone()
    if method != "ibp" and early_exit:
        todo &= ~(lb > 0).all(1)
    falsified = torch.zeros(B, dtype=torch.bool, device=x.device)
    if method != "ibp" and bool(todo.any()):
        # CROWN on IBP intermediate bounds (CROWN-IBP): cheap, decides many samples; the input points
        # minimising its linear bounds are checked as counterexamples (a real one rules certification out)
        idx = todo.nonzero().squeeze(1)
        sub = {k: (v[0][idx], v[1][idx]) for k, v in nb_ibp.items()}
        sub_inputs = inputs.select(idx)
        spec = C[idx].reshape(idx.shape[0], C.shape[1], *bm.ops[bm.index[bm.output_name]].out_shape)
        A, bias = bm.backward(bm.output_name, spec, sub, relax=bm.relaxations(sub))
        lb_c = torch.maximum(concretize(A, bias, sub_inputs), lb[idx])
        if intermediate == "ibp" and method == "alpha-crown":
            lb_a, _, _ = bm.bounds(x[idx], eps, norm=norm, method=method, C=C[idx], node_bounds=sub, upper=False,
                                   alpha_steps=alpha_steps)
            lb_c = torch.maximum(lb_c, lb_a)
        cert_c = (lb_c > 0).all(1)
        if A is not None:
            falsified[idx] = _corner_counterexample(model, A, sub_inputs, y[idx], C[idx]) & ~cert_c
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
        lb_f, _, nb = bm.bounds(x[idx], eps, norm=norm, method="crown", C=C[idx], upper=False)
        lb[idx] = torch.maximum(lb[idx], lb_f)
        unst[idx] = count_unstable(bm, nb, idx.shape[0])
        pieces[idx] = pieces_decided(bm, nb, idx.shape[0])
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
            nb_r = bm.intermediate_bounds(inputs.select(rest), True)
            unst[rest] = count_unstable(bm, nb_r, rest.shape[0])
            pieces[rest] = pieces_decided(bm, nb_r, rest.shape[0])
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
            lb[r] = torch.maximum(lb[r], affine_margin(bm, x[r], eps, norm, C[r], sub))
    return lb, unst, lin, falsified, how


def _corner_counterexample(
    model: nn.Module, A: torch.Tensor, inputs: InputSet, y: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """Per sample, whether a point minimising one of the linear lower bounds ``A x`` over the input set
    (a box corner under Linf; the ball point along ``-A``, clipped to [0,1], under L2) is misclassified."""
    n, S = A.shape[0], A.shape[1]
    A = A.expand(n, *A.shape[1:]) if A.shape[0] != n else A
    lo, hi = (t.unsqueeze(1) for t in inputs.box)
    if inputs.norm is Norm.LINF:
        pts = torch.where(A >= 0, lo, hi)
    else:
        flat = A.reshape(n, S, -1)
        step = flat / flat.norm(dim=-1, keepdim=True).clamp(min=1e-12) * inputs.eps.view(n, 1, 1)
        pts = (inputs.x.reshape(n, 1, -1) - step).clamp(0.0, 1.0).reshape(A.shape)
    logits = model(pts.reshape((n * S,) + tuple(inputs.x.shape[1:]))).reshape(n, S, -1)
    margins = logits @ C.transpose(1, 2)  # (n, S points, S margins)
    return (margins < 0).flatten(1).any(1)


def _mask(idx: torch.Tensor, n: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool, device=idx.device)
    m[idx] = True
    return m
