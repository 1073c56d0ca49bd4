"""Hand-made results dicts in the exact layout written by robkd.auditing (schema "1").

Counts are made up; every confidence interval is computed by the real
Clopper-Pearson code, so the dicts look exactly like an audit's output.
"""

from __future__ import annotations

import copy
from typing import Any

from robkd.auditing.stats import CONFIDENCE, Proportion, ratio_interval
from robkd.types import format_radius

RADII = [0.02, 0.05, 0.1]
ATTACKS = ["fgsm", "pgd-20"]
N = 400


def _p(k: int, n: int = N) -> dict[str, Any]:
    return Proportion.of(k, n).to_dict()


def _model(role: str, name: str, clean: int, worst: list[int], fgsm: list[int], *, cert: list[int] | None = None) -> dict[str, Any]:
    per_radius = []
    for i, r in enumerate(RADII):
        per_radius.append({
            "radius": r, "radius_text": format_radius(r), "worst": _p(worst[i]),
            "after_attack": {"fgsm": _p(fgsm[i]), "pgd-20": _p(worst[i])},
            "broken_by": {"fgsm": clean - fgsm[i], "pgd-20": fgsm[i] - worst[i]},
            "misclassified_clean": N - clean,
        })
    block: dict[str, Any] = {
        "model": {"role": role, "loaded_by_audit": True, "path": f"models/{name}", "file_sha256": "ab" * 32,
                  "weights_sha256": "cd" * 32, "parameters": 52650,
                  "meta": {"arch": "robkd:mlp", "arch_kwargs": {"hidden": [64, 32]}, "num_classes": 10,
                           "input_shape": [1, 28, 28], "mean": [0.286], "std": [0.353], "dataset": "fashion-mnist",
                           "class_names": None, "provenance": {"command": "robkd train --method at"}, "source": {}}},
        "clean": _p(clean),
        "per_radius": per_radius,
        "certification": None,
        "timings": {"clean_s": 0.01, "attacks_s": 1.2},
    }
    if cert is not None:
        block["certification"] = {"status": "ok", "method": "crown", "per_radius": [
            {"radius": r, "radius_text": format_radius(r), "certified": _p(cert[i]), "empirical": _p(worst[i]),
             "band": [cert[i] / N, worst[i] / N], "certified_but_broken": 0,
             "linear_region_fraction": [0.6, 0.3, 0.05][i], "mean_unstable_relus": [2.5, 8.1, 20.3][i], "total_relus": 96}
            for i, r in enumerate(RADII)]}
    return block


def _transfer(t: list[int], s: list[int]) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(RADII):
        tp, sp = Proportion.of(t[i], N), Proportion.of(s[i], N)
        point, lo, hi = ratio_interval(sp, tp)
        lost = max(t[i] - s[i], 0) + 5
        gained = lost - (t[i] - s[i])
        out.append({"radius": r, "radius_text": format_radius(r), "teacher_robust": t[i], "student_robust": s[i],
                    "both_robust": t[i] - lost,
                    "ratio": {"value": point, "ci_low": lo, "ci_high": hi, "confidence": CONFIDENCE, "method": "Bonferroni"},
                    "lost": {**_p(lost), "of_teacher_robust": lost / t[i]},
                    "gained": {**_p(gained), "of_student_robust": gained / s[i] if s[i] else None}})
    return out


def _prop2_summary(r: float, i: int) -> dict[str, Any]:
    def ms(m: float) -> dict[str, float]:
        return {"mean": m, "median": m * 0.8}

    return {"eps": r, "norm": "Linf", "dual_norm": "L1", "n": N, "llm_estimate": "lower",
            "llm_s": ms(0.05 * (i + 1)), "llm_t": ms(0.01 * (i + 1)), "ce_s": ms(0.45), "ce_t": ms(0.6),
            "grad_diff_dual": ms(30.0), "grad_diff_l2": ms(1.5), "bound": ms(1.1 + 30 * r), "bound_paper_l2": ms(1.1 + 1.5 * r),
            "lhs_max": ms(0.4 + i * 0.3), "violations": i, "violation_rate": i / N,
            "note": "LLM values are estimates from below of the true maximum."}


def audit_result(*, gates_pass: bool = False, certify: bool = False, prop2: bool = False,
                 teacher: str = "teacher.safetensors", student: str = "kd_student.safetensors") -> dict[str, Any]:
    """A complete audit results dict (schema 1)."""
    tw, sw = [300, 240, 160], [250, 120, 30]
    gates = [
        {"gate": "student.worst@0.1 >= 0.9*teacher.worst@0.1", "passed": gates_pass, "on": "lower",
         "reason": ("pass: " if gates_pass else "fail: not ") + "left 0.05 (lower 95% bound) >= right 0.39 (upper 95% bound)",
         "lhs": None, "rhs": None, "compared": [0.05, 0.39], "references": {}},
        {"gate": "student.clean >= 0.5", "passed": True, "on": "lower", "reason": "pass: left 0.83 >= right 0.5",
         "lhs": None, "rhs": None, "compared": [0.83, 0.5], "references": {}},
    ]
    d: dict[str, Any] = {
        "schema_version": "1", "kind": "robkd-audit", "created": "2025-01-01T00:00:00+0000",
        "command": ["robkd", "audit", f"models/{teacher}", f"models/{student}", "--eps", "0.02,0.05,0.1"],
        "config": {"teacher": f"models/{teacher}", "student": f"models/{student}", "data": "fashion-mnist", "n": N,
                   "seed": 0, "eps": RADII, "norm": "Linf", "attacks": ATTACKS, "gates": [g["gate"] for g in gates],
                   "certify": "crown" if certify else None, "llm": prop2},
        "norm": "Linf", "radii": list(RADII), "radii_text": [format_radius(r) for r in RADII], "attacks": list(ATTACKS),
        "confidence": CONFIDENCE,
        "data": {"dataset": "fashion-mnist", "requested": "fashion-mnist", "split": "test", "n": N, "n_requested": N,
                 "n_available": 10000, "seed": 0, "input_shape": [1, 28, 28], "num_classes": 10,
                 "class_names": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
                 "indices_sha256": "ef" * 32, "label_counts": [40] * 10},
        "teacher": _model("teacher", teacher, 340, tw, [320, 280, 200], cert=[280, 150, 40] if certify else None),
        "student": _model("student", student, 350, sw, [300, 200, 90], cert=[200, 40, 0] if certify else None),
        "transfer": _transfer(tw, sw),
        "prop2": {"steps": 20, "per_radius": [{"radius": r, "radius_text": format_radius(r), "summary": _prop2_summary(r, i)}
                                               for i, r in enumerate(RADII)]} if prop2 else None,
        "sanity": {"strict": False, "flags": []},
        "gates": gates if not gates_pass else [dict(g, passed=True) for g in gates],
        "gates_passed": gates_pass,
        "environment": {"python": "3.11.2", "torch": "2.4.0", "robkd": "0.1.0", "threads": 2},
        "resumed": [], "timings": {"total_s": 3.2},
    }
    return d


def repair_result() -> dict[str, Any]:
    """A repair results dict: the re-audit plus the training log and the pre-repair audit."""
    before = audit_result(student="kd_student.safetensors")
    after = audit_result(gates_pass=True, student="kdiga_student.safetensors")
    after["student"]["per_radius"][2]["worst"] = _p(150)
    after["student"]["per_radius"][2]["after_attack"]["pgd-20"] = _p(150)
    after["student"]["per_radius"][2]["after_attack"]["fgsm"] = _p(190)
    after["transfer"] = _transfer([300, 240, 160], [250, 120, 150])
    after["kind"] = "robkd-repair"
    after["training"] = {
        "records": [{"epoch": e, "lr": 0.01, "steps": 30 * e, "kd": 1.2 / e, "iga": 0.3 / e, "loss": 1.5 / e,
                     "train_seconds": 4.0, "images_per_s": 500.0, "val_clean": 0.7 + 0.02 * e, "val_robust": 0.1 + 0.08 * e}
                    for e in range(1, 6)],
        "config": {"method": "kdiga", "epochs": 5}, "finished": True, "selected_epoch": 5, "global_step": 150,
    }
    after["before"] = copy.deepcopy(before)
    return after
