"""CROWN certification speed on ``cnn_small`` (Fashion-MNIST): fast path vs the plain reference.

Run: ``OMP_NUM_THREADS=1 python -m bench.bounds_speed [--n 1000] [--eps 0.01,0.02,0.05,0.1] [--ref-n 100]``

For every radius it prints the wall time of ``robkd.bounds.certify(..., method="crown")`` (fast
intermediate pass and early exits, the default), the same with a skip mask of samples a PGD-20
attack broke (as an audit would pass), ``certify_radii`` over all radii, and, on ``--ref-n``
samples, the reference (``reference_certify(..., early_exit=False)`` from ``tests/crown_reference.py``:
full CROWN for every sample through the plain intermediate pass). Times are also given as multiples
of one forward pass over the same samples, which is steadier than seconds on a shared machine.
Certified sets must agree exactly with the reference (checked; a mismatch is reported).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"


def _time(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv: list[str] | None = None) -> int:
    from bench.common import fmnist_inputs, small_cnn

    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))  # the reference CROWN pass is a test helper
    from crown_reference import reference_certify
    from robkd.attacks import make_attack, verify_adversarial
    from robkd.bounds import certify, certify_radii
    from robkd.types import Norm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--eps", default="0.01,0.02,0.05,0.1")
    p.add_argument("--ref-n", type=int, default=100, help="samples for the reference comparison (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    radii = [float(e) for e in a.eps.split(",")]
    model = small_cnn("trained", a.seed)
    x, y = fmnist_inputs(a.n, a.seed)
    with torch.no_grad():
        model(x[:64])
        fwd = min(_time(lambda: model(x))[0] for _ in range(5))
    print(f"cnn_small trained, fashion-mnist n={a.n}, torch threads={torch.get_num_threads()}")
    print(f"forward pass over {a.n} samples: {fwd * 1e3:.1f} ms")
    print(f"{'eps':>6} {'certified':>9} {'fast s':>8} {'x fwd':>7} {'+skip s':>8} {'x fwd':>7} {'ref s/sample':>12} "
          f"{'fast s/sample':>13} {'speed-up':>8}")
    total = total_skip = 0.0
    for eps in radii:
        dt, res = _time(lambda: certify(model, x, y, eps, method="crown"))
        adv = make_attack("pgd-20", Norm.LINF, eps)(model, x, y)
        broken = verify_adversarial(model, x, adv, y, Norm.LINF, eps)
        dts, res_s = _time(lambda: certify(model, x, y, eps, method="crown", skip=broken))
        if not torch.equal(res_s.certified, res.certified):
            print(f"  MISMATCH: skip mask changed certified samples at eps={eps}")
        total += dt
        total_skip += dts
        ref_txt, fast_txt, speed = "-", "-", "-"
        if a.ref_n > 0:
            k = min(a.ref_n, a.n)
            dr, ref = _time(lambda: reference_certify(model, x[:k], y[:k], eps, method="crown", early_exit=False))
            df, fast = _time(lambda: certify(model, x[:k], y[:k], eps, method="crown"))
            if not torch.equal(ref.certified, fast.certified):
                print(f"  MISMATCH: fast and reference certified sets differ at eps={eps}")
            ref_txt, fast_txt, speed = f"{dr / k:.4f}", f"{df / k:.4f}", f"{dr / df:.1f}x"
        print(f"{eps:>6g} {res.certified_accuracy:>9.3f} {dt:>8.2f} {dt / fwd:>7.0f} {dts:>8.2f} {dts / fwd:>7.0f} "
              f"{ref_txt:>12} {fast_txt:>13} {speed:>8}")
    dtr, _ = _time(lambda: certify_radii(model, x, y, radii, method="crown"))
    print(f"all radii: certify {total:.2f} s ({total / fwd:.0f} x fwd), with PGD skip mask {total_skip:.2f} s, "
          f"certify_radii {dtr:.2f} s ({dtr / fwd:.0f} x fwd)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
