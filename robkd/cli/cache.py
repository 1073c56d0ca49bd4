"""``robkd cache``: where the audit result cache is, what it holds, and ``--clear`` to empty it."""

from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "cache", help="show or clear the audit result cache (finished model blocks reused by later audits)",
        description=("Show the audit result cache: its directory, entries and size. Each entry is one model's finished "
                     "block (same weights, samples and settings), taken and re-checked by a later robkd audit instead "
                     "of attacking the model again. Location: --dir, else $ROBKD_CACHE_DIR, else "
                     "~/.cache/robkd/audit; bounded by $ROBKD_CACHE_MAX_MB (default 4096) MiB."))
    p.add_argument("--dir", help="the cache directory (default: the one robkd audit uses)")
    p.add_argument("--clear", action="store_true", help="remove every entry")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import os
    import sys
    from pathlib import Path

    from robkd.auditing.cache import NO_CACHE_ENV, ResultCache, default_dir, max_bytes

    root = Path(args.dir).expanduser() if args.dir else default_dir()
    cache = ResultCache(root)
    removed = cache.clear() if args.clear else 0
    entries = cache.entries()
    info = {
        "dir": str(root),
        "entries": len(entries),
        "bytes": sum(e["bytes"] for e in entries),
        "max_bytes": max_bytes(),
        "disabled_by_env": os.environ.get(NO_CACHE_ENV, "").strip().lower() not in ("", "0", "false", "no"),
    }
    if args.clear:
        info["removed"] = removed
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return 0
    lines = [f"audit result cache: {info['dir']}",
             f"entries: {info['entries']} ({info['bytes'] / 2**20:.1f} MiB of at most {info['max_bytes'] / 2**20:.0f} MiB)"]
    if args.clear:
        lines.append(f"removed {removed} entr{'y' if removed == 1 else 'ies'}")
    if info["disabled_by_env"]:
        lines.append(f"{NO_CACHE_ENV} is set: robkd audit neither reads nor writes it unless given --cache DIR")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
