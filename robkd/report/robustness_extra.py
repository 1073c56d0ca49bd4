"""Report sections beside the adversarial figures: the transfer attack (each model attacked with the other's
adversarial examples, per direction), the attack self-test and the common corruptions (table and charts).

Each section reads its own optional record of the results (``transfer_attack``, ``<role>.self_test``,
``<role>.corruption``, ``corruption_transfer``; docs/results-schema.md) and renders nothing when it is absent,
so results files of earlier versions render as before.
"""

from __future__ import annotations

from typing import Any

from robkd.report import doc as D
from robkd.report.format import STUDENT_COLOR, TEACHER_COLOR, frame, pct, radius_label
from robkd.report.schema import Results
from robkd.report.svg import BarGroup, Series, bar_chart, line_chart

ROLES = ("teacher", "student")


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _pct_ci(e: Any) -> str:
    """``61.0% [55.2, 66.5]`` from a ``{value, ci_low, ci_high}`` record."""
    e = _dict(e)
    v = e.get("value")
    if v is None:
        return "–"
    lo, hi = e.get("ci_low"), e.get("ci_high")
    return pct(v) if lo is None or hi is None else f"{pct(v)} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _flags(res: Results, code: str) -> list[dict[str, Any]]:
    return [f for f in res.sanity_flags if isinstance(f, dict) and f.get("code") == code]


def robustness_extra_sections(res: Results, names: dict[str, str]) -> list[D.Block]:
    """Every section of this module present in the results, in report order."""
    return transfer_attack_section(res, names) + self_test_section(res, names) + corruption_section(res, names)


# ----------------------------------------------------------------------------- transfer attack
def transfer_attack_section(res: Results, names: dict[str, str]) -> list[D.Block]:
    """Per direction and radius: robust against the model's own attacks, broken by the other's examples."""
    rec = res.section("transfer_attack")
    directions = _dict(rec.get("directions"))
    if not directions:
        return []
    steps = rec.get("steps")
    blocks: list[D.Block] = [D.Heading(2, "Transfer attacks: each model attacked with the other's examples", "transfer-attack")]
    blocks.append(D.Para(
        "A student imitates its teacher, so the teacher's adversarial examples are the natural black-box attack on "
        "it (and the student's on the teacher). On the samples a model's own attacks left robust, the examples the "
        "other model's suite found are re-checked on it (a forward pass, inside the same ball), and where the other "
        f"model's suite found none, PGD-{steps} on the other model supplies one. The worst case above counts these "
        "breaks (attack 'transfer'). A transferred example that beats the model's own gradient attacks points to "
        "gradient masking.", "note"))
    rows = []
    for d in directions.values():
        d = _dict(d)
        src, tgt = str(d.get("source", "?")), str(d.get("target", "?"))
        for row in d.get("per_radius") or []:
            row = _dict(row)
            rows.append({
                "direction": f"{names.get(src, src)} ({src}) -> {names.get(tgt, tgt)} ({tgt})",
                "radius": radius_label(float(row.get("radius", 0.0))),
                "target robust (own attacks)": _pct_ci(row.get("robust_own")),
                "source's examples: fool / tried": f"{row.get('reused_broken', 0)} / {row.get('reused', 0)}",
                f"PGD-{steps} on source: fool / tried": f"{row.get('pgd_broken', 0)} / {row.get('pgd', 0)}",
                "broken by transfer": str(row.get("broken", 0)),
                "target robust (with transfer)": _pct_ci(row.get("robust_with_transfer")),
            })
    blocks.append(D.Table(frame(rows), "Per direction and radius; 'broken by transfer' counts samples broken at this "
                          "radius or a smaller one (95% Clopper-Pearson intervals)."))
    for f in _flags(res, "transfer-beats-white-box"):
        blocks.append(D.Para([("b", "Gradient masking: "), ("", str(f.get("message", "")))], "warn"))
    return blocks


# ----------------------------------------------------------------------------- self-test
def self_test_section(res: Results, names: dict[str, str]) -> list[D.Block]:
    """The binarization test's success rate per model and attack."""
    recs = {role: _dict(res.section(role).get("self_test")) for role in ROLES}
    if not any(recs.values()):
        return []
    blocks: list[D.Block] = [D.Heading(2, "Attack self-test", "self-test")]
    blocks.append(D.Para(
        "The binarization test (Zimmermann et al., NeurIPS 2022): the model's last layer is replaced by a readout "
        "under which an adversarial point provably lies inside the ball around each test sample; a working attack "
        "finds it. A success rate below the threshold means the attack misses adversarial examples that exist.", "note"))
    rows = []
    for role in ROLES:
        r = recs[role]
        if not r:
            continue
        who = f"{names.get(role, role)} ({role})"
        if r.get("status") != "ok":
            rows.append({"model": who, "attack": "–", "radius": "–", "found / valid": "–", "rate": "–",
                         "verdict": f"not applicable: {r.get('reason', '')}"})
            continue
        thr = float(r.get("threshold", 0.9))
        for attack, a in _dict(r.get("attacks")).items():
            a = _dict(a)
            rate = a.get("rate")
            ok = rate is not None and rate >= thr
            rows.append({"model": who, "attack": attack, "radius": radius_label(float(r.get("eps", 0.0))),
                         "found / valid": f"{a.get('found', 0)} / {a.get('valid', 0)}",
                         "rate": pct(rate) if rate is not None else "–",
                         "verdict": "ok" if ok else f"below {pct(thr, 0)}: flagged"})
    blocks.append(D.Table(frame(rows), "Success rate of each gradient attack of the suite on binarised models "
                          "(invalid samples, whose readout could not be built, are left out)."))
    return blocks


# ----------------------------------------------------------------------------- corruptions
def _severity_shown(sevs: list[int]) -> int:
    """Severity 3 (the gate's) when evaluated, else the middle evaluated one."""
    return 3 if 3 in sevs else sevs[len(sevs) // 2]


def corruption_section(res: Results, names: dict[str, str]) -> list[D.Block]:
    """Accuracy per corruption and severity, teacher vs student, with the mean and the transfer ratios."""
    recs = {role: _dict(res.section(role).get("corruption")) for role in ROLES}
    if not all(r.get("status") == "ok" for r in recs.values()):
        return []
    t, s = recs["teacher"], recs["student"]
    corr = [str(c) for c in t.get("corruptions") or []]
    sevs = [int(v) for v in t.get("severities") or []]
    if not corr or not sevs:
        return []
    shown = _severity_shown(sevs)
    blocks: list[D.Block] = [D.Heading(2, "Common corruptions", "corruptions")]
    blocks.append(D.Para(
        f"Accuracy on the audited samples under the common corruptions of Hendrycks and Dietterich ({len(corr)} "
        f"corruption(s), severities {', '.join(map(str, sevs))}), each image corrupted once and classified by both "
        "models. The mean corruption accuracy is the mean over the corruptions (and severities); gates read it as "
        "student.corruption@3 and student.corruption.", "note"))
    st = str(shown)
    groups = [BarGroup(f"{names.get(role, role)} ({role})",
                       [_dict(_dict(_dict(recs[role].get("per_corruption")).get(c)).get("per_severity")).get(st, {}).get("value")
                        for c in corr], color=color)
              for role, color in (("teacher", TEACHER_COLOR), ("student", STUDENT_COLOR))]
    blocks.append(D.Figure("corruptions-severity", bar_chart(
        [c.replace("_", " ") for c in corr], groups, title=f"Accuracy per corruption at severity {shown}",
        ylabel="accuracy", yfmt="{:.0%}", label_fmt="{:.0%}", width=max(640, 60 * len(corr)), tick_max=1.0,
        value_labels=len(corr) <= 8),
        f"Accuracy of each model under each corruption at severity {shown}."))
    series = []
    for role, color in (("teacher", TEACHER_COLOR), ("student", STUDENT_COLOR)):
        r = recs[role]
        xs = [0.0] + [float(v) for v in sevs]
        ys = [_dict(r.get("clean")).get("value")] + [_dict(_dict(r.get("per_severity")).get(str(v))).get("value") for v in sevs]
        lo = [_dict(r.get("clean")).get("ci_low")] + [_dict(_dict(r.get("per_severity")).get(str(v))).get("ci_low") for v in sevs]
        hi = [_dict(r.get("clean")).get("ci_high")] + [_dict(_dict(r.get("per_severity")).get(str(v))).get("ci_high") for v in sevs]
        series.append(Series(f"{names.get(role, role)} ({role})", xs, ys, lo, hi, color=color))
    blocks.append(D.Figure("corruptions-mean", line_chart(
        series, title="Mean corruption accuracy per severity", xlabel="severity (0 = clean)", ylabel="accuracy",
        xticks=[(0.0, "clean")] + [(float(v), str(v)) for v in sevs], ylim=(0.0, 1.0), yfmt="{:.0%}"),
        "Mean accuracy over the corruptions at each severity (clean accuracy at 0); shaded: 95% intervals."))
    ratios = res.section("corruption_transfer")
    rows = []
    for c in corr:
        row: dict[str, Any] = {"corruption": c}
        for role in ROLES:
            per = _dict(_dict(_dict(recs[role].get("per_corruption")).get(c)).get("per_severity"))
            for v in sevs:
                row[f"{role} @{v}"] = pct(_dict(per.get(str(v))).get("value"))
        ratio = _dict(_dict(ratios.get("per_corruption")).get(c)).get("ratio")
        row["student / teacher"] = f"{ratio:.2f}" if isinstance(ratio, (int, float)) else "–"
        rows.append(row)
    mean_row: dict[str, Any] = {"corruption": "mean"}
    for role in ROLES:
        for v in sevs:
            mean_row[f"{role} @{v}"] = pct(_dict(_dict(recs[role].get("per_severity")).get(str(v))).get("value"))
    ratio = _dict(ratios.get("mean")).get("ratio")
    mean_row["student / teacher"] = f"{ratio:.2f}" if isinstance(ratio, (int, float)) else "–"
    rows.append(mean_row)
    blocks.append(D.Table(frame(rows), "Accuracy per corruption and severity; the ratio is the student's mean over the "
                          "severities divided by the teacher's."))
    blocks.append(D.Para(
        f"Mean corruption accuracy: teacher {_pct_ci(t.get('mean'))}, student {_pct_ci(s.get('mean'))} "
        f"(95% intervals); at severity {shown}: teacher {_pct_ci(_dict(t.get('per_severity')).get(st))}, student "
        f"{_pct_ci(_dict(s.get('per_severity')).get(st))}."))
    return blocks
