"""PGD-k at one radius: robkd vs torchattacks, ART, a minimal loop and the physical limit.

Physical limit: ``k`` forward+backward-to-input passes plus one forward pass
with frozen parameters (bench.naive.physical_limit_pgd): no attack can do less.
All contenders run without random start (deterministic), so their adversarial
examples must agree: the equality check compares every sample's robust/broken
verdict (re-checked here with one forward pass and a radius check). robkd's
evaluation PGD also keeps every *iterate* that broke a sample (early exit), so it
may only break more samples than a last-iterate peer, never fewer.
"""

from __future__ import annotations

import torch

from bench import naive, peers, robkd_side
from bench.common import (Config, Row, fmnist_inputs, make_row, param_grad_guard, resnet18, small_cnn,
                          synthetic_inputs, time_interleaved)

FAMILY = "pgd"


def _cases(cfg: Config):
    n = 64 if cfg.quick else 256
    x, y = fmnist_inputs(n, cfg.seed)
    trained = small_cnn("trained", cfg.seed)
    rand = small_cnn("random", cfg.seed)
    with torch.no_grad():
        y_rand = rand(x).argmax(1)  # labels = own predictions: every sample starts clean-correct
    r18 = resnet18(cfg.seed)
    nr = 2 if cfg.quick else 4
    xr, yr = synthetic_inputs(r18, nr, (3, 32, 32), cfg.seed)
    steps = 20
    rsteps = 5 if cfg.quick else 10
    # (case, model, x, y, eps, alpha, steps, input_shape)
    return [
        (f"cnn_small trained, fmnist n={n}, eps=0.1", trained, x, y, 0.1, 2.5 * 0.1 / steps, steps, (1, 28, 28)),
        (f"cnn_small trained, fmnist n={n}, eps=0.01 (few broken)", trained, x, y, 0.01, 2.5 * 0.01 / steps, steps, (1, 28, 28)),
        (f"cnn_small random, fmnist n={n}, eps=0.1", rand, x, y_rand, 0.1, 2.5 * 0.1 / steps, steps, (1, 28, 28)),
        (f"resnet18 random, 32x32 synthetic n={nr}, eps=1/255, PGD-{rsteps}", r18, xr, yr, 1 / 255, 2.5 / 255 / rsteps,
         rsteps, (3, 32, 32)),
    ]


def run(cfg: Config) -> list[Row]:
    rows: list[Row] = []
    have_art = peers.art_available()
    for case, model, x, y, eps, alpha, steps, shape in _cases(cfg):
        kw = dict(eps=eps, alpha=alpha, steps=steps, random_start=False, seed=cfg.seed)
        art = peers.ArtPGD(model, shape) if have_art else None
        fns = {
            "limit": lambda: naive.physical_limit_pgd(model, x, y, steps),
            "robkd": lambda: robkd_side.pgd_attack(model, x, y, **kw),
            "robkd_primitive": lambda: robkd_side.pgd_primitive(model, x, y, **kw),
            "minimal": lambda: naive.minimal_pgd(model, x, y, eps=eps, alpha=alpha, steps=steps),
            "torchattacks": lambda: peers.torchattacks_pgd(model, x, y, **kw),
        }
        if art is not None:
            fns["art"] = lambda: art(x, y, **kw)
        # ---- equality: one untimed run of each, re-checked with a forward pass
        with param_grad_guard(model) as hits:
            adv_robkd = robkd_side.pgd_attack(model, x, y, **kw)
            adv_prim = robkd_side.pgd_primitive(model, x, y, **kw)
        rob = {"robkd": peers.robust_mask(model, adv_robkd, y, x, eps),
               "robkd_primitive": peers.robust_mask(model, adv_prim, y, x, eps),
               "minimal": peers.robust_mask(model, fns["minimal"](), y, x, eps),
               "torchattacks": peers.robust_mask(model, fns["torchattacks"](), y, x, eps)}
        if art is not None:
            rob["art"] = peers.robust_mask(model, fns["art"](), y, x, eps)
        last_iterate = [k for k in rob if k != "robkd"]
        same = all(bool((rob[k] == rob["torchattacks"]).all()) for k in last_iterate)
        never_weaker = all(bool((rob["robkd"] <= rob[k]).all()) for k in last_iterate)
        counts = ", ".join(f"{k} {int(v.sum())}" for k, v in rob.items())
        check = f"robust counts /{len(y)}: {counts}; last-iterate attacks identical: {same}; robkd never weaker: {never_weaker}"
        ok = same and never_weaker
        broken_frac = 1.0 - float(rob["torchattacks"].float().mean())
        grad_note = f"parameter gradients computed by robkd: {sorted(set(hits)) or 'none'}"
        reps = cfg.repeats if "resnet" not in case else min(cfg.repeats, 3)
        times = time_interleaved(fns, repeats=reps, warmup=cfg.warmup)
        note = f"{broken_frac:.0%} of samples broken by torchattacks; {grad_note}"
        rows.append(make_row(FAMILY, case, "robkd pgd (make_attack) / physical limit", times, "robkd", "limit",
                             target="<= 1.05", check=check, check_ok=ok and not hits, note=note))
        rows.append(make_row(FAMILY, case, "robkd projected_gradient_ascent / physical limit", times, "robkd_primitive",
                             "limit", target="<= 1.05", check="same run", check_ok=ok))
        rows.append(make_row(FAMILY, case, "minimal loop / physical limit", times, "minimal", "limit"))
        rows.append(make_row(FAMILY, case, "torchattacks / physical limit", times, "torchattacks", "limit"))
        if art is not None:
            rows.append(make_row(FAMILY, case, "ART / physical limit", times, "art", "limit"))
        else:
            rows.append(Row(FAMILY, case, "ART / physical limit", None, note="ART not installed (bench extra): skipped"))
        rows.append(make_row(FAMILY, case, "torchattacks / robkd pgd (speed-up)", times, "torchattacks", "robkd",
                             target=">= 1.0"))
    return rows
