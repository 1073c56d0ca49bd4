"""Certification cost per sample: robkd now vs robkd at commit 49d4016 (before issue 16), same run.

Models: pyautoattack's CIFAR-10 ResNet-18 (`examples/resnet.py` + `examples/model_test.pt` from the installed
package: real weights) and the CROWN-IBP paper's large CIFAR CNN ("DM-large": conv 64-64-128(stride 2)-128-128,
fc 512, 10; **random weights**, PyTorch's default initialisation, seed 0). Inputs: **seeded uniform random
images in [0,1]** (3x32x32; no CIFAR-10 test set on the benchmark machine; bound propagation cost depends on
the network and the radius far more than on the image), labels = the model's own predictions. Methods: `ibp`,
`crown-ibp` (CROWN at the output, IBP intermediate bounds), `crown` (full CROWN: CROWN bounds for every
intermediate neuron left unstable), `alpha-crown` and `--budget 30s` (robkd's budget ladder; not in 49d4016),
each through `robkd.bounds.certify(..., early_exit=False)` (every sample pays the method's whole cost). Each
(revision, model, method) runs in its own process with **one torch thread** (on a 2-core machine shared with
other work, two-thread runs stall at thread barriers and vary 10x), one after the other; the old revision is
`git archive 49d4016 robkd` exported to a temporary directory and put first on `PYTHONPATH`. Per-sample time is
the wall time of the call over its batch divided by the batch size (median of the repeats; the CPU-time ratio
is the steadier figure); the 1-minute load average at each run's start is in its note. Peak memory is the
process's peak RSS during the call above its RSS before it (Linux `clear_refs`). The done-when figure "4
samples in 10 minutes on 2 cores" is judged as at most 2 x 150 = 300 CPU-seconds per sample. Ratios are new / old. A run
that does not finish within its timeout is killed and reported as "> T s (timed out)" with the layers of
CROWN's intermediate pass it completed (unstable neurons before -> after each layer, seconds) and its progress
inside the current layer. "IBP unstable" counts are pure IBP's; "before" counts are IBP from the earlier
layers' CROWN bounds, "after" those left unstable by CROWN. The equality check compares the two revisions'
verdicts and margin lower bounds on the samples both finished.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Config, Row, median

FAMILY = "certify"
OLD_REV = "49d4016"
ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "certify_child.py"
THREADS = 1  # one torch thread: with ~4 runnable processes on 2 cores, 2-thread runs stall at barriers
BUDGET = "30s"
log = logging.getLogger("bench")

# (model, eps, label): the ResNet-18 at the done-when radius 1/255; the CNN at the CROWN-IBP paper's 2/255
MODELS = [("resnet18", 1 / 255, "pyautoattack ResNet-18 (real CIFAR-10 weights)", "eps 1/255"),
          ("dm_large", 2 / 255, "DM-large CNN (random weights)", "eps 2/255")]
# model -> method -> (samples, repeats, timeout of the new revision, timeout of the old one; seconds); quick runs
# shrink the timeouts. Full CROWN on the ResNet-18 gets the done-when's 2 cores x 150 s = 300 CPU-seconds per
# sample (4 samples in 10 minutes on 2 cores) on one thread; alpha-CROWN starts with the same intermediate pass
# as CROWN, so it gets a short timeout where CROWN cannot finish either
PLAN = {
    "resnet18": {"ibp": (4, 3, 120, 120), "crown-ibp": (4, 2, 180, 180), "crown": (1, 1, 300, 120),
                 "alpha-crown": (1, 1, 20, 20), "budget": (2, 1, 150, 0)},
    "dm_large": {"ibp": (4, 3, 120, 120), "crown-ibp": (4, 2, 180, 180), "crown": (1, 1, 60, 60),
                 "alpha-crown": (1, 1, 120, 120), "budget": (1, 1, 100, 0)},
}


def _export_old(dest: Path) -> Path:
    """``robkd`` as of :data:`OLD_REV` under ``dest`` (git archive; the working tree and index are untouched)."""
    arch = subprocess.run(["git", "archive", OLD_REV, "robkd"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch, check=True)
    return dest


def run_child(cfg: dict, pythonpath: Path, timeout: float) -> dict:
    """Run one certification in a child process; kill it at ``timeout`` and keep what it reported."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS=str(cfg["threads"]), ROBKD_NO_PROGRESS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(CHILD), json.dumps(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=str(pythonpath), text=True)
    events: list[dict] = []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    timed_out = False
    while True:
        left = timeout - (time.perf_counter() - t0)
        if left <= 0:
            timed_out = True
            proc.kill()
            break
        if not sel.select(timeout=min(left, 1.0)):
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    sel.close()
    proc.wait()
    err = proc.stderr.read()[-2000:] if proc.stderr else ""
    result = next((e["result"] for e in events if "result" in e), None)
    head = next((e for e in events if "robkd_file" in e), {})
    return {"result": result, "timed_out": timed_out and result is None, "wall": time.perf_counter() - t0,
            "rc": proc.returncode, "stderr": err, "layers": [e for e in events if "layer" in e],
            "progress": next((e for e in reversed(events) if "progress" in e), None), "head": head}


def _load(rec: dict) -> str:
    ld = (rec.get("result") or {}).get("load") or rec["head"].get("load")
    return f"{ld[0]:.1f}" if ld else "?"


def _layers(rec: dict) -> str:
    """CROWN's intermediate pass layer by layer: IBP unstable / before -> after (seconds)."""
    parts = [f"{e['layer']} {e.get('ibp_unstable')}/{e['unstable_before']}->{e['unstable_after']} ({e['seconds']:.0f}s)"
             for e in rec["layers"]]
    p = rec.get("progress")
    if rec["timed_out"] and p and not any(e["layer"] == p["progress"] for e in rec["layers"]):
        parts.append(f"{p['progress']} stopped at {p['pairs_done']} of {p['pairs_total']} neurons after "
                     f"{p['seconds']:.0f}s")
    return ", ".join(parts)


def _what(rec: dict, timeout: float) -> str:
    if rec["result"] is not None:
        r = rec["result"]
        return f"{median(r['seconds_per_sample']):.2f} s/sample, peak {median(r['peak_mb']):.0f} MiB"
    if rec["timed_out"]:
        peak = max([e.get("peak_kb", 0) for e in rec["layers"]] + [(rec.get("progress") or {}).get("peak_kb", 0)])
        return f"> {timeout:.0f} s (timed out; process peak RSS so far {peak / 1024:.0f} MiB, model included)"
    return f"failed (rc {rec['rc']}): {rec['stderr'].strip().splitlines()[-1] if rec['stderr'].strip() else '?'}"


def _layer_seconds(rec: dict) -> dict[str, tuple[float, bool]]:
    """Seconds per intermediate layer; a layer cut by the timeout is extrapolated from its progress (flag True)."""
    out = {e["layer"]: (float(e["seconds"]), False) for e in rec["layers"]}
    p = rec.get("progress")
    if rec["timed_out"] and p and p["progress"] not in out and p["pairs_done"] > 0:
        out[p["progress"]] = (p["seconds"] * p["pairs_total"] / p["pairs_done"], True)
    return out


def _layer_ratio(new: dict, old: dict) -> tuple[float, str] | None:
    """new / old seconds summed over the CROWN layers both runs reached (timed-out runs: a partial layer is
    extrapolated linearly from the neurons it bounded), or None when they share no layer."""
    a, b = _layer_seconds(new), _layer_seconds(old)
    common = [k for k in a if k in b]
    if not common:
        return None
    ta, tb = sum(a[k][0] for k in common), sum(b[k][0] for k in common)
    extra = [k for k in common if a[k][1] or b[k][1]]
    return ta / tb, (f"layers {', '.join(common)}: new {ta:.1f} s, old {tb:.1f} s"
                     + (f" (extrapolated from partial progress: {', '.join(extra)})" if extra else ""))


def _compare(new: dict, old: dict) -> tuple[str, bool | None]:
    a, b = new.get("result"), old.get("result")
    if a is None or b is None:
        return "not compared (a run did not finish)", None
    same = a["certified"] == b["certified"]
    diff = max((abs(u - v) for ra, rb in zip(a["margin_lb"], b["margin_lb"]) for u, v in zip(ra, rb)
                if abs(u) != float("inf") and abs(v) != float("inf")), default=0.0)
    scale = max((abs(u) for ra in a["margin_lb"] for u in ra if abs(u) != float("inf")), default=1.0)
    ok = same and diff <= 1e-3 * max(1.0, scale)
    return (f"certified sets equal: {same} ({sum(a['certified'])} of {a['n']}); max |margin lb diff| {diff:.1e} "
            f"(bounds up to {scale:.1f})"), ok


def _rows(model: str, label: str, eps_txt: str, method: str, recs: dict, timeout: float, t_old: float) -> list[Row]:
    new, old = recs["new"], recs.get("old")
    n = PLAN[model][method][0]
    case = f"{label}, {eps_txt}, n={n} uniform-random images"
    fig = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "full CROWN", "alpha-crown": "alpha-CROWN",
           "budget": f"--budget {BUDGET}"}[method]
    rows = []
    if old is None:  # the budget ladder did not exist before
        r = new["result"]
        if r is None:
            rows.append(Row(FAMILY, case, f"{fig}: per-sample seconds (new only; not in {OLD_REV})", None,
                            note=f"new: {_what(new, timeout)}; load {_load(new)}; {_layers(new)}"))
            return rows
        worst = max(r["sample_seconds"])
        per = ", ".join(f"{s:.1f}s" for s in r["sample_seconds"])
        decided = ", ".join(f"{d}" for d in r["decided_by"])
        fb = "; ".join(f for f in r["fallbacks"] if f)
        rows.append(Row(FAMILY, case, f"{fig}: slowest sample's seconds / the 30 s budget (new only; not in {OLD_REV})",
                        worst / 30.0, "<= 1.2", worst / 30.0 <= 1.2,
                        check=f"per-sample seconds {per}; wall {median(r['seconds_per_sample']):.1f} s/sample",
                        check_ok=None, unit="x",
                        note=f"deciding method per sample: {decided}; fallbacks: {fb or 'none'}; peak "
                             f"{median(r['peak_mb']):.0f} MiB; load {_load(new)}",
                        timings={"new s/sample": r["seconds_per_sample"]}))
        return rows
    check, ok = _compare(new, old)
    note = f"new: {_what(new, timeout)}, load {_load(new)}; old ({OLD_REV}): {_what(old, t_old)}, load {_load(old)}"
    if method in ("crown", "alpha-crown"):
        note += f". Layers new: {_layers(new) or '-'}. Layers old: {_layers(old) or '-'}"
    if new["result"] is not None and new["result"].get("decided_by"):
        note += f". decided by: {', '.join(new['result']['decided_by'])}"
    a, b = new["result"], old["result"]
    if a is not None and b is not None:
        ta, tb = a["seconds_per_sample"], b["seconds_per_sample"]
        ca, cb = a["cpu_per_sample"], b["cpu_per_sample"]
        rows.append(Row(FAMILY, case, f"{fig}: per-sample time new / {OLD_REV}", median(ta) / median(tb), check=check,
                        check_ok=ok, note=note, cpu_ratio=median(ca) / max(median(cb), 1e-9),
                        timings={"new s/sample": ta, "old s/sample": tb, "new s/sample#cpu": ca,
                                 "old s/sample#cpu": cb}))
        pa, pb = median(a["peak_mb"]), median(b["peak_mb"])
        rows.append(Row(FAMILY, case, f"{fig}: peak memory new / {OLD_REV}", pa / pb if pb > 0 else None,
                        note=f"new {pa:.0f} MiB, old {pb:.0f} MiB above the RSS before the call"))
    else:
        rows.append(Row(FAMILY, case, f"{fig}: per-sample time new / {OLD_REV}", None, check=check, check_ok=ok,
                        note=note, timings={k: v["result"]["seconds_per_sample"] for k, v in
                                            (("new s/sample", new), ("old s/sample", old)) if v["result"]}))
        lr = _layer_ratio(new, old)
        if lr is not None:
            rows.append(Row(FAMILY, case, f"{fig}: seconds of the intermediate layers both reached, new / {OLD_REV}",
                            lr[0], note=lr[1]))
    if model == "resnet18" and method == "crown":
        # 4 samples in 10 minutes on 2 cores: at most 2 x 150 = 300 CPU-seconds per sample
        if a is not None:
            cpu, how = median(a["cpu_per_sample"]), "measured (one thread)"
        else:
            cpu = max([e.get("cpu", 0.0) for e in new["layers"]] + [(new.get("progress") or {}).get("cpu", 0.0)])
            cpu -= new["head"].get("cpu", 0.0)  # the set-up before the certify call
            how = (f"lower bound: killed at {timeout:.0f} s wall with the intermediate pass unfinished; CPU-seconds "
                   f"at its last report; {_layers(new) or 'no layer finished'}")
        rows.append(Row(FAMILY, case, "done-when: full CROWN CPU-seconds per sample / 300 (4 samples in 10 min on "
                        "2 cores)", cpu / 300.0, "<= 1.0", a is not None and cpu <= 300.0, note=how))
    return rows


def run(cfg: Config) -> list[Row]:
    rows: list[Row] = []
    scale = 0.4 if cfg.quick else 1.0
    with tempfile.TemporaryDirectory(prefix="robkd_old_") as tmp:
        old_root = _export_old(Path(tmp))
        for model, eps, label, eps_txt in MODELS:
            for method, (n, reps, t_new, t_old) in PLAN[model].items():
                recs = {}
                for impl, path, timeout in (("new", ROOT, t_new), ("old", old_root, t_old)):
                    if impl == "old" and method == "budget":
                        continue
                    timeout = max(20.0, timeout * scale)
                    c = {"model": model, "method": method, "eps": eps, "n": n, "seed": cfg.seed,
                         "threads": THREADS, "repeats": 1 if cfg.quick else reps, "budget": BUDGET}
                    log.info("certify: %s %s %s (timeout %.0f s)", impl, model, method, timeout)
                    recs[impl] = rec = run_child(c, path, timeout)
                    if rec["head"].get("robkd_file") and not rec["head"]["robkd_file"].startswith(str(path)):
                        raise RuntimeError(f"{impl} run imported robkd from {rec['head']['robkd_file']}, not {path}")
                    log.info("certify: %s %s %s -> %s", impl, model, method, _what(rec, timeout))
                rows += _rows(model, label, eps_txt, method, recs, max(20.0, t_new * scale), max(20.0, t_old * scale))
    return rows


if __name__ == "__main__":  # one record, for trying things out: python -m bench.certify '<child json>' [old]
    logging.basicConfig(level=logging.INFO)
    c = json.loads(sys.argv[1])
    with tempfile.TemporaryDirectory(prefix="robkd_old_") as tmp:
        path = _export_old(Path(tmp)) if len(sys.argv) > 2 else ROOT
        print(json.dumps(run_child(c, path, float(c.get("timeout", 120))), indent=1)[:6000])
