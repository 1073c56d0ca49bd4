"""The sections every report has: the verdict, robust accuracy (with transfer), evaluation sanity checks,
configuration and provenance, and the command to reproduce the results.

Each function takes the typed view of the results (:class:`~robkd.report.schema.Results`) and returns a
list of document blocks.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from robkd.report import doc as D
from robkd.report.format import (
    STUDENT_COLOR,
    TEACHER_COLOR,
    attack_label,
    ci_text,
    fmt_num,
    frame,
    lost_text,
    pct,
    pct_ci,
    radius_label,
    ratio_ci,
    table_attacks,
    xticks,
)
from robkd.report.schema import DefaultVerdict, Estimate, ModelBlock, Results
from robkd.report.svg import DASHES, Series, line_chart


# ----------------------------------------------------------------------------- verdict
def verdict(res: Results) -> D.Verdict:
    """The verdict box: gates, headline figures at the largest radius, sanity warnings."""
    gates = res.gates
    flags = res.sanity_flags
    radii = res.radii
    t, s = res.teacher, res.student
    failed = [g for g in gates if not g.passed]
    dv = res.default_verdict
    enforced = dv is not None and dv.enforced and dv.gate is not None
    judged = gates + ([dv.gate] if enforced and dv is not None and dv.gate is not None else [])
    judged_failed = [g for g in judged if not g.passed]
    if judged:
        status = "fail" if judged_failed else "pass"
        plural = "s" if len(judged) != 1 else ""
        headline = (f"{len(judged_failed)} of {len(judged)} release gate{plural} failed: do not ship this student as is."
                    if judged_failed else f"All {len(judged)} release gate{plural} passed.")
    else:
        status = "none"
        headline = "No release gates were set: the figures below are for information only."
        if dv is not None:
            headline = f"No release gates were set; {default_verdict_text(dv)}."
    lines: list[D.Inline] = [[("b", "PASS " if g.passed else "FAIL "), ("code", g.text), ("", " — " + g.reason)] for g in gates]
    if dv is not None and dv.gate is not None and (enforced or not gates):
        word = ("PASS " if dv.passed else "FAIL ") if enforced else ("ADVISORY PASS " if dv.passed else "ADVISORY FAIL ")
        lines.append([("b", word), ("code", dv.expr),
                      ("", f" (default transfer verdict{'' if enforced else ', not enforced'}) — " + dv.gate.reason)])
    tiles: list[tuple[str, str, str]] = [("Teacher clean", pct(t.clean.value), ci_text(t.clean)),
                                         ("Student clean", pct(s.clean.value), ci_text(s.clean))]
    if radii:
        i = len(radii) - 1
        rl = radius_label(radii[i])
        tw, sw = t.row(i).worst, s.row(i).worst
        tiles.append((f"Teacher robust @ {rl}", pct(tw.value), ci_text(tw)))
        tiles.append((f"Student robust @ {rl}", pct(sw.value), ci_text(sw)))
        transfer = res.transfer
        ratio = transfer[i].ratio if i < len(transfer) else None
        if ratio is not None:
            v = ratio.value
            tiles.append((f"Robustness kept @ {rl}", "–" if v is None else f"{100 * v:.0f}%", "student / teacher robust acc."))
        if tw.value is not None and sw.value is not None:
            lines.insert(0, [("", f"At the largest radius ({rl}), the student is robust on "), ("b", pct(sw.value)),
                             ("", " of the samples against "), ("b", pct(tw.value)), ("", " for the teacher (worst case over "
                             f"{', '.join(res.attacks) or 'the attacks'}).")])
    before = res.before
    before_gates = before.gates if before is not None else []
    if before_gates:
        b_failed = sum(1 for g in before_gates if not g.passed)
        lines.insert(0, [("", "Before the repair: "), ("b", f"{b_failed} of {len(before_gates)}"), ("", " gate(s) failed; after it: "),
                         ("b", f"{len(failed)} of {len(gates)}"), ("", ".")])
    if res.strict and flags:
        status = "fail"
        headline = ("Strict mode: the evaluation was flagged as unreliable, so this audit fails (exit code 3). "
                    + (headline if judged else ""))
    warnings: list[D.Inline] = []
    if flags:
        codes = ", ".join(sorted({str(f.get("code", "?")) for f in flags}))
        warnings.append(f"{len(flags)} evaluation sanity flag{'s' if len(flags) != 1 else ''} raised ({codes}): "
                        "the robust accuracies may be overestimated (see 'Evaluation sanity checks').")
    return D.Verdict(status, headline, lines, tiles, warnings)


def default_verdict_text(dv: DefaultVerdict) -> str:
    """How much of the teacher's robustness the student kept, against the default verdict's threshold:
    ``the student kept 41% of the teacher's robustness at 0.1 (advisory: below 90%)`` (``enforced``
    instead of ``advisory`` when it decides the exit code)."""
    r = radius_label(dv.radius) if dv.radius is not None else "the largest radius"
    threshold = f"{100 * dv.threshold:.0f}%" if dv.threshold is not None else "the threshold"
    kind = "enforced" if dv.enforced else "advisory"
    if dv.kept is None:
        return f"the teacher is robust on no sample at {r}, so there is no robustness to keep ({kind})"
    if dv.passed:
        status = f"at least {threshold}"
    elif dv.threshold is not None and dv.kept < dv.threshold:
        status = f"below {threshold}"
    else:
        status = f"not shown to reach {threshold} with 95% confidence"
        if dv.gate is not None and dv.gate.samples_needed:
            status += f"; about {dv.gate.samples_needed} samples would decide it"
    return f"the student kept {100 * dv.kept:.0f}% of the teacher's robustness at {r} ({kind}: {status})"


# ----------------------------------------------------------------------------- robust accuracy
def curve(model: ModelBlock, radii: Sequence[float], attack: str | None = None,
          ) -> tuple[list[float], list[float | None], list[float | None], list[float | None]]:
    """(radius, value, ci_low, ci_high) per radius of the worst case (or ``attack``'s figure), with the clean
    accuracy at radius 0 first (when 0 is not an audited radius)."""
    points: list[tuple[float, Estimate]] = []
    if not radii or radii[0] > 0:
        points.append((0.0, model.clean))
    for i, r in enumerate(radii):
        row = model.row(i)
        points.append((float(r), row.worst if attack is None else row.attack(attack)))
    return [x for x, _ in points], [e.value for _, e in points], [e.low for _, e in points], [e.high for _, e in points]


def robust_section(res: Results, names: dict[str, str]) -> list[D.Block]:
    """Worst-case robust accuracy per radius (figure, cascade figure, table) and the transfer table."""
    radii = res.radii
    attacks = res.attacks
    norm = res.norm
    models = (("teacher", res.teacher, TEACHER_COLOR), ("student", res.student, STUDENT_COLOR))
    blocks: list[D.Block] = [D.Heading(2, "Robust accuracy", "robust-accuracy")]
    if not radii:
        blocks.append(D.Para("No radii were audited.", "muted"))
        return blocks
    series = []
    for role, model, color in models:
        xs, ys, lo, hi = curve(model, radii)
        series.append(Series(f"{names[role]} ({role}), worst case", xs, ys, lo, hi, color=color, width=2.6))
    suite = ", ".join(attacks) if attacks else "the attack suite"
    blocks.append(D.Figure(
        "robust-accuracy",
        line_chart(series, title=f"Worst-case robust accuracy vs {norm} radius", xlabel=f"{norm} radius (pixel scale [0,1])",
                   ylabel="accuracy", xticks=xticks(radii), ylim=(0.0, 1.0), yfmt="{:.0%}"),
        f"Worst case over {suite} (a sample counts as robust only if no attack broke it); radius 0 is clean "
        "accuracy. Shaded bands: 95% Clopper-Pearson intervals.",
    ))
    if len(attacks) > 1:
        per: list[Series] = []
        for role, model, color in models:
            for j, a in enumerate(attacks[:-1]):  # after the last attack the cascade is the worst case
                xs, ys, _, _ = curve(model, radii, a)
                per.append(Series(f"{role}: {attack_label(res, a)}", xs, ys, None, None, color=color,
                                  dash=DASHES[j % len(DASHES)], width=1.6))
            xs, ys, lo, hi = curve(model, radii)
            per.append(Series(f"{role}: worst case", xs, ys, lo, hi, color=color, width=2.8, markers=False))
        blocks.append(D.Figure(
            "robust-accuracy-per-attack",
            line_chart(per, title="Robust accuracy along the attack cascade", xlabel=f"{norm} radius", ylabel="accuracy",
                       xticks=xticks(radii), ylim=(0.0, 1.0), yfmt="{:.0%}"),
            "Dashed/dotted: robust accuracy after the first attacks of the suite (cumulative: a sample stays robust only "
            "if none of the attacks so far broke it); solid with 95% band: after the whole suite (the worst case).",
        ))
    cap = "Accuracy with 95% Clopper-Pearson intervals (percent)."
    if table_attacks(res) and res.cumulative:
        cap += " 'after X' columns: robust to the attacks of the suite up to X (cumulative)."
    blocks.append(D.Table(_accuracy_frame(res, names), cap))
    if res.transfer:
        blocks.append(D.Heading(3, "Transfer of robustness", "transfer"))
        blocks.append(D.Table(_transfer_frame(res),
                              "ratio: student / teacher worst-case robust accuracy; lost: samples robust for the teacher but not "
                              "the student (count, share of all samples with its 95% interval, share of the teacher-robust "
                              "ones); gained: share of samples robust for the student but not the teacher (95% interval)."))
    return blocks


def _accuracy_frame(res: Results, names: dict[str, str]) -> Any:
    columns = {a: attack_label(res, a) for a in table_attacks(res)}
    rows = []
    for role in ("teacher", "student"):
        m = res.model(role)
        rows.append({"model": f"{names[role]} ({role})", "radius": "clean", "worst case": pct_ci(m.clean),
                     **{label: "" for label in columns.values()}})
        for i, r in enumerate(res.radii):
            row = m.row(i)
            rows.append({"model": f"{names[role]} ({role})", "radius": radius_label(r), "worst case": pct_ci(row.worst),
                         **{label: pct_ci(row.attack(a)) for a, label in columns.items()}})
    return frame(rows, ["model", "radius", "worst case"] + list(columns.values()))


def _transfer_frame(res: Results) -> Any:
    rows = [{"radius": radius_label(r), "ratio": ratio_ci(tr.ratio),
             "lost": lost_text(tr.lost, tr.lost_of_teacher_robust, interval=True), "gained": pct_ci(tr.gained)}
            for r, tr in zip(res.radii, res.transfer)]
    return frame(rows, ["radius", "ratio", "lost", "gained"])


# ----------------------------------------------------------------------------- sanity
def sanity_section(res: Results) -> list[D.Block]:
    """The sanity flags (or that none was raised), rejected adversarial examples, the checks run."""
    flags = res.sanity_flags
    blocks: list[D.Block] = [D.Heading(2, "Evaluation sanity checks", "sanity")]
    rejected = [(role, key, n) for role in ("teacher", "student")
                for key, n in res.model(role).rejected_adversarials.items() if n]
    if not flags:
        blocks.append(D.Para("No sanity flag was raised: no sign of gradient masking or a broken evaluation in the checks run.", "note"))
    else:
        blocks.append(D.Para("These flags mean an attack may have failed for reasons other than robustness; treat the "
                             "robust accuracies as upper estimates until they are resolved.", "warn"))
        blocks.append(D.Table(frame([{"model": f.get("model", ""), "code": f.get("code", ""), "message": f.get("message", ""),
                                      "suggestion": f.get("suggestion", "")} for f in flags]), align="left"))
    if rejected:
        blocks.append(D.Para("Adversarial examples an attack claimed but that failed the forward-pass re-check (not "
                             "counted as breaks):", ""))
        blocks.append(D.Table(frame([{"model": r, "attack@radius": k, "rejected": fmt_num(n)} for r, k, n in rejected])))
    checks = res.sanity_checks
    if checks:
        blocks.append(D.Bullets([str(c) if not isinstance(c, dict) else
                                 f"{c.get('name', c.get('code', 'check'))}: {c.get('status', c.get('result', ''))}" for c in checks]))
    return blocks


# ----------------------------------------------------------------------------- provenance
def _flatten(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out += _flatten(v, key)
            else:
                out.append((key, _value_text(v)))
    else:
        out.append((prefix or "value", _value_text(d)))
    return out


def _value_text(v: Any) -> str:
    if isinstance(v, list):
        if len(v) > 12 and all(isinstance(x, (int, float)) for x in v):
            return f"[{len(v)} numbers: {', '.join(fmt_num(x) for x in v[:6])}, ...]"
        return ", ".join(_value_text(x) for x in v) if v else "[]"
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True) if v else "{}"
    if isinstance(v, float):
        return fmt_num(v, 6)
    if v is None:
        return "–"
    return str(v)


def _kv_table(d: Any, caption: str = "") -> D.Table:
    return D.Table(frame(_flatten(d), ["key", "value"]), caption, align="left")


def provenance_section(res: Results) -> list[D.Block]:
    """Configuration, data, model provenance, environment and timings as key/value tables."""
    blocks: list[D.Block] = [D.Heading(2, "Configuration and provenance", "provenance")]
    for key, title in (("config", "Configuration"), ("data", "Data"), ("environment", "Environment"), ("timings", "Timings (seconds)")):
        sect = res.section(key)
        if sect:
            blocks.append(D.Heading(3, title))
            blocks.append(_kv_table(sect))
        if key == "data":
            for role in ("teacher", "student"):
                info = res.model(role).info
                if info:
                    blocks.append(D.Heading(3, f"Model: {role}"))
                    blocks.append(_kv_table(info))
        if key == "timings":
            per_model = {role: res.model(role).timings for role in ("teacher", "student") if res.model(role).timings}
            if per_model:
                if not sect:
                    blocks.append(D.Heading(3, title))
                blocks.append(_kv_table(per_model, "per model"))
    resumed = res.resumed
    if resumed:
        blocks.append(D.Para(f"Resumed: {len(resumed)} (model, attack, radius) result(s) were taken from saved state: "
                             + ", ".join(resumed[:20]) + (" ..." if len(resumed) > 20 else ""), "muted"))
    blocks += [D.Para(text, "muted") for text in reuse_lines(res)]
    return blocks


def reuse_lines(res: Results) -> list[str]:
    """One line per model whose figures this run did not compute (``<role>.cache``): taken from the result
    cache, or from the identical other model of the pair."""
    lines = []
    for role in ("teacher", "student"):
        rec = res.raw.get(role, {}).get("cache") if isinstance(res.raw.get(role), dict) else None
        if not isinstance(rec, dict):
            continue
        when = f" (computed {rec['created']})" if rec.get("hit") and rec.get("created") else ""
        if rec.get("same_as"):
            lines.append(f"{role.capitalize()} figures are the {rec['same_as']}'s: identical model, attacked once"
                         + (f"; reused from cache{when}" if rec.get("hit") else "") + ".")
        elif rec.get("hit"):
            lines.append(f"{role.capitalize()} figures reused from cache{when}, re-checked on this run.")
    return lines


def command_section(res: Results) -> list[D.Block]:
    """The exact command line that produced the results, and the robkd version."""
    import shlex

    cmd = res.command
    text = shlex.join(cmd) if isinstance(cmd, list) else cmd
    blocks: list[D.Block] = [D.Heading(2, "Reproduce", "reproduce")]
    if text:
        blocks.append(D.Para("The exact command that produced these results:"))
        blocks.append(D.Code(text, "sh"))
    else:
        blocks.append(D.Para("The command line was not recorded (the audit was run through the Python API).", "muted"))
    if res.robkd_version:
        blocks.append(D.Para([("", "robkd version: "), ("code", res.robkd_version)], "muted"))
    return blocks


def title_and_subtitle(res: Results, names: dict[str, str]) -> tuple[str, str]:
    """The report's title and its one-line description (models, data, radii, creation time)."""
    title = f"robkd {'repair' if res.is_repair else 'audit'} report: {names['student']} vs {names['teacher']}"
    sub = [f"teacher {names['teacher']}", f"student {names['student']}"]
    data, config = res.section("data"), res.section("config")
    data_name = data.get("dataset") or config.get("data")
    n = data.get("n") or config.get("n")
    if data_name:
        sub.append(f"data {data_name}" + (f" (n = {n})" if n else ""))
    if res.radii:
        sub.append(f"{res.norm} radii {', '.join(radius_label(r) for r in res.radii)}")
    if res.created:
        sub.append(f"created {res.created}")
    return title, " · ".join(sub)
