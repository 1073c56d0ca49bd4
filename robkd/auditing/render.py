"""Terminal rendering of an audit (rich tables; the progress display is robkd.auditing.events); no computation here."""

from __future__ import annotations

from typing import Any


def _pct(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    lo, hi = entry.get("ci_low"), entry.get("ci_high")
    lo_s = f"{100 * lo:.1f}" if lo is not None else "?"
    hi_s = f"{100 * hi:.1f}" if hi is not None else "inf"
    return f"{100 * entry['value']:.1f}% [{lo_s}, {hi_s}]"


def _ratio(entry: dict[str, Any]) -> str:
    if entry.get("value") is None:
        return "n/a"
    lo, hi = entry.get("ci_low"), entry.get("ci_high")
    return f"{entry['value']:.3f} [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else f"{entry['value']:.3f}"


def _t(value: Any) -> str:
    """A string from the results shown on the terminal: rich markup escaped, control and bidi characters
    written out visibly (``\x1b``, ``\u202e``)."""
    from rich.markup import escape

    from robkd.report.escape import esc_text

    return escape(esc_text(value, keep=""))


def summary_tables(data: dict[str, Any]) -> list[Any]:
    """Rich renderables summarising a results dict (``AuditResult.to_dict()``)."""
    from rich.table import Table

    out: list[Any] = []
    d = data["data"]
    title = (f"robkd audit: {_t(d['dataset'])} {_t(d['split'])}, n={d['n']}, {_t(data['norm'])}, "
             f"cascade {' > '.join(_t(a) for a in data['cascade_order'])} (95% Clopper-Pearson intervals)")
    t = Table(title=title, title_justify="left")
    t.add_column("radius")
    t.add_column("metric")
    t.add_column("teacher", justify="right")
    t.add_column("student", justify="right")
    t.add_row("-", "clean", _pct(data["teacher"]["clean"]), _pct(data["student"]["clean"]))
    for i, rt in enumerate(_t(r) for r in data["radii_text"]):
        te, st = data["teacher"]["per_radius"][i], data["student"]["per_radius"][i]
        for a in data["cascade_order"][:-1]:
            t.add_row(rt, f"after {_t(a)}", _pct(te["after_attack"][a]), _pct(st["after_attack"][a]))
        t.add_row(rt, "[bold]worst case[/bold]", _pct(te["worst"]), _pct(st["worst"]))
        for role_col in ("certification",):
            tc, sc = data["teacher"].get(role_col), data["student"].get(role_col)
            if tc or sc:
                t.add_row(rt, f"certified ({_t((tc or sc)['method'])})", _cert(tc, i), _cert(sc, i))
    out.append(t)

    tr = Table(title="transfer (student vs teacher, worst case)", title_justify="left")
    for col in ("radius", "ratio s/t [95%]", "lost (teacher robust, student broken)", "gained (student robust, teacher broken)"):
        tr.add_column(col, justify="right")
    from robkd.report.format import lost_text
    from robkd.report.schema import Results

    for e, row in zip(data["transfer"], Results(data).transfer):
        tr.add_row(_t(e["radius_text"]), _ratio(e["ratio"]), lost_text(row.lost, row.lost_of_teacher_robust),
                   _samples(e["gained"], "of_student_robust", "student"))
    out.append(tr)

    if data.get("prop2"):
        tp = Table(title="Proposition 2 (LLM estimates are from below)", title_justify="left")
        for col in ("radius", "LLM_s", "LLM_t", "bound (mean)", "LHS max (mean)", "violations"):
            tp.add_column(col, justify="right")
        for e in data["prop2"]["per_radius"]:
            s = e["summary"]
            tp.add_row(_t(e["radius_text"]), _mean(s, "llm_s"), _mean(s, "llm_t"), _mean(s, "bound"), _mean(s, "lhs_max"),
                       str(s.get("violations")))
        out.append(tp)

    flags = data.get("sanity", {}).get("flags") or []
    if flags:
        tf = Table(title="sanity flags (the evaluation may be unreliable)", title_justify="left")
        for col in ("model", "code", "message", "suggestion"):
            tf.add_column(col)
        for f in flags:
            tf.add_row(*(_t(f.get(k)) for k in ("model", "code", "message", "suggestion")))
        out.append(tf)

    tg = gate_table(data)
    if tg is not None:
        out.append(tg)
    return out


def gate_table(data: dict[str, Any]) -> Any:
    """The gates and the default transfer verdict as a rich table (None when there is neither)."""
    from rich.table import Table

    from robkd.report.schema import Results

    res = Results(data)
    rows = [(_t(g.text), "[green]PASS[/green]" if g.passed else "[red]FAIL[/red]", _t(g.reason)) for g in res.gates]
    dv = res.default_verdict
    if dv is not None and dv.gate is not None:
        word = ("[green]PASS[/green]" if dv.passed else "[red]FAIL[/red]") if dv.enforced else \
            ("advisory: pass" if dv.passed else "[yellow]advisory: fail[/yellow]")
        rows.append((_t(dv.expr) + (" (default verdict)" if dv.enforced else " (default verdict, not enforced)"), word,
                     _t(dv.gate.reason)))
    if not rows:
        return None
    on = res.section("config").get("gate_on")
    tg = Table(title=f"gates (judged on {'point estimates' if on == 'point' else '95% confidence bounds'})", title_justify="left")
    for col in ("gate", "result", "why"):
        tg.add_column(col)
    for row in rows:
        tg.add_row(*row)
    return tg


def closing_line(data: dict[str, Any]) -> str:
    """The one line that ends the terminal output: the verdict on the gates (and the default verdict when
    enforced), or without gates how much of the teacher's robustness the student kept (advisory)."""
    from robkd.report.escape import esc_text
    from robkd.report.schema import Results
    from robkd.report.summary import default_verdict_text
    from robkd.types import format_radius

    res = Results(data)
    dv = res.default_verdict
    judged = list(res.gates) + ([dv.gate] if dv is not None and dv.enforced and dv.gate is not None else [])
    strict = res.strict and any(not f.get("handled_by") for f in res.sanity_flags)
    if judged:
        failed = [g for g in judged if not g.passed]
        plural = "s" if len(judged) != 1 else ""
        if not failed:
            line = f"Verdict: PASS ({len(judged)}/{len(judged)} gate{plural})"
        else:
            first = failed[0]
            more = f"; {len(failed) - 1} more of {len(judged)} gate{plural} failed" if len(failed) > 1 else ""
            line = f"Verdict: FAIL: {first.text}{_shortfall_note(first)}{more}"
    elif dv is not None:
        line = f"No gate set; {default_verdict_text(dv)}"
    else:  # results written before the default verdict existed
        transfer, radii = res.transfer, res.radii
        ratio = transfer[-1].ratio if transfer and len(transfer) == len(radii) else None
        line = "No gate set"
        if ratio is not None and ratio.value is not None:
            line += f"; the student kept {100 * ratio.value:.0f}% of the teacher's robustness at {format_radius(radii[-1])}"
    if strict:
        line = "Verdict: FAIL: the evaluation was flagged under --strict (exit 3); " + line
    return esc_text(line, keep="")


def _shortfall_note(g: Any) -> str:
    """`` (short by 0.08)`` for a failed gate (from its recorded shortfall, else its reason)."""
    if g.short_by is not None:
        return f" (short by {g.short_by:.3g})"
    if g.bound_short_by is not None:
        note = f" (short by {g.bound_short_by:.3g} at the 95% bound"
        return note + (f"; about {g.samples_needed} samples would decide it)" if g.samples_needed else ")")
    reason = g.reason
    for prefix in ("FAIL: ", "fail: "):
        if reason.startswith(prefix):
            reason = reason[len(prefix):]
    return f" ({reason[:157] + '...' if len(reason) > 160 else reason})" if reason else ""


def _samples(entry: dict[str, Any], of_key: str, role: str) -> str:
    """``12 samples (2.4% of all, 4.6% of the student-robust)``: the wording of the lost samples
    (:func:`robkd.report.format.lost_text`) for the gained ones."""
    k = entry.get("k")
    parts = []
    if entry.get("value") is not None:
        parts.append(f"{100 * entry['value']:.1f}% of all")
    if entry.get(of_key) is not None:
        parts.append(f"{100 * entry[of_key]:.1f}% of the {role}-robust")
    return f"{k} sample{'' if k == 1 else 's'}" + (f" ({', '.join(parts)})" if parts else "")


def _cert(block: dict[str, Any] | None, i: int) -> str:
    if not block:
        return "-"
    if block.get("status") != "ok":
        return _t(f"unsupported ({', '.join(block.get('unsupported') or []) or block.get('reason', '')})")
    e = block["per_radius"][i]
    return f"{_pct(e['certified'])}; 1 region {100 * e['linear_region_fraction']:.0f}%"


def _mean(s: dict[str, Any], key: str) -> str:
    v = (s.get(key) or {}).get("mean")
    return f"{v:.4g}" if isinstance(v, (int, float)) else "n/a"
