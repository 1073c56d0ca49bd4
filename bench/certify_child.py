"""One certification run in its own process, for ``bench/certify.py`` (not a benchmark family itself).

``python bench/certify_child.py '<json>'`` with keys ``model`` (``resnet18`` | ``dm_large``), ``method``
(``ibp`` | ``crown-ibp`` | ``crown`` | ``alpha-crown`` | ``budget``), ``eps``, ``n``, ``seed``, ``threads``,
``repeats`` and ``budget`` (e.g. ``"30s"``). It imports whichever ``robkd`` comes first on ``PYTHONPATH`` (the
working tree, or an export of an older revision), so it uses only what both revisions provide and imports
nothing from ``bench``. It prints JSON lines on stdout: ``{"ibp_unstable": ...}`` (unstable ReLU inputs
per layer under pure IBP), ``{"layer": ...}`` after each layer of CROWN's intermediate pass (unstable
neurons before and after, seconds), ``{"progress": ...}`` every few seconds inside a layer (backward
problems solved), and finally ``{"result": ...}`` (per-sample seconds, peak memory, verdicts). The parent
kills it at its timeout and reports the progress reached.
"""

from __future__ import annotations

import json
import os
import sys
import time

AUTOATTACK_EXAMPLES = "pyautoattack/examples"


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _status_kb(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> int:
    """Reset the process's peak RSS (Linux ``clear_refs`` 5) and return the current RSS in kB."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass
    return _status_kb("VmRSS")


def resnet18():
    """pyautoattack's CIFAR-10 ResNet-18 (``examples/resnet.py``) with its real weights (``model_test.pt``)."""
    import importlib.util
    import site

    import torch

    for base in site.getsitepackages():
        root = os.path.join(base, AUTOATTACK_EXAMPLES)
        if os.path.exists(os.path.join(root, "model_test.pt")):
            break
    else:
        raise FileNotFoundError("pyautoattack/examples/model_test.pt not found in site-packages")
    spec = importlib.util.spec_from_file_location("aa_resnet", os.path.join(root, "resnet.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = mod.ResNet18()
    m.load_state_dict(torch.load(os.path.join(root, "model_test.pt"), map_location="cpu", weights_only=True))
    return m.eval()


def dm_large(seed: int):
    """The CROWN-IBP paper's large CIFAR CNN ("DM-large", ``IBP_large`` in its code): conv 64-64-128(s2)-128-128,
    fc 512, 10; PyTorch's default initialisation with ``seed`` (random weights)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, 1, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(), nn.Conv2d(128, 128, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(128, 128, 3, 1, 1), nn.ReLU(), nn.Flatten(), nn.Linear(128 * 16 * 16, 512), nn.ReLU(),
        nn.Linear(512, 10),
    ).eval()


def _hooks(ibp_counts: dict) -> None:
    """Report each CROWN intermediate layer (and progress inside it) on stdout."""
    from robkd.bounds import graph, windows

    state = {"layer": None, "done": 0, "total": 0, "t": 0.0, "last": 0.0}
    orig_node = graph.BoundedModel._crown_node

    def node(self, inputs, op, lo, hi, *args, **kwargs):
        before = int(((lo < 0) & (hi > 0)).sum())
        state.update(layer=op.name, done=0, total=before, t=time.perf_counter(), last=time.perf_counter())
        out = orig_node(self, inputs, op, lo, hi, *args, **kwargs)
        after = int(((out[0] < 0) & (out[1] > 0)).sum())
        emit({"layer": op.name, "shape": list(op.out_shape), "ibp_unstable": ibp_counts.get(op.name),
              "unstable_before": before, "unstable_after": after, "seconds": round(time.perf_counter() - state["t"], 2),
              "peak_kb": _status_kb("VmHWM"), "cpu": round(time.process_time(), 1)})
        state["layer"] = None
        return out

    def tick(k: int) -> None:
        if state["layer"] is None:
            return
        state["done"] += k
        now = time.perf_counter()
        if now - state["last"] > 5.0:
            state["last"] = now
            emit({"progress": state["layer"], "pairs_done": state["done"], "pairs_total": state["total"],
                  "seconds": round(now - state["t"], 1), "peak_kb": _status_kb("VmHWM"),
                  "cpu": round(time.process_time(), 1)})

    orig_lower = windows.WindowPass.lower

    def lower(self, ps, pn, eps):
        out = orig_lower(self, ps, pn, eps)
        tick(int(ps.shape[0]))
        return out

    orig_conc = graph.concretize

    def conc(A, bias, inputs):
        out = orig_conc(A, bias, inputs)
        tick(int(out.numel()) // 2)
        return out

    graph.BoundedModel._crown_node = node
    windows.WindowPass.lower = lower
    graph.concretize = conc


def main() -> int:
    cfg = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(int(cfg.get("threads", 1)))
    import robkd
    from robkd.bounds import BoundedModel, certify, ops
    from robkd.bounds.inputset import InputSet
    from robkd.types import Norm

    model = resnet18() if cfg["model"] == "resnet18" else dm_large(int(cfg.get("seed", 0)))
    n, eps, method = int(cfg["n"]), float(cfg["eps"]), cfg["method"]
    g = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    x = torch.rand((n, 3, 32, 32), generator=g)  # seeded uniform images in [0,1] (no CIFAR-10 test set here)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels: the model's own predictions (every sample clean-correct)
    # unstable ReLU inputs per layer under pure IBP (cheap; reported beside CROWN's counts)
    bm = BoundedModel(model, (3, 32, 32))
    with torch.no_grad():
        nb = bm.intermediate_bounds(InputSet.around(x, eps, Norm.LINF), False)
    ibp_counts = {op.inputs[0]: int(((nb[op.inputs[0]][0] < 0) & (nb[op.inputs[0]][1] > 0)).sum())
                  for op in bm.ops if isinstance(op, ops.ReLU)}
    emit({"robkd_file": robkd.__file__, "cpu": round(time.process_time(), 1), "ibp_unstable": ibp_counts, "total_relus": bm.total_relus,
          "load": list(os.getloadavg())})
    del bm, nb
    if method in ("crown", "alpha-crown", "budget"):
        _hooks(ibp_counts)
    kwargs = {"batch_size": n, "early_exit": False}
    if method == "crown-ibp":
        kwargs.update(method="crown", intermediate="ibp")
    elif method != "budget":
        kwargs.update(method=method)
    times, cpus, peaks = [], [], []
    res = None
    for _ in range(int(cfg.get("repeats", 1))):
        base = reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        if method == "budget":
            from robkd.bounds.budget import Budget, certify_budget

            res = certify_budget(model, x, y, eps, Budget.parse(cfg["budget"]), batch_size=n)
        else:
            res = certify(model, x, y, eps, **kwargs)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        peaks.append(max(0, _status_kb("VmHWM") - base))
    out = {
        "seconds_per_sample": [t / n for t in times], "cpu_per_sample": [c / n for c in cpus], "peak_mb": [p / 1024 for p in peaks], "n": n,
        "certified": [bool(c) for c in res.certified], "status": list(res.status),
        "decided_by": list(getattr(res, "decided_by", []) or []),
        "margin_lb": [[float(v) for v in row] for row in res.margin_lb],
        "unstable": [int(u) for u in res.unstable], "total_relus": int(res.total_relus),
        "load": list(os.getloadavg()),
    }
    if method == "budget":
        out["sample_seconds"] = list(res.sample_seconds)
        out["fallbacks"] = list(res.fallbacks)
    emit({"result": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
