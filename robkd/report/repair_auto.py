"""The ``--method auto`` section of a repair report: the trial table, the choice and why.

Rendered from the result's ``auto`` block (written by :mod:`robkd.distill.auto`); absent block, no section.
"""

from __future__ import annotations

from typing import Any

from robkd.report import doc as D
from robkd.report.format import frame, pct
from robkd.report.schema import Results, number


def _num(v: Any) -> str:
    x = number(v)
    return "–" if x is None else pct(x)


def auto_section(res: Results) -> list[D.Block]:
    """Trials ranked by the lower bound of validation robust accuracy, the continued rounds, and the kept run."""
    block = res.section("auto")
    trials = block.get("trials")
    if not isinstance(trials, list) or not trials:
        return []
    val = block.get("validation") if isinstance(block.get("validation"), dict) else {}
    cap = number(block.get("max_clean_drop"))
    intro = (f"`--method auto` tried {len(trials)} candidate(s) on a validation split carved from the training data "
             f"(never the test set; {val.get('rank_n', '?')} images for ranking, attacked with {val.get('attack', '?')}) "
             f"and ranked them by the one-sided 95% lower bound of validation robust accuracy ({block.get('metric', '?')})"
             + (f", among those losing at most {pct(cap)} of clean accuracy." if cap is not None else "."))
    rows: list[dict[str, Any]] = []
    for t in trials:
        if not isinstance(t, dict):
            continue
        skipped = "skipped" in t
        rows.append({"trial": str(t.get("unit", "")), "candidate": str(t.get("label") or t.get("method") or ""),
                     "val clean": "–" if skipped else _num(t.get("val_clean")),
                     "val robust": "–" if skipped else _num(t.get("val_robust")),
                     "lower bound": "–" if skipped else _num(t.get("robust_lower")),
                     "chosen": "yes" if t.get("chosen") else "no", "why": str(t.get("why", ""))})
    for r in block.get("rounds") or []:
        if not isinstance(r, dict):
            continue
        rows.append({"trial": str(r.get("unit", "")), "candidate": "continued", "val clean": _num(r.get("val_clean")),
                     "val robust": _num(r.get("val_robust")), "lower bound": _num(r.get("robust_lower")),
                     "chosen": "kept" if r.get("unit") == block.get("kept") else "",
                     "why": "gate holds on validation" if r.get("gate_on_validation") else "gate not yet met on validation"})
    cols = ["trial", "candidate", "val clean", "val robust", "lower bound", "chosen", "why"]
    elapsed, budget = number(block.get("elapsed_s")), number(block.get("budget_s"))
    tail = (f"Chosen: {block.get('chosen', '?')} ({block.get('why', '')}). Kept: {block.get('kept', '?')}; "
            f"stopped: {block.get('stopped', '?')}"
            + (f"; {elapsed:.0f} s of a {budget:.0f} s budget." if elapsed is not None and budget is not None else "."))
    return [D.Heading(2, "Choosing the repair (--method auto)", "auto"), D.Para(intro, ""),
            D.Table(frame(rows, cols), "Trials and continued rounds (validation figures, never the test set).", align="left"),
            D.Para(tail, "")]
