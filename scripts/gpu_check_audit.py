"""GPU check of ``robkd audit``, certification and ``robkd repair`` with ``--device cuda`` against the CPU run.

Each check runs the command line in a fresh process (``python -m robkd ...``) on the bundled demo models
(robkd/zoo: the Fashion-MNIST teacher and its KD student) and the bundled Fashion-MNIST slice, once on
``--device`` and once on the CPU, and compares what came out:

- ``audit``: ``robkd audit`` (fgsm, pgd-10, two radii, --llm but under --smoke, certification by CROWN):
  both exit codes are 0/1 (gates) and equal, the clean predictions agree on every sample but at most 1%
  (GPU kernels round differently), robust and certified accuracy agree within 5 points, every kept
  adversarial example is inside its ball and [0,1], and ``--resume`` of the finished device run
  recomputes nothing;
- ``certify``: the certification API (``robkd.bounds.certify``, the ``robkd certify`` command has no
  ``--device``) with the model on the device: certified accuracy within 5 points of the CPU's, and every
  sample certified on the device is certified or unknown on the CPU (never falsified);
- ``repair``: ``robkd repair --method kdiga`` for a few steps: the checkpoint loads on the CPU and its
  loss log is finite, the first logged loss within 1% of the CPU run's.

``--smoke --device cpu`` runs everything tiny on the CPU against itself (under a minute: proves the
script works where there is no GPU). The figures go to ``--out`` (JSON). Exit 0 when every check
passes, 1 when one fails, 2 when the device is not there (never passes vacuously).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _robkd(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "robkd", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=3600)
    return proc.returncode, (proc.stdout + proc.stderr)[-3000:]


def _zoo() -> tuple[str, str]:
    return str(ROOT / "robkd/zoo/teacher.safetensors"), str(ROOT / "robkd/zoo/kd_student.safetensors")


def check_audit(dev: str, n: int, tmp: Path, env: dict[str, str], llm: bool = True) -> dict:
    import torch
    from safetensors.torch import load_file

    teacher, student = _zoo()
    common = ["audit", teacher, student, "--data", "fashion-mnist-slice", "--n", str(n), "--eps", "0.05,0.1",
              "--attacks", "fgsm,pgd-10", "--certify", "crown", "--sanity-n", "0",
              "--batch-size", str(min(n, 128)), "--no-cache", "--no-report"] + (["--llm", "--llm-steps", "3"] if llm else [])
    runs = {}
    for where in dict.fromkeys([dev, "cpu"]):
        out = tmp / f"audit-{where}"
        t0 = time.perf_counter()
        code, log = _robkd([*common, "--device", where, "--out", str(out)], env)
        runs[where] = {"code": code, "seconds": time.perf_counter() - t0, "out": out, "log": log}
    d, c = runs[dev], runs["cpu"]
    problems = [f"{w}: exit {r['code']}: {r['log'][-600:]}" for w, r in runs.items() if r["code"] not in (0, 1)]
    if problems:
        return {"ok": False, "problems": problems}
    rd, rc = (json.loads((r["out"] / "results.json").read_text()) for r in (d, c))
    sd, sc = (load_file(str(r["out"] / "samples.safetensors")) for r in (d, c))
    if d["code"] != c["code"]:
        problems.append(f"exit codes differ: {dev} {d['code']}, cpu {c['code']}")
    for role in ("teacher", "student"):
        flips = int((sd[f"{role}.clean_pred"] != sc[f"{role}.clean_pred"]).sum())
        if flips > max(1, n // 100):
            problems.append(f"{role}: {flips} clean predictions differ")
        for i, (a, b) in enumerate(zip(rd[role]["per_radius"], rc[role]["per_radius"])):
            if abs(a["worst"]["value"] - b["worst"]["value"]) > 0.05:
                problems.append(f"{role} robust accuracy at radius {i}: {a['worst']['value']} vs cpu {b['worst']['value']}")
        for i, (a, b) in enumerate(zip(rd[role]["certification"]["per_radius"], rc[role]["certification"]["per_radius"])):
            if abs(a["certified"]["value"] - b["certified"]["value"]) > 0.05:
                problems.append(f"{role} certified accuracy at radius {i}: {a['certified']['value']} vs cpu "
                                f"{b['certified']['value']}")
        x_adv, rad = sd[f"{role}.x_adv"], sd[f"{role}.adv_radius"]
        ok = torch.isfinite(rad)
        if ok.any():
            from robkd.data import eval_subset, load_dataset

            x = eval_subset(load_dataset("fashion-mnist-slice", "test"), n, 0).float_x()
            dist = (x_adv[ok] - x[ok]).flatten(1).abs().amax(1)
            if bool((dist > rad[ok].float() * (1 + 1e-5) + 1e-5).any()) or float(x_adv.min()) < 0 or float(x_adv.max()) > 1:
                problems.append(f"{role}: a kept adversarial example is outside its ball or [0,1]")
    t0 = time.perf_counter()
    code, log = _robkd([*common, "--device", dev, "--out", str(d["out"]), "--resume"], env)
    resumed = json.loads((d["out"] / "results.json").read_text()).get("resumed", [])
    if code not in (0, 1) or len(resumed) != 2 * 2 * 2:
        problems.append(f"--resume on {dev}: exit {code}, resumed {resumed}: {log[-400:]}")
    return {"ok": not problems, "problems": problems, "seconds": {w: round(r["seconds"], 1) for w, r in runs.items()},
            "resume_seconds": round(time.perf_counter() - t0, 1),
            "robust": {w: [p["worst"]["value"] for p in r_["student"]["per_radius"]] for w, r_ in ((dev, rd), ("cpu", rc))}}


def check_certify(dev: str, n: int) -> dict:
    import torch

    import robkd
    from robkd.bounds import certify
    from robkd.data import eval_subset, load_dataset

    teacher, _ = _zoo()
    data = eval_subset(load_dataset("fashion-mnist-slice", "test"), n, 0)
    x, y = data.float_x(), data.y
    got = {}
    for where in dict.fromkeys([dev, "cpu"]):
        model = robkd.load_model(teacher).to(where).eval()
        t0 = time.perf_counter()
        res = certify(model, x.to(where), y.to(where), 0.02, norm="Linf", method="crown")
        got[where] = (res.certified.cpu().bool(), list(res.status), time.perf_counter() - t0)
    (cd, sd, td), (cc, sc, tc) = got[dev], got["cpu"]
    problems = []
    if abs(float(cd.float().mean()) - float(cc.float().mean())) > 0.05:
        problems.append(f"certified accuracy {float(cd.float().mean())} vs cpu {float(cc.float().mean())}")
    if any(a == "certified" and b == "falsified" for a, b in zip(sd, sc)):
        problems.append("a sample certified on the device is falsified on the CPU")
    return {"ok": not problems, "problems": problems, "certified": {dev: float(cd.float().mean()), "cpu": float(cc.float().mean())},
            "seconds": {dev: round(td, 2), "cpu": round(tc, 2)}}


def check_repair(dev: str, steps: int, tmp: Path, env: dict[str, str]) -> dict:
    import math

    import torch

    import robkd

    teacher, student = _zoo()
    first = {}
    problems = []
    for where in dict.fromkeys([dev, "cpu"]):
        out = tmp / f"repair-{where}.safetensors"
        code, log = _robkd(["repair", teacher, student, "--method", "kdiga", "--epochs", "1", "--train-n", str(steps * 32),
                            "--batch-size", "32", "--data", "fashion-mnist-slice", "--device", where, "--out", str(out),
                            "--no-audit", "--val-n", "0", "--select", "last", "--log", str(tmp / f"repair-{where}.log.jsonl")], env)
        if code != 0:
            problems.append(f"{where}: exit {code}: {log[-600:]}")
            continue
        model = robkd.load_model(str(out))  # a device-trained checkpoint loads on the CPU
        if any(p.device.type != "cpu" for p in model.parameters()):
            problems.append(f"{where}: the checkpoint did not load on the CPU")
        lines = [json.loads(s) for s in (tmp / f"repair-{where}.log.jsonl").read_text().splitlines() if s.strip()]
        losses = [float(r["loss"]) for r in lines if isinstance(r.get("loss"), (int, float))]
        if not losses or not all(math.isfinite(v) for v in losses):
            problems.append(f"{where}: no finite loss in the log")
        else:
            first[where] = losses[0]
    if len(first) == len(dict.fromkeys([dev, "cpu"])) and abs(first[dev] - first["cpu"]) > 1e-2 * max(1.0, abs(first["cpu"])):
        problems.append(f"first loss {first[dev]} vs cpu {first['cpu']}")
    del torch
    return {"ok": not problems, "problems": problems, "first_loss": first}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="device under test (default cuda); cpu only with --smoke")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (proves the script runs; figures mean little)")
    ap.add_argument("--out", default="reports/gpu_check_audit.json", help="JSON file for the figures")
    ap.add_argument("--only", default="audit,certify,repair", help="comma-separated checks")
    args = ap.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: nothing checked", file=sys.stderr)
        return 2
    n, steps = (16, 2) if args.smoke else (200, 20)
    env = dict(os.environ, ROBKD_NO_PROGRESS="1", ROBKD_NO_CACHE="1")
    env.setdefault("OMP_NUM_THREADS", "2")
    report: dict = {"device": args.device, "smoke": args.smoke, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None, "checks": {}}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for name in [s.strip() for s in args.only.split(",") if s.strip()]:
            t0 = time.perf_counter()
            try:
                res = {"audit": lambda: check_audit(args.device, n, tmp, env, llm=not args.smoke), "certify": lambda: check_certify(args.device, n),
                       "repair": lambda: check_repair(args.device, steps, tmp, env)}[name]()
            except Exception as exc:  # noqa: BLE001 - a check that crashes fails, the others still run
                res = {"ok": False, "problems": [f"{type(exc).__name__}: {exc}"]}
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            report["checks"][name] = res
            print(f"{name}: {'ok' if res['ok'] else 'FAILED'} ({res['wall_s']} s) {'; '.join(res['problems'])}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0 if all(c["ok"] for c in report["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
