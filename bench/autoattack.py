"""AutoAttack (standard) curve over 8 radii: robkd's Suite vs pyautoattack looped over the radii.

robkd runs ``Suite(["autoattack"]).run(model, x, y, radii)``: the pyautoattack
adapter at each radius, only on the samples still robust at the previous radius
(a break carries over to every larger radius). The peer runs
``pyautoattack.AutoAttack(version="standard", seed=0)`` on all samples at every
radius. Both use the same seed and batch size. One timed run each (no warm-up:
a single pyautoattack curve takes minutes on 2 cores), robkd first then the peer.
The equality check compares the robust count per radius; pyautoattack's random
restarts are seeded per call and robkd calls it on a different subset of
samples, so per-sample outcomes may legitimately differ on borderline points: the
check reports the per-radius counts of both and the samples where they disagree.
"""

from __future__ import annotations

from bench import peers, robkd_side
from bench.common import Config, Row, fmnist_inputs, small_cnn, time_once

FAMILY = "autoattack"


def run(cfg: Config) -> list[Row]:
    n = 8 if cfg.quick else 16
    radii = [0.1 * k / 8 for k in range(1, 9)] if not cfg.quick else [0.05 * k / 2 for k in range(1, 3)]
    model = small_cnn("trained", cfg.seed)
    x, y = fmnist_inputs(n, cfg.seed + 1)
    case = f"cnn_small trained, fmnist n={n}, {len(radii)} radii {radii[0]:g}..{radii[-1]:g}"
    t_robkd, c_robkd, res = time_once(lambda: robkd_side.suite_curve(model, x, y, radii, ["autoattack"], seed=cfg.seed,
                                                             batch_size=n))
    t_peer, c_peer, advs = time_once(lambda: peers.pyautoattack_curve(model, x, y, radii, seed=cfg.seed, batch_size=n))
    rk = [res.robust[i] for i in range(len(radii))]
    pa = [peers.robust_mask(model, a, y, x, e) for a, e in zip(advs, radii)]
    counts_equal = all(int(a.sum()) == int(b.sum()) for a, b in zip(rk, pa))
    weaker = sum(int((a & ~b).sum()) for a, b in zip(rk, pa))  # robust for robkd but broken by the peer
    stronger = sum(int((~a & b).sum()) for a, b in zip(rk, pa))
    fmt = lambda ms: "[" + " ".join(str(int(m.sum())) for m in ms) + "]"  # noqa: E731
    check = (f"robust per radius: robkd {fmt(rk)}, pyautoattack {fmt(pa)} (of {n}); counts identical: {counts_equal}; "
             f"(sample, radius) pairs robkd robust but peer broken: {weaker}, the reverse: {stronger}")
    ratio = t_robkd / t_peer
    target = "<= 0.5"
    from bench.common import judge

    return [Row(FAMILY, case, "robkd AutoAttack curve / pyautoattack looped over radii", ratio, target,
                judge(ratio, target), check, counts_equal and weaker == 0,
                note=f"single timed run each; robkd per-attack seconds {res.seconds}",
                timings={"robkd_curve": [t_robkd], "pyautoattack_loop": [t_peer], "robkd_curve#cpu": [c_robkd],
                         "pyautoattack_loop#cpu": [c_peer]},
                cpu_ratio=c_robkd / max(c_peer, 1e-9))]
