"""Terminal rendering of an audit (rich tables) and the progress display; no computation here."""

from __future__ import annotations

import time
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
    for col in ("radius", "ratio s/t [95%]", "lost (t robust, s broken)", "gained (s robust, t broken)"):
        tr.add_column(col, justify="right")
    for e in data["transfer"]:
        lost = e["lost"]
        of = f" = {100 * lost['of_teacher_robust']:.1f}% of t-robust" if lost.get("of_teacher_robust") is not None else ""
        tr.add_row(_t(e["radius_text"]), _ratio(e["ratio"]), f"{lost['k']}{of}", str(e["gained"]["k"]))
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

    if data.get("gates"):
        tg = Table(title=f"gates (judged on {'95% confidence bounds' if data['config']['gate_on'] == 'lower' else 'point estimates'})",
                   title_justify="left")
        tg.add_column("gate")
        tg.add_column("result")
        tg.add_column("why")
        for g in data["gates"]:
            tg.add_row(_t(g["gate"]), "[green]PASS[/green]" if g["passed"] else "[red]FAIL[/red]", _t(g["reason"]))
        out.append(tg)
    return out


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


class ProgressDisplay:
    """Turns audit events (``start``/``advance``/``done``) into rich progress bars with samples/s."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.task: Any = None
        self.key: Any = None
        self.t0 = 0.0
        self.done = 0

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        from robkd.types import format_radius
        from robkd.utils.progress import rate_text

        if kind == "progress":
            key = (info.get("model"), info.get("attack"), info.get("radius"))
            if key != getattr(self, "key", None):
                self.finish()
                self.key = key
                r = info.get("radius")
                label = f"{info.get('model')}: {info.get('attack')}" + (f" @ {format_radius(r)}" if r is not None else "")
                self.task = self.progress.add_task(label, total=max(int(info.get("total") or 0), 1), rate="")
            self.progress.update(self.task, completed=int(info.get("done", 0)),
                                 rate=rate_text(int(info.get("done", 0)), float(info.get("seconds", 0.0))))
        elif kind == "start":
            self.finish()
            r = info.get("radius")
            label = f"{info.get('model')}: {info.get('stage', '')}" + (f" @ {format_radius(r)}" if r is not None else "")
            self.t0, self.done = time.perf_counter(), 0
            self.task = self.progress.add_task(label, total=info.get("total") or None, rate="")
        elif kind == "advance" and self.task is not None:
            self.done += int(info.get("n", 0))
            self.progress.update(self.task, advance=int(info.get("n", 0)),
                                 rate=rate_text(self.done, time.perf_counter() - self.t0))
        elif kind == "done":
            self.finish()

    def finish(self) -> None:
        self.key = None
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
