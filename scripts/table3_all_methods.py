#!/usr/bin/env python
"""Fashion-MNIST Table-3 analogue for every robust-distillation method, 3 seeds, plus ``--method auto``.

One PGD-AT teacher (``robkd:cnn_small`` width 2) per seed; students (``robkd:cnn_small``, from scratch,
the same epochs and data for every method): ST, KD, ARD, Fast-ARD, KDIGA, KDIGA-ARDC, KDIGA-ARDA, RSLAD,
IAD, AdaAD, and ARD/RSLAD/AdaAD + IGDM. Every student is audited against its teacher with ``robkd.audit``
on seeded Fashion-MNIST *test* subsets: clean accuracy and PGD-20 at each radius, the worst case of PGD-20 and
AutoAttack (standard) at the largest radius, and the KDIGA paper's Table-4 columns (LLM of student and teacher,
clean CE, the input-gradient difference, the Proposition-2 bound with the dual norm) at two radii. Training
cost is the summed ``train_seconds`` of the epoch logs, relative to KD. The table gives mean and spread
(min..max) over the seeds. Finally ``--method auto`` repairs the KD student of each seed within
``--auto-budget`` against ``--gate`` and the short KDIGA repair is run beside it (``auto`` section).

Model selection uses the validation split carved from the training data, never the test set. Resumable:
every finished training run and audit is skipped, an interrupted training run resumes from its state in
``--work``. ``--audit-helper`` beside a running main process (same arguments) audits the trained students from
the last method back, so two cores share one seed's audits. ``ROBKD_TABLE3_SMOKE=1`` (or ``--smoke``) runs the whole pipeline at a tiny size (bundled slice,
1 epoch, 2 seeds, small audits) in about a minute, to check it end to end. Full run (the lead schedules it)::

    OMP_NUM_THREADS=1 nohup .venv/bin/python scripts/table3_all_methods.py > runs/table3_all.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

#: (name, label, repair method, extra options); "st" trains without a teacher
METHODS = [
    ("st", "ST", "st", {}), ("kd", "KD", "kd", {}), ("ard", "ARD", "ard", {"alpha": 0.5, "temperature": 1.0}),
    ("fast-ard", "Fast-ARD", "fast-ard", {"alpha": 0.5, "temperature": 1.0}), ("kdiga", "KDIGA", "kdiga", {}),
    ("kdiga-ardc", "KDIGA-ARDC", "kdiga-ardc", {}), ("kdiga-arda", "KDIGA-ARDA", "kdiga-arda", {}),
    ("rslad", "RSLAD", "rslad", {}), ("iad", "IAD", "iad", {}), ("adaad", "AdaAD", "adaad", {}),
    ("ard-igdm", "ARD+IGDM", "ard", {"alpha": 0.5, "temperature": 1.0, "igdm": True}),
    ("rslad-igdm", "RSLAD+IGDM", "rslad", {"igdm": True}), ("adaad-igdm", "AdaAD+IGDM", "adaad", {"igdm": True}),
]
#: the seed papers' orderings checked (a > b on mean robust accuracy at the largest radius, worst case)
ORDERINGS = [("kdiga", "kd", "KDIGA paper: KDIGA beats KD"), ("ard", "kd", "ARD paper: ARD beats KD"),
             ("kdiga-ardc", "ard", "KDIGA paper: KDIGA-ARDC beats ARD"), ("kdiga-arda", "ard", "KDIGA paper: KDIGA-ARDA beats ARD"),
             ("rslad", "ard", "RSLAD paper: RSLAD beats ARD"), ("iad", "ard", "IAD paper: IAD beats ARD"),
             ("adaad", "rslad", "AdaAD paper: AdaAD beats RSLAD"), ("rslad-igdm", "rslad", "IGDM paper: +IGDM helps RSLAD"),
             ("adaad-igdm", "adaad", "IGDM paper: +IGDM helps AdaAD"), ("ard-igdm", "ard", "IGDM paper: +IGDM helps ARD")]


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="reports/table3_all")
    ap.add_argument("--work", default="runs/table3_all", help="training states, logs and audits (not committed)")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-dir")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train-n", type=int, default=12000)
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--student-epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--val-n", type=int, default=300)
    ap.add_argument("--eval-n", type=int, default=1000, help="test samples of the PGD-20 curve (every radius)")
    ap.add_argument("--aa-n", type=int, default=500,
                    help="test samples of the worst case (PGD-20, then AutoAttack on what survives) at the largest radius")
    ap.add_argument("--table4-n", type=int, default=200, help="test samples of the LLM / Prop-2 columns (a third audit)")
    ap.add_argument("--radii", default="0.02,0.04,0.06,0.08,0.1")
    ap.add_argument("--table4-radii", default="0.05,0.1")
    ap.add_argument("--gate", default="student.worst@0.1 >= 0.9*teacher.worst@0.1")
    ap.add_argument("--auto-budget", default="2h")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--aa", default="autoattack", help="the AutoAttack spec of the worst case (smoke: apgd-ce, its first component)")
    ap.add_argument("--smoke", action="store_true", help="tiny end-to-end run (also ROBKD_TABLE3_SMOKE=1)")
    ap.add_argument("--audit-helper", action="store_true",
                    help="beside a running main process on the same --work: audit the students already trained, from the "
                         "last method back (the main process goes forward and skips what is done), then stop; writes no table")
    a = ap.parse_args(argv)
    if a.smoke or os.environ.get("ROBKD_TABLE3_SMOKE") == "1":
        a.smoke = True
        a.data, a.seeds, a.train_n, a.teacher_epochs, a.student_epochs = "fashion-mnist-slice", "0,1", 384, 1, 1
        a.val_n, a.eval_n, a.table4_n, a.radii, a.table4_radii, a.auto_budget = 48, 48, 24, "0.05,0.1", "0.05,0.1", "20s"
        a.aa_n = 48
        a.aa = "apgd-ce"  # full AutoAttack (standard) costs ~25 s per model even on 48 images
        a.out, a.work = a.out + "_smoke", a.work + "_smoke"
    return a


def train_settings(a: argparse.Namespace, seed: int) -> dict:
    """The training options every run of the experiment shares (teacher and students), for ``robkd.distill.train``/``repair``."""
    steps = 3 if a.smoke else 10
    return dict(data=a.data, data_dir=a.data_dir, seed=seed, train_n=a.train_n, lr=a.lr, momentum=0.9, weight_decay=5e-4,
                schedule="multistep", milestones=(0.5, 0.75), eps=0.1, step_size=0.025, steps=steps, val_n=a.val_n,
                val_steps=steps, select="val-robust", show_progress=False, batch_size=64 if a.smoke else 128)


def _spread(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    import torch

    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    log = logging.getLogger("table3_all")
    os.environ.setdefault("ROBKD_NO_PROGRESS", "1")
    import robkd
    from robkd.distill import repair, train
    from robkd.distill.checks import chance_level_warning

    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    radii = [float(r) for r in a.radii.split(",")]
    t4_radii = [float(r) for r in a.table4_radii.split(",")]

    def common(seed):
        return train_settings(a, seed)

    def audit_json(name, seed, teacher, student, kw) -> dict:
        f = work / f"s{seed}" / f"{name}.json"
        if f.exists():
            return json.loads(f.read_text())
        res = robkd.audit(str(teacher), str(student), data=a.data, data_dir=a.data_dir, seed=seed, **kw)
        d = res.to_dict()
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")  # atomic: an --audit-helper may read it meanwhile
        tmp.write_text(json.dumps(d))
        os.replace(tmp, f)
        return d

    rows: dict[str, dict[int, dict]] = {m[0]: {} for m in METHODS}
    teachers: dict[int, dict] = {}
    autos: dict[int, dict] = {}
    excluded: dict[int, dict] = {}  # seeds whose teacher failed to train (the rule is fixed here, not chosen after the fact)
    for seed in seeds:
        wd = work / f"s{seed}"
        wd.mkdir(exist_ok=True)
        tpath = wd / "teacher.pt"
        if a.audit_helper and not tpath.exists():
            log.info("audit helper: seed %d has no teacher yet", seed)
            continue
        if not tpath.exists():
            log.info("seed %d: teacher (PGD-AT, %d epochs)", seed, a.teacher_epochs)
            train("at", "robkd:cnn_small", epochs=a.teacher_epochs, out=tpath, arch_kwargs={"width": 2},
                  state_path=wd / "teacher.state.pt", log_path=wd / "teacher.log.jsonl", resume=True, **common(seed))
        tlog = [json.loads(x) for x in (wd / "teacher.log.jsonl").read_text().splitlines() if x.strip()]
        best_clean = max(r["val_clean"] for r in tlog)
        # robkd's own rule (robkd train warns the same way); the smoke run's 1-epoch teachers are near chance by design
        if chance_level_warning(tlog, 10) is not None and not a.smoke:  # 10 classes: PGD-AT from scratch can stay at the constant solution
            log.error("seed %d: the PGD-AT teacher never left chance level (best validation clean accuracy %.3f): "
                      "excluded, no student is distilled from it", seed, best_clean)
            excluded[seed] = {"reason": "the PGD-AT teacher never left chance level", "teacher_val_clean": best_clean,
                              "teacher_log": tlog}
            continue
        for name, _, method, extra in METHODS:
            p = wd / f"{name}.pt"
            if not p.exists():
                log.info("seed %d: student %s", seed, name)
                kw = dict(common(seed), state_path=wd / f"{name}.state.pt", log_path=wd / f"{name}.log.jsonl", resume=True)
                if method == "st":
                    train("st", "robkd:cnn_small", epochs=a.student_epochs, out=p, **kw)
                else:
                    repair(tpath, None, student_arch="robkd:cnn_small", method=method, epochs=a.student_epochs, out=p, **kw, **extra)
        # the PGD-20 curve at every radius; the AutoAttack worst case at the largest radius only (the table's column:
        # AutoAttack standard at five radii on every student would cost hours per seed on 2 CPU cores)
        eval_kw = dict(n=a.eval_n, eps=radii, attacks=["pgd-20"], sanity_n=0)
        worst_kw = dict(n=a.aa_n, eps=[max(radii)], attacks=["pgd-20", a.aa], sanity_n=0)
        t4_kw = dict(n=a.table4_n, eps=t4_radii, attacks=["pgd-20"], llm=True, llm_steps=5 if a.smoke else 20, sanity_n=0)
        if a.audit_helper:  # a second process: the trained students' audits from the last one back, then stop
            for name, *_ in reversed(METHODS):
                if (wd / f"{name}.pt").exists():
                    for suffix, kw in (("audit", eval_kw), ("worst", worst_kw), ("table4", t4_kw)):
                        audit_json(f"{name}.{suffix}", seed, tpath, wd / f"{name}.pt", kw)
            continue
        for name, *_ in METHODS:
            ev = audit_json(f"{name}.audit", seed, tpath, wd / f"{name}.pt", eval_kw)
            wc = audit_json(f"{name}.worst", seed, tpath, wd / f"{name}.pt", worst_kw)
            t4 = audit_json(f"{name}.table4", seed, tpath, wd / f"{name}.pt", t4_kw)
            lg = [json.loads(x) for x in (wd / f"{name}.log.jsonl").read_text().splitlines() if x.strip()]
            st = ev["student"]
            rows[name][seed] = {
                "clean": st["clean"]["value"],
                "pgd20": {f"{r['radius']:g}": r["after_attack"]["pgd-20"]["value"] for r in st["per_radius"]},
                "worst": {f"{r['radius']:g}": r["worst"]["value"] for r in wc["student"]["per_radius"]},
                "train_seconds": sum(r.get("train_seconds", 0.0) for r in lg),
                "table4": {f"{r['radius']:g}": {k: (r["summary"][k]["mean"] if isinstance(r["summary"].get(k), dict) else None)
                                               for k in ("llm_s", "llm_t", "ce_s", "grad_diff_dual", "grad_diff_l2", "bound", "bound_paper_l2")}
                           for r in ((t4.get("prop2") or {}).get("per_radius") or [])},
            }
            teachers[seed] = {"clean": ev["teacher"]["clean"]["value"],
                              "worst": {f"{r['radius']:g}": r["worst"]["value"] for r in wc["teacher"]["per_radius"]}}
        # --method auto on this seed's KD student, and the short KDIGA repair beside it
        # the repair's audit judges the gate on the worst-case column's images (the audit's seed is the run's seed)
        akw = {"n": a.aa_n, "eps": [max(radii)], "attacks": ["pgd-20", a.aa], "sanity_n": 0, "seed": seed}
        for kind in ("kdiga-short", "auto"):
            dst = wd / f"{kind}.pt"
            res_f = wd / f"{kind}.result.json"
            if res_f.exists():
                continue
            kw = dict(common(seed), epochs=1, audit=True, audit_out=wd / f"{kind}.audit", audit_kwargs=akw, audit_before=True,
                      gate=a.gate, state_path=wd / f"{kind}.state.pt", log_path=wd / f"{kind}.log.jsonl", resume=True)
            if kind == "auto":
                r = repair(tpath, wd / "kd.pt", method="auto", out=dst, budget=a.auto_budget,
                           auto_options={"max_rounds": 3 if a.smoke else 20, "rank_n": 48 if a.smoke else 1000}, **kw)
            else:
                r = repair(tpath, wd / "kd.pt", method="kdiga", out=dst, lambda_iga=2.0, **kw)
            res_f.write_text(json.dumps({"gates_passed": r.audit.gates_passed, "auto": r.auto,
                                         "student_worst": r.audit.metric(f"student.worst@{max(radii):g}").point,
                                         "teacher_worst": r.audit.metric(f"teacher.worst@{max(radii):g}").point}))
        autos[seed] = {k: json.loads((wd / f"{k}.result.json").read_text()) for k in ("kdiga-short", "auto")}

    if a.audit_helper:
        log.info("audit helper: done")
        return 0
    kept = [s for s in seeds if s not in excluded]
    if not kept:
        log.error("every seed was excluded: nothing to tabulate")
        return 1
    _write(a, out, rows, teachers, autos, kept, radii, t4_radii, robkd.__version__, torch.__version__, excluded)
    log.info("wrote %s", out / "table3_all.md")
    return 0


def _write(a, out, rows, teachers, autos, seeds, radii, t4_radii, version, torch_version, excluded) -> None:
    from robkd.distill.checks import CHANCE_FACTOR

    big = f"{max(radii):g}"
    kd_cost = statistics.fmean(rows["kd"][s]["train_seconds"] for s in seeds) or 1.0
    summary = {}
    for name, *_ in METHODS:
        rs = [rows[name][s] for s in seeds]
        summary[name] = {"clean": _spread([r["clean"] for r in rs]),
                         "pgd20": {k: _spread([r["pgd20"][k] for r in rs]) for k in rs[0]["pgd20"]},
                         "worst": {k: _spread([r["worst"][k] for r in rs]) for k in rs[0]["worst"]},
                         "cost_vs_kd": statistics.fmean(r["train_seconds"] for r in rs) / kd_cost,
                         "table4": {r_: {k: _spread([r["table4"].get(r_, {}).get(k) for r in rs]) for k in
                                         ("llm_s", "llm_t", "ce_s", "grad_diff_dual", "grad_diff_l2", "bound", "bound_paper_l2")}
                                    for r_ in (f"{x:g}" for x in t4_radii)}}
    f = lambda s: "-" if s is None else f"{100 * s['mean']:.1f} ({100 * s['min']:.1f}..{100 * s['max']:.1f})"  # noqa: E731
    g = lambda s: "-" if s is None else f"{s['mean']:.3g}"  # noqa: E731
    lab = {m[0]: m[1] for m in METHODS}
    lines = ["# Table 3 analogue, every method: Fashion-MNIST students of a PGD-AT teacher" + (" (SMOKE RUN)" if a.smoke else ""), "",
             f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}); mean (min..max) in %. {a.student_epochs} student epochs on "
             f"{a.train_n} training images, the same for every method; PGD-20 at every radius on {a.eval_n} test images, "
             f"the worst case of PGD-20 and {a.aa} at the largest radius on {a.aa_n} test images (the gate's audit of the "
             "`auto` section too); cost = summed training seconds relative to KD, with "
             f"{a.threads} torch thread(s) per process (wall-clock seconds: on a shared machine, runs side by side slow each "
             "other down, so the cost column is a rough guide). Produced by `scripts/table3_all_methods.py`.", "",
             "| Student | Clean | " + " | ".join(f"PGD-20 @{r:g}" for r in radii) + f" | Worst (PGD-20+{a.aa}) @{big} | Cost vs KD |",
             "|---" * (len(radii) + 4) + "|"]
    if excluded:
        reasons = "; ".join(sorted({e["reason"] for e in excluded.values()}))
        accs = ", ".join(f"{e['teacher_val_clean']:.3f}" for e in excluded.values())
        lines[4:4] = [f"Excluded seed(s) {', '.join(map(str, sorted(excluded)))}: {reasons} (best validation clean accuracy "
                      f"{accs}; the rule: below {CHANCE_FACTOR:g}x chance, added after seed 2's teacher failed this way). Their teacher logs are in "
                      "`table3_all.json` under `excluded`.", ""]
    tw = _spread([teachers[s]["worst"][big] for s in seeds])
    lines.append(f"| Teacher (PGD-AT) | {f(_spread([teachers[s]['clean'] for s in seeds]))} | " + " | ".join("" for _ in radii)
                 + f" | {f(tw)} | - |")
    for name, *_ in METHODS:
        s = summary[name]
        lines.append(f"| {lab[name]} | {f(s['clean'])} | " + " | ".join(f(s["pgd20"][f"{r:g}"]) for r in radii)
                     + f" | {f(s['worst'][big])} | {s['cost_vs_kd']:.2f} |")
    lines += ["", f"Table-4 columns (means over {a.table4_n} test images, then over seeds): LLM of student/teacher (estimates from "
              "below), clean CE of the student, input-gradient difference (L1 = dual norm of Linf, and the paper's L2), and "
              "the Proposition-2 bound (valid, dual norm; the paper's L2 figure beside it).", "",
              "| Student | radius | LLM_s | LLM_t | CE_s | ||g_s-g_t||_1 | ||g_s-g_t||_2 | bound (L1) | paper bound (L2) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, *_ in METHODS:
        for r_ in (f"{x:g}" for x in t4_radii):
            t = summary[name]["table4"][r_]
            lines.append(f"| {lab[name]} | {r_} | " + " | ".join(g(t[k]) for k in
                         ("llm_s", "llm_t", "ce_s", "grad_diff_dual", "grad_diff_l2", "bound", "bound_paper_l2")) + " |")
    lines += ["", f"Orderings of the papers at radius {big} (worst case, mean over seeds; 'holds in every seed' compares seed by seed):", ""]
    for hi, lo, text in ORDERINGS:
        m = summary[hi]["worst"][big]["mean"] > summary[lo]["worst"][big]["mean"]
        every = all(rows[hi][s]["worst"][big] > rows[lo][s]["worst"][big] for s in seeds)
        lines.append(f"- {text}: {'reproduces' if m else 'does NOT reproduce'} on the mean"
                     f"{' (holds in every seed)' if every else ' (not in every seed)'}.")
    lines += ["", f"`--method auto` on each seed's KD student, gate `{a.gate}`, budget {a.auto_budget}; the short KDIGA repair (1 epoch) "
              f"beside it. The gate is judged by the repair's own audit of student and teacher, on the {a.aa_n} test images of the "
              "worst-case column (its teacher figure is the table's teacher row):", "",
              "| seed | KDIGA short: gate | KDIGA worst | auto: gate | auto worst | teacher worst | chosen | kept | stopped |", "|---|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        k, au = autos[s]["kdiga-short"], autos[s]["auto"]
        b = au["auto"] or {}
        lines.append(f"| {s} | {'pass' if k['gates_passed'] else 'fail'} | {100 * k['student_worst']:.1f} | {'pass' if au['gates_passed'] else 'fail'} | "
                     f"{100 * au['student_worst']:.1f} | {100 * au['teacher_worst']:.1f} | {b.get('chosen')} | {b.get('kept')} | {b.get('stopped')} |")
    lines.append("")
    (out / "table3_all.md").write_text("\n".join(lines))
    meta = {"seeds": seeds, "data": a.data, "train_n": a.train_n, "teacher_epochs": a.teacher_epochs, "student_epochs": a.student_epochs,
            "eval_n": a.eval_n, "aa_n": a.aa_n, "table4_n": a.table4_n, "radii": radii, "table4_radii": t4_radii, "gate": a.gate,
            "auto_budget": a.auto_budget, "robkd_version": version, "torch": torch_version, "platform": platform.platform(),
            "smoke": a.smoke, "worst_case_attacks": ["pgd-20", a.aa], "written": time.strftime("%Y-%m-%d")}
    (out / "table3_all.json").write_text(json.dumps({"meta": meta, "summary": summary, "per_seed": {k: {s: v[s] for s in seeds} for k, v in rows.items()},
                                                     "teachers": teachers, "auto": autos, "excluded": excluded},
                                                    indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
