"""Work an audit does not redo: the teacher taken from the result cache, identical models attacked once.

Both figures time whole ``robkd.auditing.audit`` calls with the default settings (PGD-20, the default
sanity checks) on the bundled Fashion-MNIST slice, in one process, one torch thread. Teacher and
students are ``robkd:cnn_small`` models trained alike (3 epochs, seeds 0, 1, 2). Models trained alike
still differ in cost (their attack-based sanity checks attack the samples they keep), so every figure
puts each model in each position equally often, and the cheaper model cannot decide the ratio.

*Second audit / first audit*: every repeat starts from an empty cache directory, audits the teacher
against one student (computes both, stores both) and then the same teacher against the other student
(the teacher's block is loaded and re-checked: one forward pass over its clean inputs and its
adversarial examples; its sanity checks are loaded too); the students swap places every repeat, and the
ratio is that of the total times. The check: the second audit's teacher block and per-sample tensors
(adversarial examples included) are bit-identical to the first's, and come from the cache.

The figure is given twice: with a teacher trained like the students (the hardest case for the target:
the teacher costs what a student costs), and with the teacher a CI gate of distillation has, a robust
one (FGSM-trained, ``bench.common.small_cnn("robust")``), which costs more to attack than its students.

What a cache hit still costs: the fixed part of every audit (loading, the model checks, the
environment record, aggregation: about 0.1 s here) and, for the cached teacher, the re-check (one
forward pass over its clean inputs, one over its adversarial examples) and the aggregation's own passes
over the adversarial examples. A non-robust model under PGD-20 with early exit is broken in a few steps,
so re-checking it costs a good part of what attacking it cost; a robust teacher, the one a distillation
gate keeps, is where the cache saves most.

*M vs M / M vs M'*: with the cache off, a model audited against an identical copy of itself (attacked
once, its sanity checks run once) against the model audited with the other one, for both models:
(M vs M + M' vs M') / (M vs M' + M' vs M), medians of interleaved repeats. The check: the student's
block of M vs M is the teacher's, and both equal M's block in the audits with M'."""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Config, Row, judge, median, small_cnn, time_interleaved

FAMILY = "cache"
TARGET = "<= 0.55"
VOLATILE = ("timings", "cache")


def _settings(n: int) -> dict:
    return dict(data="fashion-mnist-slice", n=n, eps=[0.1], attacks=["pgd-20"])


def _block(d: dict, role: str) -> dict:
    b = {k: v for k, v in d[role].items() if k not in VOLATILE}
    b["model"] = {k: v for k, v in b["model"].items() if k != "role"}
    return b


def _tensors_equal(a, b, ra: str, rb: str) -> bool:
    names = [k[len(ra) + 1:] for k in a.tensors if k.startswith(ra + ".")]
    for k in names:
        u, v = a.tensors[f"{ra}.{k}"], b.tensors[f"{rb}.{k}"]
        if u.dtype.is_floating_point:
            if u.dtype != v.dtype or not torch.equal(u.isnan(), v.isnan()):
                return False
            u, v = u[~u.isnan()], v[~v.isnan()]
        if not torch.equal(u, v):
            return False
    return bool(names)


def _same(a, b, ra: str = "teacher", rb: str = "teacher") -> bool:
    return _block(a.to_dict(), ra) == _block(b.to_dict(), rb) and _tensors_equal(a, b, ra, rb)


def _pair_ratio(times: dict[str, list[float]], num: list[str], den: list[str], suffix: str = "") -> float:
    """sum over ``num`` of the median times / the same over ``den`` (``suffix`` "#cpu": process CPU time)."""
    return sum(median(times[k + suffix]) for k in num) / sum(median(times[k + suffix]) for k in den)


def _second_vs_first(cfg: Config, teacher, students, kw: dict, root: Path, case: str) -> Row:
    """The figure *second audit / first audit* (see the module docstring)."""
    from robkd.auditing import audit

    s1, s2 = students
    reps = cfg.repeats + cfg.repeats % 2
    times: dict[str, list[float]] = {"first": [], "second": [], "first#cpu": [], "second#cpu": []}
    ok = True
    for r in range(cfg.warmup + reps):
        cache = root / f"c{r}"
        a, b = (s1, s2) if r % 2 == 0 else (s2, s1)
        c0, t0 = time.process_time(), time.perf_counter()
        first = audit(teacher, a, cache=cache, **kw)
        t1, c1 = time.perf_counter(), time.process_time()
        second = audit(teacher, b, cache=cache, **kw)
        t2, c2 = time.perf_counter(), time.process_time()
        ok = ok and second.to_dict()["teacher"]["cache"]["hit"] and _same(first, second)
        if r >= cfg.warmup:
            times["first"].append(t1 - t0)
            times["second"].append(t2 - t1)
            times["first#cpu"].append(c1 - c0)
            times["second#cpu"].append(c2 - c1)
        shutil.rmtree(cache, ignore_errors=True)
    ratio = sum(times["second"]) / sum(times["first"])
    return Row(FAMILY, case, "second audit, same teacher (from the cache) and a new student / first audit", ratio,
               TARGET, judge(ratio, TARGET), check="teacher block and per-sample tensors bit-identical; teacher.cache.hit",
               check_ok=bool(ok),
               note=(f"ratio of total times over {reps} repeats, each from an empty cache directory; the two students "
                     "alternate as first and second"),
               timings=times, cpu_ratio=sum(times["second#cpu"]) / sum(times["first#cpu"]))


def _identical_vs_other(cfg: Config, m, other, kw: dict, case: str) -> Row:
    """The figure *M vs M / M vs M'* (see the module docstring)."""
    from robkd.auditing import audit

    twins = {"m": copy.deepcopy(m), "p": copy.deepcopy(other)}
    held: dict[str, object] = {}

    def job(name: str, a, b):
        def go() -> None:
            held[name] = audit(a, b, cache=False, **kw)
        return go

    t = time_interleaved({"m_vs_m": job("mm", m, twins["m"]), "mp_vs_mp": job("pp", other, twins["p"]),
                          "m_vs_mp": job("mp", m, other), "mp_vs_m": job("pm", other, m)},
                         repeats=cfg.repeats, warmup=cfg.warmup)
    mm, pp, mp, pm = held["mm"], held["pp"], held["mp"], held["pm"]
    ok = all(r.to_dict()["student"]["cache"]["same_as"] == "teacher" and _same(r, r, "teacher", "student")
             for r in (mm, pp)) and _same(mp, mm) and _same(pm, pp) and _same(mp, pp, "student", "teacher")
    num, den = ["m_vs_m", "mp_vs_mp"], ["m_vs_mp", "mp_vs_m"]
    ratio = _pair_ratio(t, num, den)
    return Row(FAMILY, case, "audit of M vs an identical copy of M / audit of M vs M'", ratio, TARGET,
               judge(ratio, TARGET), check="student block = teacher block = M's block in M vs M' (bit-identical tensors)",
               check_ok=bool(ok),
               note="cache off (--no-cache): the identical model is attacked once; (M vs M + M' vs M') / (M vs M' + M' vs M), medians",
               timings=t, cpu_ratio=_pair_ratio(t, num, den, "#cpu"))


def run(cfg: Config) -> list[Row]:
    n = 100 if cfg.quick else 500
    kw = _settings(n)
    trained = [small_cnn("trained", seed) for seed in (0, 1, 2)]
    what = f"fmnist n={n}, PGD-20 eps 0.1, default sanity checks"
    root = Path(tempfile.mkdtemp(prefix="robkd-bench-cache-"))
    try:
        return [
            _second_vs_first(cfg, trained[0], trained[1:], kw, root,
                             f"cnn_small trained teacher, two cnn_small trained students, {what}"),
            _second_vs_first(cfg, small_cnn("robust", 0), trained[1:], kw, root,
                             f"cnn_small FGSM-trained teacher, two cnn_small trained students, {what}"),
            _identical_vs_other(cfg, trained[0], trained[1], kw, f"cnn_small trained M and M', {what}"),
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
