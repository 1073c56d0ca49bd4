"""Entry point: ``python -m bench.run [--quick] [--only pgd,curve,...] [--threads N] --out reports/benchmarks.md``.

Runs the selected benchmark families in one process, then writes a markdown
report and a JSON file (same stem) with every ratio, target, equality check and
the raw timings.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

FAMILIES = ["pgd", "curve", "autoattack", "distill", "bounds", "memory", "cli", "cache", "certify"]

log = logging.getLogger("bench")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent.parent).stdout.rstrip()
    except Exception:
        return "unknown"


def environment(threads: int) -> dict:
    """Versions, threads, machine load and the git commit of this run."""
    import torch

    from bench import peers

    try:
        import robkd
        robkd_version = robkd.__version__
    except Exception:
        robkd_version = "unknown"
    dirty_bench = _git("status", "--porcelain", "--", "bench")
    dirty_robkd = _git("status", "--porcelain", "--untracked-files=no", "--", "robkd")
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty_bench": bool(dirty_bench and dirty_bench != "unknown"),
        "robkd_uncommitted": [ln[3:] for ln in dirty_robkd.splitlines()] if dirty_robkd != "unknown" else [],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "robkd": robkd_version,
        **peers.versions(),
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_before": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats (smoke run)")
    ap.add_argument("--only", default=",".join(FAMILIES), help=f"comma-separated families from {','.join(FAMILIES)}")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every measurement (default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per contender (default 5, quick 3)")
    ap.add_argument("--out", default="reports/benchmarks.md", help="markdown report path (JSON written beside it)")
    ap.add_argument("--from-json", default=None, metavar="JSON",
                    help="do not measure: re-render the markdown from a previous run's JSON (e.g. after editing "
                         "bench/FINDINGS.md)")
    ap.add_argument("--splice-into", default=None, metavar="JSON",
                    help="measure the --only families, then put their rows in place of that family's rows in a "
                         "previous run's JSON (recorded as environment.<family>_rerun) and render --out from it")
    ap.add_argument("--why", default="", help="with --splice-into: why the families were re-run (shown in the report)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("ROBKD_NO_PROGRESS", "1")
    os.environ.setdefault("ROBKD_NO_CACHE", "1")  # every audit computes its models (the cache family passes cache=DIR)

    if args.from_json:
        return _rerender(Path(args.from_json), Path(args.out))
    only = [f.strip() for f in args.only.split(",") if f.strip()]
    bad = [f for f in only if f not in FAMILIES]
    if bad:
        ap.error(f"unknown families {bad}; choose from {FAMILIES}")
    if args.threads < 1:
        ap.error("--threads must be >= 1")

    import torch

    from bench.common import Config, Row
    from bench.report import render

    torch.set_num_threads(args.threads)
    cfg = Config(quick=args.quick, threads=args.threads,
                 repeats=args.repeats or (3 if args.quick else 5), warmup=1)
    env = environment(args.threads)
    env["command"] = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    rows: list[Row] = []
    docs: dict[str, str] = {}
    durations: dict[str, float] = {}
    for fam in only:
        mod = importlib.import_module(f"bench.{fam}")
        docs[fam] = (mod.__doc__ or "").strip()
        log.info("running %s", fam)
        t0 = time.perf_counter()
        try:
            rows.extend(mod.run(cfg))
        except Exception as exc:  # keep the other families; the failure is reported, not hidden
            log.error("family %s failed: %s", fam, exc)
            rows.append(Row(fam, "-", "FAILED", None, check=f"{type(exc).__name__}: {exc}", check_ok=False,
                            note=traceback.format_exc(limit=3).replace("\n", " | ")))
        durations[fam] = time.perf_counter() - t0
        if torch.get_num_threads() != args.threads:  # some peers change it; keep it consistent
            torch.set_num_threads(args.threads)
    env["load_after"] = list(os.getloadavg())
    env["family_seconds"] = {k: round(v, 1) for k, v in durations.items()}
    if args.splice_into:
        return _splice(Path(args.splice_into), Path(args.out), env, rows, docs, args.why)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = render(env, rows, docs, _findings())
    js = json.dumps({"environment": env, "docs": docs, "rows": [r.to_dict() for r in rows]}, indent=1)
    from robkd.utils.io import atomic_write_text

    atomic_write_text(out, md)
    atomic_write_text(out.with_suffix(".json"), js)
    log.info("wrote %s and %s", out, out.with_suffix(".json"))
    failed = [r for r in rows if r.check_ok is False]
    return 1 if failed else 0


FINDINGS = Path(__file__).resolve().parent / "FINDINGS.md"


def _findings() -> str:
    """The hand-written analysis (bench/FINDINGS.md), appended under the targets table when present."""
    return FINDINGS.read_text(encoding="utf-8") if FINDINGS.exists() else ""


def _splice(src: Path, out: Path, env: dict, rows: list, docs: dict[str, str], why: str) -> int:
    """Replace the re-run families' rows (in place, same order as the new run) in the stored run ``src``;
    record each as ``environment.<family>_rerun``; write the JSON back and render ``out`` from it."""
    from bench.report import render
    from robkd.utils.io import atomic_write_text

    data = json.loads(src.read_text(encoding="utf-8"))
    fams = list(dict.fromkeys(r.family for r in rows))
    old = data["rows"]
    merged: list[dict] = []
    for r in old:
        if r["family"] in fams:
            if not any(m["family"] == r["family"] for m in merged if m.get("_new")):
                merged += [dict(n.to_dict(), _new=True) for n in rows if n.family == r["family"]]
            continue
        merged.append(r)
    merged += [n.to_dict() for n in rows if n.family not in {r["family"] for r in old}]
    data["rows"] = [{k: v for k, v in r.items() if k != "_new"} for r in merged]
    for fam in fams:
        data["environment"][f"{fam}_rerun"] = {
            "date": env["date"], "git_commit": env["git_commit"], "git_dirty_bench": env["git_dirty_bench"],
            "robkd_uncommitted": env["robkd_uncommitted"], "load_before": env["load_before"],
            "load_after": env["load_after"], "family_seconds": {fam: env["family_seconds"].get(fam)},
            "command": env["command"], "why": why}
        data.setdefault("docs", {})[fam] = docs.get(fam, "")
    from bench.common import Row

    atomic_write_text(src, json.dumps(data, indent=1))
    atomic_write_text(out, render(data["environment"], [Row(**r) for r in data["rows"]], data.get("docs", {}), _findings()))
    log.info("spliced %s into %s and rendered %s", ", ".join(fams), src, out)
    return 1 if any(r.check_ok is False for r in rows) else 0


def _rerender(src: Path, out: Path) -> int:
    """Render the markdown of a stored run (same numbers, current FINDINGS.md)."""
    from bench.common import Row
    from bench.report import render
    from robkd.utils.io import atomic_write_text

    data = json.loads(src.read_text(encoding="utf-8"))
    rows = [Row(**r) for r in data["rows"]]
    atomic_write_text(out, render(data["environment"], rows, data.get("docs", {}), _findings()))
    log.info("re-rendered %s from %s", out, src)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
