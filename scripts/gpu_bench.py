"""GPU benchmark rows for reports/benchmarks.md (family ``gpu``): robkd against its peers on one device.

- *PGD-20*, ResNet-18 on CIFAR-size inputs (3x32x32, random weights, labels = the model's own predictions,
  deterministic start): robkd's ``make_attack("pgd-20")`` against torchattacks.PGD and against the
  physical limit (20 forward+backward-to-input passes + 1 forward, bench.naive); equality: per-sample
  robust verdicts (robkd keeps every broken iterate, so it may only break more, never fewer);
- *AutoAttack* (standard, one radius), same model and inputs: robkd's Suite(["autoattack"]) against
  pyautoattack.AutoAttack run_standard_evaluation; equality: robust count;
- *KDIGA epoch vs KD epoch*: ``robkd.distill.train`` one epoch of each on the same in-memory CIFAR-size
  data, ResNet-18 teacher and student (the cost of the input-gradient alignment term).

Every ratio is measured in this one process on this device, contenders interleaved (bench.common), the
device synchronised after each call; throughputs are in the notes. ``--smoke --device cpu`` runs tiny
sizes on the CPU (under a minute) to prove the script works. Output: a JSON file in the bench format
(``environment`` with the GPU's name, ``rows``), which ``--splice-into reports/benchmarks.json`` puts
into the committed report (as ``bench.run --splice-into`` does for a re-run family).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAMILY = "gpu"
#: the benchmarked architecture; --smoke swaps in a small CNN on the same 3x32x32 inputs
ARCH = {"name": "robkd:resnet18"}


def _model(seed: int = 0):
    from bench.common import _fresh

    return _fresh(ARCH["name"], (3, 32, 32), seed, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))


def _arch() -> str:
    return ARCH["name"].split(":")[-1]


def _sync(dev: str):
    import torch

    def wrap(fn):
        def run():
            out = fn()
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            return out
        return run
    return wrap


def pgd_rows(dev: str, n: int, repeats: int, eps: float) -> list:
    from bench import naive, peers, robkd_side
    from bench.common import make_row, synthetic_inputs, time_interleaved

    model = _model(0).to(dev).eval()
    x, y = synthetic_inputs(model.cpu(), n, (3, 32, 32), 0)
    model.to(dev)
    x, y = x.to(dev), y.to(dev)
    steps, alpha = 20, 2.5 * eps / 20
    kw = dict(eps=eps, alpha=alpha, steps=steps, random_start=False)
    s = _sync(dev)
    fns = {"limit": s(lambda: naive.physical_limit_pgd(model, x, y, steps)),
           "robkd": s(lambda: robkd_side.pgd_attack(model, x, y, **kw)),
           "torchattacks": s(lambda: peers.torchattacks_pgd(model, x, y, **kw))}
    rob = {k: peers.robust_mask(model, fns[k](), y, x, eps).cpu() for k in ("robkd", "torchattacks")}
    ok = bool((rob["robkd"] <= rob["torchattacks"]).all())
    check = (f"robust /{n}: robkd {int(rob['robkd'].sum())}, torchattacks {int(rob['torchattacks'].sum())}; "
             f"robkd never weaker: {ok}")
    times = time_interleaved(fns, repeats=repeats, warmup=1 if repeats > 1 else 0)
    case = f"{_arch()} random, 3x32x32 synthetic n={n}, eps={eps:.4g}, PGD-20 on {dev}"
    thr = {k: n / sorted(v)[len(v) // 2] for k, v in times.items() if not k.endswith("#cpu")}
    note = "samples/s: " + ", ".join(f"{k} {v:.0f}" for k, v in thr.items())
    return [make_row(FAMILY, case, "robkd pgd / torchattacks (time ratio)", times, "robkd", "torchattacks",
                     target="<= 1.0", check=check, check_ok=ok, note=note),
            make_row(FAMILY, case, "robkd pgd / physical limit", times, "robkd", "limit", target="<= 1.05",
                     check="same run", check_ok=ok)]


def autoattack_rows(dev: str, n: int, eps: float) -> list:
    import logging

    import torch
    from pyautoattack import AutoAttack

    from bench import peers, robkd_side
    from bench.common import Row, synthetic_inputs, time_once

    model = _model(0).cpu().eval()
    x, y = synthetic_inputs(model, n, (3, 32, 32), 1)
    model.to(dev)
    x, y = x.to(dev), y.to(dev)
    s = _sync(dev)
    logging.getLogger("auto-attack").setLevel(logging.WARNING)

    def peer():
        aa = AutoAttack(model, eps=float(eps), norm="Linf", version="standard", seed=0, device=dev)
        aa.verbose = False
        return aa.run_standard_evaluation(x, y, batch_size=n)[0]

    t_r, c_r, res = time_once(s(lambda: robkd_side.suite_curve(model, x, y, [eps], ["autoattack"], seed=0, batch_size=n)))
    t_p, c_p, adv = time_once(s(peer))
    rk = int(res.robust[0].sum())
    pa = int(peers.robust_mask(model, adv, y, x, eps).sum())
    case = f"{_arch()} random, 3x32x32 synthetic n={n}, eps={eps:.4g}, AutoAttack standard on {dev}"
    del torch
    return [Row(FAMILY, case, "robkd AutoAttack / pyautoattack (time ratio)", t_r / t_p, "<= 1.0", t_r / t_p <= 1.0,
                f"robust /{n}: robkd {rk}, pyautoattack {pa}", rk == pa,
                note=f"single timed run each; samples/s robkd {n / t_r:.1f}, pyautoattack {n / t_p:.1f}",
                timings={"robkd": [t_r], "pyautoattack": [t_p], "robkd#cpu": [c_r], "pyautoattack#cpu": [c_p]},
                cpu_ratio=c_r / max(c_p, 1e-9))]


def distill_rows(dev: str, n: int, batch: int, rounds: int = 2) -> list:
    import tempfile

    import torch

    from bench.common import Row, time_once
    from robkd.data import ImageData
    from robkd.distill import train

    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 32, 32, generator=g)
    teacher = _model(0).cpu().eval()
    with torch.no_grad():
        y = torch.cat([teacher(x[i:i + 256]).argmax(1) for i in range(0, n, 256)])
    data = ImageData(x, y, name="synthetic-cifar")
    s = _sync(dev)
    times = {}
    with tempfile.TemporaryDirectory() as td:
        for method in ("kd", "kdiga") * rounds:  # interleaved, the last of each is kept (warm)
            t, c, _ = time_once(s(lambda: train(method, ARCH["name"], data, 1, Path(td) / f"{method}.safetensors",
                                                teacher=teacher, device=dev, batch_size=batch, val_n=0, select="last",
                                                augment="none", show_progress=False, lr=0.01)))
            times[method], times[f"{method}#cpu"] = [t], [c]
    r = times["kdiga"][0] / times["kd"][0]
    return [Row(FAMILY, f"{_arch()} student and teacher, 3x32x32 synthetic n={n}, batch {batch}, one epoch on {dev}",
                "robkd KDIGA epoch / KD epoch", r, None, None, "", None,
                note=f"samples/s KD {n / times['kd'][0]:.0f}, KDIGA {n / times['kdiga'][0]:.0f}", timings=times,
                cpu_ratio=times["kdiga#cpu"][0] / max(times["kd#cpu"][0], 1e-9))]


def environment(dev: str) -> dict:
    import torch

    from bench import peers
    from bench.run import _git

    gpu = torch.cuda.get_device_name(0) if dev.startswith("cuda") else None
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "git_commit": _git("rev-parse", "--short", "HEAD"),
            "git_dirty_bench": bool(_git("status", "--porcelain", "--", "bench", "scripts")), "robkd_uncommitted": [],
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu,
            "device": dev, **peers.versions(), "platform": platform.platform(), "load_before": list(os.getloadavg()),
            "command": "python scripts/gpu_bench.py " + " ".join(sys.argv[1:])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (proves the script runs; figures mean little)")
    ap.add_argument("--only", default="pgd,autoattack,distill")
    ap.add_argument("--out", default="reports/gpu_bench.json", help="results (bench JSON format)")
    ap.add_argument("--splice-into", default=None, metavar="JSON",
                    help="also put the rows into a bench run's JSON (e.g. reports/benchmarks.json) and render its .md")
    args = ap.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: nothing measured", file=sys.stderr)
        return 2
    os.environ.setdefault("ROBKD_NO_PROGRESS", "1")
    os.environ.setdefault("ROBKD_NO_CACHE", "1")
    if args.smoke:  # AutoAttack at a radius that breaks every sample at once: Square's queries never run
        ARCH["name"] = "robkd:cnn_small"
        sizes = dict(pgd=(4, 1), aa=4, aa_eps=16 / 255, distill=(32, 16, 1))
    else:
        sizes = dict(pgd=(512, 5), aa=256, aa_eps=1 / 255, distill=(10000, 128, 2))
    env = environment(args.device)
    rows = []
    fams = [s.strip() for s in args.only.split(",") if s.strip()]
    t0 = time.perf_counter()
    if "pgd" in fams:
        rows += pgd_rows(args.device, *sizes["pgd"], eps=1 / 255)
    if "autoattack" in fams:
        rows += autoattack_rows(args.device, sizes["aa"], eps=sizes["aa_eps"])
    if "distill" in fams:
        rows += distill_rows(args.device, *sizes["distill"])
    env["load_after"] = list(os.getloadavg())
    env["family_seconds"] = {FAMILY: round(time.perf_counter() - t0, 1)}
    data = {"environment": env, "docs": {FAMILY: (__doc__ or "").strip()}, "rows": [r.to_dict() for r in rows]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    for r in rows:
        print(f"{r.case} | {r.figure} | {r.ratio:.3f} | {r.check} | {r.note}")
    if args.splice_into:
        from bench.run import _splice

        src = Path(args.splice_into)
        env_rerun = dict(env, family_seconds=env["family_seconds"])
        _splice(src, src.with_suffix(".md"), env_rerun, rows, data["docs"], f"measured on {env['gpu'] or args.device}")
    return 0 if all(r.check_ok is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
