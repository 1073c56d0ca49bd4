"""``robkd report results.json --format md,html --out DIR``: re-render reports from a results file.

No model and no torch are needed: the report is rendered from the JSON alone.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``report`` command."""
    p = sub.add_parser(
        "report",
        help="re-render report.md / report.html from a results.json (no model needed)",
        description="Re-render the Markdown and self-contained HTML reports from a results.json written by "
        "'robkd audit' or 'robkd repair'. No model or GPU is needed.",
    )
    p.add_argument("results", help="path to results.json")
    p.add_argument("--format", default="md,html", help="comma-separated formats: md, html (default: md,html)")
    p.add_argument("--out", help="output directory (default: the directory of results.json)")
    p.set_defaults(func=run)


def parse_formats(text: str) -> tuple[str, ...]:
    """``'md,html'`` -> ('md', 'html'); raises UsageError on an unknown or empty format list."""
    from robkd.errors import UsageError
    from robkd.report import FORMATS
    from robkd.utils.validate import split_list

    fmts = [f.lower() for f in split_list(str(text), "--format", allow_empty=True)]
    if not fmts:
        raise UsageError("empty --format: use md, html or md,html")
    bad = [f for f in fmts if f not in FORMATS]
    if bad:
        raise UsageError(f"unknown --format {', '.join(bad)}: use {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(fmts))


def run(args: argparse.Namespace) -> int:
    """Check the output directory, load and validate the results file, render; prints the written paths
    on stdout. Bad input (formats, output directory, results file) is refused before anything is written."""
    import sys

    from robkd.report import load_results, render, with_training_log
    from robkd.report.escape import esc_text
    from robkd.utils.outdir import check_out_dir

    formats = parse_formats(args.format)
    path = Path(args.results)
    src_dir = path if path.is_dir() else path.resolve().parent
    out_dir = check_out_dir(Path(args.out) if args.out else src_dir)
    result = load_results(path)
    if out_dir.resolve() != src_dir.resolve():
        # render() shows a training_log.json of the directory it writes to; one beside the source must
        # travel with the results. In place, the results file is left exactly as it is.
        result = with_training_log(result, src_dir)
    from robkd.report.schema import SAMPLES_FILE

    written = render(result, out_dir, formats=formats, samples=src_dir / SAMPLES_FILE)
    for p in written:
        sys.stdout.write(f"{esc_text(p, keep='')}\n")
    log.info("report written to %s", esc_text(out_dir, keep=""))
    return 0
