"""Render a results.json dict (``AuditResult.to_dict()``) into report.md (+ SVG files) and report.html.

Only the dict is needed: no model, no torch. Optional sections (certification,
LLM/Proposition 2, linear regions, training log, before/after) are rendered when
present and skipped when absent. See docs/results-schema.md for the layout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from robkd.errors import OutputError, UsageError
from robkd.report import doc as D
from robkd.report.escape import esc_text
from robkd.utils.outdir import check_out_dir  # noqa: F401  (re-exported: robkd.report.check_out_dir)
from robkd.report.schema import SUPPORTED_SCHEMA_VERSIONS, ResultsError, check_header, read_results  # noqa: F401 (re-exported)
from robkd.report.svg import PALETTE, BarGroup, Series, bar_chart, line_chart

log = logging.getLogger(__name__)

FORMATS = ("md", "html")
TRAINING_LOG_FILE = "training_log.json"
TEACHER_COLOR, STUDENT_COLOR, REPAIRED_COLOR = PALETTE[0], PALETTE[1], PALETTE[2]


# ----------------------------------------------------------------------------- loading / validation
def check_schema(result: Any, where: str = "results") -> dict[str, Any]:
    """Raise :class:`ResultsError` unless ``result`` is a results dict of a supported schema version
    with teacher and student sections (the minimum :func:`render` needs; files are checked in full by
    :func:`load_results`)."""
    return check_header(result, where)


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results.json (a directory holding one is accepted too) with the guarded JSON reader and
    validate it against the results schema; :class:`ResultsError` names the first bad key path."""
    return read_results(path)


# ----------------------------------------------------------------------------- small helpers
def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    return None


def prop(entry: Any) -> tuple[float | None, float | None, float | None]:
    """(value, ci_low, ci_high) from a proportion dict or a bare number."""
    if isinstance(entry, dict):
        return _num(entry.get("value")), _num(entry.get("ci_low")), _num(entry.get("ci_high"))
    return _num(entry), None, None


def pct(v: float | None, digits: int = 1) -> str:
    """``0.8523`` -> ``85.2%``; None -> ``–``."""
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def pct_ci(entry: Any) -> str:
    """``85.2% [82.8, 87.4]`` (95% CI in percent)."""
    v, lo, hi = prop(entry)
    if v is None:
        return "–"
    if lo is None or hi is None:
        return pct(v)
    return f"{pct(v)} [{100 * lo:.1f}, {100 * hi:.1f}]"


def ratio_ci(entry: Any) -> str:
    """A ratio with its interval (upper end may be unbounded)."""
    if not isinstance(entry, dict):
        v = _num(entry)
        return "–" if v is None else f"{v:.3f}"
    v, lo, hi = prop(entry)
    if v is None:
        return "–"
    lo_s = "–" if lo is None else f"{lo:.3f}"
    hi_s = "∞" if hi is None else f"{hi:.3f}"
    return f"{v:.3f} [{lo_s}, {hi_s}]"


def fmt_num(v: Any, digits: int = 4) -> str:
    """A number in compact form; non-numbers as text."""
    n = _num(v)
    if n is None:
        return "–" if v is None else str(v)
    if n == int(n) and abs(n) < 1e12:
        return str(int(n))
    return f"{n:.{digits}g}"


def radius_label(r: float) -> str:
    """``8/255`` for k/255 radii, else a short decimal (same rule as robkd.types.format_radius)."""
    from robkd.types import format_radius

    return format_radius(float(r))


def _get(d: Any, *keys: Any, default: Any = None) -> Any:
    cur = d
    for k in keys:
        if isinstance(cur, dict):
            cur = cur.get(k)
        elif isinstance(cur, list) and isinstance(k, int) and -len(cur) <= k < len(cur):
            cur = cur[k]
        else:
            return default
        if cur is None:
            return default
    return cur


def _model_info(result: dict[str, Any], role: str) -> dict[str, Any]:
    m = _get(result, role, "model")
    return m if isinstance(m, dict) else {}


def _model_name(result: dict[str, Any], role: str, *, short: bool = True) -> str:
    """A display name: the model file's name (``short``) or path, else the configured name, else the role."""
    info = _model_info(result, role)
    name = info.get("name") or info.get("path") or _get(result, "config", role)
    if not name:
        return role
    name = str(name)
    if short and not name.startswith("<"):
        name = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or name
    return name


def _model_names(result: dict[str, Any]) -> dict[str, str]:
    """Display names of both models: file names, or the paths when the file names are the same."""
    names = {role: _model_name(result, role) for role in ("teacher", "student")}
    if names["teacher"] == names["student"]:
        full = {role: _model_name(result, role, short=False) for role in ("teacher", "student")}
        if full["teacher"] != full["student"]:
            return full
    return names


def _radii(result: dict[str, Any]) -> list[float]:
    r = result.get("radii")
    if isinstance(r, list):
        return [float(x) for x in r if _num(x) is not None]
    return []


def _attacks(result: dict[str, Any]) -> list[str]:
    """The attack suite in the order it ran (``cascade_order``; else as given)."""
    for a in (result.get("cascade_order"), result.get("attacks"), _get(result, "config", "attacks")):
        if isinstance(a, list) and a:
            return [str(x) for x in a]
    return []


def _norm(result: dict[str, Any]) -> str:
    return str(result.get("norm") or _get(result, "config", "norm") or "Linf")


def _per_radius(model: dict[str, Any], radii: Sequence[float]) -> list[dict[str, Any]]:
    pr = model.get("per_radius")
    rows = pr if isinstance(pr, list) else []
    return [rows[i] if i < len(rows) and isinstance(rows[i], dict) else {} for i in range(len(radii))]


def _cumulative(result: dict[str, Any]) -> bool:
    """True when per-attack figures are the cascade's cumulative worst case (``after_attack``)."""
    row = _get(result, "teacher", "per_radius", 0) or {}
    return "per_attack" not in row


def _attack_label(result: dict[str, Any], attack: str) -> str:
    """Column/legend label of one attack's figure."""
    attacks = _attacks(result)
    if not _cumulative(result) or not attacks:
        return attack
    k = attacks.index(attack) if attack in attacks else -1
    return f"after {attack}" if k <= 0 else f"after +{attack}"


def _attack_entry(row: dict[str, Any], attack: str) -> Any:
    """An attack's robust accuracy at one radius: the attack alone if recorded, else cumulative."""
    alone = _get(row, "per_attack", attack)
    return alone if alone is not None else _get(row, "after_attack", attack)


# ----------------------------------------------------------------------------- sections
def _verdict(result: dict[str, Any]) -> D.Verdict:
    gates = [g for g in (result.get("gates") or []) if isinstance(g, dict)]
    flags = _sanity_flags(result)
    radii = _radii(result)
    t, s = result["teacher"], result["student"]
    failed = [g for g in gates if not g.get("passed")]
    if gates:
        status = "fail" if failed else "pass"
        headline = (f"{len(failed)} of {len(gates)} release gate{'s' if len(gates) != 1 else ''} failed: do not ship this student as is."
                    if failed else f"All {len(gates)} release gate{'s' if len(gates) != 1 else ''} passed.")
    else:
        status = "none"
        headline = "No release gates were set: the figures below are for information only."
    lines: list[D.Inline] = []
    for g in gates:
        ok = bool(g.get("passed"))
        lines.append([("b", "PASS " if ok else "FAIL "), ("code", str(g.get("gate", "?"))), ("", " — " + str(g.get("reason", "")))])
    tiles: list[tuple[str, str, str]] = []
    tiles.append(("Teacher clean", pct(prop(t.get("clean"))[0]), _ci_text(t.get("clean"))))
    tiles.append(("Student clean", pct(prop(s.get("clean"))[0]), _ci_text(s.get("clean"))))
    if radii:
        i = len(radii) - 1
        rl = radius_label(radii[i])
        tw = _per_radius(t, radii)[i].get("worst")
        sw = _per_radius(s, radii)[i].get("worst")
        tiles.append((f"Teacher robust @ {rl}", pct(prop(tw)[0]), _ci_text(tw)))
        tiles.append((f"Student robust @ {rl}", pct(prop(sw)[0]), _ci_text(sw)))
        tr = _get(result, "transfer", i, "ratio")
        if tr is not None:
            v = prop(tr)[0]
            tiles.append((f"Robustness kept @ {rl}", "–" if v is None else f"{100 * v:.0f}%", "student / teacher robust acc."))
        tv, sv = prop(tw)[0], prop(sw)[0]
        if tv is not None and sv is not None:
            lines.insert(0, [("", f"At the largest radius ({rl}), the student is robust on "), ("b", pct(sv)),
                             ("", " of the samples against "), ("b", pct(tv)), ("", " for the teacher (worst case over "
                             f"{', '.join(_attacks(result)) or 'the attacks'}).")])
    before_gates = _get(result, "before", "gates")
    if isinstance(before_gates, list) and before_gates:
        b_failed = sum(1 for g in before_gates if isinstance(g, dict) and not g.get("passed"))
        lines.insert(0, [("", "Before the repair: "), ("b", f"{b_failed} of {len(before_gates)}"), ("", " gate(s) failed; after it: "),
                         ("b", f"{len(failed)} of {len(gates)}"), ("", ".")])
    strict = bool(_get(result, "sanity", "strict"))
    if strict and flags:
        status = "fail"
        headline = ("Strict mode: the evaluation was flagged as unreliable, so this audit fails (exit code 3). "
                    + (headline if gates else ""))
    warnings: list[D.Inline] = []
    if flags:
        codes = ", ".join(sorted({str(f.get("code", "?")) for f in flags}))
        warnings.append(f"{len(flags)} evaluation sanity flag{'s' if len(flags) != 1 else ''} raised ({codes}): "
                        "the robust accuracies may be overestimated (see 'Evaluation sanity checks').")
    return D.Verdict(status, headline, lines, tiles, warnings)


def _ci_text(entry: Any) -> str:
    v, lo, hi = prop(entry)
    if lo is None or hi is None:
        return ""
    k, n = (entry.get("k"), entry.get("n")) if isinstance(entry, dict) else (None, None)
    count = f"{k}/{n}, " if k is not None and n is not None else ""
    return f"{count}95% CI {100 * lo:.1f}–{100 * hi:.1f}%"


def _sanity_flags(result: dict[str, Any]) -> list[dict[str, Any]]:
    s = result.get("sanity")
    flags = s.get("flags") if isinstance(s, dict) else s
    return [f for f in (flags or []) if isinstance(f, dict)]


def _curve(model: dict[str, Any], radii: Sequence[float], key: str | None, attack: str | None = None,
           with_clean: bool = True) -> tuple[list[float], list[float | None], list[float | None], list[float | None]]:
    xs: list[float] = []
    ys: list[float | None] = []
    lo: list[float | None] = []
    hi: list[float | None] = []
    if with_clean and (not radii or radii[0] > 0):
        v, l, h = prop(model.get("clean"))
        xs.append(0.0), ys.append(v), lo.append(l), hi.append(h)
    for r, row in zip(radii, _per_radius(model, radii)):
        entry = row.get(key) if key else _attack_entry(row, attack or "")
        v, l, h = prop(entry)
        xs.append(float(r)), ys.append(v), lo.append(l), hi.append(h)
    return xs, ys, lo, hi


def _xticks(radii: Sequence[float]) -> list[tuple[float, str]]:
    ticks = [(0.0, "0")] + [(float(r), radius_label(r)) for r in radii if r > 0]
    if len(ticks) > 9:  # thin out crowded labels, keep the last
        step = math.ceil(len(ticks) / 8)
        ticks = ticks[::step] + ([ticks[-1]] if (len(ticks) - 1) % step else [])
    return ticks


def _robust_section(result: dict[str, Any], names: dict[str, str]) -> list[D.Block]:
    radii = _radii(result)
    attacks = _attacks(result)
    norm = _norm(result)
    t, s = result["teacher"], result["student"]
    blocks: list[D.Block] = [D.Heading(2, "Robust accuracy", "robust-accuracy")]
    if not radii:
        blocks.append(D.Para("No radii were audited.", "muted"))
        return blocks
    series = []
    for role, model, color in (("teacher", t, TEACHER_COLOR), ("student", s, STUDENT_COLOR)):
        xs, ys, lo, hi = _curve(model, radii, "worst")
        series.append(Series(f"{names[role]} ({role}), worst case", xs, ys, lo, hi, color=color, width=2.6))
    suite = ", ".join(attacks) if attacks else "the attack suite"
    blocks.append(D.Figure(
        "robust-accuracy",
        line_chart(series, title=f"Worst-case robust accuracy vs {norm} radius", xlabel=f"{norm} radius (pixel scale [0,1])",
                   ylabel="accuracy", xticks=_xticks(radii), ylim=(0.0, 1.0), yfmt="{:.0%}"),
        f"Worst case over {suite} (a sample counts as robust only if no attack broke it); radius 0 is clean "
        "accuracy. Shaded bands: 95% Clopper-Pearson intervals.",
    ))
    if len(attacks) > 1:
        per: list[Series] = []
        for role, model, color in (("teacher", t, TEACHER_COLOR), ("student", s, STUDENT_COLOR)):
            for j, a in enumerate(attacks[:-1]):  # after the last attack the cascade is the worst case
                xs, ys, lo, hi = _curve(model, radii, None, a)
                per.append(Series(f"{role}: {_attack_label(result, a)}", xs, ys, None, None, color=color,
                                  dash=["6 3", "2 3", "8 3 2 3", "1 2"][j % 4], width=1.6))
            xs, ys, lo, hi = _curve(model, radii, "worst")
            per.append(Series(f"{role}: worst case", xs, ys, lo, hi, color=color, width=2.8, markers=False))
        blocks.append(D.Figure(
            "robust-accuracy-per-attack",
            line_chart(per, title="Robust accuracy along the attack cascade", xlabel=f"{norm} radius", ylabel="accuracy",
                       xticks=_xticks(radii), ylim=(0.0, 1.0), yfmt="{:.0%}"),
            "Dashed/dotted: robust accuracy after the first attacks of the suite (cumulative: a sample stays robust only "
            "if none of the attacks so far broke it); solid with 95% band: after the whole suite (the worst case).",
        ))
    cap = "Accuracy with 95% Clopper-Pearson intervals (percent)."
    if _table_attacks(result) and _cumulative(result):
        cap += " 'after X' columns: robust to the attacks of the suite up to X (cumulative)."
    blocks.append(D.Table(_accuracy_frame(result, names), cap))
    transfer = result.get("transfer")
    if isinstance(transfer, list) and transfer:
        blocks.append(D.Heading(3, "Transfer of robustness", "transfer"))
        blocks.append(D.Table(_transfer_frame(result),
                              "ratio: student / teacher worst-case robust accuracy; lost / gained: share of samples robust for "
                              "one model but not the other (95% intervals)."))
    return blocks


def _accuracy_frame(result: dict[str, Any], names: dict[str, str]) -> Any:
    import pandas as pd

    radii = _radii(result)
    attacks = _attacks(result)
    rows = []
    for role in ("teacher", "student"):
        m = result[role]
        rows.append({"model": f"{names[role]} ({role})", "radius": "clean", "worst case": pct_ci(m.get("clean")),
                     **{_attack_label(result, a): "" for a in _table_attacks(result)}})
        for r, row in zip(radii, _per_radius(m, radii)):
            rec = {"model": f"{names[role]} ({role})", "radius": radius_label(r), "worst case": pct_ci(row.get("worst"))}
            for a in _table_attacks(result):
                rec[_attack_label(result, a)] = pct_ci(_attack_entry(row, a))
            rows.append(rec)
    return pd.DataFrame(rows, columns=["model", "radius", "worst case"] + [_attack_label(result, a) for a in _table_attacks(result)])


def _table_attacks(result: dict[str, Any]) -> list[str]:
    """Attacks that get their own column (the cascade's last one equals the worst case)."""
    attacks = _attacks(result)
    if len(attacks) <= 1:
        return []
    return attacks[:-1] if _cumulative(result) else attacks


def _transfer_frame(result: dict[str, Any]) -> Any:
    import pandas as pd

    rows = []
    for r, tr in zip(_radii(result), result.get("transfer") or []):
        if not isinstance(tr, dict):
            continue
        rows.append({"radius": radius_label(r), "ratio": ratio_ci(tr.get("ratio")),
                     "lost": pct_ci(tr.get("lost")), "gained": pct_ci(tr.get("gained"))})
    return pd.DataFrame(rows, columns=["radius", "ratio", "lost", "gained"])


def _sanity_section(result: dict[str, Any]) -> list[D.Block]:
    flags = _sanity_flags(result)
    blocks: list[D.Block] = [D.Heading(2, "Evaluation sanity checks", "sanity")]
    checks = _get(result, "sanity", "checks")
    rejected = [(role, key, n) for role in ("teacher", "student")
                for key, n in (_get(result, role, "rejected_adversarials") or {}).items() if n]
    if not flags:
        blocks.append(D.Para("No sanity flag was raised: no sign of gradient masking or a broken evaluation in the checks run.", "note"))
    else:
        import pandas as pd

        blocks.append(D.Para("These flags mean an attack may have failed for reasons other than robustness; treat the "
                             "robust accuracies as upper estimates until they are resolved.", "warn"))
        df = pd.DataFrame([{"model": f.get("model", ""), "code": f.get("code", ""), "message": f.get("message", ""),
                            "suggestion": f.get("suggestion", "")} for f in flags])
        blocks.append(D.Table(df, align="left"))
    if rejected:
        import pandas as pd

        blocks.append(D.Para("Adversarial examples an attack claimed but that failed the forward-pass re-check (not "
                             "counted as breaks):", ""))
        blocks.append(D.Table(pd.DataFrame([{"model": r, "attack@radius": k, "rejected": fmt_num(n)} for r, k, n in rejected])))
    if isinstance(checks, list) and checks:
        blocks.append(D.Bullets([str(c) if not isinstance(c, dict) else
                                 f"{c.get('name', c.get('code', 'check'))}: {c.get('status', c.get('result', ''))}" for c in checks]))
    return blocks


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
    import pandas as pd

    return D.Table(pd.DataFrame(_flatten(d), columns=["key", "value"]), caption, align="left")


def _provenance_section(result: dict[str, Any]) -> list[D.Block]:
    blocks: list[D.Block] = [D.Heading(2, "Configuration and provenance", "provenance")]
    for key, title in (("config", "Configuration"), ("data", "Data"), ("environment", "Environment"), ("timings", "Timings (seconds)")):
        sect = result.get(key)
        if sect:
            blocks.append(D.Heading(3, title))
            blocks.append(_kv_table(sect))
        if key == "data":
            for role in ("teacher", "student"):
                info = _model_info(result, role)
                if info:
                    blocks.append(D.Heading(3, f"Model: {role}"))
                    blocks.append(_kv_table(info))
        if key == "timings":
            per_model = {role: _get(result, role, "timings") for role in ("teacher", "student") if _get(result, role, "timings")}
            if per_model:
                if not sect:
                    blocks.append(D.Heading(3, title))
                blocks.append(_kv_table(per_model, "per model"))
    resumed = result.get("resumed")
    if isinstance(resumed, list) and resumed:
        blocks.append(D.Para(f"Resumed: {len(resumed)} (model, attack, radius) result(s) were taken from saved state: "
                             + ", ".join(str(r) for r in resumed[:20]) + (" ..." if len(resumed) > 20 else ""), "muted"))
    return blocks


def _command_section(result: dict[str, Any]) -> list[D.Block]:
    cmd = result.get("command")
    blocks: list[D.Block] = [D.Heading(2, "Reproduce", "reproduce")]
    if isinstance(cmd, list):
        import shlex

        cmd = shlex.join(str(c) for c in cmd)
    if cmd:
        blocks.append(D.Para("The exact command that produced these results:"))
        blocks.append(D.Code(str(cmd), "sh"))
    else:
        blocks.append(D.Para("The command line was not recorded (the audit was run through the Python API).", "muted"))
    ver = result.get("robkd_version") or _get(result, "environment", "robkd")
    if ver:
        blocks.append(D.Para([("", "robkd version: "), ("code", str(ver))], "muted"))
    return blocks


# ----------------------------------------------------------------------------- public entry points
def build_blocks(result: dict[str, Any]) -> tuple[str, list[D.Block]]:
    """(title, blocks) of the report for a validated results dict."""
    from robkd.report import sections

    check_schema(result)
    names = _model_names(result)
    kind = "repair" if (result.get("training") or "repair" in str(result.get("kind", ""))) else "audit"
    title = f"robkd {kind} report: {names['student']} vs {names['teacher']}"
    radii = _radii(result)
    sub = [f"teacher {names['teacher']}", f"student {names['student']}"]
    data_name = _get(result, "data", "dataset") or _get(result, "config", "data")
    n = _get(result, "data", "n") or _get(result, "config", "n")
    if data_name:
        sub.append(f"data {data_name}" + (f" (n = {n})" if n else ""))
    if radii:
        sub.append(f"{_norm(result)} radii {', '.join(radius_label(r) for r in radii)}")
    created = result.get("created") or result.get("timestamp")
    if created:
        sub.append(f"created {created}")
    blocks: list[D.Block] = [D.Heading(1, title, "top"), D.Para(" · ".join(sub), "muted"), _verdict(result)]
    if kind == "repair":  # the decision-maker's question first: did the repair work?
        blocks += sections.before_after_section(result, names)
    blocks += _robust_section(result, names)
    blocks += sections.certification_section(result, names)
    blocks += sections.llm_section(result, names)
    blocks += sections.linear_region_section(result, names)
    blocks += sections.training_section(result, names)
    if kind != "repair":
        blocks += sections.before_after_section(result, names)
    blocks += _sanity_section(result)
    blocks += _provenance_section(result)
    blocks += _command_section(result)
    return title, blocks


def render(result_dict: dict[str, Any], out_dir: str | Path, formats: Iterable[str] = ("md", "html")) -> list[Path]:
    """Write report.md (+ its SVG figures), report.html and results.json into ``out_dir``.

    A ``training_log.json`` already in ``out_dir`` (written by ``robkd repair``) is shown
    as the training section when the dict has no ``training`` key. Returns the written paths. ``result_dict`` is ``AuditResult.to_dict()`` (or a
    loaded results.json); raises :class:`ResultsError` on an unknown schema version, :class:`OutputError`
    when ``out_dir`` cannot be written (checked before rendering; a write that fails midway removes the
    files and folders this call created, and every file is written atomically).
    """
    from robkd.utils.io import json_text

    fmts = [str(f).strip().lower() for f in formats]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise UsageError(f"unknown report format(s) {bad or fmts}: use {', '.join(FORMATS)}")
    check_schema(result_dict)
    out = check_out_dir(out_dir)
    title, blocks = build_blocks(with_training_log(result_dict, out))
    files: dict[str, str] = {}  # everything is rendered before the first byte is written
    if not _same_json(out / "results.json", result_dict):
        files["results.json"] = json_text(result_dict)
    names = ["results.json"]
    if "md" in fmts:
        fig_paths: dict[str, str] = {}
        for b in blocks:
            if isinstance(b, D.Figure):
                name = f"report-{b.stem}.svg"
                files[name] = b.svg + "\n"
                fig_paths[b.stem] = name
                names.append(name)
        files["report.md"] = D.to_markdown(blocks, fig_paths)
        names.append("report.md")
    if "html" in fmts:
        files["report.html"] = D.to_html(blocks, title=title)
        names.append("report.html")
    _write_files(out, files)
    written = [out / n for n in names]
    log.debug("report files: %s", ", ".join(esc_text(p, keep="") for p in written))
    return written


def _write_files(out: Path, files: dict[str, str]) -> None:
    """Write ``files`` (name -> text) into ``out`` atomically, one by one. On a failure (disk full, file-size
    limit, a directory in the way) remove what this call created and raise :class:`OutputError`."""
    from robkd.utils.io import atomic_write_text

    made_dirs = [d for d in [out, *out.parents] if not os.path.lexists(d)][::-1]
    created: list[Path] = []
    target = out
    try:
        for target in made_dirs:
            target.mkdir()
            created.append(target)
        for name, text in files.items():
            target = out / name
            existed = os.path.lexists(target)
            atomic_write_text(target, text)
            if not existed:
                created.append(target)
    except BaseException as exc:
        for p in reversed(created):
            with contextlib.suppress(OSError):
                if p.is_dir():
                    p.rmdir()
                else:
                    p.unlink()
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {esc_text(target, keep='')}: {exc.strerror or exc}") from exc
        raise


def with_training_log(result: dict[str, Any], directory: str | Path) -> dict[str, Any]:
    """``result`` plus ``training`` read from ``directory/training_log.json`` when it has none.

    ``robkd repair`` writes the trainer's epoch log (``TrainLog.to_dict()``) beside the
    audit's results.json; the report shows it as the training section.
    """
    if result.get("training"):
        return result
    from robkd.utils.io import read_json

    path = Path(directory) / TRAINING_LOG_FILE
    if not path.is_file():
        return result
    try:
        log_dict = read_json(path, what="training log")
    except ValueError as exc:
        log.warning("ignoring the training log: %s", esc_text(exc, keep=""))
        return result
    if not isinstance(log_dict, (dict, list)):
        return result
    return {**result, "training": log_dict}


def _same_json(path: Path, obj: Any) -> bool:
    from robkd.utils.io import read_json

    if not path.is_file():
        return False
    try:
        return read_json(path) == json.loads(json.dumps(obj))
    except ValueError:
        return False
