"""``robkd gate RESULTS --gate EXPR ...``: judge gates again from a results file, without any model.

Exit codes: 0 every gate passed (or none), 1 a gate failed (or the default verdict, when enforced),
2 bad input (a malformed results file, a bad gate expression, a radius or attack the audit did not
measure), 3 the results file records sanity flags under ``--strict`` (as the audit itself would exit).
"""

from __future__ import annotations

import argparse
import sys


def register(sub: "argparse._SubParsersAction") -> None:
    """The ``gate`` subcommand."""
    p = sub.add_parser(
        "gate",
        help="judge release gates again from a results.json (no model needed)",
        description=(
            "Judge release gates on the figures of a results.json written by 'robkd audit' or 'robkd repair', "
            "without loading any model. Gates over several metrics use the paired bootstrap when "
            "samples.safetensors lies beside the results file (the audit's own judgement), else the conservative "
            "interval arithmetic over the recorded 95%% intervals. Without --gate the gates the file records are "
            "judged again. Exit codes: 0 gates passed, 1 a gate failed, 2 bad input, 3 the file records sanity "
            "flags under --strict."
        ),
    )
    p.add_argument("results", help="results.json (or the audit directory holding it)")
    p.add_argument("--gate", action="append", dest="gates", metavar="EXPR",
                   help='gate, repeatable, e.g. "student.worst@8/255 >= 0.9*teacher.worst@8/255" (default: the file\'s gates)')
    p.add_argument("--gate-on", choices=["lower", "point"],
                   help="judge on 95%% confidence bounds (lower) or point estimates (point); default: as the audit did")
    p.add_argument("--enforce-default-verdict", action="store_true", default=None,
                   help="exit 1 when the default transfer verdict (kept >= 90%% of the teacher's robustness at the "
                        "largest radius) fails; default: as the audit did")
    p.add_argument("--json", action="store_true", help="print the verdicts as JSON instead of a table")
    p.add_argument("--write", metavar="PATH",
                   help="also write the results with the new verdicts to PATH (atomically; may be the file itself)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load and validate the results file, judge the gates, print them and the closing line."""
    import json
    from pathlib import Path

    from robkd.auditing.result import AuditResult
    from robkd.auditing.verdict import rejudge

    loaded = AuditResult.load(Path(args.results))
    command = list(getattr(args, "_robkd_argv", None) or ["robkd"] + sys.argv[1:])
    result = rejudge(loaded.to_dict(), args.gates, loaded.tensors, on=args.gate_on,
                     enforce_default=args.enforce_default_verdict, command=command)
    data = result.to_dict()
    if args.write:
        from robkd.report.schema import validate_results
        from robkd.utils.io import atomic_write_json

        out = Path(args.write)
        if out.is_dir():
            out = out / "results.json"
        validate_results(data, "the judged results")
        atomic_write_json(out, data)
    if args.json:
        verdicts = {key: data.get(key) for key in ("gates", "gates_passed", "default_verdict", "exit_code")}
        sys.stdout.write(json.dumps({"results": str(args.results), "gate_on": data["config"].get("gate_on"), **verdicts},
                                    indent=2) + "\n")
    else:
        from rich.console import Console

        from robkd.auditing.render import closing_line, gate_table
        from robkd.report.escape import esc_text

        console = Console()
        table = gate_table(data)
        if table is not None:
            console.print(table)
        if args.write:
            console.print(f"wrote {esc_text(out, keep='')}", markup=False, highlight=False)
        console.print(closing_line(data), markup=False, highlight=False, soft_wrap=True)
    return result.exit_code
