"""Diagnostic report sections: robust accuracy per class, and a gallery of the samples the student lost.

Per class: from the ``per_class`` counts of each model block (audits written before those counts render
without the section). Gallery: from ``samples.safetensors`` (:mod:`robkd.report.gallery`); without it the
section says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robkd.report import doc as D
from robkd.report.format import STUDENT_COLOR, TEACHER_COLOR, frame, pct, radius_label
from robkd.report.gallery import GALLERY_MAX, lost_gallery
from robkd.report.schema import PerClass, Results
from robkd.report.svg import BarGroup, bar_chart

#: the chart shows at most this many classes (those the student lost most robustness on); the table has all
CHART_CLASSES = 20


def class_names(res: Results) -> dict[int, str]:
    """Label -> display name from the data record's ``class_names`` (the label itself when absent)."""
    names = res.section("data").get("class_names")
    if not isinstance(names, list):
        return {}
    return {i: str(n) for i, n in enumerate(names) if n is not None}


def _share(k: int, n: int) -> float | None:
    return k / n if n else None


def _count_pct(k: int, n: int) -> str:
    return f"{pct(_share(k, n))} ({k}/{n})" if n else "–"


def per_class_section(res: Results, names: dict[str, str]) -> list[D.Block]:
    """Clean and worst-case robust accuracy at the largest radius per class, teacher vs student."""
    t, s = res.teacher.per_class, res.student.per_class
    radii = res.radii
    if t is None or s is None or not radii or t.classes != s.classes or t.n != s.n:
        return []
    rl = radius_label(radii[-1])
    labels = class_names(res)
    rows: list[dict[str, Any]] = []
    drops: list[tuple[float, int]] = []
    for j, c in enumerate(t.classes):
        n = t.n[j]
        tr, sr = t.robust[-1][j], s.robust[-1][j]
        change = None if not n else 100 * (sr - tr) / n
        drops.append((change if change is not None else 0.0, j))
        rows.append({"class": f"{c} {labels[c]}" if c in labels else str(c), "n": str(n),
                     "teacher clean": _count_pct(t.clean_correct[j], n), "student clean": _count_pct(s.clean_correct[j], n),
                     f"teacher robust @ {rl}": _count_pct(tr, n), f"student robust @ {rl}": _count_pct(sr, n),
                     "change": "–" if change is None else f"{change:+.1f} pts"})
    shown = sorted(j for _, j in sorted(drops)[:CHART_CLASSES])
    cats = [_axis_name(t.classes[j], labels, len(shown)) for j in shown]
    groups = [BarGroup(f"{names['teacher']} (teacher)", [_robust(t, j) for j in shown], color=TEACHER_COLOR),
              BarGroup(f"{names['student']} (student)", [_robust(s, j) for j in shown], color=STUDENT_COLOR)]
    chart = bar_chart(cats, groups, title=f"Worst-case robust accuracy per class at {rl}", ylabel="accuracy",
                      yfmt="{:.0%}", label_fmt="{:.0%}", tick_max=1.0, width=max(640, min(1000, 70 * len(shown) + 80)))
    note = (f"The {len(shown)} classes on which the student lost the most robustness (of {len(t.classes)}); "
            "the table lists all. " if len(shown) < len(t.classes) else "")
    return [
        D.Heading(2, "Robust accuracy per class", "per-class"),
        D.Para("Where the student's robustness goes: each class's share of its samples that are classified correctly "
               f"(clean) and that no attack broke at the largest radius ({rl}). Small classes have wide uncertainty; "
               "the counts are given.", "note"),
        D.Figure("per-class", chart, note + f"Robust accuracy per class at {rl} (worst case over the attack suite)."),
        D.Table(frame(rows), f"Per class: clean and worst-case robust accuracy at {rl} (correct / samples); change: "
                             "student minus teacher robust accuracy in percentage points."),
    ]


def _robust(p: PerClass, j: int) -> float | None:
    return _share(p.robust[-1][j], p.n[j])


def _axis_name(label: int, labels: dict[int, str], count: int) -> str:
    """The class name on the chart's axis, shortened to its slot; the label when there is no name."""
    name = labels.get(label)
    if not name:
        return str(label)
    fit = max(3, int(560 / max(count, 1) / 6.5))
    return name if len(name) <= fit else name[: fit - 1] + "…"


def gallery_section(res: Results, names: dict[str, str], samples: str | Path | None) -> list[D.Block]:
    """Thumbnails of the first samples the student lost at the largest radius (clean, adversarial, perturbation)."""
    g = lost_gallery(res, samples, GALLERY_MAX)
    if g is None:
        return []
    rl = radius_label(g.radius)
    blocks: list[D.Block] = [D.Heading(2, f"Samples the student lost at {rl}", "lost-samples")]
    if g.note:
        blocks.append(D.Para(g.note, "muted"))
        return blocks
    if not g.samples:
        blocks.append(D.Para(f"The student lost no sample at {rl}: every sample robust for the teacher is robust "
                             "for the student too.", "muted"))
        return blocks
    labels = class_names(res)

    def cls(c: int | None) -> str:
        if c is None:
            return "–"
        if c < 0:
            return "non-finite output"
        return f"{c} {labels[c]}" if c in labels else str(c)

    rows: list[list[str | D.Image]] = []
    for k, x in enumerate(g.samples, 1):
        if x.adv_radius is None:
            how = "misclassified without perturbation"
        else:
            how = f"broken at {radius_label(x.adv_radius)}" + (f"; perturbation ×{x.amplification:.3g}" if x.amplification else "")
        rows.append([str(k), str(x.index), cls(x.label), cls(x.clean_pred), cls(x.adv_pred), how,
                     D.Image(f"lost-{k}", x.png, f"sample {x.index}: clean, adversarial, perturbation")])
    shown = f"the first {len(g.samples)} of {g.total}" if g.total > len(g.samples) else f"all {g.total}"
    blocks.append(D.Para(
        f"Samples robust for the teacher ({names['teacher']}) but broken for the student ({names['student']}) at {rl}: "
        f"{shown}, in audit order. Each image: the clean sample, the student's adversarial example, and the "
        "perturbation amplified (mid-grey: no change).", "note"))
    blocks.append(D.ImageTable(["#", "sample", "label", "student clean", "student adversarial", "how", "clean | adversarial | perturbation"],
                               rows, "Lost samples (the teacher classifies each correctly under every attack)."))
    return blocks
