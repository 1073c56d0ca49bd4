"""``robkd env``: versions, threads, devices and data locations, ready to paste into a bug report."""

from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("env", help="print versions, threads, devices and data locations (for bug reports)",
                       description="Print versions, threads, devices and data locations found, for bug reports.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from robkd.utils.env import collect

    info = collect()
    if args.json:
        import sys

        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="robkd environment", show_header=False)
    for k, v in info.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                table.add_row(f"data: {kk}", str(vv) if vv else "not found")
        else:
            table.add_row(k, ", ".join(map(str, v)) if isinstance(v, list) else str(v))
    Console().print(table)
    return 0
