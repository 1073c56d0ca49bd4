"""Optional report sections: certification, LLM / Proposition 2, linear regions, training, before/after.

Each function takes the typed view of the results (:class:`~robkd.report.schema.Results`) and returns a
(possibly empty) list of blocks; an absent or malformed optional section yields no blocks (or a short
note), never an exception.
"""

from __future__ import annotations

import math
from typing import Any

from robkd.report import doc as D
from robkd.report.format import (
    BEFORE_COLOR,
    STUDENT_COLOR,
    TEACHER_COLOR,
    fmt_g,
    fmt_num,
    frame,
    model_name,
    pct,
    pct_ci,
    radius_label,
    xticks,
)
from robkd.report.schema import Estimate, ModelBlock, Prop2Row, Results, find_radius, number
from robkd.report.svg import PALETTE, BarGroup, Series, bar_chart, line_chart

LLM_NOTE = (
    "The local linearity measure (LLM) is estimated by projected ascent, so it is an estimate from below "
    "of the true maximum; a bound built from it can itself be too low. The valid Proposition-2 bound uses "
    "the dual norm of the threat model's norm (L1 for an Linf ball, L2 for an L2 ball). The L2 gradient "
    "difference printed in the KDIGA paper's Table 4 is shown beside it, labelled as the paper's figure: "
    "for an Linf ball it is not a valid bound."
)


# ----------------------------------------------------------------------------- certification
def certification_section(res: Results, names: dict[str, str]) -> list[D.Block]:
    """Certified (lower) vs empirical (upper) robust accuracy per radius, per model."""
    certs = {role: res.model(role).certification for role in ("teacher", "student")}
    if not any(certs.values()):
        return []
    radii = res.radii
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
        method = c.method or "?"
        if not c.ok:
            why = c.reason or "unknown reason"
            blocks.append(D.Para([("b", f"{names[role]} ({role}): "), ("", f"certification ({method}) did not run: {why}")], "warn"))
            continue
        xs, cert_v, emp_v = [], [], []
        for i, r in enumerate(radii):
            row = c.row(i)
            cv, ev = row.certified.value, row.empirical.value
            xs.append(float(r))
            cert_v.append(cv)
            emp_v.append(ev)
            broken = row.numbers.get("certified_but_broken")
            rows.append({
                "model": f"{names[role]} ({role})", "radius": radius_label(r), "method": method,
                "certified": pct_ci(row.certified), "empirical (attack)": pct_ci(row.empirical),
                "undecided": pct(ev - cv) if cv is not None and ev is not None else "–",
                "certified but broken": fmt_num(broken),
            })
            for extra in ("falsified", "unknown"):
                if extra in row.numbers:
                    rows[-1][extra] = fmt_num(row.numbers[extra])
            if broken is not None and broken > 0:
                blocks.append(D.Para(f"{names[role]} ({role}) at {radius_label(r)}: {int(broken)} sample(s) are certified yet "
                                     "an attack broke them. This is inconsistent: the bound or the attack is wrong.", "warn"))
        series.append(Series(f"{role}: empirical (attack)", xs, emp_v, cert_v, emp_v, color=color, width=2.4))
        series.append(Series(f"{role}: certified ({method})", xs, cert_v, color=color, dash="6 3", width=2.0))
    if series and len(radii) == 1:  # one radius: a curve would be one point, so certified vs empirical as bars
        blocks.append(D.Figure("certified-vs-empirical", _certified_bars(series, names, radius_label(radii[0])),
                               "Per model: certified accuracy (a proof, lower end) and robust accuracy under the attack "
                               "suite (upper end); the true robust accuracy lies between them."))
    elif series:
        blocks.append(D.Figure("certified-vs-empirical",
                               line_chart(series, title="Certified (lower) vs empirical (upper) robust accuracy",
                                          xlabel=f"{res.norm} radius", ylabel="accuracy", xticks=xticks(radii)[1:] or None,
                                          ylim=(0.0, 1.0), yfmt="{:.0%}"),
                               "Dashed: certified accuracy; solid: robust accuracy under the attack suite; shaded: undecided band."))
    if rows:
        blocks.append(D.Table(frame(rows), "Certified and empirical robust accuracy with 95% intervals."))
    return blocks


def _certified_bars(series: list[Series], names: dict[str, str], radius: str) -> str:
    """Bars of certified and empirical accuracy per model at the one audited radius (``series`` come in
    (empirical, certified) pairs per model, as the certification section builds them)."""
    roles = [s.name.split(":", 1)[0] for s in series[::2]]
    cats = [f"{names.get(r, r)} ({r})" for r in roles]
    emp = [s.y[0] for s in series[::2]]
    cert = [s.y[0] for s in series[1::2]]
    groups = [BarGroup("certified", cert, color=PALETTE[2]), BarGroup("empirical (attack)", emp, color=PALETTE[0])]
    return bar_chart(cats, groups, title=f"Certified (lower) vs empirical (upper) robust accuracy at {radius}",
                     ylabel="accuracy", yfmt="{:.0%}", label_fmt="{:.1%}", tick_max=1.0)


# ----------------------------------------------------------------------------- linear regions
def linear_region_section(res: Results, names: dict[str, str]) -> list[D.Block]:
    """Share of samples whose whole ball lies in one linear region; mean unstable ReLUs."""
    rows = []
    for role in ("teacher", "student"):
        c = res.model(role).certification
        if c is None or not c.ok:
            continue
        for i, r in enumerate(res.radii):
            nums = c.row(i).numbers
            if nums.get("linear_region_fraction") is None and nums.get("mean_unstable_relus") is None:
                continue
            rows.append({"model": f"{names[role]} ({role})", "radius": radius_label(r),
                         "ball in one linear region": pct(nums.get("linear_region_fraction")),
                         "mean unstable ReLUs": fmt_num(nums.get("mean_unstable_relus"), 4),
                         "total ReLUs": fmt_num(nums.get("total_relus"))})
    if not rows:
        return []
    return [
        D.Heading(2, "Linear regions", "linear-regions"),
        D.Para("Proposition 1 of the KDIGA paper assumes the perturbation ball lies in one linear region of a "
               "piecewise-linear network. A ball is in one region when no ReLU's pre-activation bounds over the ball "
               "straddle zero (checked with the certification bounds, so the share below is a lower estimate); "
               "there the network is affine and the LLM is exactly 0.", "note"),
        D.Table(frame(rows), "Linear-region statistics per radius."),
    ]


# ----------------------------------------------------------------------------- LLM / Proposition 2
def llm_section(res: Results, names: dict[str, str]) -> list[D.Block]:
    """LLM and Proposition-2 terms, teacher vs student, with the bound violation rate."""
    per = res.prop2
    if not per:
        return []
    norm = res.norm
    dual = next((d for p in per if (d := p.text("dual_norm"))), "L1" if norm.lower() == "linf" else "L2")
    tn, sn = names["teacher"], names["student"]
    blocks: list[D.Block] = [D.Heading(2, "Local linearity and Proposition 2", "llm"), D.Para(LLM_NOTE, "note")]
    # chart 1: LLM (mean) per radius, teacher vs student
    xs = [p.radius for p in per]
    if len(per) > 1:
        series = [Series(f"{tn} (teacher) LLM", xs, [p.mean("llm_t") for p in per], color=TEACHER_COLOR),
                  Series(f"{sn} (student) LLM", xs, [p.mean("llm_s") for p in per], color=STUDENT_COLOR)]
        blocks.append(D.Figure("llm", line_chart(series, title="Local linearity (mean, estimate from below)",
                                                 xlabel=f"{norm} radius", ylabel="LLM",
                                                 xticks=[(x, radius_label(x)) for x in xs]),
                               "Mean LLM per radius; lower is more locally linear."))
    else:
        p = per[0]
        groups = [BarGroup(f"{tn} (teacher)", [p.mean("llm_t"), p.mean("ce_t")], color=TEACHER_COLOR),
                  BarGroup(f"{sn} (student)", [p.mean("llm_s"), p.mean("ce_s")], color=STUDENT_COLOR)]
        blocks.append(D.Figure("llm", bar_chart(["LLM", "clean CE"], groups, title=f"LLM and clean CE at {radius_label(p.radius)} (means)",
                                                ylabel="value"),
                               "Mean LLM (estimate from below) and mean clean cross-entropy."))
    # chart 2: the bound vs the measured left-hand side
    cats = [radius_label(p.radius) for p in per]
    lhs = [p.mean("lhs_max") for p in per]
    bound = [p.mean("bound") for p in per]
    paper = [p.mean("bound_paper_l2") for p in per]
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
    rows = [{
        "radius": radius_label(p.radius),
        "LLM teacher (mean / median)": f"{fmt_g(p.mean('llm_t'))} / {fmt_g(p.median('llm_t'))}",
        "LLM student (mean / median)": f"{fmt_g(p.mean('llm_s'))} / {fmt_g(p.median('llm_s'))}",
        "CE teacher": fmt_g(p.mean("ce_t")),
        "CE student": fmt_g(p.mean("ce_s")),
        f"‖g_s − g_t‖ {dual} (dual)": fmt_g(p.mean("grad_diff_dual")),
        "‖g_s − g_t‖ L2 (paper)": fmt_g(p.mean("grad_diff_l2")),
        "bound (valid)": fmt_g(p.mean("bound")),
        "bound, L2 (paper)": fmt_g(p.mean("bound_paper_l2")),
        "measured LHS": fmt_g(p.mean("lhs_max")),
        "violations": _violations(p),
    } for p in per]
    blocks.append(D.Table(frame(rows), "Means over the audited samples (medians for LLM). A violation means the measured "
                                        "loss gap exceeded the computed bound, i.e. an LLM estimate was too low."))
    for note in sorted({n for p in per if (n := p.text("note"))}):
        blocks.append(D.Para(note, "muted"))
    return blocks


def _violations(p: Prop2Row) -> str:
    rate = p.mean("violation_rate")
    if rate is None:
        return "–"
    k, n = p.count("violations"), p.count("n")
    count = f" ({k}/{n})" if k is not None and n is not None else ""
    return f"{100 * rate:.1f}%{count}"


# ----------------------------------------------------------------------------- training log (repair)
_NOT_LOSS = {"epoch", "lr", "steps", "train_seconds", "images_per_s", "val_clean", "val_robust", "loss", "seconds"}


def training_section(res: Results, names: dict[str, str]) -> list[D.Block]:
    """Per-epoch loss terms and validation clean/robust accuracy of a repair run."""
    log = res.training
    if log is None or not log.records:
        return []
    recs, meta = log.records, log.meta
    method = log.method or "the repair objective"
    epochs = [number(r.get("epoch")) for r in recs]
    xs = [e if e is not None else float(i + 1) for i, e in enumerate(epochs)]
    blocks: list[D.Block] = [D.Heading(2, "Training (repair)", "training")]
    sel = meta.get("selected_epoch")
    blocks.append(D.Para(f"{len(recs)} epoch(s) of {method}" + (f"; the weights of epoch {sel} were kept." if sel else ".")
                         + ("" if meta.get("finished", True) else " Training did not finish."), ""))
    terms = [k for k in recs[0] if k not in _NOT_LOSS and all(number(r.get(k)) is not None for r in recs)]
    if "loss" in recs[0]:
        terms = terms + ["loss"]
    ticks = _epoch_ticks(xs)
    if terms:
        series = [Series(k if k != "loss" else "total loss", xs, [number(r.get(k)) for r in recs],
                         color=PALETTE[i % len(PALETTE)], width=2.8 if k == "loss" else 1.8)
                  for i, k in enumerate(terms)]
        blocks.append(D.Figure("training-loss", line_chart(series, title="Training loss terms per epoch", xlabel="epoch",
                                                           ylabel="loss", xticks=ticks),
                               "Mean of each loss term over the epoch's batches."))
    if any(number(r.get("val_clean")) is not None for r in recs):
        series = [Series("validation clean accuracy", xs, [number(r.get("val_clean")) for r in recs], color=PALETTE[0]),
                  Series("validation robust accuracy", xs, [number(r.get("val_robust")) for r in recs], color=PALETTE[1])]
        blocks.append(D.Figure("training-validation", line_chart(series, title="Validation accuracy per epoch", xlabel="epoch",
                                                                 ylabel="accuracy", xticks=ticks, ylim=(0.0, 1.0), yfmt="{:.0%}"),
                               "Clean and robust (PGD) accuracy on the held-out validation split after each epoch."))
    cols = ["epoch"] + [k for k in recs[0] if k != "epoch"]
    rows = [{k: (fmt_num(r.get(k), 4) if k not in ("val_clean", "val_robust") else pct(number(r.get(k))))
             for k in cols} for r in recs]
    blocks.append(D.Table(frame(rows, cols), "Training log."))
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
def _clean_or_worst(model: ModelBlock, radii: list[float], x: float) -> Estimate:
    """Clean accuracy at ``x == 0``, else the worst case at the audited radius ``x`` (empty if not audited)."""
    if x == 0.0:
        return model.clean
    i = find_radius(radii, x)
    return Estimate() if i is None else model.row(i).worst


def before_after_section(res: Results, names: dict[str, str]) -> list[D.Block]:
    """Student before repair vs after, against the teacher, per radius (worst case)."""
    before = res.before
    if before is None:
        return []
    has_student = isinstance(before.raw.get("student"), dict)
    b_student = before.student if has_student else ModelBlock.read(before.raw)
    b_name = model_name(before, "student") if has_student else "student before repair"
    radii = res.radii
    b_radii = before.radii or radii
    t, s = res.teacher, res.student
    xs = [0.0] + [float(r) for r in radii if r > 0]
    series = []
    for label, model, rs, color, dash in (("teacher", t, radii, TEACHER_COLOR, ""),
                                          (f"before repair: {b_name}", b_student, b_radii, BEFORE_COLOR, "6 3"),
                                          (f"after repair: {names['student']}", s, radii, STUDENT_COLOR, "")):
        points = [_clean_or_worst(model, rs, x) for x in xs]
        series.append(Series(label, xs, [e.value for e in points], [e.low for e in points], [e.high for e in points],
                             color=color, dash=dash, width=2.4))
    rows = []
    for x in xs:
        eb, ea, et = _clean_or_worst(b_student, b_radii, x), _clean_or_worst(s, radii, x), _clean_or_worst(t, radii, x)
        rows.append({"radius": "clean" if x == 0.0 else radius_label(x), "teacher": pct_ci(et),
                     "student before": pct_ci(eb), "student after": pct_ci(ea),
                     "change": "–" if eb.value is None or ea.value is None else f"{100 * (ea.value - eb.value):+.1f} pts"})
    blocks: list[D.Block] = [D.Heading(2, "Before and after repair", "before-after")]
    blocks.append(D.Figure("before-after", line_chart(series, title="Student before vs after repair (worst case)",
                                                      xlabel=f"{res.norm} radius", ylabel="accuracy",
                                                      xticks=xticks(radii), ylim=(0.0, 1.0), yfmt="{:.0%}"),
                           "Radius 0 is clean accuracy; bands are 95% intervals."))
    blocks.append(D.Table(frame(rows), "Clean and worst-case robust accuracy before and after repair."))
    b_gates = before.gates
    if b_gates:
        failed = sum(1 for g in b_gates if not g.passed)
        blocks.append(D.Para(f"Before repair, {failed} of {len(b_gates)} gate(s) failed.", "muted"))
    return blocks
