"""``robkd compare A B``: two audits side by side, from their results files (no model needed).

Clean and worst-case robust accuracy of teacher and student in each audit, the difference B - A with its
95% interval and whether it is significant (:mod:`robkd.auditing.compare`). Exit codes: 0 done, 2 a
results file is missing, malformed or breaks the results schema.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: "argparse._SubParsersAction") -> None:
    """The ``compare`` subcommand."""
    p = sub.add_parser(
        "compare",
        help="compare two audits (results.json files) side by side, with significance tests",
        description=(
            "Compare two results.json files (e.g. before and after a repair): clean and worst-case robust "
            "accuracy per radius of both models, the difference B - A with its 95%% interval and whether it is "
            "significant (exact McNemar test when both audited the same samples and samples.safetensors lies "
            "beside both files, else the two-proportion z-test). No model is needed. Exit codes: 0 done, 2 bad input."
        ),
    )
    p.add_argument("a", help="first results.json (or its audit directory), e.g. the audit before a change")
    p.add_argument("b", help="second results.json (or its audit directory)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load and validate both files, compare, print."""
    import json
    from pathlib import Path

    from robkd.auditing.compare import compare
    from robkd.auditing.result import AuditResult

    a, b = AuditResult.load(Path(args.a)), AuditResult.load(Path(args.b))
    cmp = compare(a.to_dict(), b.to_dict(), a.tensors, b.tensors)
    if args.json:
        sys.stdout.write(json.dumps({"a": str(args.a), "b": str(args.b), **cmp}, indent=2, allow_nan=False) + "\n")
        return 0
    from rich.console import Console

    console = Console()
    for item in renderables(cmp, str(args.a), str(args.b)):
        console.print(item)
    return 0


def _pct(e: dict[str, Any]) -> str:
    if e.get("value") is None:
        return "n/a"
    lo, hi = e.get("ci_low"), e.get("ci_high")
    ci = f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None and hi is not None else ""
    return f"{100 * e['value']:.1f}%{ci}"


def _diff(row: dict[str, Any]) -> str:
    d = row.get("difference")
    if not d:
        return "n/a"
    ci = f" [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]" if d.get("ci_low") is not None else ""
    return f"{100 * d['value']:+.1f} pts{ci}"


def _p(row: dict[str, Any]) -> str:
    p = row.get("p_value")
    if p is None:
        return "n/a"
    return ("< 0.001" if p < 0.001 else f"{p:.3f}") + (" (McNemar)" if row.get("test") == "mcnemar-exact" else " (z)")


def renderables(cmp: dict[str, Any], a: str, b: str) -> list[Any]:
    """The comparison as rich renderables: a title line, the table, notes."""
    from rich.markup import escape
    from rich.table import Table

    from robkd.report.escape import esc_text

    def t(v: Any) -> str:
        return escape(esc_text(v, keep=""))

    table = Table(title=f"A: {t(a)}\nB: {t(b)}", title_justify="left")
    for col, just in (("model", "left"), ("metric", "left"), ("A", "right"), ("B", "right"), ("B - A [95%]", "right"),
                      ("p", "right"), ("significant", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for row in cmp["rows"]:
        metric = "clean" if row["metric"] == "clean" else f"worst @ {t(row['radius_text'])}"
        sig = row.get("significant")
        table.add_row(row["model"], metric, _pct(row["a"]), _pct(row["b"]), _diff(row), _p(row),
                      "n/a" if sig is None else ("[bold]yes[/bold]" if sig else "no"))
    out: list[Any] = [table]
    lines = [f"compared on {'the same samples, paired' if cmp['paired'] else 'unpaired tests'}; significant: p < 0.05"]
    lines += [t(n) for n in cmp.get("notes") or []]
    if cmp.get("only_in_a"):
        lines.append("radii audited in A only: " + ", ".join(t(r) for r in cmp["only_in_a"]))
    if cmp.get("only_in_b"):
        lines.append("radii audited in B only: " + ", ".join(t(r) for r in cmp["only_in_b"]))
    out += lines
    return out
