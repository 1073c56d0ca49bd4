"""Optional report sections: certification, LLM / Proposition 2, linear regions, training, before/after.

Each function takes the results dict and returns a (possibly empty) list of
blocks; an absent or malformed optional section yields no blocks (or a short
note), never an exception.
"""

from __future__ import annotations

import math
from typing import Any

from robkd.report import doc as D
from robkd.report.svg import PALETTE, BarGroup, Series, bar_chart, line_chart

TEACHER_COLOR, STUDENT_COLOR, BEFORE_COLOR = PALETTE[0], PALETTE[1], PALETTE[4]

LLM_NOTE = (
    "The local linearity measure (LLM) is estimated by projected ascent, so it is an estimate from below "
    "of the true maximum; a bound built from it can itself be too low. The valid Proposition-2 bound uses "
    "the dual norm of the threat model's norm (L1 for an Linf ball, L2 for an L2 ball). The L2 gradient "
    "difference printed in the KDIGA paper's Table 4 is shown beside it, labelled as the paper's figure: "
    "for an Linf ball it is not a valid bound."
)


def _r():  # late import keeps the helpers in one place
    from robkd.report import core as R

    return R


def _frame(rows: list[dict[str, Any]], columns: list[str] | None = None) -> Any:
    import pandas as pd

    return pd.DataFrame(rows, columns=columns) if columns else pd.DataFrame(rows)


def _ok_cert(result: dict[str, Any], role: str) -> dict[str, Any] | None:
    c = result.get(role, {}).get("certification") if isinstance(result.get(role), dict) else None
    return c if isinstance(c, dict) else None


# ----------------------------------------------------------------------------- certification
def certification_section(result: dict[str, Any], names: dict[str, str]) -> list[D.Block]:
    """Certified (lower) vs empirical (upper) robust accuracy per radius, per model."""
    R = _r()
    certs = {role: _ok_cert(result, role) for role in ("teacher", "student")}
    if not any(certs.values()):
        return []
    radii = R._radii(result)
    blocks: list[D.Block] = [D.Heading(2, "Certified vs empirical robustness", "certification")]
    blocks.append(D.Para(
        "The true robust accuracy lies between the certified accuracy (a proof: no perturbation in the ball "
        "changes the prediction) and the empirical accuracy under attack (an upper estimate). The shaded band "
        "is that undecided range.", "note"))
    series: list[Series] = []
    rows: list[dict[str, Any]] = []
    for role, color in (("teacher", TEACHER_COLOR), ("student", STUDENT_COLOR)):
        c = certs[role]
        if c is None:
            continue
        method = str(c.get("method") or "?")
        if c.get("status") != "ok":
            why = str(c.get("reason") or c.get("status") or "unknown reason")
            blocks.append(D.Para([("b", f"{names[role]} ({role}): "), ("", f"certification ({method}) did not run: {why}")], "warn"))
            continue
        pr = c.get("per_radius") or []
        xs, cert_v, emp_v = [], [], []
        for i, r in enumerate(radii):
            row = pr[i] if i < len(pr) and isinstance(pr[i], dict) else {}
            cv = R.prop(row.get("certified"))[0]
            ev = R.prop(row.get("empirical"))[0]
            xs.append(float(r))
            cert_v.append(cv)
            emp_v.append(ev)
            broken = row.get("certified_but_broken")
            rows.append({
                "model": f"{names[role]} ({role})", "radius": R.radius_label(r), "method": method,
                "certified": R.pct_ci(row.get("certified")), "empirical (attack)": R.pct_ci(row.get("empirical")),
                "undecided": R.pct(ev - cv) if cv is not None and ev is not None else "–",
                "certified but broken": R.fmt_num(broken),
            })
            for extra in ("falsified", "unknown"):
                if extra in row:
                    rows[-1][extra] = R.fmt_num(row.get(extra))
            if isinstance(broken, (int, float)) and broken > 0:
                blocks.append(D.Para(f"{names[role]} ({role}) at {R.radius_label(r)}: {int(broken)} sample(s) are certified yet "
                                     "an attack broke them. This is inconsistent: the bound or the attack is wrong.", "warn"))
        series.append(Series(f"{role}: empirical (attack)", xs, emp_v, cert_v, emp_v, color=color, width=2.4))
        series.append(Series(f"{role}: certified ({method})", xs, cert_v, color=color, dash="6 3", width=2.0))
    if series:
        blocks.append(D.Figure("certified-vs-empirical",
                               line_chart(series, title="Certified (lower) vs empirical (upper) robust accuracy",
                                          xlabel=f"{R._norm(result)} radius", ylabel="accuracy", xticks=R._xticks(radii)[1:] or None,
                                          ylim=(0.0, 1.0), yfmt="{:.0%}"),
                               "Dashed: certified accuracy; solid: robust accuracy under the attack suite; shaded: undecided band."))
    if rows:
        blocks.append(D.Table(_frame(rows), "Certified and empirical robust accuracy with 95% intervals."))
    return blocks


# ----------------------------------------------------------------------------- linear regions
def linear_region_section(result: dict[str, Any], names: dict[str, str]) -> list[D.Block]:
    """Share of samples whose whole ball lies in one linear region; mean unstable ReLUs."""
    R = _r()
    radii = R._radii(result)
    rows = []
    for role in ("teacher", "student"):
        c = _ok_cert(result, role)
        if not c or c.get("status") != "ok":
            continue
        pr = c.get("per_radius") or []
        for i, r in enumerate(radii):
            row = pr[i] if i < len(pr) and isinstance(pr[i], dict) else {}
            if row.get("linear_region_fraction") is None and row.get("mean_unstable_relus") is None:
                continue
            frac = R._num(row.get("linear_region_fraction"))
            rows.append({"model": f"{names[role]} ({role})", "radius": R.radius_label(r),
                         "ball in one linear region": R.pct(frac),
                         "mean unstable ReLUs": R.fmt_num(row.get("mean_unstable_relus"), 4),
                         "total ReLUs": R.fmt_num(row.get("total_relus"))})
    if not rows:
        return []
    return [
        D.Heading(2, "Linear regions", "linear-regions"),
        D.Para("Proposition 1 of the KDIGA paper assumes the perturbation ball lies in one linear region of a "
               "piecewise-linear network. A ball is in one region when no ReLU's pre-activation bounds over the ball "
               "straddle zero (checked with the certification bounds, so the share below is a lower estimate); "
               "there the network is affine and the LLM is exactly 0.", "note"),
        D.Table(_frame(rows), "Linear-region statistics per radius."),
    ]


# ----------------------------------------------------------------------------- LLM / Proposition 2
def _mean(summary: dict[str, Any], key: str) -> float | None:
    v = summary.get(key)
    if isinstance(v, dict):
        v = v.get("mean")
    return _r()._num(v)


def _median(summary: dict[str, Any], key: str) -> float | None:
    v = summary.get(key)
    return _r()._num(v.get("median")) if isinstance(v, dict) else None


def _g(v: float | None) -> str:
    return "–" if v is None else f"{v:.4g}"


def llm_section(result: dict[str, Any], names: dict[str, str]) -> list[D.Block]:
    """LLM and Proposition-2 terms, teacher vs student, with the bound violation rate."""
    R = _r()
    p2 = result.get("prop2")
    if not isinstance(p2, dict) or not isinstance(p2.get("per_radius"), list) or not p2["per_radius"]:
        return []
    per = [(R._num(e.get("radius")), e.get("summary") if isinstance(e.get("summary"), dict) else {})
           for e in p2["per_radius"] if isinstance(e, dict)]
    per = [(r, s) for r, s in per if r is not None]
    if not per:
        return []
    norm = R._norm(result)
    dual = next((str(s.get("dual_norm")) for _, s in per if s.get("dual_norm")), "L1" if norm.lower() == "linf" else "L2")
    tn, sn = names["teacher"], names["student"]
    blocks: list[D.Block] = [D.Heading(2, "Local linearity and Proposition 2", "llm"), D.Para(LLM_NOTE, "note")]
    # chart 1: LLM (mean) per radius, teacher vs student
    xs = [r for r, _ in per]
    if len(per) > 1:
        series = [Series(f"{tn} (teacher) LLM", xs, [_mean(s, "llm_t") for _, s in per], color=TEACHER_COLOR),
                  Series(f"{sn} (student) LLM", xs, [_mean(s, "llm_s") for _, s in per], color=STUDENT_COLOR)]
        blocks.append(D.Figure("llm", line_chart(series, title="Local linearity (mean, estimate from below)",
                                                 xlabel=f"{norm} radius", ylabel="LLM",
                                                 xticks=[(x, R.radius_label(x)) for x in xs]),
                               "Mean LLM per radius; lower is more locally linear."))
    else:
        r, s = per[0]
        cats = ["LLM", "clean CE"]
        groups = [BarGroup(f"{tn} (teacher)", [_mean(s, "llm_t"), _mean(s, "ce_t")], color=TEACHER_COLOR),
                  BarGroup(f"{sn} (student)", [_mean(s, "llm_s"), _mean(s, "ce_s")], color=STUDENT_COLOR)]
        blocks.append(D.Figure("llm", bar_chart(cats, groups, title=f"LLM and clean CE at {R.radius_label(r)} (means)",
                                                ylabel="value"),
                               "Mean LLM (estimate from below) and mean clean cross-entropy."))
    # chart 2: the bound vs the measured left-hand side
    cats = [R.radius_label(r) for r, _ in per]
    lhs = [_mean(s, "lhs_max") for _, s in per]
    bound = [_mean(s, "bound") for _, s in per]
    paper = [_mean(s, "bound_paper_l2") for _, s in per]
    vals = [v for v in lhs + bound + paper if v is not None and v > 0]
    log_scale = bool(vals) and max(vals) / min(vals) > 50
    groups = [BarGroup("measured max |CE_s - CE_t| (attack)", lhs, color=PALETTE[2]),
              BarGroup(f"bound, {dual} dual norm (valid)", bound, color=PALETTE[0])]
    if any(v is not None for v in paper) and dual != "L2":
        groups.append(BarGroup("bound with L2 norm (paper's figure)", paper, color=PALETTE[5]))
    blocks.append(D.Figure("prop2", bar_chart(cats, groups, title="Proposition 2: bound vs measured loss gap (means)",
                                              ylabel="cross-entropy gap" + (" (log scale)" if log_scale else ""), log=log_scale),
                           "Per radius: the largest student-teacher loss gap found by attack, the valid dual-norm bound and "
                           "the paper's L2 variant."))
    rows = []
    for r, s in per:
        rows.append({
            "radius": R.radius_label(r),
            "LLM teacher (mean / median)": f"{_g(_mean(s, 'llm_t'))} / {_g(_median(s, 'llm_t'))}",
            "LLM student (mean / median)": f"{_g(_mean(s, 'llm_s'))} / {_g(_median(s, 'llm_s'))}",
            "CE teacher": _g(_mean(s, "ce_t")),
            "CE student": _g(_mean(s, "ce_s")),
            f"‖g_s − g_t‖ {dual} (dual)": _g(_mean(s, "grad_diff_dual")),
            "‖g_s − g_t‖ L2 (paper)": _g(_mean(s, "grad_diff_l2")),
            "bound (valid)": _g(_mean(s, "bound")),
            "bound, L2 (paper)": _g(_mean(s, "bound_paper_l2")),
            "measured LHS": _g(_mean(s, "lhs_max")),
            "violations": _violations(s),
        })
    blocks.append(D.Table(_frame(rows), "Means over the audited samples (medians for LLM). A violation means the measured "
                                         "loss gap exceeded the computed bound, i.e. an LLM estimate was too low."))
    notes = {str(s.get("note")) for _, s in per if s.get("note")}
    for n in sorted(notes):
        blocks.append(D.Para(n, "muted"))
    return blocks


def _violations(s: dict[str, Any]) -> str:
    rate = _r()._num(s.get("violation_rate"))
    k = s.get("violations")
    n = s.get("n")
    if rate is None:
        return "–"
    count = f" ({k}/{n})" if isinstance(k, int) and isinstance(n, int) else ""
    return f"{100 * rate:.1f}%{count}"


# ----------------------------------------------------------------------------- training log (repair)
_NOT_LOSS = {"epoch", "lr", "steps", "train_seconds", "images_per_s", "val_clean", "val_robust", "loss", "seconds"}


def _records(result: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    tr = result.get("training")
    if isinstance(tr, list):
        return [r for r in tr if isinstance(r, dict)], {}
    if isinstance(tr, dict):
        recs = tr.get("records") if isinstance(tr.get("records"), list) else tr.get("log")
        return [r for r in (recs or []) if isinstance(r, dict)], tr
    return [], {}


def training_section(result: dict[str, Any], names: dict[str, str]) -> list[D.Block]:
    """Per-epoch loss terms and validation clean/robust accuracy of a repair run."""
    R = _r()
    recs, meta = _records(result)
    if not recs:
        return []
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    method = str(cfg.get("method") or meta.get("method") or "the repair objective")
    epochs = [R._num(r.get("epoch")) for r in recs]
    xs = [e if e is not None else float(i + 1) for i, e in enumerate(epochs)]
    blocks: list[D.Block] = [D.Heading(2, "Training (repair)", "training")]
    sel = meta.get("selected_epoch")
    blocks.append(D.Para(f"{len(recs)} epoch(s) of {method}" + (f"; the weights of epoch {sel} were kept." if sel else ".")
                         + ("" if meta.get("finished", True) else " Training did not finish."), ""))
    terms = [k for k in recs[0] if k not in _NOT_LOSS and all(R._num(r.get(k)) is not None for r in recs)]
    if "loss" in recs[0]:
        terms = terms + ["loss"]
    ticks = _epoch_ticks(xs)
    if terms:
        series = [Series(k if k != "loss" else "total loss", xs, [R._num(r.get(k)) for r in recs],
                         color=PALETTE[i % len(PALETTE)], width=2.8 if k == "loss" else 1.8)
                  for i, k in enumerate(terms)]
        blocks.append(D.Figure("training-loss", line_chart(series, title="Training loss terms per epoch", xlabel="epoch",
                                                           ylabel="loss", xticks=ticks),
                               "Mean of each loss term over the epoch's batches."))
    if any(R._num(r.get("val_clean")) is not None for r in recs):
        series = [Series("validation clean accuracy", xs, [R._num(r.get("val_clean")) for r in recs], color=PALETTE[0]),
                  Series("validation robust accuracy", xs, [R._num(r.get("val_robust")) for r in recs], color=PALETTE[1])]
        blocks.append(D.Figure("training-validation", line_chart(series, title="Validation accuracy per epoch", xlabel="epoch",
                                                                 ylabel="accuracy", xticks=ticks, ylim=(0.0, 1.0), yfmt="{:.0%}"),
                               "Clean and robust (PGD) accuracy on the held-out validation split after each epoch."))
    cols = ["epoch"] + [k for k in recs[0] if k != "epoch"]
    rows = [{k: (R.fmt_num(r.get(k), 4) if k not in ("val_clean", "val_robust") else R.pct(R._num(r.get(k))))
             for k in cols} for r in recs]
    blocks.append(D.Table(_frame(rows, cols), "Training log."))
    return blocks


def _epoch_ticks(xs: list[float]) -> list[tuple[float, str]]:
    if not xs:
        return []
    step = max(1, math.ceil(len(xs) / 10))
    ticks = xs[::step]
    if ticks[-1] != xs[-1]:
        ticks.append(xs[-1])
    return [(x, f"{x:g}") for x in ticks]


# ----------------------------------------------------------------------------- before / after (repair)
def before_after_section(result: dict[str, Any], names: dict[str, str]) -> list[D.Block]:
    """Student before repair vs after, against the teacher, per radius (worst case)."""
    R = _r()
    before = result.get("before")
    if not isinstance(before, dict):
        return []
    b_student = before.get("student") if isinstance(before.get("student"), dict) else before
    radii = R._radii(result)
    b_radii = R._radii(before) or radii
    t, s = result["teacher"], result["student"]

    def worst_at(model: dict[str, Any], rs: list[float], r: float) -> Any:
        for i, rr in enumerate(rs):
            if abs(rr - r) <= 1e-9 * max(1.0, abs(r)):
                return R._per_radius(model, rs)[i].get("worst")
        return None

    b_name = R._model_name(before, "student") if isinstance(before.get("student"), dict) else "student before repair"
    xs = [0.0] + [float(r) for r in radii if r > 0]
    series = []
    for label, model, rs, color, dash in (("teacher", t, radii, TEACHER_COLOR, ""),
                                          (f"before repair: {b_name}", b_student, b_radii, BEFORE_COLOR, "6 3"),
                                          (f"after repair: {names['student']}", s, radii, STUDENT_COLOR, "")):
        ys, lo, hi = [], [], []
        for x in xs:
            e = model.get("clean") if x == 0.0 else worst_at(model, rs, x)
            v, l, h = R.prop(e)
            ys.append(v), lo.append(l), hi.append(h)
        series.append(Series(label, xs, ys, lo, hi, color=color, dash=dash, width=2.4))
    rows = []
    for x in xs:
        eb = b_student.get("clean") if x == 0.0 else worst_at(b_student, b_radii, x)
        ea = s.get("clean") if x == 0.0 else worst_at(s, radii, x)
        et = t.get("clean") if x == 0.0 else worst_at(t, radii, x)
        vb, va = R.prop(eb)[0], R.prop(ea)[0]
        rows.append({"radius": "clean" if x == 0.0 else R.radius_label(x), "teacher": R.pct_ci(et),
                     "student before": R.pct_ci(eb), "student after": R.pct_ci(ea),
                     "change": "–" if vb is None or va is None else f"{100 * (va - vb):+.1f} pts"})
    blocks: list[D.Block] = [D.Heading(2, "Before and after repair", "before-after")]
    blocks.append(D.Figure("before-after", line_chart(series, title="Student before vs after repair (worst case)",
                                                      xlabel=f"{R._norm(result)} radius", ylabel="accuracy",
                                                      xticks=R._xticks(radii), ylim=(0.0, 1.0), yfmt="{:.0%}"),
                           "Radius 0 is clean accuracy; bands are 95% intervals."))
    blocks.append(D.Table(_frame(rows), "Clean and worst-case robust accuracy before and after repair."))
    b_gates = before.get("gates")
    if isinstance(b_gates, list) and b_gates:
        failed = sum(1 for g in b_gates if isinstance(g, dict) and not g.get("passed"))
        blocks.append(D.Para(f"Before repair, {failed} of {len(b_gates)} gate(s) failed.", "muted"))
    return blocks
