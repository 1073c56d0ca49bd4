"""Formatting shared by the report's sections: percentages with intervals, numbers, radii, names, colours.

Values come typed from :mod:`robkd.report.schema` (:class:`Estimate`, floats or None); every function
here returns display text (``–`` for an undefined value).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from robkd.report.schema import Estimate, Results, number
from robkd.report.svg import PALETTE
from robkd.types import format_radius

#: teacher blue, student (after a repair) vermillion; the student before a repair black (dashed): the
#: before/after pair stays far apart under deuteranopia, protanopia and tritanopia (the former orange did not)
TEACHER_COLOR, STUDENT_COLOR, BEFORE_COLOR = PALETTE[0], PALETTE[1], PALETTE[6]
DASH = "–"


def pct(v: float | None, digits: int = 1) -> str:
    """``0.8523`` -> ``85.2%``; None -> ``–``."""
    return DASH if v is None else f"{100 * v:.{digits}f}%"


def pct_ci(e: Estimate) -> str:
    """``85.2% [82.8, 87.4]`` (95% CI in percent); the value alone when no interval was recorded."""
    if e.value is None:
        return DASH
    if e.low is None or e.high is None:
        return pct(e.value)
    return f"{pct(e.value)} [{100 * e.low:.1f}, {100 * e.high:.1f}]"


def ci_text(e: Estimate) -> str:
    """``250/400, 95% CI 57.5–67.3%`` (the count when recorded); empty without an interval."""
    if e.low is None or e.high is None:
        return ""
    count = f"{e.k}/{e.n}, " if e.k is not None and e.n is not None else ""
    return f"{count}95% CI {100 * e.low:.1f}–{100 * e.high:.1f}%"


def ratio_ci(e: Estimate | None) -> str:
    """A ratio with its interval (the upper end may be unbounded: ``∞``)."""
    if e is None or e.value is None:
        return DASH
    if e.bare:
        return f"{e.value:.3f}"
    lo = DASH if e.low is None else f"{e.low:.3f}"
    hi = "∞" if e.high is None else f"{e.high:.3f}"
    return f"{e.value:.3f} [{lo}, {hi}]"


def lost_text(lost: Estimate, of_teacher_robust: float | None, *, interval: bool = False) -> str:
    """The one phrasing of the lost samples: ``35 samples (35.0% of all, 59.3% of the teacher-robust)``
    (``interval``: the 95% interval after the share of all); ``–`` when undefined."""
    if lost.value is None:
        return DASH
    count = f"{lost.k} sample{'' if lost.k == 1 else 's'}" if lost.k is not None else "samples"
    share = pct_ci(lost) if interval else pct(lost.value)
    of_t = f", {pct(of_teacher_robust)} of the teacher-robust" if of_teacher_robust is not None else ""
    return f"{count} ({share} of all{of_t})"


def fmt_num(v: Any, digits: int = 4) -> str:
    """A number in compact form (integers without decimals); a non-number as text, null as ``–``."""
    n = number(v)
    if n is None:
        return DASH if v is None else str(v)
    if n == int(n) and abs(n) < 1e12:
        return str(int(n))
    return f"{n:.{digits}g}"


def fmt_g(v: float | None) -> str:
    """Four significant digits, ``–`` for None."""
    return DASH if v is None else f"{v:.4g}"


def radius_label(r: float) -> str:
    """``8/255`` for k/255 radii, else a short decimal (:func:`robkd.types.format_radius`)."""
    return format_radius(float(r))


def xticks(radii: Sequence[float]) -> list[tuple[float, str]]:
    """Ticks at 0 and every radius; crowded labels thinned out, the last kept."""
    ticks = [(0.0, "0")] + [(float(r), radius_label(r)) for r in radii if r > 0]
    if len(ticks) > 9:
        step = math.ceil(len(ticks) / 8)
        ticks = ticks[::step] + ([ticks[-1]] if (len(ticks) - 1) % step else [])
    return ticks


def frame(rows: list[dict[str, Any]], columns: list[str] | None = None) -> Any:
    """A pandas DataFrame of table rows (the report's tables are DataFrames)."""
    import pandas as pd

    return pd.DataFrame(rows, columns=columns) if columns else pd.DataFrame(rows)


def model_name(res: Results, role: str, *, short: bool = True) -> str:
    """A display name: the model file's name (``short``) or path, else the configured name, else the role."""
    info = res.model(role).info
    name = info.get("name") or info.get("path") or res.section("config").get(role)
    if not name:
        return role
    name = str(name)
    if short and not name.startswith("<"):
        name = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or name
    return name


def model_names(res: Results) -> dict[str, str]:
    """Display names of both models: file names, or the paths when the file names are the same."""
    names = {role: model_name(res, role) for role in ("teacher", "student")}
    if names["teacher"] == names["student"]:
        full = {role: model_name(res, role, short=False) for role in ("teacher", "student")}
        if full["teacher"] != full["student"]:
            return full
    return names


def attack_label(res: Results, attack: str) -> str:
    """Column/legend label of one attack's figure (``after X`` / ``after +X`` along the cascade)."""
    attacks = res.attacks
    if not res.cumulative or not attacks:
        return attack
    k = attacks.index(attack) if attack in attacks else -1
    return f"after {attack}" if k <= 0 else f"after +{attack}"


def table_attacks(res: Results) -> list[str]:
    """Attacks that get their own column (the cascade's last one equals the worst case)."""
    attacks = res.attacks
    if len(attacks) <= 1:
        return []
    return attacks[:-1] if res.cumulative else attacks
