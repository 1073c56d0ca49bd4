"""Bound propagation cost as a multiple of one forward pass (same batch, no_grad).

``robkd.bounds.compute_bounds(model, x, eps, method=...)`` for IBP and CROWN
(including its fx trace on every call, as a user calls it) against ``model(x)``
and against the naive lower/upper interval arithmetic of ``bench/naive.py``.
Equality/soundness checks: robkd's IBP bounds equal the naive IBP bounds
(different algorithm: centre/radius vs lower/upper form) up to float round-off;
both IBP and CROWN bounds contain the logits of the clean input, of random
points of the ball and of its random corners (a violated bound is a bug); the
note gives the share of logit bounds where CROWN is at least as tight as IBP.
"""

from __future__ import annotations

import torch

from bench import naive
from bench.common import Config, Row, fmnist_inputs, make_row, small_cnn, time_interleaved

FAMILY = "bounds"


def _contains(model, x, eps, lb, ub, n_samples: int = 32, seed: int = 0) -> bool:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pts = [x]
        for i in range(n_samples):
            u = torch.rand(x.shape, generator=g) * 2 - 1
            if i % 2:
                u = u.sign()  # a corner of the Linf ball
            pts.append((x + eps * u).clamp(0, 1))
        tol = 1e-4 * max(1.0, float(ub.abs().max()))
        return all(bool(((model(p) >= lb - tol) & (model(p) <= ub + tol)).all()) for p in pts)


def run(cfg: Config) -> list[Row]:
    from robkd.bounds import BoundedModel, compute_bounds
    from robkd.types import Norm

    rows: list[Row] = []
    n = 32 if cfg.quick else 128
    x, _ = fmnist_inputs(n, cfg.seed)
    model = small_cnn("trained", cfg.seed)
    eps = 0.01
    case = f"cnn_small trained, fmnist n={n}, eps={eps}"
    fns = {
        "forward": lambda: _fwd(model, x),
        "robkd_ibp": lambda: compute_bounds(model, x, eps, method="ibp", batch_size=n),
        "naive_ibp": lambda: _naive(model, x, eps),
    }
    bm = BoundedModel(model, tuple(x.shape[1:]))

    def traced(method: str):
        with torch.no_grad():
            return bm.bounds(x, eps, norm=Norm.LINF, method=method)[:2]

    fns["robkd_ibp_pretraced"] = lambda: traced("ibp")
    lb_i, ub_i = fns["robkd_ibp"]()
    lb_n, ub_n = fns["naive_ibp"]()
    nc = 8 if cfg.quick else 16  # CROWN with CROWN intermediate bounds is far costlier: a smaller batch
    xc = x[:nc]
    cfns = {
        "forward": lambda: _fwd(model, xc),
        "robkd_crown": lambda: compute_bounds(model, xc, eps, method="crown", batch_size=nc),
        "robkd_crown_ibp_intermediate": lambda: compute_bounds(model, xc, eps, method="crown", intermediate="ibp",
                                                               batch_size=nc),
    }
    lb_c, ub_c = cfns["robkd_crown"]()
    lb_ic, ub_ic = lb_i[:nc], ub_i[:nc]
    d_ibp = max(float((lb_i - lb_n).abs().max()), float((ub_i - ub_n).abs().max()))
    scale = float(ub_n.abs().max())
    ibp_equal = d_ibp <= 1e-4 * max(1.0, scale)
    sound_ibp = _contains(model, x, eps, lb_i, ub_i)
    sound_crown = _contains(model, xc, eps, lb_c, ub_c)
    tighter = float(((lb_c >= lb_ic - 1e-6) & (ub_c <= ub_ic + 1e-6)).float().mean())
    check_ibp = (f"robkd IBP vs naive IBP: max |diff| {d_ibp:.2e} (bounds up to {scale:.1f}); IBP contains clean, "
                 f"random and corner points: {sound_ibp}")
    check_crown = f"CROWN contains clean, random and corner points: {sound_crown}"
    times = time_interleaved(fns, repeats=cfg.repeats, warmup=cfg.warmup)
    rows.append(make_row(FAMILY, case, "robkd IBP / forward pass", times, "robkd_ibp", "forward", check=check_ibp,
                         check_ok=ibp_equal and sound_ibp))
    rows.append(make_row(FAMILY, case, "naive IBP / forward pass", times, "naive_ibp", "forward"))
    rows.append(make_row(FAMILY, case, "robkd IBP / naive IBP", times, "robkd_ibp", "naive_ibp"))
    rows.append(make_row(FAMILY, case, "robkd IBP, model traced once (BoundedModel.bounds) / forward pass", times,
                         "robkd_ibp_pretraced", "forward", note="the difference to compute_bounds is the fx trace"))
    ctimes = time_interleaved(cfns, repeats=min(cfg.repeats, 3), warmup=cfg.warmup)
    ccase = f"cnn_small trained, fmnist n={nc}, eps={eps}"
    rows.append(make_row(FAMILY, ccase, "robkd CROWN / forward pass", ctimes, "robkd_crown", "forward",
                         check=check_crown, check_ok=sound_crown,
                         note=f"CROWN at least as tight as IBP on {tighter:.0%} of the logit bounds"))
    rows.append(make_row(FAMILY, ccase, "robkd CROWN with IBP intermediate bounds / forward pass", ctimes,
                         "robkd_crown_ibp_intermediate", "forward"))
    return rows


def _fwd(model, x):
    with torch.no_grad():
        return model(x)


def _naive(model, x, eps):
    with torch.no_grad():
        return naive.naive_ibp(model, x, eps)
